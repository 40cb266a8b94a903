"""gRPC health (``grpc.health.v1.Health``) served through the admission gate.

grpcio's HealthServicer keeps the statuses and the watchers; only how its two methods reach
a serving thread is ours. Registered as grpcio registers it, each call would hold one of the
few serving threads (``--grpc-threads``) while it waits for its request message, and a
``Watch`` for as long as the client keeps it open: a handful of half-open health calls or
open watches would leave no thread for Check, and Envoy, without answers, denies every
request. So ``Check`` is read like Check (a call whose message does not come within the
stall time is cancelled) and at most a quarter of the serving threads watch at once; the
next watch is refused with RESOURCE_EXHAUSTED (``authz_checks_rejected_total{reason=
"overloaded"}``), and its client may retry or poll with ``Check``, as Envoy's and
Kubernetes' gRPC health checks do.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from authz.admission import ContextFunc, WatchFunc

SERVICE = "grpc.health.v1.Health"
CHECK_METHOD = f"/{SERVICE}/Check"
WATCH_METHOD = f"/{SERVICE}/Watch"


def max_watches(grpc_threads: int) -> int:
    """Watch streams served at once: the rest of the serving threads stay for checks."""
    return max(1, grpc_threads // 4)


def _request(data: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return health_pb2.HealthCheckRequest.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError; any failure is a bad argument
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a HealthCheckRequest")


def check_method(servicer: health.HealthServicer) -> ContextFunc:
    """``Check`` on raw bytes, for CheckGate's ``others``."""

    def call(data: bytes, context: grpc.ServicerContext) -> bytes:
        # grpc_health is untyped: the answer is a HealthCheckResponse
        return bytes(servicer.Check(_request(data, context), context).SerializeToString())

    return call


def watch_method(servicer: health.HealthServicer) -> WatchFunc:
    """``Watch`` on raw bytes, for CheckGate's ``watches``: the servicer's stream of statuses."""

    def call(data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for answer in servicer.Watch(_request(data, context), context):
            yield answer.SerializeToString()

    return call
