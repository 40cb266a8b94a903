"""OCI references, Docker credentials files, auth challenges and redirects (no registry needed;
tests/integration/test_oci_registry.py runs against a real one)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from authz.bundle import oci
from authz.bundle.runtime import open_source
from authz.bundle.sources import PollPolicy, SourceUnavailable
from authz.cli import main

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("oci://ghcr.io/acme/policies:v1", "ghcr.io", "acme/policies", "v1", None),
    ("oci://127.0.0.1:5000/authz:prod", "127.0.0.1:5000", "authz", "prod", None),
    (f"oci://reg.example/a/b/c@{DIGEST}", "reg.example", "a/b/c", None, DIGEST),
    (f"oci://reg.example:443/a:v2@{DIGEST}", "reg.example:443", "a", "v2", DIGEST),
    ("oci://[::1]:5000/x_y/z-1.2:T_9.x", "[::1]:5000", "x_y/z-1.2", "T_9.x", None),
])
def test_parse_reference(text: str, registry: str, repository: str, tag: str | None,
                         digest: str | None) -> None:
    ref = oci.parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize(("text", "reason"), [
    ("oci://ghcr.io/acme/policies", "needs :TAG or @sha256"),
    ("oci://ghcr.io", "needs a registry and a repository"),
    ("oci:///acme:v1", "needs a registry and a repository"),
    ("oci://ghcr.io/Acme/policies:v1", "invalid"),
    ("oci://ghcr.io/acme/policies:-v1", "invalid tag"),
    ("oci://ghcr.io/acme/policies@sha256:1234", "sha256:<64 hex digits>"),
    ("oci://ghcr.io/acme/policies@md5:" + "a" * 32, "sha256:<64 hex digits>"),
    ("https://ghcr.io/acme:v1", "not an OCI reference"),
])
def test_bad_references_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        oci.parse_reference(text)


def test_loopback_detection() -> None:
    assert oci.parse_reference("oci://127.0.0.1:5000/a:b").loopback
    assert oci.parse_reference("oci://localhost/a:b").loopback
    assert oci.parse_reference("oci://[::1]:5000/a:b").loopback
    assert not oci.parse_reference("oci://127.0.0.1.nip.io/a:b").loopback
    assert not oci.parse_reference("oci://registry.internal:5000/a:b").loopback


def test_plain_http_only_for_loopback_and_configured_insecure_registries() -> None:
    assert oci.parse_reference("oci://127.0.0.1:5000/a:b").plain_http_allowed()
    ref = oci.parse_reference("oci://registry.kube-system.svc:5000/a:b")
    assert not ref.plain_http_allowed()
    assert not ref.plain_http_allowed(["registry.kube-system.svc"])  # the port is part of it
    assert ref.plain_http_allowed(["Registry.Kube-System.svc:5000"])
    source = oci.OciSource("oci://registry.internal/a:b")
    assert source.client.scheme == "https" and not source.client.plain_http
    insecure = oci.OciSource("oci://registry.internal/a:b", insecure=["registry.internal"])
    assert insecure.client.plain_http
    # Credentials over plain http: to the insecure registry itself or loopback, nowhere else.
    insecure.client._ensure_safe_transport("http://registry.internal/token")
    insecure.client._ensure_safe_transport("http://127.0.0.1:9999/token")
    with pytest.raises(oci.RegistryError, match="only over https"):
        insecure.client._ensure_safe_transport("http://auth.internal/token")
    with pytest.raises(oci.RegistryError, match="only over https"):
        source.client._ensure_safe_transport("http://registry.internal/token")


def test_open_source_knows_oci_references() -> None:
    source = open_source("oci://registry.internal/mesh/bundle:prod")
    assert isinstance(source, oci.OciSource) and source.polled
    assert source.description == "oci://registry.internal/mesh/bundle:prod"
    with pytest.raises(ValueError):
        open_source("oci://registry.internal/mesh/bundle")


# --- credentials ---------------------------------------------------------------------------


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_credentials_forms(tmp_path: Path) -> None:
    auth = base64.b64encode(b"robot:pa:ss").decode()  # a password may contain ':'
    f = write(tmp_path / "config.json", {"auths": {
        "https://reg.example/v1/": {"auth": auth},
        "other.example:5000": {"username": "u", "password": "p"},
        "empty.example": {},
    }})
    assert oci.load_credentials(f, "reg.example") == ("robot", "pa:ss")
    assert oci.load_credentials(f, "other.example:5000") == ("u", "p")
    assert oci.load_credentials(f, "REG.example") == ("robot", "pa:ss")
    assert oci.load_credentials(f, "missing.example") is None
    with pytest.raises(oci.RegistryError, match="not supported") as info:
        oci.load_credentials(f, "empty.example")
    assert "pa:ss" not in str(info.value)


def test_bad_credentials_files_name_the_file_never_the_content(tmp_path: Path) -> None:
    with pytest.raises(oci.RegistryError, match="cannot read"):
        oci.load_credentials(tmp_path / "absent.json", "r")
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"r": {"auth": "c2VjcmV0')  # truncated
    with pytest.raises(oci.RegistryError, match="not JSON") as info:
        oci.load_credentials(bad, "r")
    assert "c2VjcmV0" not in str(info.value)
    f = write(tmp_path / "x.json", {"auths": {"r": {"auth": base64.b64encode(b"nocolon").decode()}}})
    with pytest.raises(oci.RegistryError, match="not base64 user:password") as info:
        oci.load_credentials(f, "r")
    assert "nocolon" not in str(info.value)
    with pytest.raises(oci.RegistryError, match="no 'auths'"):
        oci.load_credentials(write(tmp_path / "y.json", []), "r")


def test_parse_challenge() -> None:
    c = oci.parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"')
    assert c is not None and c.scheme == "bearer"
    assert dict(c.params) == {"realm": "https://auth.example/token", "service": "registry.example",
                              "scope": "repository:a/b:pull,push"}
    basic = oci.parse_challenge('Basic realm="Registry \\"Realm\\""')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == 'Registry "Realm"'
    assert oci.parse_challenge(None) is None


# --- transport rules, against small local servers --------------------------------------------


class Recorder:
    """An HTTP server on 127.0.0.1 that answers by a table and records request headers."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append((self.command, self.path, dict(self.headers.items())))
                code, headers, body = outer.routes.get(self.path.split("?")[0], (404, {}, b""))
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v.replace("{port}", str(outer.port)))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def creds(tmp_path: Path) -> Iterator[Path]:
    yield write(tmp_path / "config.json", {"auths": {}})


