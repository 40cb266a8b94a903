"""OpenTelemetry traces of checks and bundle loads, exported with OTLP over gRPC. Off by default.

``authz serve --otlp-endpoint HOST:PORT`` turns it on. Each check becomes one SERVER span
(named after Envoy's gRPC method, or ``authz.check`` for HTTP ext_authz and the decision
API), a child of the request's W3C ``traceparent`` when it has a valid one (a new trace
otherwise), with the decision as attributes: ``authz.decision``, ``authz.policy``,
``authz.rule``, ``authz.tenant``, ``authz.reason``, ``authz.bundle.revision``,
``authz.decision_id``, ``authz.caller``. No header value becomes an attribute.
Bundle loads (loaded, rejected or failed; not the polls that found nothing new) become
``authz.bundle.load`` spans of their own traces.

Sampling is decided on the trace id, so every instance decides alike for one trace: a
check is traced when its parent is sampled (W3C flag 01; no parent counts as sampled) and
the trace id falls within ``--trace-ratio`` (default 1: all of them). A parent that says
"not sampled" is never overruled.

The check path does no I/O and takes no lock: it appends one tuple of plain values to a
bounded deque, or counts a drop (``authz_trace_spans_dropped_total{reason="queue_full"}``)
when the queue is full. The exporter thread turns batches into ExportTraceServiceRequest
messages (encoded here, no SDK: see "OTLP on the wire") and sends them with a timeout; a batch the
receiver refuses, or that fails or times out, is dropped and counted, never retried, so a
receiver that is down or hangs costs checks nothing.

The one module that knows OTLP.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from authz.engine.model import Decision
from authz.metrics import Metrics

log = logging.getLogger("authz.tracing")

CHECK_SPAN = "envoy.service.auth.v3.Authorization/Check"  # a check over gRPC ext_authz
HTTP_CHECK_SPAN = "authz.check"  # over HTTP ext_authz or the decision API (authz.caller says)
LOAD_SPAN = "authz.bundle.load"
SCOPE = "authz"
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})((?:-[\x20-\x7e]*)?)")
_SAMPLED_DIGITS = frozenset("13579bdf")  # low hex digit of the flags with bit 0 set
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_ERROR = 1024  # characters of a load error kept on its span

_SAMPLED = 0x01  # the W3C trace flag
_GRPC_CALLER = "envoy_grpc"  # authz.check.CALLER_ENVOY_GRPC; check.py uses this module


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C traceparent, else None.

    Version 00 must be exactly 55 characters; a later version may append fields, which
    are ignored as the spec asks. Upper-case hex, ids of all zeros and version ff are
    invalid: the header is then ignored and the check starts a trace of its own.
    """
    if value is None:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if (version == "00" and rest) or version == "ff" or trace_id == _ZERO_TRACE or (
            span_id == _ZERO_SPAN):
        return None
    return trace_id, span_id, flags[1] in _SAMPLED_DIGITS


@dataclass(frozen=True, slots=True)
class Settings:
    endpoint: str  # host:port of an OTLP/gRPC receiver (plain gRPC)
    ratio: float = 1.0
    queue_size: int = 2048
    batch_size: int = 512
    interval: float = 1.0  # seconds between exports when the batch is not full
    timeout: float = 5.0  # of one export call
    service_name: str = "authz"


# A queued check span: trace id (hex; "" for a new trace), parent span id (hex or ""),
# start and end (ns), the decision, revision and decision id. Ids are drawn and bytes encoded
# by the exporter thread: the check path only decides sampling and appends this tuple.
_CheckItem = tuple[str, str, int, int, Decision, str, str, str]
# A queued load span: ("load", start, end, source, result, revision, served_from, error).
_LoadItem = tuple[str, int, int, str, str, str, str, str]


