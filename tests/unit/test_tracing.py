"""OpenTelemetry spans of checks and bundle loads, received by a real OTLP/gRPC receiver.

The receiver (support/otlp.py) implements TraceService from the published protos and
decodes what authz sends with the published message classes. Checks run through the real
Checker on a real bundle.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import INTRUDER, check_request, loaded_store, write_bundle
from support.otlp import OtlpReceiver, attributes

from authz.bundle.sources import DirectorySource
from authz.bundle.store import BundleStore
from authz.bundle.watcher import Reloader
from authz.check import Checker
from authz.metrics import Metrics
from authz.tracing import CHECK_SPAN, LOAD_SPAN, Settings, Tracing, parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
NOT_SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"
SERVER_KIND = 2


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    try:
        yield r
    finally:
        r.close()


def make_tracing(endpoint: str, metrics: Metrics, **kw: Any) -> Tracing:
    kw.setdefault("interval", 0.05)
    return Tracing(Settings(endpoint, **kw), metrics)


def dropped(metrics: Metrics, reason: str) -> float:
    return float(metrics.registry.get_sample_value(
        "authz_trace_spans_dropped_total", {"reason": reason}) or 0.0)


def exported(metrics: Metrics) -> float:
    return float(metrics.registry.get_sample_value("authz_trace_spans_exported_total") or 0.0)


# --- traceparent --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (SAMPLED, (TRACE_ID, PARENT_ID, True)),
    (NOT_SAMPLED, (TRACE_ID, PARENT_ID, False)),
    (f"00-{TRACE_ID}-{PARENT_ID}-03", (TRACE_ID, PARENT_ID, True)),  # other flag bits ignored
    (f"cc-{TRACE_ID}-{PARENT_ID}-01-future-fields", (TRACE_ID, PARENT_ID, True)),
    (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),
    (f"00-{'0' * 32}-{PARENT_ID}-01", None),
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),
    (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),
    (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
    (f"00_{TRACE_ID}-{PARENT_ID}-01", None),
    ("", None),
    (None, None),
])
def test_parse_traceparent(value: str | None, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(value) == expected


# --- check spans --------------------------------------------------------------------------


def test_check_spans_are_children_of_the_traceparent_with_the_decision(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    metrics = Metrics()
    tracing = make_tracing(receiver.endpoint, metrics)
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    secret = "Bearer eyJhbGciOiJIUzI1NiJ9.secret-token"
    try:
        allow = checker.run(check_request(
            path="/v1/tenants/acme/items", headers={
                "traceparent": SAMPLED, "authorization": secret, "x-custom": "header-value-77"}))
        deny = checker.run(check_request(principal=INTRUDER, headers={"traceparent": SAMPLED}))
        spans = receiver.wait_for_spans(2, 10)
    finally:
        tracing.close()
    assert allow.decision.allowed and not deny.decision.allowed
    assert len(spans) == 2
    by_id = {attributes(s)["authz.decision_id"]: s for s in spans}
    for outcome in (allow, deny):
        span = by_id[outcome.decision_id]
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID
        assert len(span.span_id) == 8 and span.span_id.hex() != PARENT_ID
        assert span.name == CHECK_SPAN and span.kind == SERVER_KIND
        assert 0 < span.start_time_unix_nano <= span.end_time_unix_nano
        assert abs(span.end_time_unix_nano / 1e9 - time.time()) < 60
        attrs = attributes(span)
        d = outcome.decision
        assert attrs["authz.decision"] == ("allow" if d.allowed else "deny")
        assert attrs["authz.policy"] == d.policy and attrs["authz.rule"] == d.rule
        assert attrs["authz.reason"] == d.reason
        assert attrs["authz.bundle.revision"] == outcome.revision == "rev-7"
        assert attrs.get("authz.tenant") == d.tenant
    assert attributes(by_id[allow.decision_id])["authz.tenant"] == "acme"
    assert (attributes(by_id[allow.decision_id])["authz.policy"],
            attributes(by_id[allow.decision_id])["authz.rule"]) == ("api", "tenant-route")
    # No header value becomes a span attribute (nor anything else that was sent).
    everything = str(receiver.requests)
    assert secret not in everything and "secret-token" not in everything
    assert "header-value-77" not in everything
    assert receiver.resources()[0]["service.name"] == "authz"
    assert exported(metrics) == 2 and dropped(metrics, "queue_full") == 0


def test_http_ext_authz_and_api_checks_name_their_caller(tmp_path: Path, receiver: OtlpReceiver) -> None:
    metrics = Metrics()
    tracing = make_tracing(receiver.endpoint, metrics)
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    try:
        grpc_check = checker.run(check_request(headers={"traceparent": SAMPLED}))
        http_check = checker.run(check_request(headers={"traceparent": SAMPLED}), caller="envoy_http")
        spans = receiver.wait_for_spans(2, 10)
    finally:
        tracing.close()
    by_id = {attributes(s)["authz.decision_id"]: s for s in spans}
    grpc_span, http_span = by_id[grpc_check.decision_id], by_id[http_check.decision_id]
    assert (grpc_span.name, attributes(grpc_span)["authz.caller"]) == (CHECK_SPAN, "envoy_grpc")
    assert attributes(grpc_span)["rpc.method"] == "Check"
    assert (http_span.name, attributes(http_span)["authz.caller"]) == ("authz.check", "envoy_http")
    assert "rpc.method" not in attributes(http_span)
    assert http_span.parent_span_id.hex() == PARENT_ID


def test_sampling_follows_the_parent_flag_and_the_ratio(tmp_path: Path, receiver: OtlpReceiver) -> None:
    metrics = Metrics()
    tracing = make_tracing(receiver.endpoint, metrics)
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    try:
        checker.run(check_request(headers={"traceparent": NOT_SAMPLED}))  # never traced
        root = checker.run(check_request())  # no parent: a trace of its own
        bad = checker.run(check_request(headers={"traceparent": "00-zz-yy-01"}))  # ignored
        spans = receiver.wait_for_spans(2, 10)
        time.sleep(0.3)
        spans = receiver.spans()
    finally:
        tracing.close()
    assert sorted(attributes(s)["authz.decision_id"] for s in spans) == sorted(
        [root.decision_id, bad.decision_id])
    for span in spans:
        assert span.parent_span_id == b"" and len(span.trace_id) == 16
        assert span.trace_id.hex() != TRACE_ID

    # A ratio: decided on the trace id, so one trace is traced by all instances or none.
    half = make_tracing(receiver.endpoint, metrics, ratio=0.5)
    twin = make_tracing(receiver.endpoint, metrics, ratio=0.5)
    none = make_tracing(receiver.endpoint, metrics, ratio=0.0)
    before = len(receiver.spans())
    trace_ids = [f"{i:016x}{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}" for i in range(1, 401)]
    try:
        for t in (half, twin, none):
            c = Checker(checker.store, metrics, tracing=t)
            for trace_id in trace_ids:
                c.run(check_request(headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}))
    finally:
        for t in (half, twin, none):
            t.close()
    new = receiver.spans()[before:]
    per_trace: dict[str, int] = {}
    for span in new:
        per_trace[span.trace_id.hex()] = per_trace.get(span.trace_id.hex(), 0) + 1
    assert set(per_trace.values()) == {2}  # both 0.5 instances agree; ratio 0 traced none
    assert 120 <= len(per_trace) <= 280, len(per_trace)  # about half of 400


def test_a_receiver_that_is_down_costs_checks_nothing_and_drops_are_counted(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    metrics = Metrics()
    tracing = make_tracing(f"127.0.0.1:{port}", metrics, timeout=0.5)
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    try:
        for _ in range(300):
            assert checker.run(check_request(headers={"traceparent": SAMPLED})).decision.allowed
        assert _wait(lambda: dropped(metrics, "export_failed") == 300, 15)
    finally:
        tracing.close()
    assert exported(metrics) == 0


def test_a_receiver_that_hangs_leaves_check_latency_unchanged(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    request = check_request(headers={"traceparent": SAMPLED})

    def latencies(checker: Checker, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            checker.run(request)
            out.append(time.perf_counter() - t)
        return out

    plain = Checker(store, metrics)
    latencies(plain, 200)  # warm up
    baseline = statistics.median(latencies(plain, 2000))

    receiver.hang()
    tracing = make_tracing(receiver.endpoint, metrics, queue_size=100, batch_size=50, timeout=5.0)
    traced = Checker(store, metrics, tracing=tracing)
    try:
        hanging = latencies(traced, 2000)
        assert _wait(lambda: receiver.calls >= 1, 5)  # the exporter is stuck inside Export
        # The queue held 100 spans; the rest were dropped and counted, checks went on.
        assert dropped(metrics, "queue_full") >= 2000 - 100 - 50
        assert statistics.median(hanging) < baseline * 3 + 0.0002, (baseline, statistics.median(hanging))
        assert max(hanging) < 2.5  # no check waited for the export timeout (5 s)
        receiver.release()  # the stuck export completes, and the queue drains
        assert _wait(lambda: exported(metrics) >= 100, 10)
    finally:
        receiver.release()
        tracing.close()
    assert dropped(metrics, "queue_full") + dropped(metrics, "export_failed") + exported(metrics) == 2000


def test_spans_the_receiver_rejects_are_counted(tmp_path: Path, receiver: OtlpReceiver) -> None:
    metrics = Metrics()
    receiver.reject = 1
    tracing = make_tracing(receiver.endpoint, metrics)
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    try:
        checker.run(check_request(headers={"traceparent": SAMPLED}))
        assert _wait(lambda: dropped(metrics, "rejected") == 1, 10)
    finally:
        tracing.close()
    assert exported(metrics) == 0


def test_close_exports_what_is_queued(tmp_path: Path, receiver: OtlpReceiver) -> None:
    metrics = Metrics()
    tracing = make_tracing(receiver.endpoint, metrics, interval=3600)  # only close() exports
    checker = Checker(loaded_store(tmp_path, metrics), metrics, tracing=tracing)
    for _ in range(10):
        checker.run(check_request(headers={"traceparent": SAMPLED}))
    assert receiver.spans() == []
    tracing.close()
    assert len(receiver.spans()) == 10


# --- bundle load spans -------------------------------------------------------------------------


def test_bundle_loads_have_spans_with_result_and_errors(tmp_path: Path, receiver: OtlpReceiver) -> None:
    metrics = Metrics()
    tracing = make_tracing(receiver.endpoint, metrics)
    root = write_bundle(tmp_path / "bundle", revision="rev-1")
    reloader = Reloader(BundleStore(metrics), DirectorySource(root), interval=0.05, tracing=tracing)
    try:
        assert reloader.initial_load() == "loaded"
        assert reloader.initial_load() == "unchanged"  # no span for a load that changed nothing
        (root / "policies" / "p.yaml").write_text("- not: [a policy\n")
        reloader.trigger()
        reloader.start()
        spans = receiver.wait_for_spans(2, 10)
    finally:
        reloader.stop()
        tracing.close()
    assert [s.name for s in spans] == [LOAD_SPAN, LOAD_SPAN]
    ok, bad = (attributes(s) for s in spans)
    assert ok["authz.bundle.result"] == "loaded" and ok["authz.bundle.revision"] == "rev-1"
    assert ok["authz.bundle.source"] == str(root)
    assert bad["authz.bundle.result"] == "rejected" and bad["authz.bundle.revision"] == "rev-1"
    assert "policies/p.yaml:2:1: error: invalid YAML" in bad["authz.bundle.error"]
    assert spans[1].status.code == 2 and spans[0].status.code == 1


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())

