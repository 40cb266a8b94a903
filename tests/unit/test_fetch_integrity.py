"""Fetch integrity: redirects never downgrade or leave the host, signed bundles never roll back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_factory import write_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.auth_server import AuthServer
from support.pki import PKI, generate_pki
from support.tls_serve import Serve, wait_for
from test_sources import bundle_bytes

from authz.bundle import archive, signing
from authz.bundle.archive import Snapshot
from authz.bundle.runtime import open_source
from authz.bundle.sources import PollPolicy, SourceUnavailable, read_directory
from authz.bundle.store import LOADED, REJECTED, UNCHANGED, BundleStore
from authz.metrics import Metrics
from authz.tls import ClientTls

ALLOW_ALL = {"name": "everyone", "action": "ALLOW", "rules": [{"name": "all"}]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def servers(pki: PKI) -> Iterator[dict[str, AuthServer]]:
    tls = (pki.servers["orders-api"].cert, pki.servers["orders-api"].key)
    made = {"https": AuthServer(tls=tls), "http": AuthServer(), "other": AuthServer()}
    try:
        yield made
    finally:
        for s in made.values():
            s.close()


def permissive_bundle(tmp_path: Path) -> bytes:
    """What an attacker would like served: an unsigned bundle allowing everything."""
    root = write_bundle(tmp_path / "evil", [ALLOW_ALL], revision="evil")
    return archive.build_archive(read_directory(root).files, "t", "evil")


def source(url: str, pki: PKI, allow_redirects: bool):  # type: ignore[no-untyped-def]
    return open_source(url, policy=PollPolicy(timeout=5), tls=ClientTls(pki.ca_cert),
                       allow_redirects=allow_redirects)


@pytest.mark.parametrize("allow_redirects", [False, True])
def test_https_redirect_to_http_is_refused(
    servers: dict[str, AuthServer], pki: PKI, tmp_path: Path, allow_redirects: bool
) -> None:
    secure, plain = servers["https"], servers["http"]
    plain.body = permissive_bundle(tmp_path)
    secure.redirects["/bundle.tar.gz"] = plain.url()
    with pytest.raises(SourceUnavailable) as err:
        source(secure.url(), pki, allow_redirects).fetch()
    message = str(err.value)
    if allow_redirects:
        assert "never changes the scheme (https to http)" in message
    else:
        assert "redirects are not followed without --allow-redirects" in message
    assert plain.requests() == []  # the downgraded URL was never even asked


def test_redirect_to_another_host_or_port_is_refused(
    servers: dict[str, AuthServer], tmp_path: Path, pki: PKI
) -> None:
    first, other = servers["http"], servers["other"]
    other.body = permissive_bundle(tmp_path)
    for target in (other.url(), first.url(host="localhost"), other.url(host="localhost")):
        first.redirects["/bundle.tar.gz"] = target
        with pytest.raises(SourceUnavailable, match="a redirect never leaves the host"):
            source(first.url(), pki, allow_redirects=True).fetch()
    assert other.requests() == []


def test_same_origin_redirect_is_followed_only_when_allowed(
    servers: dict[str, AuthServer], tmp_path: Path, pki: PKI
) -> None:
    server = servers["https"]
    server.body = archive.build_archive(bundle_bytes(tmp_path, "moved"), "t", "moved")
    server.redirects["/old.tar.gz"] = "/bundle.tar.gz"
    with pytest.raises(SourceUnavailable, match="not followed"):
        source(server.url("/old.tar.gz"), pki, allow_redirects=False).fetch()
    snap = source(server.url("/old.tar.gz"), pki, allow_redirects=True).fetch()
    assert snap is not None and b"moved" in b"".join(snap.files.values())


# --- rollback --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(tmp_path: Path, key: Ed25519PrivateKey, revision: str, serial: int | None) -> bytes:
    return archive.build_archive(bundle_bytes(tmp_path, revision), "t", revision, key, serial)


def test_store_refuses_a_signed_bundle_older_than_the_serving_one(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    store = BundleStore(Metrics(), verification_key=key.public_key())
    load = lambda rev, serial: store.load_snapshot(
        archive.unpack(signed(tmp_path, key, rev, serial), f"{rev}.tar.gz"))
    assert load("r20", 20) == LOADED
    assert load("r10", 10) == REJECTED
    assert store.current is not None and store.current.revision == "r20"
    error = store.status().last_error or ""
    assert "rollback refused" in error and "serial 10" in error and "serial 20" in error
    assert "--allow-rollback" in error
    assert load("r-none", None) == REJECTED  # no serial cannot prove it is not older
    # Equal is not newer: two builds sharing a serial would replace each other back and forth.
    assert load("r20b", 20) == REJECTED
    assert "no newer than the serving bundle (revision r20) with serial 20" in (store.status().last_error or "")
    assert load("r20", 20) == UNCHANGED  # the very bundle that serves
    assert load("r30", 30) == LOADED
    store.allow_rollback = True
    assert load("r10", 10) == LOADED
    assert store.current is not None and store.current.revision == "r10"


def test_a_signed_bundle_of_another_name_does_not_replace_the_serving_one(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """Every bundle CI signs with the key verifies: staging's (defaultAction ALLOW), built
    later, replaced production's with no more than an INFO line."""
    store = BundleStore(Metrics(), verification_key=key.public_key())

    def build(name: str, revision: str, serial: int) -> Snapshot:
        root = write_bundle(tmp_path / f"{name}-{revision}", [ALLOW_ALL], name=name, revision=revision)
        return archive.unpack(archive.build_archive(read_directory(root).files, name, revision, key, serial),
                              f"{name}.tar.gz")

    assert store.load_snapshot(build("prod", "p200", 200)) == LOADED
    assert store.load_snapshot(build("staging", "s300", 300)) == REJECTED
    assert store.current is not None and (store.current.name, store.current.revision) == ("prod", "p200")
    assert "bundle 'staging' is not the serving bundle 'prod'" in (store.status().last_error or "")
    assert store.load_snapshot(build("prod", "p300", 300)) == LOADED
    store.allow_rollback = True
    assert store.load_snapshot(build("staging", "s400", 400)) == LOADED
    # After a restart the persisted bundle's name stands for the serving one's: staging,
    # rejected while prod served, loaded first thing after the restart and replaced it.
    saved = tmp_path / "persist"
    first = BundleStore(Metrics(), verification_key=key.public_key(), persist_dir=saved)
    assert first.load_snapshot(build("prod", "p500", 500)) == LOADED
    restarted = BundleStore(Metrics(), verification_key=key.public_key(), persist_dir=saved)
    assert restarted.load_snapshot(build("staging", "s600", 600)) == REJECTED
    assert "bundle 'staging' is not the persisted bundle 'prod'" in (restarted.status().last_error or "")
    assert restarted.load_snapshot(build("prod", "p600", 600)) == LOADED


