"""Hot reload under load, through a real Envoy with mTLS.

1. Steady traffic (4 client threads, ~80 requests/s) asks GET /v1/probe as checkout-api
   while the bundle, a ConfigMap-style directory, switches every second for 22 seconds
   between revisions that allow and deny it. Every response must come from authz (a
   decision id that the audit log knows), be the answer of the revision that decided it,
   and the revisions a client sees must never go backwards; each switch must be seen within
   2 seconds; there must be no error at all.
2. Bad candidates pushed to a bundle server (invalid YAML, a CEL error, unknown tenant
   data, unknown data, a failing bundle test, a truncated archive, a digest mismatch, an
   unsigned bundle, one over the size limit) are each rejected and counted while every
   check keeps succeeding on the last good revision.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.bundle_sources import BundleServer, ConfigMapDir

from authz.bundle import archive, signing

from .harness import (
    LOCALHOST,
    ORDERS,
    AuthzProcess,
    EchoUpstream,
    EnvoyProcess,
    ListenerSpec,
    client_context,
)
from support.pki import PKI
from .test_fleet import PROBE_PATH, bundle_files, http_get, status, wait_for

SWITCHES = 22
SWITCH_EVERY = 1.0
VISIBLE_WITHIN = 2.0
CLIENTS = 4
RATE_PER_CLIENT = 20.0  # requests per second per client thread


@dataclass
class Result:
    client: int
    started: float
    ended: float
    status: int | None
    decision_id: str | None
    error: str | None = None


class Traffic:
    """Client threads on keep-alive mTLS connections, each paced to RATE_PER_CLIENT."""

    def __init__(self, pki: PKI, port: int) -> None:
        self.ctx = client_context(pki.ca_cert, pki.clients["checkout-api"])
        self.port = port
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def _run(self, client: int) -> None:
        conn: http.client.HTTPSConnection | None = None
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += 1.0 / RATE_PER_CLIENT
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(
                        LOCALHOST, self.port, context=self.ctx, timeout=5
                    )
                conn.request("GET", PROBE_PATH, headers={"x-test-marker": f"load-{client}"})
                resp = conn.getresponse()
                body = resp.read()
                result = Result(
                    client, started, time.monotonic(), resp.status, _decision_id(resp.status, body)
                )
            except (OSError, http.client.HTTPException) as exc:
                result = Result(client, started, time.monotonic(), None, None, repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.results.append(result)
            time.sleep(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def count(self) -> int:
        with self._lock:
            return len(self.results)


def _decision_id(status: int, body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if status == 200:  # the echo upstream: the x-authz-decision-id header authz added
        return doc.get("headers", {}).get("x-authz-decision-id")
    return doc.get("decision_id") if isinstance(doc, dict) else None


def audit_revisions(path: Path) -> dict[str, tuple[str, bool]]:
    """decision id -> (revision, allowed) from the authz audit log."""
    out: dict[str, tuple[str, bool]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            out[rec["decision_id"]] = (rec["revision"], rec["allowed"])
    return out


@pytest.fixture
def stack(tmp_path: Path, pki: PKI, upstream: EchoUpstream) -> Iterator[Any]:
    procs: list[Any] = []

    def start(bundle: str | Path, *extra: str) -> tuple[AuthzProcess, EnvoyProcess, Path]:
        audit = tmp_path / f"audit-{len(procs)}.log"
        authz = AuthzProcess(
            bundle,
            tmp_path / f"authz-{len(procs)}",  # type: ignore[arg-type]
            extra_args=["--audit-log", str(audit), *extra],
        )
        procs.append(authz)
        authz.start()
        envoy = EnvoyProcess(
            tmp_path / f"envoy-{len(procs)}",
            pki,
            [ListenerSpec(ORDERS, pki.servers["orders-api"])],
            authz_grpc_port=authz.grpc_port,
            upstream_port=upstream.port,
        )
        procs.append(envoy)
        envoy.start()
        return authz, envoy, audit

    try:
        yield start
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_bundle_switches_every_second_under_load_without_a_single_error(
    tmp_path: Path, stack: Any
) -> None:
    cm = ConfigMapDir(tmp_path / "configmap")
    revisions = [f"{i:03d}-{'allow' if i % 2 == 0 else 'deny'}" for i in range(SWITCHES + 1)]
    cm.publish(bundle_files(revisions[0], allow_probe=True))
    authz, envoy, audit = stack(cm.root, "--watch-interval", "0.1")
    assert status(authz)["revision"] == revisions[0]

    switched_at: dict[str, float] = {}
    with Traffic(envoy.pki, envoy.port(ORDERS)) as traffic:
        assert wait_for(lambda: traffic.count() >= 20, 5)
        switched_at[revisions[0]] = time.monotonic()
        for i, revision in enumerate(revisions[1:], start=1):
            time.sleep(max(0.0, switched_at[revisions[0]] + i * SWITCH_EVERY - time.monotonic()))
            cm.publish(bundle_files(revision, allow_probe=revision.endswith("allow")))
            switched_at[revision] = time.monotonic()
        time.sleep(VISIBLE_WITHIN + 0.5)
    duration = time.monotonic() - switched_at[revisions[0]]
    results = sorted(traffic.results, key=lambda r: r.started)

    errors = [
        r for r in results if r.error is not None or r.status not in (200, 403) or not r.decision_id
    ]
    assert not errors, f"{len(errors)} errors, e.g. {errors[:3]}"

    # Every response was decided by authz, by one of the two kinds of revision, consistently.
    assert wait_for(lambda: len(audit_revisions(audit)) >= len(results), 10)
    decided = audit_revisions(audit)
    index = {rev: i for i, rev in enumerate(revisions)}
    for r in results:
        assert r.decision_id in decided, f"decision {r.decision_id} is not in the audit log"
        revision, allowed = decided[r.decision_id]
        assert revision in index, revision
        assert allowed == revision.endswith("allow") == (r.status == 200), (r, revision)

    # A client never sees an older revision after a newer one.
    for client in range(CLIENTS):
        seen = [index[decided[r.decision_id][0]] for r in results if r.client == client]  # type: ignore[index]
        assert seen == sorted(seen), f"client {client} went back to an older revision"

    # Each switch is visible within 2 seconds.
    first_seen: dict[str, float] = {}
    for r in results:
        first_seen.setdefault(decided[r.decision_id][0], r.ended)  # type: ignore[index]
    lag = {rev: first_seen[rev] - switched_at[rev] for rev in revisions[1:] if rev in first_seen}
    missing = [rev for rev in revisions[1:] if rev not in first_seen]
    assert not missing, f"revisions never seen: {missing}"
    assert max(lag.values()) <= VISIBLE_WITHIN, f"switch lag per revision: {lag}"

    rate = len(results) / duration
    assert duration >= 20 and rate >= 50, (duration, rate)
    allowed = sum(1 for r in results if r.status == 200)
    print(
        f"\n{len(results)} requests in {duration:.1f}s ({rate:.0f}/s), {allowed} allowed, "
        f"{len(results) - allowed} denied, {SWITCHES} switches, 0 errors, "
        f"switch lag max {max(lag.values()):.2f}s mean {sum(lag.values()) / len(lag):.2f}s"
    )
    assert status(authz)["revision"] == revisions[-1]
    assert authz.running


# --- rejected candidates through a bundle server -------------------------------------------


def _archive(files: dict[str, bytes], revision: str, key: Ed25519PrivateKey | None) -> bytes:
    return archive.build_archive(files, "fleet", revision, key)


def _digest_mismatch(key: Ed25519PrivateKey) -> bytes:
    snap = archive.unpack(_archive(bundle_files("bad-digest", True), "bad-digest", key), "x")
    files = dict(snap.files)
    files["policies/orders-api.yaml"] = files["policies/orders-api.yaml"].replace(b"GET", b"PUT")
    return archive.pack(files)


def _failing_test_files() -> dict[str, bytes]:
    test = {
        "apiVersion": "authz/v1",
        "kind": "BundleTest",
        "name": "probe",
        "cases": [
            {
                "name": "probe-denied",
                "request": {
                    "principal": "spiffe://cluster.local/ns/prod/sa/checkout-api",
                    "destination": "spiffe://cluster.local/ns/prod/sa/orders-api",
                    "method": "GET",
                    "path": PROBE_PATH,
                },
                "expect": {"allowed": False},
            }
        ],
    }
    return bundle_files("bad-test", True, extra_files={"tests/probe.yaml": yaml.safe_dump(test)})


def bad_candidates(key: Ed25519PrivateKey) -> list[tuple[str, bytes, str]]:
    """(name, archive bytes, pattern the rejection must show)."""

    def signed(files: dict[str, bytes], revision: str) -> bytes:
        return _archive(files, revision, key)

    yaml_broken = bundle_files("bad-yaml", True)
    yaml_broken["policies/orders-api.yaml"] = b"apiVersion: authz/v1\nkind: Policy\nrules: [\n"
    big = bundle_files(
        "bad-size",
        True,
        extra_files={"data/blob.json": json.dumps([os.urandom(32).hex() for _ in range(6000)])},
    )
    good = signed(bundle_files("bad-trunc", True), "bad-trunc")
    return [
        (
            "invalid YAML",
            signed(yaml_broken, "bad-yaml"),
            r"policies/orders-api\.yaml:\d+:\d+: error",
        ),
        (
            "CEL compile error",
            signed(
                bundle_files("bad-cel", True, rule_extra={"when": ["request.path =="]}), "bad-cel"
            ),
            r"policies/orders-api\.yaml:\d+:\d+: error: .*",
        ),
        (
            "unknown tenant data",
            signed(
                bundle_files("bad-tenant", True, policy_extra={"tenant": {"header": "x-t"}}),
                "bad-tenant",
            ),
            r"orders-api\.yaml:\d+:\d+: error: policy reads a tenant",
        ),
        (
            "unknown data",
            signed(
                bundle_files("bad-data", True, rule_extra={"when": ["'a' in data.nope"]}),
                "bad-data",
            ),
            r"orders-api\.yaml:\d+:\d+: error: condition reads data\.nope",
        ),
        (
            "failing bundle test",
            signed(_failing_test_files(), "bad-test"),
            r"tests/probe\.yaml:\d+:\d+: error: bundle test 'probe/probe-denied' failed",
        ),
        (
            "truncated archive",
            good[: len(good) // 2],
            r"bundle\.tar\.gz:1:1: error: archive is truncated",
        ),
        (
            "digest mismatch",
            _digest_mismatch(key),
            r"policies/orders-api\.yaml:1:1: error: digest mismatch",
        ),
        (
            "unsigned bundle",
            _archive(bundle_files("bad-unsigned", True), "bad-unsigned", None),
            r"MANIFEST\.sig:1:1: error: bundle is not signed",
        ),
        ("over the size limit", signed(big, "bad-size"), r"size limit of 200000"),
    ]


def rejected_total(authz: AuthzProcess) -> float:
    text = http_get(authz, "/metrics")[1]
    m = re.search(r'^authz_bundle_loads_total\{result="rejected"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_bad_candidates_are_rejected_without_a_single_failed_check(
    tmp_path: Path, stack: Any
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "verify.pem"
    pub.write_bytes(signing.public_pem(key))
    server = BundleServer()
    try:
        server.publish(_archive(bundle_files("good", True), "good", key), "good")
        authz, envoy, audit = stack(
            server.url,
            "--verification-key",
            str(pub),
            "--bundle-max-bytes",
            "200000",
            "--poll-min",
            "0.1",
            "--poll-max",
            "0.2",
        )
        assert status(authz)["revision"] == "good"
        candidates = bad_candidates(key)
        with Traffic(envoy.pki, envoy.port(ORDERS)) as traffic:
            assert wait_for(lambda: traffic.count() >= 20, 5)
            for n, (name, body, pattern) in enumerate(candidates, start=1):
                server.publish(body, f"bad-{n}")
                assert wait_for(lambda n=n: rejected_total(authz) >= n, 5), (
                    f"{name} was not rejected"
                )
                st = status(authz)
                # The poller may already have asked again (a 304: "unchanged") by now.
                assert st["revision"] == "good" and st["last_result"] in ("rejected", "unchanged"), (name, st)
                assert re.search(pattern, st["last_error"]), (name, st["last_error"])
                before = traffic.count()
                assert wait_for(lambda b=before: traffic.count() >= b + 10, 5)
        results = traffic.results
        failed = [r for r in results if r.status != 200 or r.error]
        assert not failed, f"{len(failed)} failed checks, e.g. {failed[:3]}"
        assert wait_for(lambda: len(audit_revisions(audit)) >= len(results), 10)
        decided = audit_revisions(audit)
        assert {decided[r.decision_id][0] for r in results} == {"good"}  # type: ignore[index]
        assert rejected_total(authz) == len(candidates)
        print(
            f"\n{len(candidates)} candidates rejected, {len(results)} checks, all allowed by 'good'"
        )
    finally:
        server.close()