class Tracing:
    def __init__(self, settings: Settings, metrics: Metrics | None) -> None:
        if not 0.0 <= settings.ratio <= 1.0:
            raise ValueError(f"trace ratio must be from 0 to 1, not {settings.ratio}")
        self.settings = settings
        self.metrics = metrics
        # Ratio sampling compares the trace id's low 64 bits (the random part) to a bound.
        self._bound = int(settings.ratio * (1 << 64))
        self._all = settings.ratio >= 1.0
        self._queue: collections.deque[_CheckItem | _LoadItem] = collections.deque()
        self._max = settings.queue_size
        self._rng = random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(settings.endpoint)
        # Bytes in, bytes out: the messages are encoded here (see "OTLP on the wire" below).
        self._export = self._channel.unary_unary(EXPORT_METHOD)
        # Constant parts of every request and span, encoded once.
        self._resource = _field(1, b"".join([
            _attr("service.name", os.environ.get("OTEL_SERVICE_NAME") or settings.service_name, 1),
            _attr("service.instance.id", f"{socket.gethostname()}/{os.getpid()}", 1),
            _attr("process.pid", os.getpid(), 1),
        ]))
        self._scope = _field(1, _field(1, SCOPE.encode()))
        self._check_heads = {
            _GRPC_CALLER: _field(5, CHECK_SPAN.encode()) + _varint_field(6, _KIND_SERVER),
            "": _field(5, HTTP_CHECK_SPAN.encode()) + _varint_field(6, _KIND_SERVER),
        }
        self._rpc_attrs = b"".join([
            _attr("rpc.system", "grpc"),
            _attr("rpc.service", "envoy.service.auth.v3.Authorization"),
            _attr("rpc.method", "Check"),
        ])
        self._blocks: dict[tuple[bool, str, str, str, str | None, str, str], bytes] = {}
        self.exported = 0  # spans the receiver accepted (also in the metric)
        self.exporter_cpu = 0.0  # CPU seconds the exporter thread spent encoding and sending
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="authz-otlp-exporter", daemon=True)
        self._thread.start()

    # --- the check path: no I/O, no lock, O(1) ---------------------------------------------

    def check(self, traceparent: str | None, decision: Decision, decision_id: str,
              revision: str, elapsed: float, caller: str = "envoy_grpc") -> None:
        """Queue the span of one check, if sampled. Never blocks, never raises on bad input."""
        parent = parse_traceparent(traceparent)
        if parent is None:
            if not self._all and self._rng.random() >= self.settings.ratio:
                return
            trace_id = parent_id = ""
        else:
            trace_id, parent_id, sampled = parent
            if not sampled or (not self._all and int(trace_id[16:], 16) >= self._bound):
                return
        end = time.time_ns()
        self._put((trace_id, parent_id, end - int(elapsed * 1e9), end, decision, revision,
                   decision_id, caller))

    def _put(self, item: _CheckItem | _LoadItem) -> None:
        queue = self._queue
        if len(queue) >= self._max:
            self._dropped("queue_full", 1)
            return
        queue.append(item)
        if len(queue) == self.settings.batch_size:
            self._wake.set()

    # --- bundle loads --------------------------------------------------------------------

    def bundle_load(self, source: str, result: str, revision: str | None,
                    served_from: str | None, error: str | None, started_ns: int) -> None:
        self._put(("load", started_ns, time.time_ns(), source, result, revision or "",
                   served_from or "", (error or "")[:_MAX_ERROR]))

    # --- the exporter thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.interval)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while self._queue:
            batch: list[_CheckItem | _LoadItem] = []
            queue = self._queue
            while queue and len(batch) < self.settings.batch_size:
                batch.append(queue.popleft())
            self._send(batch)
            if self._stop.is_set() and time.monotonic() > self._close_deadline:
                self._dropped("export_failed", len(queue))
                queue.clear()
                return

    _close_deadline = float("inf")

    def _send(self, batch: list[_CheckItem | _LoadItem]) -> None:
        started = time.thread_time()
        try:
            self._send_batch(batch)
        finally:
            self.exporter_cpu += time.thread_time() - started

    def _send_batch(self, batch: list[_CheckItem | _LoadItem]) -> None:
        try:
            request = self.request(batch)
            response = self._export(request, timeout=self.settings.timeout)
        except grpc.RpcError as exc:
            self._dropped("export_failed", len(batch))
            self._warn(f"OTLP export to {self.settings.endpoint} failed "
                       f"({exc.code().name if hasattr(exc, 'code') else exc}); "
                       f"{len(batch)} spans dropped")
            return
        except Exception:  # noqa: BLE001 - the exporter thread must live on
            log.exception("OTLP export failed")
            self._dropped("export_failed", len(batch))
            return
        rejected = _rejected_spans(response)
        if rejected:
            self._dropped("rejected", rejected)
            self._warn(f"OTLP receiver rejected {rejected} of {len(batch)} spans")
        accepted = len(batch) - rejected
        self.exported += accepted
        if self.metrics is not None:
            self.metrics.trace_spans_exported.inc(accepted)

    def request(self, batch: list[_CheckItem | _LoadItem]) -> bytes:
        """The serialized ExportTraceServiceRequest of queued items (built here, off the check
        path): one ResourceSpans with one ScopeSpans holding every span."""
        spans = b"".join(
            _field(2, self._load_span(i) if i[0] == "load"  # type: ignore[arg-type]
                   else self._check_span(i))  # type: ignore[arg-type]
            for i in batch
        )
        scope_spans = self._scope + spans
        return _field(1, self._resource + _field(2, scope_spans))

    def _check_span(self, item: _CheckItem) -> bytes:
        trace_id, parent_id, start, end, decision, revision, decision_id, caller = item
        return b"".join([
            # trace_id (1) and span_id (2): 16 and 8 bytes; parent_span_id (4) when remote.
            b"\x0a\x10" + (bytes.fromhex(trace_id) if trace_id else self._new_trace_id()),
            b"\x12\x08" + (self._rng.getrandbits(64) | 1).to_bytes(8, "big"),
            b"\x22\x08" + bytes.fromhex(parent_id) if parent_id else b"",
            self._check_heads.get(caller) or self._check_heads[""],
            _TIMES.pack(0x39, start, 0x41, end),  # start (7) and end (8) time, fixed64
            self._decision_block(decision, revision, caller),
            _DECISION_ID(decision_id),
            _FLAGS_REMOTE if parent_id else _FLAGS_ROOT,
        ])

    def _new_trace_id(self) -> bytes:
        return (self._rng.getrandbits(128) | 1).to_bytes(16, "big")

    def _decision_block(self, d: Decision, revision: str, caller: str) -> bytes:
        """The attributes and status a decision gives a span, encoded once per distinct
        decision: a service sees few (policy, rule, reason) combinations, over and over."""
        key = (d.allowed, d.policy, d.rule, d.reason, d.tenant, revision, caller)
        block = self._blocks.get(key)
        if block is None:
            if len(self._blocks) >= 4096:
                self._blocks.clear()
            block = self._blocks[key] = b"".join([
                self._rpc_attrs if caller == _GRPC_CALLER else b"",
                _CALLER(caller),
                _ALLOW if d.allowed else _DENY,
                _POLICY(d.policy),
                _RULE(d.rule),
                _REASON(d.reason),
                _REVISION(revision),
                _TENANT(d.tenant) if d.tenant else b"",
                _status(_ERROR) if d.reason.startswith("internal error") else _STATUS_UNSET,
            ])
        return block

    def _load_span(self, item: _LoadItem) -> bytes:
        _, start, end, source, result, revision, served_from, error = item
        failed = result not in ("loaded", "unchanged")
        out = [
            _field(1, self._rng.getrandbits(128).to_bytes(16, "big")),
            _field(2, self._rng.getrandbits(64).to_bytes(8, "big")),
            _field(5, LOAD_SPAN.encode()),
            _varint_field(6, _KIND_INTERNAL),
            _fixed64(7, start),
            _fixed64(8, end),
            _attr("authz.bundle.source", source),
            _attr("authz.bundle.result", result),
            _attr("authz.bundle.revision", revision) if revision else b"",
            _attr("authz.bundle.served_from", served_from) if served_from else b"",
            _attr("authz.bundle.error", error) if error else b"",
            _status(_ERROR if failed else _OK, error[:200] if failed else ""),
            _FLAGS_ROOT,
        ]
        return b"".join(out)

    def _dropped(self, reason: str, n: int) -> None:
        if self.metrics is not None and n:
            self.metrics.trace_spans_dropped.labels(reason).inc(n)

    def _warn(self, message: str) -> None:
        # One warning a minute at most: a receiver that is down must not flood the log.
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning("%s (further export errors this minute are only counted)", message)

    def close(self, timeout: float = 2.0) -> None:
        """Export what is queued (within ``timeout``), then stop the thread and the channel."""
        self._close_deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout + self.settings.timeout)
        self._channel.close()


