"""gRPC health on a real `authz serve`: its calls cannot take the serving threads from Check.

Registered as grpcio registers it, a health Check whose message never comes held a serving
thread until its client gave up, and every Watch held one for as long as it stayed open: four
of either on `--grpc-threads 4` and no check was answered any more (authz.health)."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bundle_factory import check_request
from test_serve import http_get, running

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rejected(h: int, reason: str) -> float:
    text = http_get(h, "/metrics")[1]
    found = re.search(rf'^authz_checks_rejected_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def _never():  # type: ignore[no-untyped-def]
    await asyncio.sleep(3600)
    yield b""


def test_half_open_health_checks_are_cancelled_and_checks_go_on() -> None:
    """Six health checks opened and never sent on, over four serving threads: they are
    cancelled as stalled, and the check behind them is answered."""
    with running("--grpc-threads", "4") as (_, g, h):
        async def main() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{g}") as ch:
                held = [ch.stream_unary(HEALTH_CHECK)(_never()) for _ in range(6)]
                await asyncio.sleep(0.5)  # they have the threads
                check = external_auth_pb2_grpc.AuthorizationStub(ch).Check
                started = time.monotonic()
                answer = await check(check_request(), timeout=20)
                assert answer.status.code == 7  # decided (a deny), not lost
                assert time.monotonic() - started < 15
                for call in held:
                    with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                        await call
                    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
                ok = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert ok.status == SERVING

        asyncio.run(main())
        assert rejected(h, "stalled") >= 6


def test_watches_are_bounded_and_follow_the_status() -> None:
    """`--grpc-threads 8`: two watches at once, the third refused while checks are answered;
    a closed watch frees its place; an open one sees NOT_SERVING when the drain starts."""
    with running("--grpc-threads", "8", "--drain-grace", "2") as (proc, g, h):
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            first = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            second = health.Watch(health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
                                  timeout=30)
            assert next(first).status == SERVING and next(second).status == SERVING
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rejected(h, "overloaded") == 1
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            for _ in range(20):  # more checks than the six threads left, one after another
                assert stub.Check(check_request(), timeout=5).status.code == 7
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING

            second.cancel()
            deadline = time.monotonic() + 10
            while True:  # the server sees the cancel a moment later
                third = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                try:
                    assert next(third).status == SERVING
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline
                    time.sleep(0.1)

            proc.send_signal(signal.SIGTERM)
            assert next(first).status == NOT_SERVING
            assert next(third).status == NOT_SERVING
            first.cancel()
            third.cancel()
