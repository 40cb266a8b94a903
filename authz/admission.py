"""Admission control for Check: bounded work in flight, expired calls dropped, excess refused fast.

Past its capacity a server that queues everything answers nothing in time: every call waits
behind the ones before it until all of them miss their deadline. So:

- at most ``max_concurrent_checks`` calls are in the server at once (waiting for a serving
  thread, reading their message or being decided): grpcio's threaded server is built with
  ``maximum_concurrent_rpcs`` and refuses the next one with RESOURCE_EXHAUSTED on its polling
  thread, before the call reaches a serving thread or any of our code but ``service()``.
  Measured, that is about half the cost of refusing it in a handler of ours (a thread
  hand-off and an abort), and refusals are what a server past capacity mostly does;
- a call whose deadline has passed (or is closer than ``min_remaining``), or whose client
  went away, while it waited for a thread is dropped before any work: its answer could no
  longer be used, and deciding it would only make the calls behind it late too;
- a call whose message has not come ``stall_seconds`` after it got a thread (a half-open
  stream) is cancelled, so it cannot hold that thread for ever.

Each refusal is counted in ``authz_checks_rejected_total{reason}``. Envoy, with
``failure_mode_allow: false``, turns a refusal into a 403 like a deny: nothing is let through.

The gate is a generic handler of the threaded server. grpcio calls ``service()`` on its
polling thread as each call arrives, under the lock with which it has just compared its
count of calls in flight with the bound; the gate reads the same two numbers there to count
the refusal that follows. The Check method is served as stream-unary (on the wire the same
as unary) so that the handler has the call's context before its message comes: that is what
lets it drop an expired call without reading it and cancel a stalled one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from authz.metrics import (
    REJECT_CANCELLED,
    REJECT_DEADLINE,
    REJECT_OVERLOADED,
    REJECT_REASONS,
    REJECT_STALLED,
    Metrics,
)

log = logging.getLogger("authz.admission")

CheckFunc = Callable[[bytes], bytes]
ContextFunc = Callable[[bytes, grpc.ServicerContext], bytes]  # may abort through the context
WatchFunc = Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]  # a stream of answers


class CheckGate(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The generic handler of one unary method (``/service/method``) of ``server``, a
    ``grpc.server`` built with ``maximum_concurrent_rpcs``."""

    def __init__(self, method: str, check: CheckFunc, metrics: Metrics, server: grpc.Server, *,
                 stall_seconds: float = 5.0, min_remaining: float = 0.005,
                 others: Mapping[str, ContextFunc] | None = None,
                 watches: Mapping[str, WatchFunc] | None = None, max_watches: int = 1) -> None:
        """``others``: more unary methods (the decision API, gRPC health), read the same way:
        a client that opens their streams and never sends a message would otherwise hold
        serving threads for as long as it likes, and every check would wait behind them.
        ``watches``: server-streaming methods (health's Watch), each holding a serving thread
        while it streams; at most ``max_watches`` at once, the next refused."""
        self.method = method
        self.check = check
        self.stall_seconds = stall_seconds
        self.min_remaining = min_remaining
        # grpcio's own count and bound (grpc._server._ServerState); without them refusals
        # still happen, only uncounted, which the unit tests would show.
        self._server_state: Any = getattr(server, "_state", None)
        if getattr(self._server_state, "maximum_concurrent_rpcs", None) is None:
            log.warning("cannot count refused checks: grpcio's server state has changed")
            self._server_state = None
        # Calls reading their message, by id(context): (since, context), for the sweeper.
        self.reading: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._rejected = {r: metrics.checks_rejected.labels(r) for r in REJECT_REASONS}
        self._in_flight_gauge = metrics.checks_in_flight
        self._handler = grpc.stream_unary_rpc_method_handler(self._serve)
        self._others = {name: grpc.stream_unary_rpc_method_handler(self._serving(fn))
                        for name, fn in (others or {}).items()}
        self._others.update({name: grpc.stream_stream_rpc_method_handler(self._watching(fn))
                             for name, fn in (watches or {}).items()})
        self.max_watches = max_watches
        self.watching = 0
        self._watch_lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="authz-gate-sweeper", daemon=True)

    def in_flight(self) -> int:
        """Calls in the server now (all methods, as grpcio bounds them)."""
        state = self._server_state
        return int(state.active_rpc_count) if state is not None else 0

    # On grpcio's polling thread, as each call arrives, before anything of it is read.
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != self.method:
            return self._others.get(handler_call_details.method)
        state = self._server_state
        if state is not None and state.active_rpc_count >= state.maximum_concurrent_rpcs:
            self._rejected[REJECT_OVERLOADED].inc()  # grpcio refuses it next
        return self._handler

    def _serve(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return self.check(self._message(requests, context))

    def _serving(self, fn: ContextFunc) -> Callable[[Iterator[bytes], grpc.ServicerContext], bytes]:
        def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            return fn(self._message(requests, context), context)
        return serve

    def _watching(self, fn: WatchFunc) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        def serve(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            with self._watch_lock:
                full = self.watching >= self.max_watches
                if not full:
                    self.watching += 1
            if full:
                self._reject(context, REJECT_OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"at most {self.max_watches} watch streams at once; poll with Check")
            try:
                yield from fn(self._message(requests, context), context)
            finally:
                with self._watch_lock:
                    self.watching -= 1
        return serve

    def _message(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """The call's one message, read under the sweeper's eye; the call refused (raises)
        when it is expired, cancelled, or stalls before its message comes."""
        if context.time_remaining() < self.min_remaining:
            self._reject(context, REJECT_DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         "deadline too close when the check could start")
        if not context.is_active():
            self._reject(context, REJECT_CANCELLED, grpc.StatusCode.CANCELLED,
                         "cancelled before the check started")
        key = id(context)
        self.reading[key] = (time.monotonic(), context)
        try:
            data = next(requests, None)
        except grpc.RpcError:  # cancelled while its message was awaited (by the sweeper or the client)
            data = None
        swept = self.reading.pop(key, None) is None  # the sweeper took it: counted as stalled
        if data is None:
            if swept:
                context.abort(grpc.StatusCode.CANCELLED, "stalled: no request message")
            self._reject(context, REJECT_CANCELLED, grpc.StatusCode.CANCELLED, "no request message")
        return data  # type: ignore[return-value]

    def _reject(self, context: grpc.ServicerContext, reason: str, code: grpc.StatusCode, details: str) -> None:
        self._rejected[reason].inc()
        context.abort(code, details)  # raises: grpcio sends the status

    # --- the sweeper: stalled calls and the in-flight gauge ------------------------------

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()

    def _sweep(self) -> None:
        while not self._stop.wait(0.5):
            self.sweep_once()

    def sweep_once(self) -> int:
        """Cancel calls whose message has not come within stall_seconds; returns how many."""
        self._in_flight_gauge.set(self.in_flight())
        too_old = time.monotonic() - self.stall_seconds
        cancelled = 0
        for key in [key for key, (since, _) in list(self.reading.items()) if since < too_old]:
            entry = self.reading.pop(key, None)
            if entry is not None:
                entry[1].cancel()
                cancelled += 1
        if cancelled:
            self._rejected[REJECT_STALLED].inc(cancelled)
        return cancelled
