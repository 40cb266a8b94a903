"""OCI fetches against a hostile registry on 127.0.0.1: one that drips its answers (the whole
fetch must still end at --poll-timeout) and one whose redirects aim at the network authz runs
in (only https, or plain http within an insecure registry itself, is followed)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.auth_server import AuthServer
from support.pki import PKI, generate_pki
from test_sources import bundle_bytes

from authz.bundle import archive, oci
from authz.bundle.sources import PollPolicy, SourceUnavailable
from authz.tls import client_context

REPO = "mesh/bundle"
DRIP = 0.2  # seconds between two bytes of a dripped answer: far below any socket timeout
DRIP_FOR = 8.0  # a drip ends after this, so a client without a deadline fails by its duration
TIMEOUT = 2.0  # --poll-timeout of the sources under test


class Registry:
    """The pull side of the distribution API by a table, path -> (status, headers, body);
    ``{port}`` in a header is this server's port. ``drip`` (a path) is answered a byte every
    DRIP seconds from byte ``drip_from`` of the answer on (0: the status line and headers too).
    With ``token``, repository paths want ``Bearer <token>`` and /token hands it out."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]],
                 token: str | None = None) -> None:
        self.routes = routes
        self.token = token
        self.drip: str | None = None
        self.drip_from = 0
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._lock = threading.Lock()
        self._closed = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                path = self.path.split("?")[0]
                auth = self.headers.get("Authorization")
                with outer._lock:
                    outer.seen.append((self.command, path, auth))
                code, headers, body = outer._route(path, auth)
                head = f"HTTP/1.1 {code} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                head += "".join(f"{k}: {v.replace('{port}', str(outer.port))}\r\n"
                                for k, v in headers.items())
                answer = (head + "\r\n").encode() + (body if self.command != "HEAD" else b"")
                self.close_connection = True
                try:
                    if outer.drip != path:
                        self.wfile.write(answer)
                        return
                    self.wfile.write(answer[:outer.drip_from])
                    ends = time.monotonic() + DRIP_FOR
                    for i in range(outer.drip_from, len(answer)):
                        if time.monotonic() > ends or outer._closed.is_set():
                            return
                        self.wfile.write(answer[i:i + 1])
                        self.wfile.flush()
                        time.sleep(DRIP)
                except OSError:
                    pass  # the client gave up

            do_GET = do_HEAD = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _route(self, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        if self.token is not None:
            if path == "/token":
                return 200, {}, b'{"token": "%s", "expires_in": 300}' % self.token.encode()
            if path.startswith("/v2/") and path != "/v2/" and auth != f"Bearer {self.token}":
                realm = f'Bearer realm="http://127.0.0.1:{self.port}/token",service="test"'
                return 401, {"WWW-Authenticate": realm}, b""
        return self.routes.get(path, (404, {}, b""))

    def paths(self) -> list[str]:
        with self._lock:
            return [p for _, p, _ in self.seen]

    def close(self) -> None:
        self._closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def bundle_registry(tmp_path: Path, token: str | None = None) -> tuple[Registry, str, str]:
    """A registry holding a valid bundle under REPO:v1; returns it, the layer's path and digest."""
    layer = archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1")
    manifest = oci.manifest_for(layer, "t", "r1")
    digest, blob = oci.sha256_digest(manifest), oci.sha256_digest(layer)
    found = {"Docker-Content-Digest": digest}
    routes = {
        "/v2/": (200, {}, b"{}"),
        f"/v2/{REPO}/manifests/v1": (200, found, manifest),
        f"/v2/{REPO}/manifests/{digest}": (200, found, manifest),
        f"/v2/{REPO}/blobs/{blob}": (200, {}, layer),
    }
    return Registry(routes, token), f"/v2/{REPO}/blobs/{blob}", blob


def source(registry: Registry, **kw: Any) -> oci.OciSource:
    return oci.OciSource(f"oci://{registry.host}/{REPO}:v1",
                         policy=PollPolicy(0.1, 0.2, 1, TIMEOUT), **kw)


# --- a dripping registry: every request ends at the fetch's deadline --------------------------


@pytest.mark.parametrize(("request_", "part"), [
    ("token", "headers"), ("manifest", "headers"), ("blob", "headers"), ("blob", "body"),
])
def test_a_dripping_registry_fails_the_fetch_at_the_poll_timeout(
    tmp_path: Path, request_: str, part: str
) -> None:
    registry, blob_path, _ = bundle_registry(tmp_path, token="t0k")
    try:
        registry.drip = {"token": "/token", "manifest": f"/v2/{REPO}/manifests/v1",
                         "blob": blob_path}[request_]
        registry.drip_from = 0 if part == "headers" else 80  # past the status line and headers
        src = source(registry)
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match=r"did not finish in time.*--poll-timeout") as e:
            src.fetch()
        elapsed = time.monotonic() - started
        assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + 1.5, (elapsed, str(e.value))
        assert registry.drip in str(e.value) and "t0k" not in str(e.value)
        # Too slow is not a verdict on the bundle: nothing remembered, the next poll downloads.
        assert src.digest is None and src.failures == 1
        registry.drip = None
        assert src.fetch() is not None and src.failures == 0
    finally:
        registry.close()


