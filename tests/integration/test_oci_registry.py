"""OCI bundles against a real registry (Debian's docker-registry, started here on 127.0.0.1).

Push with `authz build --push`, pull with the OciSource `authz serve` uses: what arrives is
what was built, an unchanged digest downloads nothing, a tampered or oversized layer and a
non-bundle artifact are rejected, and registries that require auth (htpasswd basic auth;
the Docker token flow over TLS) work with a credentials file and refuse without one.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from support.pki import generate_pki, spiffe_id
from support.registry import Registry, TokenServer, write_credentials

from authz.bundle import archive, oci
from authz.bundle.loader import BundleError
from authz.bundle.runtime import open_source
from authz.bundle.sources import PollPolicy, SourceUnavailable
from authz.bundle.store import LOADED, REJECTED, UNCHANGED, BundleStore
from authz.cli import main
from authz.metrics import Metrics
from authz.tls import client_context

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"
POLICY = PollPolicy(min_delay=0.1, max_delay=0.2, backoff_max=1, timeout=10)


def build_push(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["build", str(EXAMPLE), *args])
    return code, out.getvalue(), err.getvalue()


def example_files() -> dict[str, bytes]:
    return {
        p.relative_to(EXAMPLE).as_posix(): p.read_bytes()
        for p in sorted(EXAMPLE.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(EXAMPLE).parts)
    }


def blob_gets(reg: Registry) -> list[str]:
    return [p for m, p, s in reg.access_log() if m == "GET" and "/blobs/" in p]


def manifest_gets(reg: Registry) -> list[str]:
    return [p for m, p, s in reg.access_log() if m == "GET" and "/manifests/" in p]


def test_push_then_pull_gives_the_built_bundle_and_an_unchanged_tag_downloads_nothing(
    registry: Registry,
) -> None:
    ref = registry.reference("authz/example", "prod")
    code, out, err = build_push("--push", ref)
    assert code == 0, err
    assert "manifest sha256:" in out
    digest = out.rsplit("manifest ", 1)[1].strip()

    source = open_source(ref, policy=POLICY)
    assert isinstance(source, oci.OciSource)
    snap = source.fetch()
    assert snap is not None
    assert snap.origin == f"oci://{registry.host}/authz/example@{digest}"
    files = {k: v for k, v in snap.files.items() if k not in archive.META_FILES}
    assert files == example_files()
    assert archive.verify(snap, None) is not None  # MANIFEST.json travels inside the layer

    # The artifact as stored: our artifactType, one layer of our media type, the empty config.
    manifest = json.loads(registry.blob_path(digest).read_bytes())
    assert manifest["artifactType"] == oci.ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == oci.EMPTY_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [oci.LAYER_MEDIA_TYPE]

    assert len(blob_gets(registry)) == 1 and len(manifest_gets(registry)) == 1
    before = len(registry.access_log())
    for _ in range(5):
        assert source.fetch() is None
    after = registry.access_log()[before:]
    assert [(m, p) for m, p, _ in after] == [("HEAD", "/v2/authz/example/manifests/prod")] * 5
    assert len(blob_gets(registry)) == 1

    # SIGHUP (force) downloads again even though the digest is the same.
    assert source.fetch(force=True) is not None
    assert len(blob_gets(registry)) == 2


def test_store_follows_the_tag_and_pinned_digests_never_poll(registry: Registry, tmp_path: Path) -> None:
    ref = registry.reference("authz/example", "prod")
    assert build_push("--push", ref)[0] == 0
    store = BundleStore(Metrics(), persist_dir=tmp_path / "persist")
    source = open_source(ref, policy=POLICY)
    assert store.fetch_and_load(source) == LOADED
    assert store.fetch_and_load(source) == UNCHANGED
    digest = store.status().served_from.rsplit("@", 1)[1]  # type: ignore[union-attr]
    assert (tmp_path / "persist" / "bundle.tar.gz").read_bytes() == registry.blob_path(
        json.loads(registry.blob_path(digest).read_bytes())["layers"][0]["digest"]
    ).read_bytes()

    pinned = open_source(f"oci://{registry.host}/authz/example@{digest}", policy=POLICY)
    other = BundleStore(Metrics())
    assert other.fetch_and_load(pinned) == LOADED
    before = len(registry.access_log())
    assert other.fetch_and_load(pinned) == UNCHANGED
    assert len(registry.access_log()) == before  # a pinned digest cannot change: no request


def test_tampered_layer_is_rejected_and_not_downloaded_again(registry: Registry) -> None:
    ref = registry.reference("authz/example", "prod")
    assert build_push("--push", ref)[0] == 0
    store = BundleStore(Metrics())
    source = open_source(ref, policy=POLICY)
    assert store.fetch_and_load(source) == LOADED

    layer = archive.build_archive(example_files(), "example", "tampered")
    digest = registry.push_tampered("authz/example", "prod", layer, "example", "tampered")
    assert store.fetch_and_load(source) == REJECTED
    st = store.status()
    assert st.revision == "2026-11-25.1"  # the good bundle keeps serving
    assert "digest mismatch" in (st.last_error or "") and digest in (st.last_error or "")
    gets = len(blob_gets(registry))
    assert store.fetch_and_load(source) == UNCHANGED  # the same manifest is not fetched again
    assert len(blob_gets(registry)) == gets


def test_oversized_layer_is_rejected_before_download(registry: Registry) -> None:
    ref = registry.reference("authz/example", "big")
    assert build_push("--push", ref)[0] == 0
    size = len(archive.build_archive(example_files(), "example", "2026-11-25.1"))
    source = oci.OciSource(ref, archive.Limits(max_bytes=size - 1), POLICY)
    with pytest.raises(BundleError, match="over the size limit"):
        source.fetch()
    assert blob_gets(registry) == []


def test_an_artifact_that_is_not_a_bundle_is_rejected(registry: Registry) -> None:
    client = oci.RegistryClient(registry.host, plain_http=True)
    scope = "repository:authz/other:pull,push"
    layer = b"not a bundle"
    for blob in (oci.EMPTY_BLOB, layer):
        oci._upload_blob(client, "authz/other", blob, scope, time.monotonic() + 30)
    manifest = oci.manifest_for(layer, "x", "y").replace(
        oci.LAYER_MEDIA_TYPE.encode(), b"application/vnd.oci.image.layer.v1.tar+gzip"
    )
    client.request(
        "PUT", "/v2/authz/other/manifests/v1", scope=scope, deadline=time.monotonic() + 30, max_bytes=65536,
        headers={"Content-Type": oci.MANIFEST_MEDIA_TYPE}, body=manifest, ok=(201,),
    )
    with pytest.raises(BundleError, match="not an authz bundle"):
        oci.OciSource(registry.reference("authz/other", "v1"), policy=POLICY).fetch()
    assert blob_gets(registry) == []


def test_missing_tag_and_unreachable_registry_are_unavailable(registry: Registry) -> None:
    source = oci.OciSource(registry.reference("authz/none", "v1"), policy=POLICY)
    with pytest.raises(SourceUnavailable, match="no such tag"):
        source.fetch()
    assert source.failures == 1
    assert source.next_delay(False) >= POLICY.min_delay
    registry.close()
    with pytest.raises(SourceUnavailable, match="unreachable"):
        source.fetch()
    assert source.failures == 2


# --- registries that require auth ----------------------------------------------------------

USER, PASSWORD = "deployer", "s3cret-Pa55word"


def test_htpasswd_registry_needs_the_credentials_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry", htpasswd={USER: PASSWORD})
    try:
        ref = reg.reference("authz/example", "prod")
        code, _, err = build_push("--push", ref)
        assert code == 1 and "requires authentication" in err and "--registry-credentials" in err

        wrong = write_credentials(tmp_path / "wrong.json", reg.host, USER, "nope")
        code, _, err = build_push("--push", ref, "--registry-credentials", str(wrong))
        assert code == 1 and "refused the credentials" in err
        assert "nope" not in err

        creds = write_credentials(tmp_path / "config.json", reg.host, USER, PASSWORD)
        code, _, err = build_push("--push", ref, "--registry-credentials", str(creds))
        assert code == 0, err

        with pytest.raises(SourceUnavailable, match="requires authentication"):
            oci.OciSource(ref, policy=POLICY).fetch()
        source = oci.OciSource(ref, policy=POLICY, credentials=creds)
        snap = source.fetch()
        assert snap is not None and "bundle.yaml" in snap.files
        assert source.fetch() is None

        # The credentials file may also spell the registry as a URL, with user and password.
        (tmp_path / "url.json").write_text(json.dumps(
            {"auths": {f"http://{reg.host}/v2/": {"username": USER, "password": PASSWORD}}}))
        assert oci.OciSource(ref, policy=POLICY, credentials=tmp_path / "url.json").fetch()
    finally:
        reg.close()


def test_token_auth_registry_over_tls_with_a_credentials_file(tmp_path: Path) -> None:
    pki = generate_pki(tmp_path / "pki", servers={"registry": spiffe_id("infra", "registry")},
                       clients={})
    server = pki.servers["registry"]
    tokens = TokenServer(tmp_path, {USER: PASSWORD}, "authz-registry", "authz-token-issuer")
    reg = Registry(tmp_path / "registry", token=tokens, tls=(server.cert, server.key))
    try:
        ref = reg.reference("authz/example", "prod")
        creds = write_credentials(tmp_path / "config.json", reg.host, USER, PASSWORD)
        # The registry's certificate is not trusted without --ca-file, and plain http is not
        # tried for a registry that speaks TLS.
        code, _, err = build_push("--push", ref, "--registry-credentials", str(creds))
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err, err
        code, _, err = build_push("--push", ref, "--ca-file", str(pki.ca_cert))
        assert code == 1 and "requires authentication" in err, err
        code, _, err = build_push(
            "--push", ref, "--registry-credentials", str(creds), "--ca-file", str(pki.ca_cert)
        )
        assert code == 0, err
        assert any(
            a["actions"] == ["pull", "push"] for t in tokens.issued for a in t["access"]
        ), tokens.issued

        tls = client_context(pki.ca_cert)
        source = oci.OciSource(ref, policy=POLICY, credentials=creds, ssl_context=tls)
        snap = source.fetch()
        assert snap is not None and source.client.scheme == "https"
        assert source.fetch() is None
        pulls = [t for t in tokens.issued if t["sub"] == USER
                 and t["access"] == [{"type": "repository", "name": "authz/example",
                                      "actions": ["pull"]}]]
        assert len(pulls) == 1  # the token is reused while it is valid

        with pytest.raises(SourceUnavailable, match="requires authentication|refused"):
            oci.OciSource(ref, policy=POLICY, ssl_context=tls).fetch()
        bad = write_credentials(tmp_path / "bad.json", reg.host, USER, "wrong")
        with pytest.raises(SourceUnavailable, match="refused the credentials") as info:
            oci.OciSource(ref, policy=POLICY, credentials=bad, ssl_context=tls).fetch()
        assert "wrong" not in str(info.value)
    finally:
        reg.close()
        tokens.close()