# --- OTLP on the wire ------------------------------------------------------------------------
#
# The messages of opentelemetry/proto (trace/v1/trace.proto, common/v1/common.proto,
# collector/trace/v1/trace_service.proto; stable field numbers since OTLP 1.0) encoded by
# hand. Not through generated classes: xds-protos, on our hot path, installs its own, older
# copy of the same opentelemetry.proto modules (InstrumentationLibrarySpans, no
# ScopeSpans), so which generated code a process gets depends on install order. A few
# varints and length prefixes depend on nothing, and cost less than building messages.

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_KIND_INTERNAL, _KIND_SERVER = 1, 2  # Span.SpanKind
_UNSET, _OK, _ERROR = 0, 1, 2  # Status.StatusCode


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: bytes, string or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _fixed64(number: int, value: int) -> bytes:
    return _varint(number << 3 | 1) + value.to_bytes(8, "little")


def _attr(key: str, value: str | int, number: int = 9) -> bytes:
    """An attribute: KeyValue{key (1), value (2): AnyValue{string (1) | int (3)}} as field
    ``number``: 9 on a Span, 1 on a Resource."""
    any_value = _varint_field(3, value) if isinstance(value, int) else _field(1, value.encode())
    return _field(number, _field(1, key.encode()) + _field(2, any_value))


