"""Admission control on a real grpcio threaded server (as `authz serve` runs it): excess refused fast with RESOURCE_EXHAUSTED,
expired calls dropped before any work, stalled calls cancelled, each counted by reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from authz.admission import CheckGate
from authz.metrics import Metrics
from authz.serving_pool import ServingPool

METHOD = "/test.Svc/Check"


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.checks_rejected.labels(reason)._value.get()  # type: ignore[no-any-return]


class Served:
    """A threaded server built as authz.server builds it: the bound is grpcio's, the gate counts."""

    def __init__(self, check: Callable[[bytes], bytes], metrics: Metrics, threads: int = 4,
                 max_concurrent: int = 100, **kw: Any) -> None:
        self.pool = ServingPool(threads)
        self.server = grpc.server(self.pool, maximum_concurrent_rpcs=max_concurrent)
        self.gate = CheckGate(METHOD, check, metrics, self.server, **kw)
        self.server.add_generic_rpc_handlers((self.gate,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.gate.start()

    async def stop(self) -> None:
        self.gate.stop()
        self.server.stop(None).wait(10)
        self.pool.shutdown(wait=False)


async def serve(check: Callable[[bytes], bytes], metrics: Metrics, **kw: Any) -> tuple[Served, CheckGate, int]:
    served = Served(check, metrics, **kw)
    return served, served.gate, served.port


def test_past_the_bound_calls_are_refused_fast_then_stalled_ones_cancelled() -> None:
    """Two half-open streams (their message never comes) hold both slots: the next call is
    refused with RESOURCE_EXHAUSTED without any work, until the sweeper cancels the stalled
    ones and frees their slots."""
    metrics = Metrics()
    calls: list[bytes] = []

    def check(data: bytes) -> bytes:
        calls.append(data)
        return b"ok"

    async def main() -> None:
        server, gate, port = await serve(check, metrics, max_concurrent=2, stall_seconds=1.5)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                held = [ch.stream_unary(METHOD)(_never()) for _ in range(2)]
                assert await _until(lambda: gate.in_flight() == 2)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await ch.unary_unary(METHOD)(b"x", timeout=5)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert calls == [] and rejected(metrics, "overloaded") == 1
                # the sweeper cancels the two stalled calls after 1.5 s
                assert await _until(lambda: gate.in_flight() == 0, 15)
                assert rejected(metrics, "stalled") == 2
                assert await ch.unary_unary(METHOD)(b"x", timeout=5) == b"ok"
                assert calls == [b"x"]
                assert await _until(lambda: gate.in_flight() == 0)  # its slot released too
                for h in held:
                    h.cancel()
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_call_too_close_to_its_deadline_is_dropped_before_any_work() -> None:
    metrics = Metrics()
    calls: list[bytes] = []

    def check(data: bytes) -> bytes:
        calls.append(data)
        return b"ok"

    async def main() -> None:
        # min_remaining 60 s: a call with a 30 s deadline could not be answered usefully
        server, _, port = await serve(check, metrics, max_concurrent=10, min_remaining=60.0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as dropped:
                    await ch.unary_unary(METHOD)(b"x", timeout=30)
                assert dropped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert await ch.unary_unary(METHOD)(b"y", timeout=120) == b"ok"  # enough time left
                assert await ch.unary_unary(METHOD)(b"z") == b"ok"  # no deadline at all
        finally:
            await server.stop()

    asyncio.run(main())
    assert calls == [b"y", b"z"]
    assert rejected(metrics, "deadline_exceeded") == 1


def test_calls_that_expire_while_queued_are_not_decided() -> None:
    """A check that holds the only serving thread for 0.3 s; 20 calls with 0.2 s deadlines behind it expire
    while they wait, and are dropped (by gRPC's core when the client cancels, or by the gate)
    instead of being decided late."""
    metrics = Metrics()
    calls = []

    def blocking(data: bytes) -> bytes:
        calls.append(data)
        time.sleep(0.3)
        return b"ok"

    async def main() -> list[str]:
        # one serving thread, as one busy core would be
        server, _, port = await serve(blocking, metrics, max_concurrent=100, threads=1)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(METHOD)

                async def one() -> str:
                    try:
                        await call(b"x", timeout=0.2)
                        return "OK"
                    except grpc.aio.AioRpcError as exc:
                        return str(exc.code().name)

                out = await asyncio.gather(*(one() for _ in range(20)))
                await asyncio.sleep(1.0)  # let the server reach whatever is still queued
                return out
        finally:
            await server.stop()

    results = asyncio.run(main())
    assert results.count("DEADLINE_EXCEEDED") >= 15
    assert len(calls) < 10  # without dropping, all 20 would have been decided, one by one


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def _never():  # type: ignore[no-untyped-def]
    await asyncio.sleep(3600)
    yield b""


@pytest.mark.parametrize("method", ["/other.Svc/Call"])
def test_other_methods_pass_through(method: str) -> None:
    gate = CheckGate(METHOD, lambda d: d, Metrics(), grpc.server(ServingPool(1), maximum_concurrent_rpcs=1))

    class Details:
        pass

    d = Details()
    d.method = method  # type: ignore[attr-defined]
    assert gate.service(d) is None  # type: ignore[arg-type]


def test_half_open_streams_of_other_gated_methods_are_cancelled_too() -> None:
    """The decision API's methods go through the gate as well: streams opened and never sent
    on held every serving thread (the caller check came after the message), and each check
    waited behind them for as long as the client liked."""
    metrics = Metrics()
    other = "/test.Svc/Decide"

    def decide(data: bytes, context: grpc.ServicerContext) -> bytes:
        return b"decided:" + data

    async def main() -> None:
        server, gate, port = await serve(lambda d: b"ok", metrics, threads=2, stall_seconds=1.0,
                                         others={other: decide})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                held = [ch.stream_unary(other)(_never()) for _ in range(2)]  # both serving threads
                assert await _until(lambda: gate.in_flight() == 2)
                # the sweeper frees the threads; the check that waited behind them is answered
                assert await ch.unary_unary(METHOD)(b"x", timeout=15) == b"ok"
                assert rejected(metrics, "stalled") == 2
                for h in held:
                    with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                        await h
                    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
                assert await ch.unary_unary(other)(b"q", timeout=5) == b"decided:q"
        finally:
            await server.stop()

    asyncio.run(main())
