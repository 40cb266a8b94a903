"""https:// bundle servers and audit collectors under a private CA (--ca-file)."""

from __future__ import annotations

import gzip
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import write_bundle
from support.bundle_sources import BundleServer
from support.pki import PKI, generate_pki

from authz.audit import HttpSink, UploadError
from authz.bundle import archive
from authz.bundle.runtime import open_source
from authz.bundle.sources import SourceUnavailable, read_directory
from authz.tls import client_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: PKI) -> ssl.SSLContext:
    server = pki.servers["orders-api"]  # DNS:localhost and IP:127.0.0.1 SANs
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server.cert, server.key)
    return ctx


@pytest.fixture
def https_bundle_server(pki: PKI, tmp_path: Path) -> Iterator[BundleServer]:
    server = BundleServer()
    server.httpd.socket = _server_context(pki).wrap_socket(server.httpd.socket, server_side=True)
    files = read_directory(write_bundle(tmp_path / "b", [{"name": "p", "action": "ALLOW"}], revision="tls1")).files
    server.publish(archive.build_archive(files, "t", "tls1"), "tls1")
    try:
        yield server
    finally:
        server.close()


def test_https_bundle_server_with_the_private_ca(pki: PKI, https_bundle_server: BundleServer) -> None:
    url = https_bundle_server.url.replace("http://", "https://")
    snapshot = open_source(url, ssl_context=client_context(pki.ca_cert)).fetch()
    assert snapshot is not None and b"tls1" in b"".join(snapshot.files.values())


def test_https_bundle_server_is_refused_without_the_ca(https_bundle_server: BundleServer) -> None:
    url = https_bundle_server.url.replace("http://", "https://")
    with pytest.raises(SourceUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        open_source(url).fetch()


class _Collector:
    def __init__(self, pki: PKI) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.batches.append(json.loads(gzip.decompress(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = _server_context(pki).wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/v1/audit"


def test_https_audit_collector_with_the_private_ca(pki: PKI) -> None:
    collector = _Collector(pki)
    try:
        HttpSink(collector.url, ssl_context=client_context(pki.ca_cert)).write(['{"decision_id":"d1"}'])
        assert collector.batches == [[{"decision_id": "d1"}]]
        with pytest.raises(UploadError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            HttpSink(collector.url, max_attempts=1).write(['{"decision_id":"d2"}'])
        assert len(collector.batches) == 1
    finally:
        collector.httpd.shutdown()
        collector.httpd.server_close()


def test_unusable_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("hello")
    for ca in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        proc = subprocess.run([sys.executable, "-m", "authz", "serve", "--ca-file", str(ca),
                               "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "cannot use CA file" in proc.stderr
