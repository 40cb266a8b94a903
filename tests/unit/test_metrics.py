"""Prometheus metrics of the check pipeline: names, labels, the opt-in tenant label, buckets."""

from __future__ import annotations

import re
from pathlib import Path

from audit_helpers import CALLER, INTRUDER, check_request, loaded_store, sample, write_bundle

from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.metrics import DURATION_BUCKETS, Metrics

REQUIRED = (
    "authz_checks_total", "authz_check_duration_seconds", "authz_condition_errors_total",
    "authz_audit_records_total", "authz_audit_dropped_total", "authz_bundle_info",
    "authz_bundle_loads_total", "authz_bundle_last_success_timestamp_seconds", "authz_dry_run_total",
)


def run(tmp_path: Path, metrics: Metrics, requests: list[object]) -> Checker:
    checker = Checker(loaded_store(tmp_path, metrics), metrics)
    for cr in requests:
        checker.run(cr)  # type: ignore[arg-type]
    return checker


def test_every_required_metric_is_exported(tmp_path: Path) -> None:
    metrics = Metrics()
    run(tmp_path, metrics, [check_request()])
    text = metrics.exposition().decode()
    for name in REQUIRED:
        assert re.search(rf"^# TYPE {name.removesuffix('_total')}(_total)? ", text, re.MULTILINE), name


def test_checks_are_counted_by_decision_reason_and_policy(tmp_path: Path) -> None:
    metrics = Metrics()
    requests = [check_request()] * 3 + [check_request(path="/admin/x")] * 2 + \
        [check_request(principal=INTRUDER)]
    run(tmp_path, metrics, requests)
    assert sample(metrics, "authz_checks_total", decision="allow", reason="allowed by policy", policy="api") == 3
    assert sample(metrics, "authz_checks_total", decision="deny", reason="denied by policy",
                  policy="block-admin") == 2
    assert sample(metrics, "authz_checks_total", decision="deny", reason="no allow rule matched",
                  policy="default") == 1
    assert sample(metrics, "authz_check_duration_seconds_count") == 6
    assert "tenant=" not in metrics.exposition().decode()  # no tenant label unless asked


def test_tenant_label_is_opt_in_and_bounded_by_the_bundle(tmp_path: Path) -> None:
    metrics = Metrics(tenant_label=True)
    run(tmp_path, metrics, [
        check_request(path="/v1/tenants/acme/items"),  # allowed for tenant acme
        check_request(path="/v1/tenants/globex/items"),  # known tenant, caller not in it
        check_request(path="/v1/tenants/evil-corp/items"),  # unknown tenant
        check_request(path="/v1/tenants/..%2e/items"),  # not a tenant id at all
        check_request(path="/v1/tenants/a%20b/items"),
        check_request(),  # no tenant
    ])
    assert sample(metrics, "authz_checks_total", decision="allow", reason="allowed by policy",
                  policy="api", tenant="acme") == 1
    text = metrics.exposition().decode()
    values = set(re.findall(r'authz_checks_total\{[^}]*tenant="([^"]*)"', text))
    assert values <= {"acme", "globex", ""}, values
    assert "evil-corp" not in text
    assert sample(metrics, "authz_checks_total", decision="deny", reason="unknown tenant",
                  policy="api", tenant="") == 1


def test_duration_buckets_start_at_ten_microseconds() -> None:
    assert DURATION_BUCKETS[0] == 0.00001
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    metrics = Metrics()
    metrics.count_check(True, "allowed by policy", "p", 0.000004)
    assert sample(metrics, "authz_check_duration_seconds_bucket", le="1e-05") == 1


def test_condition_errors_and_dry_run_are_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    run(tmp_path, metrics, [check_request(method="DELETE", path="/v1/items/1")] * 2)
    assert sample(metrics, "authz_dry_run_total", would="deny") == 2
    assert sample(metrics, "authz_dry_run_total", would="allow") == 0

    import yaml

    root = write_bundle(tmp_path / "cel")
    docs = list(yaml.safe_load_all((root / "policies" / "p.yaml").read_text()))
    docs[-1]["rules"][0]["when"] = ["request.headers['x-missing'] == 'y'"]  # no such key: error
    (root / "policies" / "p.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    metrics = Metrics()
    store = BundleStore(metrics)
    assert store.load(root)
    outcome = Checker(store, metrics).run(check_request())
    assert outcome.decision.condition_error, outcome.decision
    assert sample(metrics, "authz_condition_errors_total") == 1


def test_bundle_metrics_follow_loads(tmp_path: Path) -> None:
    metrics = Metrics()
    store = BundleStore(metrics)
    assert store.load(write_bundle(tmp_path / "b1", revision="r1"))
    assert sample(metrics, "authz_bundle_info", name="audit-test", revision="r1") == 1
    first = sample(metrics, "authz_bundle_last_success_timestamp_seconds")
    assert first > 0
    assert store.load(write_bundle(tmp_path / "b2", revision="r2"))
    assert sample(metrics, "authz_bundle_info", name="audit-test", revision="r2") == 1
    assert metrics.registry.get_sample_value("authz_bundle_info", {"name": "audit-test", "revision": "r1"}) is None
    broken = write_bundle(tmp_path / "b3", revision="r3")
    (broken / "bundle.yaml").write_text("kind: Nonsense\n")
    assert not store.load(broken)
    assert sample(metrics, "authz_bundle_loads_total", result="rejected") == 1
    assert sample(metrics, "authz_bundle_loads_total", result="loaded") == 2
    assert sample(metrics, "authz_bundle_last_success_timestamp_seconds") >= first


def test_series_used_by_alerts_exist_before_any_event() -> None:
    text = Metrics().exposition().decode()
    for line in ('authz_bundle_loads_total{result="rejected"} 0.0',
                 'authz_dry_run_total{would="deny"} 0.0', "authz_condition_errors_total 0.0"):
        assert line in text


def test_callers_of_the_tenant_route_are_counted_separately(tmp_path: Path) -> None:
    metrics = Metrics(tenant_label=True)
    run(tmp_path, metrics, [check_request(principal=CALLER, path="/v1/tenants/acme/items")] * 2)
    assert sample(metrics, "authz_checks_total", decision="allow", reason="allowed by policy",
                  policy="api", tenant="acme") == 2
