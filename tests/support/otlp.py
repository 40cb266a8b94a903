"""An OTLP/gRPC trace receiver for the tests: opentelemetry.proto.collector.trace.v1.TraceService
/Export on a free 127.0.0.1 port, decoding requests with the published message classes
(``opentelemetry-proto``), not with authz's encoder.

xds-protos installs an older copy of the same modules, and which copy a venv ends up with
depends on install order; the receiver works with both (see ``scope_spans``), and encodes
its one optional response field (a partial success) itself, as the old copy lacks it.

It keeps every ExportTraceServiceRequest it receives. ``hang()`` makes Export block until ``release()``, as a
receiver that accepts connections but never answers; ``reject`` answers with a partial
success that rejects that many spans.

Run as a script it serves until killed and prints its port (for the benchmark).
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def scope_spans(resource_spans: Any) -> Any:
    """ResourceSpans.scope_spans (field 2). xds-protos ships an older copy of these modules,
    where field 2 is named instrumentation_library_spans; same wire format either way."""
    names = resource_spans.DESCRIPTOR.fields_by_name
    return resource_spans.scope_spans if "scope_spans" in names else (
        resource_spans.instrumentation_library_spans)


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def partial_success(rejected: int, message: str) -> bytes:
    """ExportTraceServiceResponse{partial_success (1): {rejected_spans (1), error_message (2)}}."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    text = message.encode()
    inner = b"\x08" + varint(rejected) + b"\x12" + varint(len(text)) + text
    return b"\x0a" + varint(len(inner)) + inner


class OtlpReceiver:
    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: count spans only (the benchmark's long runs)
        self.span_count = 0
        self.requests: list[Any] = []
        self.reject = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(
                self.Export,
                request_deserializer=trace_service_pb2.ExportTraceServiceRequest.FromString,
                response_serializer=lambda response: response,
            ),
        }),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self.server.start()

    def Export(self, request: Any, context: grpc.ServicerContext) -> bytes:  # noqa: N802
        with self._lock:
            self.calls += 1
        while not self._open.wait(0.1):
            if not context.is_active():  # the client gave up (deadline): stop waiting
                return b""
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in scope_spans(rs))
        with self._lock:
            self.span_count += n
            if self.keep:
                self.requests.append(request)
        # An empty ExportTraceServiceResponse is full success.
        return partial_success(self.reject, "rejected by the test") if self.reject else b""

    def hang(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def spans(self) -> list[Any]:
        with self._lock:
            requests = list(self.requests)
        return [span for r in requests for rs in r.resource_spans
                for ss in scope_spans(rs) for span in ss.spans]

    def resources(self) -> list[dict[str, Any]]:
        with self._lock:
            requests = list(self.requests)
        return [attributes(rs.resource) for r in requests for rs in r.resource_spans]

    def wait_for_spans(self, n: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if len(spans) >= n:
                return spans
            time.sleep(0.02)
        return self.spans()

    def close(self) -> None:
        self.release()
        self.server.stop(0).wait(5)


if __name__ == "__main__":
    receiver = OtlpReceiver(keep=False)
    print(receiver.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        receiver.close()
        sys.exit(0)
