"""A bundle server and audit collector that wants credentials, started in the test.

GET /bundle.tar.gz serves ``body``; POST anywhere stores a gzipped JSON batch (a collector);
``redirects`` answers a path with a 302 to another URL. With ``tls`` it speaks HTTPS, and
with ``client_ca`` too it requires a client certificate from that CA (mTLS). When
``expect_auth`` is set, a request whose ``Authorization`` header differs gets 401. Every
request is recorded (path, Authorization header, client certificate URI SANs).
"""

from __future__ import annotations

import gzip
import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str | None
    client_uris: tuple[str, ...]
    client_serial: str | None = None


class AuthServer:
    def __init__(self, tls: tuple[Path, Path] | None = None, client_ca: Path | None = None) -> None:
        self.body = b""
        self.expect_auth: str | None = None
        self.redirects: dict[str, str] = {}
        self.seen: list[Seen] = []
        self.batches: list[list[dict[str, Any]]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> bool:
                uris: tuple[str, ...] = ()
                serial = None
                if isinstance(self.connection, ssl.SSLSocket):
                    peer = self.connection.getpeercert() or {}
                    uris = tuple(v for k, v in peer.get("subjectAltName", ()) if k == "URI")
                    serial = peer.get("serialNumber")
                auth = self.headers.get("Authorization")
                with outer._lock:
                    outer.seen.append(Seen(self.command, self.path, auth, uris, serial))
                    expect, target = outer.expect_auth, outer.redirects.get(self.path)
                if expect is not None and auth != expect:
                    self._answer(401, b"unauthorized\n")
                    return False
                if target is not None:
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                return True

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self._record():
                    if self.path.split("?", 1)[0] == "/bundle.tar.gz":
                        self._answer(200, outer.body)
                    else:
                        self._answer(404, b"")

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._record():
                    with outer._lock:
                        outer.batches.append(json.loads(gzip.decompress(data)))
                    self._answer(204, b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            if client_ca is not None:
                ctx.load_verify_locations(cafile=str(client_ca))
                ctx.verify_mode = ssl.CERT_REQUIRED
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/bundle.tar.gz", host: str = "127.0.0.1", userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo}{host}:{self.port}{path}"

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for b in self.batches for r in b]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
