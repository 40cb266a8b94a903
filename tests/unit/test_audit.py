"""Audit records: every field, redaction, sampling, rotation, and never in the way of a check."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import (
    API,
    CALLER,
    INTRUDER,
    BlockingSink,
    MemorySink,
    RaisingSink,
    check_request,
    collector,
    loaded_store,
    sample,
)

from authz import audit as audit_mod
from authz.redact import NEVER_LOGGED
from authz.audit import (
    AuditEntry,
    AuditLog,
    FileSink,
    HttpSink,
    StreamSink,
    build_record,
    check_header_allowlist,
    rfc3339,
)
from authz.check import Checker
from authz.cli import main as cli_main
from authz.engine.model import Decision
from authz.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
RFC3339_MICRO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


def run_checks(tmp_path: Path, requests: list[Any], sinks: list[Any] | None = None,
               **audit_kw: Any) -> tuple[list[Any], Metrics, list[Any]]:
    """Decide ``requests`` with an AuditLog over ``sinks``; return outcomes, metrics, sinks."""
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    sinks = sinks if sinks is not None else [MemorySink()]
    audit = AuditLog(sinks, metrics, poll_interval=0.01, **audit_kw)
    checker = Checker(store, metrics, audit)
    try:
        outcomes = [checker.run(cr) for cr in requests]
    finally:
        audit.close(timeout=10)
    return outcomes, metrics, sinks


def documented_fields() -> list[str]:
    """Field names of the record table in docs/audit.md (rows starting with | `name` |)."""
    text = (REPO / "docs" / "audit.md").read_text()
    section = text.split("## The record", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


# --- every field ---------------------------------------------------------------------------


def test_every_field_of_an_allow_with_an_audit_match(tmp_path: Path) -> None:
    before = time.time()
    cr = check_request(
        method="POST", path="/v1/items?secret_query=1", request_id="1234567",
        headers={"traceparent": TRACEPARENT, "x-request-id": "req-42", "user-agent": "t/1"},
    )
    (outcome,), metrics, (sink,) = run_checks(tmp_path, [cr])
    after = time.time()
    (rec,) = sink.records()

    assert RFC3339_MICRO.match(rec["time"]), rec["time"]
    stamp = time.mktime(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert int(before) - 1 <= stamp <= after
    assert rec["decision_id"] == outcome.decision_id
    ok_headers = {h.header.key: h.header.value for h in outcome.response.ok_response.headers}
    assert ok_headers["x-authz-decision-id"] == rec["decision_id"]
    assert outcome.response.dynamic_metadata["decision_id"] == rec["decision_id"]
    assert rec["allowed"] is True
    assert rec["http_status"] == 200
    assert rec["reason"] == "allowed by policy"
    assert rec["policy"] == "api"
    assert rec["rule"] == "caller"
    assert rec["action"] == "AUDIT"  # an AUDIT rule matched: docs/audit.md
    assert rec["audit"] == ["watch-writes/writes"]
    assert rec["dry_run"] == []
    assert rec["tenant"] is None
    assert rec["revision"] == "rev-7"
    assert isinstance(rec["latency_us"], int) and 0 <= rec["latency_us"] < 10_000_000
    assert rec["source_principal"] == CALLER
    assert rec["destination_principal"] == API
    assert rec["source_address"] == "10.1.2.3"
    assert rec["method"] == "POST"
    assert rec["host"] == "api.example:8443"
    assert rec["path"] == "/v1/items"  # query dropped by default
    assert rec["request_id"] == "req-42"  # the x-request-id header, not Envoy's stream id
    assert rec["traceparent"] == TRACEPARENT
    assert rec["headers"] == {}
    assert sample(metrics, "authz_audit_records_total", sink="memory") == 1


def test_record_keys_are_exactly_the_documented_schema(tmp_path: Path) -> None:
    (_,), _, (sink,) = run_checks(tmp_path, [check_request()])
    fields = documented_fields()
    assert len(fields) >= 20, fields
    assert list(sink.records()[0]) == fields


def test_deny_default_dry_run_and_tenant_fields(tmp_path: Path) -> None:
    requests = [
        check_request(path="/admin/users"),  # DENY policy
        check_request(principal=INTRUDER, path="/v1/items"),  # ALLOW applies, no rule matched
        check_request(method="DELETE", path="/v1/items/9"),  # allowed; dry-run DENY would deny
        check_request(path="/v1/tenants/acme/items"),  # tenant route
        check_request(destination="spiffe://cluster.local/ns/x/sa/unprotected"),  # default
    ]
    outcomes, _, (sink,) = run_checks(tmp_path, requests)
    by_id = {r["decision_id"]: r for r in sink.records()}
    deny, no_rule, dry, tenant, default = (by_id[o.decision_id] for o in outcomes)

    assert (deny["allowed"], deny["http_status"], deny["action"]) == (False, 403, "DENY")
    assert (deny["policy"], deny["rule"], deny["reason"]) == ("block-admin", "admin-paths", "denied by policy")
    assert (no_rule["allowed"], no_rule["action"], no_rule["policy"]) == (False, "default", "default")
    assert no_rule["reason"] == "no allow rule matched"
    assert no_rule["source_principal"] == INTRUDER
    assert dry["allowed"] is True and dry["dry_run"] == ["shadow/no-deletes=deny"]
    assert dry["action"] == "ALLOW"
    assert tenant["tenant"] == "acme" and tenant["rule"] == "tenant-route"
    assert default["action"] == "default" and default["reason"] == "denied by default"
    for rec in (deny, no_rule, dry, tenant, default):
        assert rec["request_id"] is None and rec["traceparent"] is None


def test_a_malformed_request_is_recorded_with_null_request_fields(tmp_path: Path) -> None:
    (outcome,), _, (sink,) = run_checks(tmp_path, [check_request(path="/a/%2e%2e%2f/b#frag")])
    (rec,) = sink.records()
    assert rec["decision_id"] == outcome.decision_id and rec["allowed"] is False
    assert rec["reason"].startswith("malformed request")
    assert rec["method"] is None and rec["path"] is None and rec["source_principal"] is None


def test_query_is_kept_only_when_configured(tmp_path: Path) -> None:
    cr = check_request(path="/v1/items?page=2&q=x")
    _, _, (sink,) = run_checks(tmp_path / "a", [cr])
    assert sink.records()[0]["path"] == "/v1/items"
    _, _, (sink,) = run_checks(tmp_path / "b", [cr], log_query=True)
    assert sink.records()[0]["path"] == "/v1/items?page=2&q=x"


def test_a_malformed_traceparent_is_not_recorded(tmp_path: Path) -> None:
    cr = check_request(headers={"traceparent": "not-a-trace secret"})
    _, _, (sink,) = run_checks(tmp_path, [cr])
    assert sink.records()[0]["traceparent"] is None


def test_fast_formatter_matches_the_reference_record(tmp_path: Path) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    checker = Checker(store, metrics)
    fmt = audit_mod.RecordFormatter(("x-tenant-hint", "user-agent"), log_query=True)
    requests = [
        check_request(method="POST", path="/v1/items?a=1", headers={"traceparent": TRACEPARENT,
                      "x-tenant-hint": 'quote" and \\ and \u00e9 and \n', "user-agent": "u",
                      "x-request-id": 'r"1'},
                      request_id="77"),
        check_request(path="/admin/x"),
        check_request(path="/v1/tenants/acme/items", host="h\u2603"),
        check_request(path="/v1/tenants/nope/items"),
        check_request(path="bad"),
    ]
    for i, cr in enumerate(requests):
        o = checker.run(cr)
        e = AuditEntry(1_700_000_000.25 + i, o.decision_id, o.decision, o.request, o.revision, 17)
        line = fmt(e)
        assert "\n" not in line
        assert json.loads(line) == build_record(e, fmt.header_allowlist, True)
        assert list(json.loads(line)) == list(build_record(e))
    assert rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"


# --- redaction -----------------------------------------------------------------------------


def test_credentials_leave_no_trace_in_any_sink(tmp_path: Path) -> None:
    secret_headers = {
        "authorization": "Bearer secret",
        "proxy-authorization": "Basic secret",
        "cookie": "session=secret",
        "set-cookie": "id=secret",
        "x-tenant-hint": "visible-hint",
    }
    stream = io.StringIO()
    file_path = tmp_path / "audit.log"
    with collector() as c:
        sinks = [StreamSink(stream), FileSink(file_path),
                 HttpSink(c.url, max_batch=10, max_delay=0.05)]
        requests = [check_request(headers=secret_headers),
                    check_request(path="/admin/x", headers=secret_headers),
                    check_request(principal=INTRUDER, headers=secret_headers)]
        _, metrics, _ = run_checks(tmp_path, requests, sinks, header_allowlist=["X-Tenant-Hint"])
        http_records = c.records()
        http_raw = b"".join(c.raw_bodies)
    outputs = {"stdout": stream.getvalue(), "file": file_path.read_text(), "http": json.dumps(http_records)}
    for name, text in outputs.items():
        assert text.count('"decision_id"') == 3, (name, text)
        assert "secret" not in text, name
        assert "visible-hint" in text, name  # the allow-list works; the test can see values
    assert b"secret" not in http_raw
    assert sample(metrics, "authz_audit_records_total", sink="http") == 3


def test_allow_listed_url_headers_keep_no_query_values(tmp_path: Path) -> None:
    """`--audit-header referer` (or `:path`) wrote `?access_token=...` into every record, where
    the record's own path drops its query unless --audit-log-query."""
    stream = io.StringIO()
    headers = {"referer": "https://a.example/?token=SeCrEt7", "x-envoy-original-path": "/o?api_key=SeCrEt2",
               ":path": "/v1/orders?access_token=SeCrEt1"}  # Envoy sends the pseudo-headers too
    requests = [check_request(path="/v1/orders?access_token=SeCrEt1", headers=headers)]
    run_checks(tmp_path, requests, [StreamSink(stream)],
               header_allowlist=[":path", "referer", "x-envoy-original-path"])
    text = stream.getvalue()
    assert "SeCrEt" not in text, text
    record = json.loads(text.splitlines()[0])
    assert record["headers"] == {":path": "/v1/orders?access_token=REDACTED",
                                 "referer": "https://a.example/?token=REDACTED",
                                 "x-envoy-original-path": "/o?api_key=REDACTED"}


