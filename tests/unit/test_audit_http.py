"""The HTTP audit sink against a collector started in the test: batches, gzip, outage, recovery."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from audit_helpers import Collector, check_request, collector, loaded_store, sample

from authz.audit import AuditLog, HttpSink, UploadError
from authz.check import Checker
from authz.metrics import Metrics


def wait_until(predicate, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def fast_sink(url: str, **kw: object) -> HttpSink:
    params: dict[object, object] = {"max_batch": 5, "max_delay": 0.05, "max_attempts": 3,
                                    "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 2.0}
    params.update(kw)
    return HttpSink(url, **params)  # type: ignore[arg-type]


def test_batches_are_gzipped_json_arrays_of_bounded_size(tmp_path: Path) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    with collector() as c:
        audit = AuditLog([fast_sink(c.url)], metrics, poll_interval=0.01)
        checker = Checker(store, metrics, audit)
        ids = [checker.run(check_request(path=f"/v1/items/{i}")).decision_id for i in range(23)]
        audit.close(timeout=10)
        assert [r["decision_id"] for r in c.records()] == ids
        assert all(1 <= len(b) <= 5 for b in c.batches), [len(b) for b in c.batches]
        assert len(c.batches) >= 5
        for h in c.headers:
            assert h["content-encoding"] == "gzip"
            assert h["content-type"] == "application/json"
        assert all(body[:2] == b"\x1f\x8b" for body in c.raw_bodies)
    assert sample(metrics, "authz_audit_records_total", sink="http") == 23
    assert sample(metrics, "authz_audit_dropped_total", reason="sink_error") == 0


def test_a_batch_waits_at_most_max_delay(tmp_path: Path) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    with collector() as c:
        audit = AuditLog([fast_sink(c.url, max_batch=1000, max_delay=0.2)], metrics, poll_interval=0.01)
        try:
            Checker(store, metrics, audit).run(check_request())
            # One record, far below max_batch: it still goes out once max_delay passed.
            assert wait_until(lambda: len(c.records()) == 1, timeout=10)
        finally:
            audit.close(timeout=10)


def test_retries_with_backoff_until_the_collector_takes_the_batch() -> None:
    with collector() as c:
        c.fail_with = 503
        sink = fast_sink(c.url, max_attempts=5)
        import threading

        def recover() -> None:
            wait_until(lambda: c.attempts >= 2)
            c.fail_with = None

        t = threading.Thread(target=recover)
        t.start()
        sink.write(['{"n":1}', '{"n":2}'])
        t.join()
        assert c.records() == [{"n": 1}, {"n": 2}]
        assert c.attempts >= 3
        assert sink.failures == c.attempts - 1


def test_gives_up_after_max_attempts_and_does_not_retry_a_client_error() -> None:
    with collector() as c:
        c.fail_with = 503
        sink = fast_sink(c.url, max_attempts=3)
        with pytest.raises(UploadError, match="503"):
            sink.write(['{"n":1}'])
        assert c.attempts == 3
        c.fail_with = 400
        with pytest.raises(UploadError, match="400"):
            sink.write(['{"n":1}'])
        assert c.attempts == 4  # a 400 is not retried


def test_backoff_is_exponential_capped_and_jittered() -> None:
    low = HttpSink("http://127.0.0.1:9/", backoff_base=0.5, backoff_max=4.0, rng=lambda: 0.0)
    high = HttpSink("http://127.0.0.1:9/", backoff_base=0.5, backoff_max=4.0, rng=lambda: 0.999999)
    assert [low.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert [round(high.backoff(n), 3) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_rejects_non_http_urls() -> None:
    with pytest.raises(ValueError):
        HttpSink("ftp://example/")


def test_outage_drops_and_counts_then_recovers(tmp_path: Path) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    c = Collector().start()
    port = c.port
    audit = AuditLog([fast_sink(c.url)], metrics, sink_queue_size=20, poll_interval=0.01)
    checker = Checker(store, metrics, audit)
    try:
        before = [checker.run(check_request(path="/admin/x")).decision_id for _ in range(4)]
        assert wait_until(lambda: len(c.records()) == 4)

        # Outage 1: the collector answers 503.
        c.fail_with = 503
        during = [checker.run(check_request(path="/admin/x")) for _ in range(30)]
        assert all(not o.decision.allowed for o in during)  # checks go on, unchanged
        assert wait_until(lambda: sample(metrics, "authz_audit_dropped_total", reason="sink_error")
                          + sample(metrics, "authz_audit_dropped_total", reason="sink_blocked") == 30)

        # Outage 2: the collector is gone (connection refused).
        c.stop()
        gone = [checker.run(check_request(path="/admin/x")) for _ in range(7)]
        assert len(gone) == 7
        assert wait_until(lambda: sample(metrics, "authz_audit_dropped_total", reason="sink_error")
                          + sample(metrics, "authz_audit_dropped_total", reason="sink_blocked") == 37)

        # Recovery: the collector is back on the same port; new records arrive.
        c = Collector().start(port)
        after = [checker.run(check_request(path="/admin/x")).decision_id for _ in range(6)]
        assert wait_until(lambda: {r["decision_id"] for r in c.records()} >= set(after))
    finally:
        audit.close(timeout=10)
        c.stop()
    assert sample(metrics, "authz_audit_records_total", sink="http") == 10
    assert set(before).isdisjoint({r["decision_id"] for r in c.records()})


def test_close_stops_retrying_against_a_dead_collector(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    sink = fast_sink(dead, max_attempts=1000, backoff_base=0.2, backoff_max=0.2)
    audit = AuditLog([sink], metrics, poll_interval=0.01)
    Checker(store, metrics, audit).run(check_request(path="/admin/x"))
    assert wait_until(lambda: sink.failures >= 2)
    started = time.monotonic()
    audit.close(timeout=1.0)
    assert time.monotonic() - started < 5
    assert sample(metrics, "authz_audit_dropped_total", reason="sink_error") == 1