# --- redirects ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Registry, str]]:
    made, blob_path, _ = bundle_registry(tmp_path, token="t0k")
    try:
        yield made, blob_path
    finally:
        made.close()


def redirect(registry: Registry, path: str, location: str) -> None:
    registry.routes[path] = (307, {"Location": location}, b"")


def test_blob_redirect_to_storage_over_https_works_without_the_registry_credentials(
    hostile: tuple[Registry, str], pki: PKI
) -> None:
    """What Docker Hub, GHCR and ECR do: a 307 to a signed https URL on another host."""
    reg, blob_path = hostile
    layer = reg.routes[blob_path][2]
    cdn = AuthServer(tls=(pki.servers["orders-api"].cert, pki.servers["orders-api"].key))
    try:
        cdn.body = layer
        redirect(reg, blob_path, cdn.url("/bundle.tar.gz?X-Amz-Signature=s3cr3t", host="localhost"))
        snap = source(reg, ssl_context=client_context(pki.ca_cert)).fetch()
        assert snap is not None
        assert [(s.path.split("?")[0], s.authorization) for s in cdn.requests()] == [
            ("/bundle.tar.gz", None)]
        assert ("GET", blob_path, "Bearer t0k") in reg.seen
    finally:
        cdn.close()


def test_redirect_to_another_port_over_plain_http_is_refused(hostile: tuple[Registry, str]) -> None:
    """A blind SSRF: the layer's digest check would only tell how big the answer was."""
    reg, blob_path = hostile
    metadata = AuthServer()
    try:
        metadata.body = b'{"AccessKeyId": "AKIA..."}'
        redirect(reg, blob_path, metadata.url("/bundle.tar.gz?role=node"))
        with pytest.raises(SourceUnavailable, match="refused") as err:
            source(reg).fetch()
        assert metadata.requests() == []
        assert f"http://127.0.0.1:{metadata.port}/bundle.tar.gz" in str(err.value)
        assert "role=node" not in str(err.value) and "bytes" not in str(err.value)
    finally:
        metadata.close()


def test_redirect_to_another_scheme_never_connects(hostile: tuple[Registry, str]) -> None:
    reg, blob_path = hostile
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        redirect(reg, blob_path, f"ftp://127.0.0.1:{listener.getsockname()[1]}/x")
        with pytest.raises(SourceUnavailable, match="refused"):
            source(reg).fetch()
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()  # no connection was even attempted


@pytest.mark.parametrize("target", [
    "https://169.254.169.254/latest/meta-data/",
    "https://[fe80::1]/x",
])
def test_redirect_to_a_link_local_address_is_refused(
    hostile: tuple[Registry, str], target: str
) -> None:
    reg, blob_path = hostile
    redirect(reg, blob_path, target)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="refused.*link-local"):
        source(reg).fetch()
    assert time.monotonic() - started < TIMEOUT  # refused, not tried until the deadline


