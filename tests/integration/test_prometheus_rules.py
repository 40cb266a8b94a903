"""The alert rules and the dashboard: promtool check/test rules, and every metric they name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from authz.audit import AuditLog
from authz.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "authz-dashboard.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: install Debian's 'prometheus' package "
                    "(./scripts/test does it when missing)")
    return path


def run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_fails_when_a_threshold_is_broken(tmp_path: Path) -> None:
    # The rule tests are able to fail: loosen one threshold and they must catch it.
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    text = (PROM / "alerts.yml").read_text()
    assert ") > 0.25" in text
    (tmp_path / "alerts.yml").write_text(text.replace(") > 0.25", ") > 0.9"))
    result = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "AuthzDenyRateSpike" in result.stdout + result.stderr


def test_promtool_test_rules_catch_a_broken_certificate_threshold(tmp_path: Path) -> None:
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    text = (PROM / "alerts.yml").read_text()
    old = "(authz_tls_cert_expiry_timestamp_seconds) - time() < 86400"
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, old.replace("86400", "3600")))
    result = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "AuthzCertificateExpiresSoon" in result.stdout + result.stderr


def test_example_prometheus_config_is_valid() -> None:
    result = run("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_required_conditions() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "authz_checks_total" in by_name["AuthzDenyRateSpike"]
    assert 'result="rejected"' in by_name["AuthzBundleLoadRejected"]
    assert "authz_bundle_last_success_timestamp_seconds" in by_name["AuthzBundleStale"]
    assert "authz_audit_dropped_total" in by_name["AuthzAuditRecordsDropped"]
    assert "histogram_quantile(0.99" in by_name["AuthzCheckLatencyHigh"]
    assert "authz_audit_oldest_queued_seconds" in by_name["AuthzAuditSinkStuck"]
    assert "authz_checks_rejected_total" in by_name["AuthzChecksShed"]
    assert "authz_tls_cert_expiry_timestamp_seconds" in by_name["AuthzCertificateExpiresSoon"]
    assert "authz_tls_ca_expiry_timestamp_seconds" in by_name["AuthzCABundleExpiresSoon"]
    assert "authz_tls_rotation_failing" in by_name["AuthzCertificateRotationFailing"]


class _NullSink:
    name = "file"

    def write(self, lines: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


def exported_names() -> set[str]:
    metrics = Metrics()
    AuditLog([_NullSink()], metrics, start=False)
    metrics.count_check(True, "allowed by policy", "p", 0.0001)
    metrics.bundle_loaded("b", "r", 1.0)
    for gauge in (metrics.tls_cert_expiry, metrics.tls_ca_expiry, metrics.tls_rotation_failing):
        gauge.labels("grpc").set(1)
    metrics.tls_rotation_failures.labels("grpc").inc()
    return {m.group(1) for m in re.finditer(r"^([a-z_]+)(?:\{| )", metrics.exposition().decode(), re.MULTILINE)}


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\b(authz_[a-z_]+)\b", text))


def test_every_metric_the_rules_and_dashboard_use_is_exported() -> None:
    exported = exported_names()
    rules_text = (PROM / "alerts.yml").read_text()
    dash = json.loads(DASHBOARD.read_text())
    dash_text = json.dumps([t["expr"] for p in dash["panels"] for t in p.get("targets", [])])
    used = referenced_names(rules_text) | referenced_names(dash_text)
    assert used, "no metric referenced"
    assert used <= exported, used - exported


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"], p["title"]
