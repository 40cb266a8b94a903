"""gRPC and HTTP plumbing only: the Authorization servicer, health, probes, signals."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz import decision_api
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.http_authz import HttpAuthzServer
from authz.metrics import CONTENT_TYPE, Metrics
from authz.redact import hide_paths
from authz.tls_server import ServerTls, grpc_credentials, handshake_error, http_ssl_context

log = logging.getLogger("authz.server")

AUTH_SERVICE = "envoy.service.auth.v3.Authorization"


def authorization_handler(checker: Checker) -> grpc.GenericRpcHandler:
    """Envoy's Check method, taking raw bytes so that even a request that does not parse
    is answered by the checker (a deny with a reason) instead of a gRPC error."""

    async def check(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return checker.check_bytes(data)

    return grpc.method_handlers_generic_handler(
        AUTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class ProbeServer:
    """/metrics, /healthz, /readyz and /v1/status on a plain HTTP thread; with a checker also
    the decision API's POST /v1/decide and /v1/explain (authz.decision_api)."""

    def __init__(self, addr: str, store: BundleStore, metrics: Metrics, worker: int | None = None,
                 checker: Checker | None = None, tls: ServerTls | None = None,
                 hidden: Mapping[str, str] | None = None) -> None:
        """``hidden`` maps file system paths to the labels /readyz and /v1/status show instead."""
        store_ref, metrics_ref = store, metrics
        hide = dict(hidden or {})

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if checker is None or path not in decision_api.JSON_PATHS:
                    self._send(404, b"not found\n", "text/plain")
                    return
                length = self.headers.get("content-length", "")
                if not length.isdigit() or int(length) > decision_api.MAX_JSON_BYTES:
                    self.close_connection = True
                    self._send(*decision_api.error_json(411 if not length.isdigit() else 413,
                               "a body of at most 1 MiB with a content-length is required"),
                               "application/json")
                    return
                status, body = decision_api.handle_json(checker, path, self.rfile.read(int(length)))
                self._send(status, body, "application/json")

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics_ref.exposition(), CONTENT_TYPE)
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    st = store_ref.status()
                    expired = tls.expired() if tls is not None else []
                    if expired:
                        self._send(503, f"not ready: the {' and '.join(expired)} serving "
                                   "certificate has expired\n".encode(), "text/plain")
                    elif st.revision is not None:
                        note = f" (persisted copy: {st.persisted_reason})" if st.serving_persisted else ""
                        self._send(200, hide_paths(f"ready: revision {st.revision}{note}\n", hide)
                                   .encode(), "text/plain")
                    else:
                        reason = hide_paths(st.last_error or "no bundle loaded yet", hide)
                        self._send(503, f"not ready: {reason}\n".encode(), "text/plain")
                elif path == "/v1/status":
                    st = store_ref.status()
                    doc = hide_paths(st.as_dict(), hide)
                    if tls is not None:
                        doc["tls"] = tls.status()
                    if worker is not None:
                        doc["worker"] = {"index": worker, "pid": os.getpid()}
                    body = json.dumps(doc).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        host, port = split_addr(addr)
        # Workers of one service share the port (SO_REUSEPORT), as they share the gRPC one.
        server_class = _SharedPortHTTPServer if worker is not None else ThreadingHTTPServer
        self.httpd = server_class((host, port), Handler)
        self.httpd.daemon_threads = True
        if tls is not None and tls.http is not None:
            # The handshake runs in the request's thread, on first read, not in accept().
            self.httpd.socket = http_ssl_context(tls.http).wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.httpd.handle_error = handshake_error  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="authz-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _SharedPortHTTPServer(ThreadingHTTPServer):
    allow_reuse_port = True


async def serve(
    checker: Checker, store: BundleStore, metrics: Metrics, grpc_addr: str, http_addr: str,
    drain_seconds: float = 10.0, on_reload: Callable[[], None] | None = None,
    worker: int | None = None, http_authz: HttpAuthzServer | None = None, tls: ServerTls | None = None,
    hidden: Mapping[str, str] | None = None,
) -> None:
    """Serve until SIGTERM. ``worker`` is this process's index under ``--workers``: only
    then is the port shared with sibling processes (grpcio would otherwise share it silently)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0 if worker is None else 1)],
                             interceptors=tls.interceptors(metrics) if tls is not None else None)
    server.add_generic_rpc_handlers((authorization_handler(checker), decision_api.decision_handler(checker)))
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls is not None and tls.grpc is not None:
        bound = server.add_secure_port(grpc_addr, grpc_credentials(tls.grpc, tls.require_client_cert))
    else:
        bound = server.add_insecure_port(grpc_addr)
    if bound == 0:
        raise OSError(f"cannot bind gRPC address {grpc_addr}")
    probes = ProbeServer(http_addr, store, metrics, worker, checker, tls, hidden)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    loop = asyncio.get_running_loop()

    async def update_health() -> None:
        # Loads finish in the reloader thread; health follows store.current from the loop.
        state = serving if store.current is not None else not_serving
        for name in ("", AUTH_SERVICE):
            await health.set(name, state)

    unsubscribe = store.subscribe(
        lambda _status: loop.call_soon_threadsafe(lambda: loop.create_task(update_health())))
    await update_health()
    await server.start()
    probes.start()
    if http_authz is not None:
        await http_authz.start()
        log.info("HTTP ext_authz listening on %s", http_authz.addr)
    if tls is not None:
        tls.start()
    log.info("authz listening: gRPC %s, HTTP %s", grpc_addr, http_addr)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    await stop.wait()
    unsubscribe()
    log.info("draining in-flight checks")
    await health.enter_graceful_shutdown()
    await server.stop(drain_seconds)
    if http_authz is not None:
        await http_authz.stop()
    probes.stop()
    if tls is not None:
        tls.stop()
