"""A real Prometheus scrapes a running `authz serve`; PromQL returns the allows and denies we sent.

Also: `promtool check metrics` on the scraped text, the alert rules load in that Prometheus, and
every query of the Grafana dashboard is valid PromQL over the live data. Prometheus and promtool
come from Debian's `prometheus` package (scripts/test installs it); without them these tests fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TD = "cluster.local"
API = f"spiffe://{TD}/ns/prod/sa/api"
CALLER = f"spiffe://{TD}/ns/prod/sa/caller"
STRANGER = f"spiffe://{TD}/ns/dev/sa/stranger"
ALLOWS, DENIES = 7, 5


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install Debian's 'prometheus' package "
                    "(./scripts/test does it when missing)")
    return path


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_for(what: str, predicate: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            last = predicate()
        except (OSError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}; last: {last!r}\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def write_bundle(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "bundle.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Bundle", "name": "prom-test", "revision": "p1",
        "trustDomain": TD, "defaultAction": "DENY"}))
    (root / "policies").mkdir()
    (root / "policies" / "api.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Policy", "name": "api", "action": "ALLOW",
        "target": {"principals": [API]},
        "rules": [{"name": "caller", "from": [{"source": {"principals": [CALLER]}}]}]}))
    return root


def check_request(principal: str, path: str) -> external_auth_pb2.CheckRequest:
    cr = external_auth_pb2.CheckRequest()
    cr.attributes.source.principal = principal
    cr.attributes.destination.principal = API
    http = cr.attributes.request.http
    http.method, http.path, http.host = "GET", path, "api.local"
    http.headers["authorization"] = "Bearer secret"
    return cr


@dataclass
class Service:
    http_addr: str
    grpc_addr: str
    audit_log: Path
    decisions: dict[str, int]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`authz serve` with an audit file; ALLOWS allowed and DENIES denied checks already sent."""
    work = tmp_path_factory.mktemp("authz-prom")
    bundle = write_bundle(work / "bundle")
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    audit_log = work / "audit.log"
    log = work / "authz.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--bundle", str(bundle), "--grpc-addr", grpc_addr,
             "--http-addr", http_addr, "--audit-log", str(audit_log)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for("authz /readyz", lambda: http_get(f"http://{http_addr}/readyz")[0] == 200, 30, proc, log)
        decisions = {"allow": 0, "deny": 0}
        with grpc.insecure_channel(grpc_addr) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            for i in range(ALLOWS + DENIES):
                principal = CALLER if i % 2 == 0 and decisions["allow"] < ALLOWS or decisions["deny"] >= DENIES \
                    else STRANGER
                resp = stub.Check(check_request(principal, f"/items/{i}"), timeout=10)
                decisions["allow" if resp.HasField("ok_response") else "deny"] += 1
        assert decisions == {"allow": ALLOWS, "deny": DENIES}
        yield Service(http_addr, grpc_addr, audit_log, decisions)
    finally:
        stop(proc)


def scrape(service: Service) -> str:
    status, body = http_get(f"http://{service.http_addr}/metrics")
    assert status == 200
    return body.decode()


def test_promtool_check_metrics_passes_on_the_scraped_output(service: Service, tmp_path: Path) -> None:
    text = scrape(service)
    for name in ("authz_checks_total", "authz_check_duration_seconds_bucket", "authz_audit_records_total",
                 "authz_audit_dropped_total", "authz_bundle_info", "authz_bundle_loads_total",
                 "authz_bundle_last_success_timestamp_seconds", "authz_dry_run_total",
                 "authz_condition_errors_total"):
        assert f"\n{name}" in text, name
    result = subprocess.run([binary("promtool"), "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
    # The checker can fail: a metric without help and with a bad name is reported.
    bad = subprocess.run([binary("promtool"), "check", "metrics"],
                         input=b"# TYPE authzChecks counter\nauthzChecks 1\n", capture_output=True, timeout=60, check=False)
    assert bad.returncode != 0 or bad.stdout or bad.stderr


def test_audit_file_holds_one_record_per_check_and_no_credentials(service: Service) -> None:
    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in service.audit_log.read_text().splitlines()]
    wait_for("audit records", lambda: len(records()) == ALLOWS + DENIES, 15)
    recs = records()
    assert sum(r["allowed"] for r in recs) == ALLOWS
    assert "secret" not in service.audit_log.read_text()


@pytest.fixture(scope="module")
def prometheus(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus scraping the service every second, with the alert rules loaded."""
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", work / "alerts.yml")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "authz", "static_configs": [{"targets": [service.http_addr]}]}],
    }))
    addr = f"127.0.0.1:{free_port()}"
    log = work / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address={addr}", "--storage.tsdb.retention.time=1h"],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for("Prometheus ready", lambda: http_get(f"http://{addr}/-/ready")[0] == 200, 60, proc, log)
        yield f"http://{addr}"
    finally:
        stop(proc)


def promql(base: str, query: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (query, answer)
    return list(answer["data"]["result"])


def test_promql_returns_the_allows_and_denies_sent(service: Service, prometheus: str) -> None:
    query = 'sum by (decision) (authz_checks_total{job="authz"})'

    def counts() -> dict[str, float] | None:
        got = {r["metric"]["decision"]: float(r["value"][1]) for r in promql(prometheus, query)}
        return got if got == {"allow": ALLOWS, "deny": DENIES} else None

    assert wait_for(f"{query} to return the checks sent", counts, 60) == {
        "allow": service.decisions["allow"], "deny": service.decisions["deny"]}
    # Up and scraped by this Prometheus, not some other.
    up = promql(prometheus, 'up{job="authz"}')
    assert [r["metric"]["instance"] for r in up] == [service.http_addr]
    revision = promql(prometheus, 'authz_bundle_info{job="authz"}')
    assert [r["metric"]["revision"] for r in revision] == ["p1"]
    records = promql(prometheus, 'sum(authz_audit_records_total{job="authz"})')
    assert float(records[0]["value"][1]) == ALLOWS + DENIES


def test_alert_rules_load_in_prometheus(prometheus: str) -> None:
    def groups() -> list[dict[str, Any]] | None:
        status, body = http_get(f"{prometheus}/api/v1/rules")
        found = json.loads(body)["data"]["groups"] if status == 200 else []
        return found or None

    rules = [r for g in wait_for("rules loaded", groups, 30) for r in g["rules"]]
    names = {r["name"] for r in rules}
    assert {"AuthzDenyRateSpike", "AuthzBundleLoadRejected", "AuthzBundleStale",
            "AuthzAuditRecordsDropped", "AuthzCheckLatencyHigh"} <= names

    def evaluated() -> bool:
        _, body = http_get(f"{prometheus}/api/v1/rules")
        rs = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return all(r.get("health") == "ok" for r in rs)

    wait_for("every rule evaluated without error", evaluated, 30)


def dashboard_queries() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "authz-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def test_every_dashboard_query_is_valid_over_live_data(service: Service, prometheus: str) -> None:
    wait_for("a scrape", lambda: promql(prometheus, 'authz_checks_total{job="authz"}'), 60)
    time.sleep(2.5)  # a few samples, so rate() has two points
    empty = []
    for expr in dashboard_queries():
        query = (expr.replace('job=~"$job"', 'job=~".*"').replace("$__rate_interval", "1m")
                 .replace("$__range", "5m"))
        assert "$" not in query, query
        if not promql(prometheus, query):
            empty.append(query)
    # Series that exist from the start (all but latency quantiles of idle intervals) answer.
    assert not [q for q in empty if "authz_checks_total" in q and "deny" not in q], empty
