"""gRPC and HTTP plumbing only: the Authorization servicer, health, probes, signals."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from authz import affinity, decision_api
from authz import health as grpc_health
from authz.admission import CheckGate
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.http_authz import HttpAuthzServer
from authz.limits import ServeLimits
from authz.metrics import CONTENT_TYPE, Metrics
from authz.ports import bind_error, split_addr
from authz.redact import hide_paths
from authz.serving_pool import ServingPool
from authz.tls_server import ServerTls, grpc_credentials, handshake_error, http_ssl_context
from authz.version import VERSION

log = logging.getLogger("authz.server")

AUTH_SERVICE = "envoy.service.auth.v3.Authorization"


CHECK_METHOD = f"/{AUTH_SERVICE}/Check"


def grpc_options(opts: ServeLimits, worker: int | None) -> list[tuple[str, int]]:
    # grpcio would otherwise share a port in use silently: only workers of one supervisor may.
    return [
        ("grpc.so_reuseport", 0 if worker is None else 1),
        ("grpc.max_concurrent_streams", opts.max_streams_per_connection),
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.keepalive_time_ms", int(opts.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(opts.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", int(opts.max_connection_idle_seconds * 1000)),
        # Envoy may ping; more often than this is abuse and closes the connection.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class ProbeServer:
    """/metrics, /healthz, /readyz and /v1/status over plain HTTP; with a checker also the
    decision API's POST /v1/decide and /v1/explain (authz.decision_api).

    A small bounded pool answers: at most ``pool_size`` connections are served at once and
    ``backlog`` wait; past that a connection is closed at once. A connection that sends
    nothing for ``idle_timeout`` seconds is closed, so idle clients cannot hold the pool.
    """

    def __init__(self, addr: str, store: BundleStore, metrics: Metrics, worker: int | None = None,
                 checker: Checker | None = None, tls: ServerTls | None = None,
                 hidden: Mapping[str, str] | None = None, *, pool_size: int = 8, backlog: int = 64,
                 idle_timeout: float = 10.0) -> None:
        """``hidden`` maps file system paths to the labels /readyz and /v1/status show instead."""
        store_ref, metrics_ref = store, metrics
        hide = dict(hidden or {})
        self.draining = False
        # False while a worker holds its gRPC port closed until its first load has finished
        # (serve): it is not ready then even though its bundle may already be loaded.
        self.grpc_listening = True
        probe = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout  # socket timeout: an idle or slow client is dropped

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if checker is None or path not in decision_api.JSON_PATHS:
                    self._send(404, b"not found\n", "text/plain")
                    return
                length = self.headers.get("content-length", "")
                # isdigit() alone takes '²', and int() refuses over 4,300 digits
                digits = length.isascii() and length.isdigit() and len(length) <= 12
                if not digits or int(length) > decision_api.MAX_JSON_BYTES:
                    self.close_connection = True
                    self._send(*decision_api.error_json(411 if not digits else 413,
                               "a body of at most 1 MiB with a content-length is required"),
                               "application/json")
                    self._linger()
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
                    if probe.draining:
                        self._send(503, b"not ready: shutting down\n", "text/plain")
                    elif expired:
                        self._send(503, f"not ready: the {' and '.join(expired)} serving "
                                   "certificate has expired\n".encode(), "text/plain")
                    elif st.revision is not None and not probe.grpc_listening:
                        self._send(503, b"not ready: the gRPC port is not open yet\n", "text/plain")
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
                    doc["version"] = VERSION
                    if tls is not None:
                        doc["tls"] = tls.status()
                    if worker is not None:
                        doc["worker"] = {"index": worker, "pid": os.getpid(),
                                         "grpc_listening": probe.grpc_listening}
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

            def _linger(self) -> None:
                """Half-close, then read and drop what the client is still sending (at most
                2 MiB, 1 s) before the connection closes: closing with unread data would reset
                it, and the client could lose the answer before reading it."""
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    deadline = time.monotonic() + 1.0
                    dropped = 0
                    while dropped < 2 * decision_api.MAX_JSON_BYTES and time.monotonic() < deadline:
                        self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                        chunk = self.connection.recv(65536)
                        if not chunk:
                            return
                        dropped += len(chunk)
                except OSError:  # best effort: the answer is already sent
                    return

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        host, port = split_addr(addr)
        try:
            self.httpd = _PooledHTTPServer((host, port), Handler, pool_size=pool_size, backlog=backlog,
                                           reuse_port=worker is not None)
        except OSError as exc:
            raise OSError(f"cannot listen on HTTP address {addr}: {exc.strerror or exc}") from None
        if tls is not None and tls.http is not None:
            # The handshake runs in the pool's thread, on first read, not in accept().
            self.httpd.socket = http_ssl_context(tls.http).wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.httpd.handle_error = handshake_error  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="authz-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def settle_heap(store: BundleStore) -> Callable[[], None]:
    """Keep the cyclic garbage collector off the serving bundle.

    A collection walks every tracked object it is given: with 10k rules or 100k tenants,
    70-100 ms of held GIL, a stall of every check in flight (docs/performance.md). So once
    a bundle serves, it is frozen (gc.freeze) and collections walk only the few objects
    checks create. Nothing is collected here: the store collected just before the load,
    and compiled bundles hold no reference cycles, so the bundle a swap replaces is freed
    by reference counting, frozen or not. Returns the unsubscribe function.
    """
    settled = [0]

    def settle(_status: object = None) -> None:
        current = store.current
        if current is None or id(current) == settled[0]:
            return
        settled[0] = id(current)
        gc.freeze()

    gc.collect()  # before serving: what start-up left behind (imports do make cycles)
    settle()
    return store.subscribe(settle)


class _PooledHTTPServer(HTTPServer):
    """An HTTPServer whose connections are served by a fixed pool of threads."""

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 pool_size: int, backlog: int, reuse_port: bool) -> None:
        # Workers of one service share the port (SO_REUSEPORT), as they share the gRPC one.
        self.allow_reuse_port = reuse_port
        self.request_queue_size = backlog
        # Before binding: a failed bind calls server_close(), which shuts the pool down.
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="authz-http")
        self._limit = pool_size + backlog
        self._open = 0
        self._lock = threading.Lock()
        self.refused = 0  # connections closed at once because the pool was full
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if self._open >= self._limit:
                self.refused += 1
                self.shutdown_request(request)
                return
            self._open += 1
        self._pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one broken connection must not end the pool
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("probe connection from %s failed", client_address)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _bind_problem(addr: str) -> str | None:
    exc = bind_error(addr)
    return None if exc is None else exc.strerror or str(exc)


async def serve(
    checker: Checker, store: BundleStore, metrics: Metrics, grpc_addr: str, http_addr: str,
    options: ServeLimits | None = None, on_reload: Callable[[], None] | None = None,
    worker: int | None = None, on_started: Callable[[], None] | None = None,
    http_authz: HttpAuthzServer | None = None, tls: ServerTls | None = None,
    hidden: Mapping[str, str] | None = None, first_load_done: threading.Event | None = None,
    http_decision_api: bool = False,
) -> None:
    """Serve until SIGTERM, then drain (docs/operations.md): health NOT_SERVING at once, checks
    answered for ``drain_grace`` seconds while load balancers take this endpoint out, then new
    streams refused and in-flight checks given ``drain_timeout`` seconds to finish.

    ``worker`` is this process's index under ``--workers``: only then is the port shared with
    sibling processes. ``on_started`` runs once the ports are open (the first bundle load
    starts then, so /healthz answers while it is in flight). A worker given
    ``first_load_done`` opens its gRPC port only once that is set: the kernel spreads a shared
    port's connections over every process listening on it, and one still loading would deny
    each check it got ("no policy bundle loaded") while its siblings could decide them."""
    options = options or ServeLimits()
    if options.cpu_affinity == "auto":  # first: the threads started below inherit it
        cpu = affinity.pin_process(worker or 0)
        log.info("serving threads on CPU %s", cpu, extra={"cpu": cpu})
    keeper = affinity.GilAffinity(worker) if options.cpu_affinity == "gil" else None
    # grpcio's threaded server, chosen by measurement (docs/performance.md, "Serving stack"):
    # its polling thread takes new calls and refuses those over max_concurrent_checks before
    # any Python work of ours, so past capacity the checks served are still answered in time.
    # The asyncio loop here only waits for signals and serves HTTP ext_authz. The Checker is
    # safe to call from several threads at once. The pool is ours, not concurrent.futures'
    # (its per-call future cost as much as a decision; docs/performance.md, "Serving pool").
    pool = ServingPool(options.grpc_threads)
    server = grpc.server(pool, options=grpc_options(options, worker),
                         interceptors=tls.interceptors(metrics) if tls is not None else None,
                         maximum_concurrent_rpcs=options.max_concurrent_checks)
    # Health through the gate too: registered as grpcio registers it, half-open health calls
    # and open watches would hold the serving threads (authz.health).
    health_servicer = health.HealthServicer()
    gate = CheckGate(CHECK_METHOD, checker.check_bytes, metrics, server, stall_seconds=options.stall_seconds,
                     others={**decision_api.decision_methods(checker),
                             grpc_health.CHECK_METHOD: grpc_health.check_method(health_servicer)},
                     watches={grpc_health.WATCH_METHOD: grpc_health.watch_method(health_servicer)},
                     max_watches=grpc_health.max_watches(options.grpc_threads))
    server.add_generic_rpc_handlers((gate,))

    def listen_grpc() -> int:
        # Asked of the OS first: grpcio would say only "Failed to bind" (and log a C++ error line).
        problem = _bind_problem(grpc_addr) if worker is None else None
        try:
            if problem:
                bound = 0
            elif tls is not None and tls.grpc is not None:
                bound = server.add_secure_port(grpc_addr, grpc_credentials(tls.grpc, tls.require_client_cert))
            else:
                bound = server.add_insecure_port(grpc_addr)
        except RuntimeError:
            bound = 0
        if bound == 0:
            reason = problem or _bind_problem(grpc_addr) or "refused by gRPC"
            raise OSError(f"cannot listen on gRPC address {grpc_addr}: {reason}")
        return bound

    hold_grpc = worker is not None and first_load_done is not None
    bound = 0 if hold_grpc else listen_grpc()
    # The JSON decision API only when asked for: the probe port checks no caller, and an
    # explanation shows every policy's rules to whoever asks.
    probes = ProbeServer(http_addr, store, metrics, worker, checker if http_decision_api else None, tls, hidden)
    probes.grpc_listening = not hold_grpc
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    loop = asyncio.get_running_loop()

    def update_health(_status: object = None) -> None:
        # Loads finish in the reloader thread; health follows store.current.
        state = serving if store.current is not None else not_serving
        for name in ("", AUTH_SERVICE):
            health_servicer.set(name, state)

    unsubscribe = store.subscribe(update_health)
    unsettle = settle_heap(store)
    update_health()
    if http_authz is not None:
        # Bound before the gRPC server starts: a port in use stops us before anything runs.
        try:
            await http_authz.start()
        except OSError:
            probes.httpd.server_close()
            raise
        log.info("HTTP ext_authz listening on %s", http_authz.addr, extra={"http_authz_addr": http_authz.addr})
    http_at = f"{http_addr.rpartition(':')[0]}:{probes.httpd.server_address[1]}"

    def start_grpc() -> None:
        server.start()
        grpc_at = f"{grpc_addr.rpartition(':')[0]}:{bound}"
        log.info("authz %s listening: gRPC %s, HTTP %s", VERSION, grpc_at, http_at,
                 extra={"grpc_addr": grpc_at, "http_addr": http_at, "version": VERSION})

    if not hold_grpc:
        start_grpc()
    probes.start()
    gate.start()
    if tls is not None:
        tls.start()
    if keeper is not None:  # after the threads above: it sorts them into Python's and gRPC's
        keeper.start()
        log.info("Python threads on CPU %d", keeper.cpu, extra={"cpu": keeper.cpu})

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    if on_started is not None:
        on_started()
    if hold_grpc:
        assert first_load_done is not None
        while not first_load_done.is_set() and not stop.is_set():
            await asyncio.sleep(0.02)
        try:
            bound = listen_grpc()
        except OSError:
            gate.stop()
            probes.stop()
            if tls is not None:
                tls.stop()
            if keeper is not None:
                keeper.stop()
            raise
        start_grpc()
        probes.grpc_listening = True
    await stop.wait()
    stop.clear()
    unsubscribe()
    unsettle()
    # Not ready at once, still answering: Envoy's health checks and Kubernetes' endpoint
    # controller take this instance out while it keeps deciding what still arrives.
    probes.draining = True
    health_servicer.enter_graceful_shutdown()
    log.info("SIGTERM: NOT_SERVING; answering checks for %.1fs, then draining for up to %.1fs",
             options.drain_grace, options.drain_timeout)
    try:  # a second SIGTERM or SIGINT cuts the grace short
        await asyncio.wait_for(stop.wait(), options.drain_grace)
    except TimeoutError:
        pass
    stopped = server.stop(options.drain_timeout)
    await loop.run_in_executor(None, stopped.wait)
    gate.stop()
    pool.shutdown(wait=False)
    if http_authz is not None:
        await http_authz.stop()
    probes.stop()
    if tls is not None:
        tls.stop()
    if keeper is not None:
        keeper.stop()