def test_blob_redirects_keep_the_credentials_within_the_registry_only() -> None:
    """Over plain http a redirect stays within the registry (test_oci_hostile.py has the https
    one to storage on another host, which gets no credentials)."""
    storage = Recorder({"/blob": (200, {}, b"layer-bytes")})
    registry = Recorder({
        "/v2/": (200, {}, b"{}"),
        "/v2/a/blobs/" + DIGEST: (307, {"Location": "/storage/blob"}, b""),
        "/storage/blob": (200, {}, b"layer-bytes"),
        "/v2/b/blobs/" + DIGEST: (307, {"Location": f"http://localhost:{storage.port}/blob"}, b""),
    })
    try:
        client = oci.RegistryClient(f"127.0.0.1:{registry.port}", plain_http=True)
        client._auth["s"] = ("Basic dTpw", float("inf"))
        resp = client.request("GET", f"/v2/a/blobs/{DIGEST}", scope="s",
                              deadline=time.monotonic() + 10, max_bytes=100)
        assert resp.body == b"layer-bytes"
        assert [(p, h.get("Authorization")) for _, p, h in registry.seen[-2:]] == [
            (f"/v2/a/blobs/{DIGEST}", "Basic dTpw"), ("/storage/blob", "Basic dTpw")]
        with pytest.raises(oci.RegistryError, match="refused, plain http"):
            client.request("GET", f"/v2/b/blobs/{DIGEST}", scope="s",
                           deadline=time.monotonic() + 10, max_bytes=100)
        assert storage.seen == []
    finally:
        storage.close()
        registry.close()