class _Key:
    """A string attribute whose key is encoded once: ``_Key("authz.rule")("r1")``."""

    __slots__ = ("prefix",)

    def __init__(self, key: str) -> None:
        self.prefix = _field(1, key.encode()) + b"\x12"  # KeyValue.key, then the value's tag

    def __call__(self, value: str) -> bytes:
        raw = value.encode()
        any_value = b"\x0a" + _varint(len(raw)) + raw  # AnyValue.string_value
        kv = self.prefix + _varint(len(any_value)) + any_value
        return b"\x4a" + _varint(len(kv)) + kv  # Span.attributes


def _status(code: int, message: str = "") -> bytes:
    body = (_field(2, message.encode()) if message else b"") + (
        _varint_field(3, code) if code else b"")
    return _field(15, body)


# Span.flags (16, fixed32): W3C trace flags in bits 0-7, "has a parent" and "the parent is
# remote" in bits 8 and 9.
_FLAGS_ROOT = _varint(16 << 3 | 5) + (_SAMPLED | 0x100).to_bytes(4, "little")
_FLAGS_REMOTE = _varint(16 << 3 | 5) + (_SAMPLED | 0x100 | 0x200).to_bytes(4, "little")
_ALLOW = _attr("authz.decision", "allow")
_DENY = _attr("authz.decision", "deny")
_POLICY, _RULE, _REASON = _Key("authz.policy"), _Key("authz.rule"), _Key("authz.reason")
_REVISION, _DECISION_ID, _TENANT, _CALLER = (
    _Key("authz.bundle.revision"), _Key("authz.decision_id"), _Key("authz.tenant"),
    _Key("authz.caller"))
_STATUS_UNSET = b"\x7a\x00"  # Span.status, empty
_TIMES = struct.Struct("<BQBQ")  # two fixed64 fields, each after its one-byte tag


def _rejected_spans(response: bytes) -> int:
    """ExportTraceServiceResponse.partial_success (1).rejected_spans (1), 0 when absent."""
    inner = _submessage(response, 1)
    return _varint_value(inner, 1) if inner else 0


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(number, wire type, value) of each field; stops quietly at anything malformed."""
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            yield number, wire, value
        elif wire == 2:
            length, i = _read_varint(data, i)
            yield number, wire, data[i:i + length]
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            return


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while i < len(data):
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
    return value, len(data) + 1


def _submessage(data: bytes, number: int) -> bytes | None:
    for num, wire, value in _fields(data):
        if num == number and wire == 2 and isinstance(value, bytes):
            return value
    return None


def _varint_value(data: bytes, number: int) -> int:
    for num, wire, value in _fields(data):
        if num == number and wire == 0 and isinstance(value, int):
            return value
    return 0


# --- command line ------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tracing (OpenTelemetry, off by default)")
    g.add_argument("--otlp-endpoint", metavar="HOST:PORT",
                   help="export spans of checks and bundle loads to this OTLP/gRPC receiver")
    g.add_argument("--trace-ratio", type=_ratio, default=1.0, metavar="RATIO",
                   help="share of traces whose checks get a span, 0..1 (default 1); a parent "
                        "traceparent that is not sampled is never traced")


def from_args(args: argparse.Namespace, metrics: Metrics) -> Tracing | None:
    if not args.otlp_endpoint:
        return None
    host, sep, port = args.otlp_endpoint.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"--otlp-endpoint must be HOST:PORT, not {args.otlp_endpoint!r}")
    return Tracing(Settings(args.otlp_endpoint, args.trace_ratio), metrics)


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text!r}")
    return ratio
