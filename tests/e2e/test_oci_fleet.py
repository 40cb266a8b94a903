"""A fleet of three `authz serve` follows one tag in a real OCI registry (docker-registry).

Bundles are signed and pushed with `authz build --push`; every instance polls the tag with
--verification-key and --persist. An unchanged tag downloads nothing (counted in the
registry's access log); a new digest reaches all three within the maximum poll delay plus
one second; a tampered layer and a bundle signed with another key are rejected while the
good revision keeps serving; and a registry that requires auth works with a credentials
file whose secret never shows in logs, status or command lines.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.registry import Registry, write_credentials

from authz.bundle import archive, oci, signing

from .harness import REPO_ROOT, AuthzProcess
from .test_fleet import bundle_files, grpc_probe, http_get, status, wait_for

POLL_MIN, POLL_MAX = 0.5, 1.5
REPOSITORY = "mesh/authz-bundle"


def push(ref: str, revision: str, allow_probe: bool, key: Ed25519PrivateKey,
         credentials: Path | None = None) -> str:
    layer = archive.build_archive(bundle_files(revision, allow_probe), "fleet", revision, key)
    return oci.push(ref, layer, "fleet", revision, credentials=credentials)


def readyz(proc: AuthzProcess) -> tuple[int | None, str]:
    try:
        return http_get(proc, "/readyz")
    except OSError:  # not listening yet
        return None, ""


def digest_of(proc: AuthzProcess) -> str:
    return str(status(proc)["served_from"]).rsplit("@", 1)[-1]


def downloads(reg: Registry) -> list[str]:
    """GETs of manifests and blobs: what a poll that finds the same digest must not make."""
    return [p for m, p, _ in reg.access_log() if m == "GET" and ("/blobs/" in p or "/manifests/" in p)]


def test_fleet_follows_a_tag_in_a_real_registry(tmp_path: Path, registry: Registry) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "verify.pem"
    pub.write_bytes(signing.public_pem(key))
    ref = registry.reference(REPOSITORY, "prod")
    d1 = push(ref, "o1", allow_probe=False, key=key)
    flags = ["--poll-min", str(POLL_MIN), "--poll-max", str(POLL_MAX), "--poll-backoff-max", "2",
             "--poll-timeout", "5", "--verification-key", str(pub)]
    fleet = [
        AuthzProcess(ref, tmp_path / f"authz-{i}",  # type: ignore[arg-type]
                     extra_args=[*flags, "--persist", str(tmp_path / f"state-{i}"),
                                 "--audit-log", str(tmp_path / f"audit-{i}.log")])
        for i in range(3)
    ]
    started: list[AuthzProcess] = []
    try:
        for proc in fleet:
            started.append(proc.start())
        for proc in fleet:
            assert (status(proc)["revision"], digest_of(proc)) == ("o1", d1)
            assert grpc_probe(proc).status.code == 7  # o1 denies the probe
        # One manifest and one layer download per instance, then only HEADs while unchanged.
        assert len(downloads(registry)) == 6, downloads(registry)
        heads_before = sum(1 for m, p, _ in registry.access_log() if m == "HEAD")
        assert wait_for(
            lambda: sum(1 for m, p, _ in registry.access_log() if m == "HEAD") >= heads_before + 6,
            POLL_MAX * 4 + 2,
        )
        assert len(downloads(registry)) == 6, downloads(registry)
        for proc in fleet:
            assert status(proc)["last_result"] == "unchanged"

        # The tag moves: every instance serves the new digest within its poll delay.
        d2 = push(ref, "o2", allow_probe=True, key=key)
        published = time.monotonic()
        arrived: dict[int, float] = {}

        def all_arrived() -> bool:
            for i, proc in enumerate(fleet):
                if i not in arrived and digest_of(proc) == d2:
                    arrived[i] = time.monotonic() - published
            return len(arrived) == len(fleet)

        assert wait_for(all_arrived, POLL_MAX + 1.0 + 3.0), f"arrived: {arrived}"
        assert max(arrived.values()) <= POLL_MAX + 1.0, f"seconds to arrive per process: {arrived}"
        for proc in fleet:
            assert status(proc)["revision"] == "o2"
            assert grpc_probe(proc).status.code == 0  # o2 allows it

        # A tampered layer: the registry serves bytes that do not match the manifest.
        layer = archive.build_archive(bundle_files("o3", True), "fleet", "o3", key)
        tampered = registry.push_tampered(REPOSITORY, "prod", layer, "fleet", "o3")
        assert wait_for(
            lambda: all(tampered in (status(p)["last_error"] or "") for p in fleet), POLL_MAX + 4
        ), [status(p)["last_error"] for p in fleet]
        for proc in fleet:
            st = status(proc)
            assert (st["revision"], digest_of(proc)) == ("o2", d2), st
            assert "digest mismatch" in st["last_error"] and tampered in st["last_error"]
            assert grpc_probe(proc).status.code == 0

        # A well-formed artifact signed with another key: the gate refuses the signature.
        other = Ed25519PrivateKey.generate()
        d4 = push(ref, "o4", allow_probe=False, key=other)
        assert wait_for(
            lambda: all("signature" in (status(p)["last_error"] or "") for p in fleet), POLL_MAX + 4
        ), [status(p)["last_error"] for p in fleet]
        for proc in fleet:
            assert (status(proc)["revision"], digest_of(proc)) == ("o2", d2)
            assert grpc_probe(proc).status.code == 0
        # Rejected digests are not downloaded again at every poll.
        count = len(downloads(registry))
        time.sleep(POLL_MAX * 2)
        assert len(downloads(registry)) == count
        assert d4 not in "".join(str(status(p)["served_from"]) for p in fleet)

        # The registry goes away; a restart serves the persisted copy and says so.
        registry.close()
        restarted = fleet[0]
        restarted.stop()
        again = AuthzProcess(restarted.bundle, tmp_path / "authz-0-again",
                             extra_args=restarted.extra_args)
        started.append(again.start())
        st = status(again)
        assert st["revision"] == "o2" and st["serving_persisted"] is True, st
        assert "unreachable" in st["persisted_reason"]
        assert http_get(again, "/readyz")[0] == 200
        assert grpc_probe(again).status.code == 0
    finally:
        for proc in started:
            proc.stop()


def test_serve_from_a_registry_that_requires_auth(tmp_path: Path) -> None:
    user, password = "fleet-puller", "Pa55-not-in-logs"
    reg = Registry(tmp_path / "registry", htpasswd={user: password})
    key = Ed25519PrivateKey.generate()
    creds = write_credentials(tmp_path / "docker-config.json", reg.host, user, password)
    ref = reg.reference(REPOSITORY, "prod")
    started: list[AuthzProcess] = []
    try:
        digest = push(ref, "a1", allow_probe=True, key=key, credentials=creds)
        proc = AuthzProcess(ref, tmp_path / "authz",  # type: ignore[arg-type]
                            extra_args=["--registry-credentials", str(creds), "--poll-min", "0.3",
                                        "--poll-max", "0.6", "--log-level", "DEBUG"])
        started.append(proc.start())
        st = status(proc)
        assert (st["revision"], digest_of(proc), st["source"]) == ("a1", digest, ref), st
        assert grpc_probe(proc).status.code == 0
        assert wait_for(lambda: status(proc)["last_result"] == "unchanged", 5)

        # Without the credentials file: not ready, and the reason says what is missing.
        anon = AuthzProcess(ref, tmp_path / "authz-anon",  # type: ignore[arg-type]
                            extra_args=["--poll-min", "0.3", "--poll-max", "0.6"])
        anon.workdir.mkdir(parents=True)
        with open(anon.stdout_path, "wb") as out, open(anon.stderr_path, "wb") as err:
            anon.proc = subprocess.Popen(anon.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        started.append(anon)
        # /readyz answers before the first pull has failed ("no bundle loaded yet"): wait for the
        # failure itself, and check it never reads as ready on the way (None: not listening yet).
        seen: list[tuple[int | None, str]] = []
        assert wait_for(lambda: seen.append(readyz(anon)) or "requires authentication" in seen[-1][1],
                        30, step=0.2), (seen[-1:], anon.stderr_path.read_text())
        assert seen[-1][0] == 503 and {code for code, _ in seen} <= {None, 503}, seen

        cmdlines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in cmdlines
    finally:
        for p in started:
            p.stop()
        reg.close()
    logs = "".join(p.stderr_path.read_text() + p.stdout_path.read_text() for p in started)
    assert "requires authentication" in logs
    assert password not in logs and "Basic " not in logs