def test_serial_must_be_a_whole_number(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    files = dict(bundle_bytes(tmp_path, "bad"))
    manifest = json.loads(archive.make_manifest(files, "t", "bad"))
    manifest["serial"] = "tomorrow"
    data = json.dumps(manifest).encode()
    files.update({archive.MANIFEST_JSON: data, archive.MANIFEST_SIG: signing.sign(data, key)})
    store = BundleStore(Metrics(), verification_key=key.public_key())
    assert store.load_snapshot(Snapshot(files, "bad")) == REJECTED
    assert "serial must be a whole number" in (store.status().last_error or "")


def test_rollback_against_the_persisted_bundle_refused_then_allowed(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """A restart fed an older signed bundle keeps the newer persisted one, unless
    --allow-rollback; through `authz serve`, as operators run it."""
    key_file = tmp_path / "verify.pem"
    key_file.write_bytes(signing.public_pem(key))
    persist = tmp_path / "persist"
    server = AuthServer()
    try:
        common = ["--bundle", server.url(), "--verification-key", str(key_file),
                  "--persist", str(persist), "--poll-min", "0.2", "--poll-max", "0.3",
                  "--audit-log", str(tmp_path / "audit.log")]

        def revision(serve: Serve) -> str | None:
            status, body = serve.get("/v1/status")
            return json.loads(body).get("revision") if status == 200 else None

        server.body = signed(tmp_path, key, "new", 2000)
        first = Serve(tmp_path / "one", *common)
        try:
            assert wait_for(lambda: revision(first) == "new"), first.stderr()
            # While running: the older bundle appears on the server and is refused.
            server.body = signed(tmp_path, key, "old", 1000)
            assert wait_for(lambda: "rollback refused" in first.get("/v1/status")[1]), first.stderr()
            assert revision(first) == "new"
        finally:
            first.stop()
        second = Serve(tmp_path / "two", *common)
        try:
            assert wait_for(lambda: revision(second) == "new"), second.stderr()
            doc = json.loads(second.get("/v1/status")[1])
            assert doc["serving_persisted"] is True
            assert "rollback refused" in doc["last_error"]
            # The first load, before anything served, was judged against the persisted copy
            # (later polls against the serving bundle, which is that copy).
            assert "older than the persisted bundle (revision new)" in second.stderr()
        finally:
            second.stop()
        third = Serve(tmp_path / "three", *common, "--allow-rollback")
        try:
            assert wait_for(lambda: revision(third) == "old"), third.stderr()
            assert "accepted as a rollback (--allow-rollback)" in third.stderr()
        finally:
            third.stop()
    finally:
        server.close()


def test_authz_build_writes_a_growing_serial(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = write_bundle(tmp_path / "b", [ALLOW_ALL], revision="b1")
    out = tmp_path / "b.tar.gz"
    for args, expect in (([], None), (["--serial", "42"], 42)):
        proc = subprocess.run([sys.executable, "-m", "authz", "build", str(root), "-o", str(out), *args],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"})
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads(archive.unpack(out.read_bytes(), "b").files[archive.MANIFEST_JSON])
        assert manifest["serial"] == (expect if expect is not None else 1700000000)