@pytest.mark.parametrize("name", sorted(NEVER_LOGGED) + ["Authorization", " COOKIE "])
def test_credential_headers_can_never_be_allow_listed(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="can never"):
        check_header_allowlist([name])
    with pytest.raises(ValueError):
        AuditLog([], Metrics(), header_allowlist=["x-ok", name], start=False)
    rc = cli_main(["serve", "--bundle", str(tmp_path), "--audit-log", str(tmp_path / "a.log"),
                   "--audit-header", name, "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
    assert rc == 2


def test_record_builder_ignores_credentials_even_if_asked(tmp_path: Path) -> None:
    metrics = Metrics()
    o = Checker(loaded_store(tmp_path, metrics), metrics).run(
        check_request(headers={"authorization": "Bearer secret", "cookie": "secret"}))
    e = AuditEntry(time.time(), o.decision_id, o.decision, o.request, o.revision, 1)
    assert "secret" not in json.dumps(build_record(e, ("authorization", "cookie")))
    assert "secret" not in audit_mod.RecordFormatter(("authorization", "cookie"))(e)


# --- sampling ------------------------------------------------------------------------------


class Cycle:
    """A deterministic random source: returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = values
        self.i = 0

    def __call__(self) -> float:
        v = self.values[self.i % len(self.values)]
        self.i += 1
        return v


def test_sampling_keeps_that_share_of_allows_and_every_deny_and_audit_match(tmp_path: Path) -> None:
    allows = [check_request(path=f"/v1/items/{i}") for i in range(40)]
    audited = [check_request(method="POST", path="/v1/items") for _ in range(10)]
    denies = [check_request(path="/admin/x") for _ in range(10)]
    rng = Cycle(0.05, 0.30, 0.60, 0.95)  # with rate 0.5: kept, kept, dropped, dropped
    outcomes, metrics, (sink,) = run_checks(tmp_path, allows + audited + denies,
                                            allow_sample_rate=0.5, rng=rng)
    records = sink.records()
    recorded_ids = {r["decision_id"] for r in records}
    allow_ids = [o.decision_id for o in outcomes[:40]]
    assert sum(i in recorded_ids for i in allow_ids) == 20
    # The sampled ones are exactly those where the random draw was below the rate.
    assert [i in recorded_ids for i in allow_ids[:4]] == [True, True, False, False]
    assert all(o.decision_id in recorded_ids for o in outcomes[40:])  # AUDIT matches, denies
    assert rng.i == 40  # the random source is consulted for plain allows only
    assert sample(metrics, "authz_audit_sampled_out_total") == 20
    assert sample(metrics, "authz_audit_dropped_total", reason="queue_full") == 0
    assert len(records) == 40


@pytest.mark.parametrize(("rate", "kept"), [(0.0, 0), (1.0, 8)])
def test_sample_rate_bounds(rate: float, kept: int, tmp_path: Path) -> None:
    requests = [check_request() for _ in range(8)] + [check_request(path="/admin/x")]
    _, metrics, (sink,) = run_checks(tmp_path, requests, allow_sample_rate=rate, rng=Cycle(0.0))
    assert sum(r["allowed"] for r in sink.records()) == kept
    assert sum(not r["allowed"] for r in sink.records()) == 1
    assert sample(metrics, "authz_audit_sampled_out_total") == 8 - kept


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_sample_rate_out_of_range_is_refused(rate: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AuditLog([], Metrics(), allow_sample_rate=rate, start=False)
    rc = cli_main(["serve", "--audit-allow-sample-rate", str(rate), "--bundle", str(tmp_path)])
    assert rc == 2


# --- rotation ------------------------------------------------------------------------------


def test_file_sink_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    requests = [check_request(path=f"/v1/items/{i}") for i in range(120)]
    sink = FileSink(path, max_bytes=4000, backups=2)
    sink.max_batch = 5  # small writes, so several rotations happen
    outcomes, metrics, _ = run_checks(tmp_path, requests, [sink])
    files = [path, path.with_name("audit.log.1"), path.with_name("audit.log.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("audit.log.3").exists()
    kept: list[str] = []
    for f in reversed(files):  # oldest first
        lines = f.read_text().splitlines()
        ids = [json.loads(line)["decision_id"] for line in lines]  # every line parses
        kept.extend(ids)
        if f != path:
            assert f.stat().st_size >= 4000
            assert f.stat().st_size < 4000 + 5 * 400  # rotated at the first write past the limit
    all_ids = [o.decision_id for o in outcomes]
    assert kept == all_ids[-len(kept):]  # the newest records, in order, none duplicated
    assert len(kept) < len(all_ids)  # older files were dropped beyond the backups
    assert sample(metrics, "authz_audit_records_total", sink="file") == 120


def test_file_sink_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = FileSink(path, max_bytes=100, backups=0)
    for _ in range(5):
        sink.write(["x" * 60])
    sink.close()
    assert path.stat().st_size < 200
    assert not path.with_name("a.log.1").exists()


def test_file_sink_terminates_a_torn_line_after_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    sink = FileSink(path)

    class Torn:
        """A disk that fills up mid-record: a short write, then ENOSPC."""

        def __init__(self, real: Any) -> None:
            self.real = real
            self.calls = 0

        def write(self, data: Any) -> int:
            self.calls += 1
            if self.calls == 1:
                return int(self.real.write(bytes(data[:5])))
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    real = sink._fh
    sink._fh = Torn(real)
    with pytest.raises(OSError):
        sink.write(['{"a":1}'])
    sink._fh = real
    sink.write(['{"b":2}'])
    sink.close()
    assert path.read_text() == '{"a":\n{"b":2}\n'


# --- never in the way --------------------------------------------------------------------


def test_failing_and_blocking_sinks_change_nothing_in_checks(tmp_path: Path) -> None:
    requests = [check_request(path=p, principal=who, method=m)
                for p in ("/v1/items", "/admin/x", "/v1/tenants/acme/items", "/v1/tenants/zz/items")
                for who in (CALLER, INTRUDER) for m in ("GET", "POST")] * 25  # 400 checks
    metrics_ref = Metrics()
    reference = Checker(loaded_store(tmp_path / "ref", metrics_ref), metrics_ref)

    metrics = Metrics()
    store = loaded_store(tmp_path / "audited", metrics)
    raising, blocking, memory = RaisingSink(), BlockingSink(), MemorySink()
    blocking.queue_size = 50  # type: ignore[attr-defined]  # its own small queue
    audit = AuditLog([raising, blocking, memory], metrics, poll_interval=0.01)
    checker = Checker(store, metrics, audit)
    slowest = 0.0
    try:
        for cr in requests[:10]:
            checker.run(cr)
        assert blocking.entered.wait(10), "the blocking sink never received a batch"
        for cr in requests:
            want = reference.run(cr)
            started = time.monotonic()
            got = checker.run(cr)
            slowest = max(slowest, time.monotonic() - started)
            assert got.decision == want.decision
            assert got.response.status == want.response.status
            assert got.response.WhichOneof("http_response") == want.response.WhichOneof("http_response")
        assert slowest < 1.0  # generous: a blocked sink must not hold a check at all
        deadline = time.monotonic() + 10
        while len(memory.lines) < 410 and time.monotonic() < deadline:
            time.sleep(0.02)
        # The healthy sink got every record although its neighbours fail and hang.
        assert len(memory.lines) == 410
        assert blocking.release.is_set() is False
        dropped_blocked = sample(metrics, "authz_audit_dropped_total", reason="sink_blocked")
        assert dropped_blocked >= 410 - 50 - 10  # all but its queue and the batch it holds
        deadline = time.monotonic() + 10
        while sample(metrics, "authz_audit_dropped_total", reason="sink_error") < 410 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sample(metrics, "authz_audit_dropped_total", reason="sink_error") == 410
        assert sample(metrics, "authz_audit_records_total", sink="memory") == 410
        assert sample(metrics, "authz_audit_records_total", sink="raising") == 0
        assert sample(metrics, "authz_checks_total", decision="allow", reason="allowed by policy",
                      policy="api") > 0
    finally:
        blocking.release.set()
        audit.close(timeout=10)
    assert raising.calls > 0


def test_check_returns_while_a_sink_blocks_and_close_gives_up_in_time(tmp_path: Path) -> None:
    metrics = Metrics()
    store = loaded_store(tmp_path, metrics)
    blocking = BlockingSink()
    audit = AuditLog([blocking], metrics, sink_queue_size=5, poll_interval=0.01)
    checker = Checker(store, metrics, audit)
    checker.run(check_request())
    assert blocking.entered.wait(10)
    done = threading.Event()

    def burst() -> None:
        for _ in range(200):
            checker.run(check_request(path="/admin/x"))
        done.set()

    t = threading.Thread(target=burst)
    t.start()
    assert done.wait(30), "checks stalled behind a blocked sink"
    started = time.monotonic()
    audit.close(timeout=1.0)
    assert time.monotonic() - started < 5
    dropped = {r: sample(metrics, "authz_audit_dropped_total", reason=r)
               for r in ("sink_blocked", "shutdown")}
    assert dropped["sink_blocked"] + dropped["shutdown"] == 200
    assert dropped["shutdown"] <= 5
    blocking.release.set()
    t.join()


def test_full_queue_drops_and_counts_without_blocking() -> None:
    metrics = Metrics()
    memory = MemorySink()
    audit = AuditLog([memory], metrics, queue_size=3, start=False, poll_interval=0.01)
    deny = Decision(False, "denied by policy", "p", "r", "DENY")
    for i in range(5):
        audit.submit(AuditEntry(time.time(), f"id{i}", deny, None, "r1", 3))
    assert sample(metrics, "authz_audit_dropped_total", reason="queue_full") == 2
    assert audit.queued == 3
    audit.start()
    audit.close(timeout=10)
    assert [r["decision_id"] for r in memory.records()] == ["id0", "id1", "id2"]
    assert memory.closed


def test_every_drop_reason_is_exported_from_the_start() -> None:
    metrics = Metrics()
    AuditLog([MemorySink("x")], metrics, start=False)
    text = metrics.exposition().decode()
    for reason in audit_mod.DROP_REASONS:
        assert f'authz_audit_dropped_total{{reason="{reason}"}} 0.0' in text
    assert 'authz_audit_records_total{sink="x"} 0.0' in text
