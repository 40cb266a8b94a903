"""Bundle sources as operators run them: a Kubernetes ConfigMap mount and an HTTP bundle server."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class ConfigMapDir:
    """``root/..data -> ..<version>``, top-level entries symlinked through ``..data``, and
    ``publish()`` swapping ``..data`` atomically, as the kubelet updates a ConfigMap volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    def publish(self, files: dict[str, bytes]) -> None:
        self.version += 1
        target = self.root / f"..2026_01_01_00_00_00.{self.version:04d}.{os.getpid()}"
        for name, data in files.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        data_link = self.root / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        tmp_link = self.root / "..data_tmp"
        os.symlink(target.name, tmp_link)
        os.replace(tmp_link, data_link)  # the atomic swap
        for top in {name.split("/", 1)[0] for name in files}:
            link = self.root / top
            if not link.is_symlink():
                os.symlink(f"..data/{top}", link)
        if old is not None:
            for dirpath, dirnames, filenames in os.walk(self.root / old, topdown=False):
                for f in filenames:
                    os.unlink(os.path.join(dirpath, f))
                for d in dirnames:
                    os.rmdir(os.path.join(dirpath, d))
            os.rmdir(self.root / old)


class BundleServer:
    """Serves one archive at /bundle.tar.gz on 127.0.0.1 with a strong ETag, honouring
    If-None-Match; records request headers and counts 304s. ``delay``, ``status`` and
    ``send_length`` make it slow, failing or length-less for the error tests."""

    def __init__(self, port: int = 0) -> None:
        self.body = b""
        self.etag = '"0"'
        self.requests: list[dict[str, str]] = []
        self.not_modified = 0
        self.delay = 0.0
        self.status = 200
        self.send_length = True
        self.drip = 0.0  # seconds between the bytes of the answer (a slow server)
        self.drip_from = 0  # bytes of the answer sent at once before the drip (0: drip the headers too)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                with outer._lock:
                    body, etag = outer.body, outer.etag
                    outer.requests.append({k.lower(): v for k, v in self.headers.items()})
                time.sleep(outer.delay)
                if self.path != "/bundle.tar.gz" or outer.status != 200:
                    self.send_response(404 if outer.status == 200 else outer.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("If-None-Match") == etag:
                    with outer._lock:
                        outer.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                if outer.drip:
                    head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nETag: {etag}\r\n\r\n").encode()
                    answer = head + body
                    try:
                        self.wfile.write(answer[:outer.drip_from])
                        for i in range(outer.drip_from, len(answer)):
                            self.wfile.write(answer[i:i + 1])
                            self.wfile.flush()
                            time.sleep(outer.drip)
                    except OSError:
                        pass  # the client gave up
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("ETag", etag)
                if outer.send_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)
        self.thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/bundle.tar.gz"

    def publish(self, body: bytes, etag: str) -> None:
        """Serve ``body`` from now on under ETag ``etag`` (quoted here if it is not)."""
        if not etag.startswith('"'):
            etag = f'"{etag}"'
        with self._lock:
            self.body, self.etag = body, etag

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.httpd.shutdown()
            self.httpd.server_close()
