"""gRPC and HTTP plumbing only: the Authorization servicer, health, probes, signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2

from authz import affinity, decision_api
from authz import health as grpc_health
from authz.admission import CheckGate
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.http_authz import HttpAuthzServer
from authz.limits import ServeLimits, connection_budget, raise_open_files_limit
from authz.metrics import Metrics
from authz.ports import bind_error
from authz.probe_server import ProbeServer
from authz.serving_pool import ServingPool
from authz.tls_server import ServerTls, grpc_credentials
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


def _bind_problem(addr: str) -> str | None:
    exc = bind_error(addr)
    return None if exc is None else exc.strerror or str(exc)


async def serve(
    checker: Checker, store: BundleStore, metrics: Metrics, grpc_addr: str, http_addr: str,
    options: ServeLimits | None = None, on_reload: Callable[[], None] | None = None,
    worker: int | None = None, on_started: Callable[[], None] | None = None,
    http_authz: HttpAuthzServer | None = None, tls: ServerTls | None = None,
    hidden: Mapping[str, str] | None = None, first_load_done: threading.Event | None = None,
    http_decision_api: bool = False, grpc_explain: bool = False,
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
                     others={**decision_api.decision_methods(checker, grpc_explain),
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
    budget = connection_budget(raise_open_files_limit())
    if http_authz is not None:
        http_authz.max_connections = min(http_authz.max_connections, budget)
    probes = ProbeServer(http_addr, store, metrics, worker, checker if http_decision_api else None, tls, hidden,
                         max_connections=budget)
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
            probes.stop()
            raise
        log.info("HTTP ext_authz listening on %s", http_authz.addr, extra={"http_authz_addr": http_authz.addr})
    http_at = f"{http_addr.rpartition(':')[0]}:{probes.port}"

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