def test_credentials_never_go_to_a_plain_http_realm_off_loopback(creds: Path) -> None:
    registry = Recorder({
        "/v2/": (200, {}, b"{}"),
        "/v2/a/manifests/v1": (401, {"WWW-Authenticate": 'Bearer realm="http://auth.example/t"'}, b""),
    })
    try:
        source = oci.OciSource(f"oci://127.0.0.1:{registry.port}/a:v1",
                               policy=PollPolicy(0.1, 0.2, 1, 5), credentials=creds)
        with pytest.raises(SourceUnavailable, match="token realm http://auth.example/t refused"):
            source.fetch()
    finally:
        registry.close()


@pytest.mark.parametrize(("registry", "realm", "refused"), [
    # a remote registry naming a loopback or metadata realm: the password would go there
    ("registry.example", "http://127.0.0.1:9999/token", True),
    ("registry.example", "http://localhost:2379/token", True),
    ("registry.example", "https://127.0.0.1:10250/token", True),
    ("registry.example", "https://169.254.169.254/token", True),
    ("registry.example", "https://registry.example/token", False),
    ("127.0.0.1:5000", "http://127.0.0.1:5001/token", False),  # a loopback registry's own
    ("127.0.0.1:5000", "http://auth.example/token", True),
])
def test_a_token_realm_goes_no_further_than_a_redirect(registry: str, realm: str, refused: bool) -> None:
    """A registry's realm was sent the credentials wherever it pointed on loopback, in clear
    over http: any local process could collect the password."""
    why = oci.realm_refusal(registry, False, realm)
    assert (why is not None) is refused, why


def test_a_layer_cut_in_transit_is_fetched_again() -> None:
    """A short layer was remembered as a rejected digest: the old revision served on,
    `unchanged`, until the tag moved."""
    layer = b"x" * 1000
    manifest = oci.manifest_for(layer, "n", "r")
    digest = oci.sha256_digest(manifest)
    blob = "/v2/a/blobs/" + oci.sha256_digest(layer)
    registry = Recorder({
        "/v2/": (200, {}, b"{}"),
        "/v2/a/manifests/v1": (200, {"Docker-Content-Digest": digest}, b""),
        f"/v2/a/manifests/{digest}": (200, {}, manifest),
        blob: (200, {}, layer[:500]),
    })
    try:
        source = oci.OciSource(f"oci://127.0.0.1:{registry.port}/a:v1", policy=PollPolicy(0.1, 0.2, 1, 5))
        with pytest.raises(SourceUnavailable, match="ended after 500 of 1000 bytes"):
            source.fetch()
        registry.routes[blob] = (200, {}, layer)
        from authz.bundle.loader import BundleError

        with pytest.raises(BundleError, match="not a gzip"):  # downloaded again, whole (not a bundle here)
            source.fetch()
        assert sum(1 for _, p, _ in registry.seen if p == blob) == 2
    finally:
        registry.close()


def test_manifest_that_does_not_match_its_digest_is_rejected() -> None:
    manifest = oci.manifest_for(b"layer", "n", "r")
    registry = Recorder({
        "/v2/": (200, {}, b"{}"),
        "/v2/a/manifests/v1": (200, {"Docker-Content-Digest": DIGEST}, b""),
        f"/v2/a/manifests/{DIGEST}": (200, {}, manifest),
    })
    try:
        source = oci.OciSource(f"oci://127.0.0.1:{registry.port}/a:v1",
                               policy=PollPolicy(0.1, 0.2, 1, 5))
        from authz.bundle.loader import BundleError

        with pytest.raises(BundleError, match="does not match its digest"):
            source.fetch()
        assert source.digest == DIGEST and source.failures == 0
        assert source.fetch() is None  # not downloaded again until the tag moves
    finally:
        registry.close()


def test_build_needs_an_output_or_a_push(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "policies" / "example"
    assert main(["build", str(example)]) == 2
    assert "-o FILE.tar.gz, --push" in capsys.readouterr().err
    assert main(["build", str(example), "--push", "oci://r.example/a"]) == 2
    assert "needs :TAG" in capsys.readouterr().err


def test_serve_refuses_a_bad_otlp_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--otlp-endpoint", "nohostport", "--grpc-addr", "127.0.0.1:0"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["serve", "--trace-ratio", "1.5"]) == 2
