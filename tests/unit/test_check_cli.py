"""`authz check` answers the example bundle's scenarios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"
ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"
PAYMENT = "spiffe://cluster.local/ns/payment/sa/payment-service"


def sa(ns: str, name: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{name}"


def request_json(principal: str, dest: str, method: str, path: str, headers: dict[str, str] | None = None) -> str:
    return json.dumps({"attributes": {
        "source": {"principal": principal, "address": {"socketAddress": {"address": "10.1.2.3", "portValue": 40000}}},
        "destination": {"principal": dest, "address": {"socketAddress": {"address": "10.1.2.4", "portValue": 8080}}},
        "request": {"http": {"method": method, "path": path, "host": "svc.cluster.local", "headers": headers or {}}},
    }})


def run_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, *extra: str) -> tuple[int, dict]:
    f = tmp_path / "req.json"
    f.write_text(body)
    rc = main(["check", "--bundle", str(EXAMPLE), "--request", str(f), *extra])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else {})


SCENARIOS = [
    # orders-api
    (sa("prod", "checkout-api"), ORDERS, "POST", "/v1/orders", True, "orders-api", "checkout-creates-orders", None),
    (sa("prod", "checkout-api"), ORDERS, "POST", "/v1/orders/o-17/cancel", True, "orders-api", "checkout-creates-orders", None),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/v1/orders/o-17", False, "default", "default", None),
    (sa("prod", "checkout-api"), ORDERS, "POST", "/v1/orders/o-17/x/cancel", False, "default", "default", None),
    (sa("prod", "fulfillment-worker"), ORDERS, "GET", "/v1/orders/o-17", True, "orders-api", "fulfillment-reads-orders", None),
    (sa("prod", "fulfillment-worker"), ORDERS, "GET", "/v1/orders/o-17?expand=items", True, "orders-api", "fulfillment-reads-orders", None),
    (sa("prod", "fulfillment-worker"), ORDERS, "POST", "/v1/orders", False, "default", "default", None),
    (sa("prod", "fulfillment-worker"), ORDERS, "GET", "/v1/orders", False, "default", "default", None),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/v1/tenants/acme/orders", True, "orders-api", "tenant-callers", "acme"),
    (sa("prod", "checkout-api"), ORDERS, "POST", "/v1/tenants/acme/orders/o-1/items", True, "orders-api", "tenant-callers", "acme"),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/v1/tenants/globex/orders", False, "default", "default", None),
    (sa("prod", "billing"), ORDERS, "GET", "/v1/tenants/globex/orders", True, "orders-api", "tenant-callers", "globex"),
    (sa("prod", "billing"), ORDERS, "GET", "/v1/tenants/acme/orders", False, "default", "default", None),
    (sa("prod", "billing"), ORDERS, "GET", "/v1/tenants/initech/orders", False, "orders-api", "tenant", None),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/v1/tenants/acme/../globex/orders", False, "default", "default", None),
    (sa("prod", "billing"), ORDERS, "GET", "/v1/tenants/acme/orders", False, "default", "default", None),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/v1/tenants/acme/profile", False, "default", "default", None),
    (sa("prod", "checkout-api"), ORDERS, "GET", "/health", False, "default", "default", None),
    # payment-service
    (sa("order", "order-service"), PAYMENT, "POST", "/v1/charges", True, "payment-service", "order-service-charges", None),
    (sa("order", "order-service"), PAYMENT, "POST", "/v1/refunds", True, "payment-service", "order-service-charges", None),
    (sa("order", "order-service"), PAYMENT, "GET", "/v1/charges", False, "default", "default", None),
    (sa("order", "order-service"), PAYMENT, "GET", "/v1/transactions/t1", False, "default", "default", None),
    (sa("finance", "reconciliation-service"), PAYMENT, "GET", "/v1/transactions/t1", True, "payment-service", "reconciliation-reads", None),
    (sa("finance", "reconciliation-service"), PAYMENT, "POST", "/v1/charges", False, "default", "default", None),
    (sa("prod", "checkout-api"), PAYMENT, "POST", "/v1/charges", False, "default", "default", None),
    (sa("dev", "anyone"), PAYMENT, "GET", "/health", True, "payment-service", "probes", None),
    ("", PAYMENT, "GET", "/ready", True, "payment-service", "probes", None),
    (sa("dev", "anyone"), PAYMENT, "POST", "/health", False, "default", "default", None),
    # everything else
    (sa("order", "order-service"), sa("prod", "unknown-svc"), "POST", "/v1/charges", False, "default", "default", None),
    (sa("order", "order-service"), "", "GET", "/health", False, "default", "default", None),
]


@pytest.mark.parametrize(("principal", "dest", "method", "path", "allowed", "policy", "rule", "tenant"), SCENARIOS)
def test_example_scenarios(tmp_path: Path, capsys: pytest.CaptureFixture[str], principal: str, dest: str,
                           method: str, path: str, allowed: bool, policy: str, rule: str, tenant: str | None) -> None:
    rc, out = run_check(tmp_path, capsys, request_json(principal, dest, method, path))
    assert rc == 0
    assert (out["allowed"], out["http_status"], out["policy"], out["rule"], out["tenant"]) == (
        allowed, 200 if allowed else 403, policy, rule, tenant)
    assert len(out["decision_id"]) == 32 and out["reason"]


def test_malformed_request_is_a_deny_not_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_check(tmp_path, capsys, json.dumps({"attributes": {"source": {"principal": sa("a", "b")}}}))
    assert rc == 0 and out["allowed"] is False and "no HTTP attributes" in out["reason"]
    rc, out = run_check(tmp_path, capsys, request_json(sa("prod", "checkout-api"), ORDERS, "POST",
                                                       "/v1/orders%00"))
    assert rc == 0 and out["allowed"] is False and out["reason"].startswith("malformed request:")


def test_usage_and_bundle_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run_check(tmp_path, capsys, "{not json")
    assert rc == 2
    (tmp_path / "extra.json").write_text(json.dumps({"attributes": {"request": {"http": {"method": "GET"}}},
                                                     "version": 1}))
    assert main(["check", "--bundle", str(EXAMPLE), "--request", str(tmp_path / "extra.json")]) == 0
    assert "ignored field CheckRequest.version" in capsys.readouterr().err  # skipped, with a warning ...
    rc, _ = run_check(tmp_path, capsys, json.dumps({"attributes": {"source": {"principal": 7}}}))
    assert rc == 2  # ... a known field of the wrong type is an error
    assert main(["check", "--bundle", str(EXAMPLE), "--request", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bundle.yaml").write_text("apiVersion: authz/v1\nkind: Bundle\n")
    (tmp_path / "r.json").write_text(request_json("", ORDERS, "GET", "/"))
    assert main(["check", "--bundle", str(bad), "--request", str(tmp_path / "r.json")]) == 2
    assert "bundle.yaml:1:1" in capsys.readouterr().err
    assert main(["check"]) == 2


def test_request_dumps_with_fields_of_other_tools_still_decide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = json.loads(request_json(sa("prod", "checkout-api"), ORDERS, "POST", "/v1/orders"))
    body["attributes"]["request"]["http"]["parsed_path"] = ["v1", "orders"]  # OPA-Envoy's input adds these
    body["parsed_query"] = {}
    rc, out = run_check(tmp_path, capsys, json.dumps(body))
    assert rc == 0 and out["allowed"] is True and out["rule"] == "checkout-creates-orders"


def test_console_script_reads_stdin() -> None:
    body = request_json(sa("prod", "checkout-api"), ORDERS, "POST", "/v1/orders",
                        {"authorization": "Bearer secret", "x-authz-tenant": "globex"})
    proc = subprocess.run([sys.executable, "-m", "authz", "check", "--bundle", str(EXAMPLE), "--request", "-"],
                          input=body, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["allowed"] is True and out["rule"] == "checkout-creates-orders"
    assert "secret" not in proc.stdout + proc.stderr


def test_default_bundle_is_the_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.json"
    f.write_text(request_json(sa("order", "order-service"), PAYMENT, "POST", "/v1/charges"))
    assert main(["check", "--request", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "payment-service"
