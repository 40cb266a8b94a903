"""Admission control on a real grpc.aio server: excess refused fast with RESOURCE_EXHAUSTED,
expired calls dropped before any work, stalled calls cancelled, each counted by reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest

from authz.admission import CheckGate
from authz.metrics import Metrics

METHOD = "/test.Svc/Check"


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.checks_rejected.labels(reason)._value.get()  # type: ignore[no-any-return]


async def serve(check: Callable[[bytes], bytes], metrics: Metrics, **kw: float) -> tuple[grpc.aio.Server, CheckGate, int]:
    server = grpc.aio.server()
    gate = CheckGate(METHOD, check, metrics, **kw)  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((gate,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gate.start()
    return server, gate, port


def test_excess_is_refused_fast_with_resource_exhausted() -> None:
    metrics = Metrics()
    calls = []

    def slow(data: bytes) -> bytes:
        calls.append(data)
        time.sleep(0.02)  # a check that holds the loop: calls queue up behind it
        return b"ok"

    async def main() -> tuple[dict[str, int], float]:
        server, gate, port = await serve(slow, metrics, max_concurrent=5)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(METHOD)
                t0 = time.monotonic()

                async def one() -> str:
                    try:
                        await call(b"x", timeout=30)
                        return "OK"
                    except grpc.aio.AioRpcError as exc:
                        return str(exc.code().name)

                results = await asyncio.gather(*(one() for _ in range(60)))
                elapsed = time.monotonic() - t0
                assert not gate.in_flight  # every slot released
        finally:
            await server.stop(None)
        counts: dict[str, int] = {}
        for r in results:
            counts[r] = counts.get(r, 0) + 1
        return counts, elapsed

    counts, elapsed = asyncio.run(main())
    assert counts.get("OK", 0) >= 5
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"}
    assert len(calls) == counts["OK"]  # refused calls did no work
    assert rejected(metrics, "overloaded") == counts["RESOURCE_EXHAUSTED"]


def test_expired_calls_are_dropped_before_any_work() -> None:
    metrics = Metrics()
    calls = []

    def blocking(data: bytes) -> bytes:
        calls.append(data)
        time.sleep(0.3)  # every call behind this one waits past its 0.2 s deadline
        return b"ok"

    async def main() -> list[str]:
        server, _, port = await serve(blocking, metrics, max_concurrent=100)
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
                await asyncio.sleep(1.0)  # let the server reach the queued calls
                return out
        finally:
            await server.stop(None)

    results = asyncio.run(main())
    assert results.count("DEADLINE_EXCEEDED") >= 15
    # the server decided only a few of the 20: the others had expired when their turn came
    assert len(calls) < 10
    dropped = rejected(metrics, "deadline_exceeded") + rejected(metrics, "cancelled")
    assert dropped >= 20 - len(calls) - 2  # a call may expire between receipt and handler


def test_a_stalled_call_is_cancelled_and_its_slot_freed() -> None:
    metrics = Metrics()

    async def main() -> tuple[int, int]:
        server, gate, port = await serve(lambda d: b"ok", metrics, max_concurrent=1, stall_seconds=0.5)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                # a stream that never sends its message holds the only slot...
                stream = ch.stream_unary(METHOD)
                pending = stream(_never())
                await asyncio.sleep(0.3)
                held = len(gate.in_flight)
                # ...until the sweeper cancels it
                deadline = time.monotonic() + 10
                while gate.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                pending.cancel()
                answer = await ch.unary_unary(METHOD)(b"x", timeout=5)
                assert answer == b"ok"
                return held, len(gate.in_flight)
        finally:
            await server.stop(None)

    held, after = asyncio.run(main())
    assert held == 1 and after == 0
    assert rejected(metrics, "stalled") == 1


async def _never():  # type: ignore[no-untyped-def]
    await asyncio.sleep(3600)
    yield b""


@pytest.mark.parametrize("method", ["/other.Svc/Call"])
def test_other_methods_pass_through(method: str) -> None:
    gate = CheckGate(METHOD, lambda d: d, Metrics(), max_concurrent=1)

    class Details:
        pass

    d = Details()
    d.method = method  # type: ignore[attr-defined]
    assert gate.service(d) is None  # type: ignore[arg-type]