def test_at_most_three_redirects(hostile: tuple[Registry, str]) -> None:
    reg, blob_path = hostile
    layer = reg.routes[blob_path]
    hops = [f"/hop{i}" for i in range(4)]
    for here, there in zip([blob_path, *hops], hops, strict=False):
        redirect(reg, here, f"http://{reg.host}{there}")
    reg.routes[hops[-1]] = layer  # four redirects from the blob to the layer
    with pytest.raises(SourceUnavailable, match="refused, more than 3 redirects"):
        source(reg).fetch()
    assert "/hop3" not in reg.paths()
    redirect(reg, hops[1], f"http://{reg.host}{hops[3]}")  # three
    assert source(reg).fetch() is not None


REGISTRY = "registry.example:5000"  # resolves nowhere: only public targets are followed
EX, EX_HTTP = f"https://{REGISTRY}/v2/", f"http://{REGISTRY}/v2/"
LO, TEN = "http://127.0.0.1:5000/v2/", "http://10.1.2.3:5000/v2/"


@pytest.mark.parametrize(("registry_at", "plain_http", "old", "new", "why"), [
    # https to any public address, from any registry
    (REGISTRY, False, EX, "https://93.184.216.34/blob?sig=1", None),
    ("127.0.0.1:5000", True, LO, "https://93.184.216.34/b", None),
    # plain http only within an insecure registry itself, and never from https
    (REGISTRY, True, EX_HTTP, f"http://{REGISTRY}/v2/b", None),
    (REGISTRY, True, EX, f"http://{REGISTRY}/b", "plain http"),
    (REGISTRY, False, EX_HTTP, f"http://{REGISTRY}/b", "plain http"),
    (REGISTRY, True, EX_HTTP, "http://registry.example:5001/b", "plain http"),
    ("127.0.0.1:5000", True, LO, "http://93.184.216.34/b", "plain http"),
    # other schemes never
    (REGISTRY, True, EX_HTTP, "ftp://registry.example:5000/x", "ftp"),
    (REGISTRY, False, EX, "file:///etc/passwd", "file"),
    # addresses of authz's own network only when the registry is on one of the same kind
    (REGISTRY, False, EX, "https://169.254.169.254/x", "link-local"),
    (REGISTRY, False, EX, "https://[fe80::1]/x", "link-local"),
    (REGISTRY, False, EX, "https://[::ffff:169.254.169.254]/x", "link-local"),
    (REGISTRY, False, EX, "https://127.0.0.1:8443/x", "loopback"),
    (REGISTRY, False, EX, "https://0.0.0.0:8443/x", "loopback"),
    (REGISTRY, False, EX, "https://localhost:8443/x", "loopback"),
    (REGISTRY, False, EX, "https://10.0.0.7/x", "private"),
    (REGISTRY, False, EX, "https://[fd00::7]/x", "private"),
    (REGISTRY, False, EX, "https://nowhere.invalid/x", "does not resolve"),
    ("127.0.0.1:5000", True, LO, "https://127.0.0.1:8443/x", None),
    ("127.0.0.1:5000", True, LO, "https://10.0.0.7/x", "private"),
    ("127.0.0.1:5000", True, LO, "https://169.254.169.254/x", "link-local"),
    ("10.1.2.3:5000", True, TEN, "https://10.9.9.9/blob", None),
    ("10.1.2.3:5000", True, TEN, "https://169.254.169.254/x", "link-local"),
    ("10.1.2.3:5000", True, TEN, "https://127.0.0.1/x", "loopback"),
])
def test_redirect_policy(registry_at: str, plain_http: bool, old: str, new: str,
                         why: str | None) -> None:
    refusal = oci.redirect_refusal(registry_at, plain_http, old, new)
    if why is None:
        assert refusal is None
    else:
        assert refusal is not None and why in refusal
