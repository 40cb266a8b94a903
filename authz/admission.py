"""Admission control for Check: bounded work in flight, expired calls dropped, excess refused fast.

Past its capacity a server that queues everything answers nothing in time: every call waits
behind the ones before it until all of them miss their deadline. So:

- at most ``max_concurrent`` Check calls are in the server at once (received, queued on the
  event loop or being decided); the next one is refused at once with RESOURCE_EXHAUSTED,
  before its message is even read, which costs a fraction of a check;
- a call whose deadline has passed (or is closer than ``min_remaining``), or whose client
  went away, while it waited is dropped before any work: its answer could no longer be
  used, and deciding it would only make the calls behind it late too;
- a call still unanswered after ``stall_seconds`` (a half-open stream whose message never
  comes) is cancelled, so it cannot hold a slot for ever.

Each refusal is counted in ``authz_checks_rejected_total{reason}``. Envoy, with
``failure_mode_allow: false``, turns a refusal into a 403 like a deny: nothing is let through.

The gate sits in ``service()`` of a generic handler, which grpc.aio calls inside the task of
each new call: the task's completion (whatever ends it) releases the slot, so a slot can
never leak.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from authz.metrics import (
    REJECT_CANCELLED,
    REJECT_DEADLINE,
    REJECT_OVERLOADED,
    REJECT_REASONS,
    REJECT_STALLED,
    Metrics,
)

CheckFunc = Callable[[bytes], bytes]


class CheckGate(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The generic handler of one unary method (``/service/method``), behind the gate."""

    def __init__(self, method: str, check: CheckFunc, metrics: Metrics, *, max_concurrent: int,
                 stall_seconds: float = 30.0, min_remaining: float = 0.005) -> None:
        self.method = method
        self.check = check
        self.max_concurrent = max(1, max_concurrent)
        self.stall_seconds = stall_seconds
        self.min_remaining = min_remaining
        self.in_flight: dict[asyncio.Task[object], float] = {}
        self._rejected = {r: metrics.checks_rejected.labels(r) for r in REJECT_REASONS}
        self._in_flight_gauge = metrics.checks_in_flight
        self._handler = grpc.unary_unary_rpc_method_handler(self._serve)
        self._refuse = grpc.unary_unary_rpc_method_handler(self._overloaded)
        self._sweeper: asyncio.Task[None] | None = None

    # grpc.aio calls this at the start of each call's task, before reading its message.
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != self.method:
            return None
        if len(self.in_flight) >= self.max_concurrent:
            return self._refuse
        task = asyncio.current_task()
        if task is not None:
            self.in_flight[task] = time.monotonic()
            task.add_done_callback(self._release)
        return self._handler

    def _release(self, task: asyncio.Task[object]) -> None:
        self.in_flight.pop(task, None)

    async def _serve(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        if remaining is not None and remaining < self.min_remaining:
            return await self._reject(context, REJECT_DEADLINE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      "deadline too close when the check could start")
        if context.cancelled():
            return await self._reject(context, REJECT_CANCELLED, grpc.StatusCode.CANCELLED,
                                      "cancelled before the check started")
        return self.check(data)

    async def _overloaded(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._reject(context, REJECT_OVERLOADED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"overloaded: {self.max_concurrent} checks in flight")

    async def _reject(self, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode,
                      details: str) -> bytes:
        self._rejected[reason].inc()
        try:
            await context.abort(code, details)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001,S110 - the call is already gone: nobody to tell
            pass
        raise asyncio.CancelledError

    # --- the sweeper: stalled calls and the in-flight gauge ------------------------------

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep_once()

    def sweep_once(self) -> int:
        """Cancel calls older than stall_seconds; returns how many."""
        self._in_flight_gauge.set(len(self.in_flight))
        too_old = time.monotonic() - self.stall_seconds
        stalled = [t for t, since in self.in_flight.items() if since < too_old and not t.done()]
        for task in stalled:
            task.cancel()
        if stalled:
            self._rejected[REJECT_STALLED].inc(len(stalled))
        return len(stalled)

