"""`authz check --explain`: the trace of a decision, and no tracing work when nobody asks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundle_factory import check_request

from authz.cli import main
from authz.engine import explain
from authz.engine.compile import load_policy_set
from authz.engine.explain import Explainer
from authz.request import from_check_request

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"
ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"
CHECKOUT = "spiffe://cluster.local/ns/prod/sa/checkout-api"
BILLING = "spiffe://cluster.local/ns/prod/sa/billing"

EXTRA = """\
  - name: plan-header
    to:
      - operation:
          paths: ["/v1/plan"]
    when:
      - request.headers["x-plan"] == "gold"
---
apiVersion: authz/v1
kind: Policy
name: no-admin
action: DENY
target:
  principals: ["spiffe://cluster.local/ns/prod/sa/orders-api"]
rules:
  - name: admin-paths
    to:
      - operation:
          paths: ["/admin*"]
"""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(EXAMPLE, root)
    with (root / "policies" / "orders-api.yaml").open("a") as f:
        f.write(EXTRA)
    return root


def explain_cli(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], principal: str, method: str,
                path: str, dest: str = ORDERS, *extra: str) -> str:
    req = {"attributes": {"source": {"principal": principal}, "destination": {"principal": dest},
                          "request": {"http": {"method": method, "path": path, "host": "orders"}}}}
    f = tmp_path / "req.json"
    f.write_text(json.dumps(req))
    assert main(["check", "--bundle", str(bundle), "--request", str(f), "--explain", *extra]) == 0
    return capsys.readouterr().out


def test_explain_an_allow(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, CHECKOUT, "GET", "/v1/tenants/acme/orders")
    lines = out.splitlines()
    assert lines[0] == "ALLOW (HTTP 200) by orders-api/tenant-callers: allowed by policy, tenant acme"
    assert "upstream header x-authz-tenant: acme" in out
    # Policies considered, and the one that does not apply with the field that failed.
    assert "- target  payment-service: target does not apply: FAILED principals: " in out
    assert "+ target  2 policies apply: orders-api, no-admin" in out
    # A DENY rule considered first, its path field not matching.
    assert "- to      no-admin/admin-paths: to[0] FAILED paths: '/v1/tenants/acme/orders' does not match [/admin*]" in out
    # Earlier ALLOW rules, field by field.
    assert ("- to      orders-api/checkout-creates-orders: to[0] FAILED methods: 'GET' does not match [POST]"
            in out)
    # The tenant, and where it came from; the CEL condition and its value.
    assert "+ tenant  orders-api: tenant 'acme' from pathCapture 'tenant'" in out
    assert "{tenant}='acme'" in out
    assert "+ when    orders-api/tenant-callers: source.principal in tenant.callers = true" in out
    assert lines[-1] == "  + rule    orders-api/tenant-callers: matched (ALLOW)"


def test_explain_a_policy_deny(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, CHECKOUT, "GET", "/admin/users")
    assert out.splitlines()[0] == "DENY (HTTP 403) by no-admin/admin-paths: denied by policy"
    assert "+ to      no-admin/admin-paths: to[0] paths: '/admin/users' matches [/admin*]" in out
    assert out.splitlines()[-1] == "  + rule    no-admin/admin-paths: matched (DENY)"
    assert "orders-api/checkout-creates-orders" not in out  # DENY decided before any ALLOW rule


def test_explain_a_deny_read_case_insensitively(bundle: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, CHECKOUT, "GET", "/ADMIN/users")
    assert out.splitlines()[0] == "DENY (HTTP 403) by no-admin/admin-paths: denied by policy"
    assert ("+ to      no-admin/admin-paths: to[0] paths: '/ADMIN/users' matches [/admin*] "
            "(read case-insensitively)") in out


def test_explain_a_default_deny(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, BILLING, "POST", "/v1/orders")
    assert out.splitlines()[0] == "DENY (HTTP 403) by default: no allow rule matched"
    assert ("- from    orders-api/checkout-creates-orders: from[0] FAILED principals: "
            f"'{BILLING}' does not match [{CHECKOUT}]") in out
    assert out.splitlines()[-1] == "  - default no allow rule matched"

    out = explain_cli(bundle, tmp_path, capsys, BILLING, "GET", "/x", "spiffe://cluster.local/ns/prod/sa/nobody")
    assert out.splitlines()[0] == "DENY (HTTP 403) by default: denied by default"
    assert "+ target  0 policies apply: " in out
    assert out.splitlines()[-1] == "  - default denied by default"


def test_explain_a_cel_error(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, CHECKOUT, "GET", "/v1/plan")
    assert out.splitlines()[0] == "DENY (HTTP 403) by orders-api/plan-header: condition error"
    last = out.splitlines()[-1]
    assert last.startswith('  ! when    orders-api/plan-header: request.headers["x-plan"] == "gold": error: ')
    # The key it misses is not quoted back: a key read from the request could be a secret.
    error = last.split("error:", 1)[1]
    assert "x-plan" not in error and '"…"' in error, error


def test_explain_in_json(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_cli(bundle, tmp_path, capsys, CHECKOUT, "GET", "/v1/tenants/acme/orders", ORDERS,
                      "--format", "json")
    result = json.loads(out)
    assert result["allowed"] is True and result["tenant"] == "acme"
    steps = result["explain"]
    assert {"step": "rule", "ok": True, "policy": "orders-api", "rule": "tenant-callers",
            "detail": "matched (ALLOW)"} in steps
    assert any(s["step"] == "when" and s["ok"] is True for s in steps)


def test_check_without_explain_has_no_trace(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "req.json"
    f.write_text(json.dumps({"attributes": {"destination": {"principal": ORDERS},
                                            "request": {"http": {"method": "GET", "path": "/"}}}}))
    assert main(["check", "--bundle", str(bundle), "--request", str(f)]) == 0
    assert "explain" not in json.loads(capsys.readouterr().out)


def test_no_tracer_means_no_explaining_work(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ps = load_policy_set(bundle)
    req = from_check_request(check_request(BILLING, "POST", "/v1/orders", destination=ORDERS), ps.trust_domains)

    def boom(*_: object) -> str:
        raise AssertionError("explaining on the serving path")

    for name in ("describe_operations", "describe_sources", "describe_target"):
        monkeypatch.setattr(explain, name, boom)
    assert ps.decide(req).allowed is False  # no tracer: nothing described
    with pytest.raises(AssertionError, match="explaining"):
        ps.decide(req, Explainer())


def test_explainer_records_matched_rules() -> None:
    e = Explainer()
    e.step("rule", True, "matched (DENY)", "p", "r")
    e.step("rule", False, "x", "p", "s")
    e.step("when", None, "a: error: boom", "p", "t")
    assert e.matched_rules() == {"p/r"}
    assert e.lines()[2].startswith("! when")
