"""Policy-shaped responses: upstream headers set and removed by ALLOW rules (CEL over request
and tenant), deny statuses and messages of DENY policies and the bundle; checked at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import check_request, policy_set, spiffe, write_bundle

from authz.bundle.loader import BundleError
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.lint import lint_bundle

CALLER = spiffe("prod", "checkout")
TENANTS = {"acme": {"plan": "enterprise", "callers": [CALLER], "flags": {"beta": True},
                    "attributes": {"region": "eu"}},
           "globex": {"plan": "standard", "callers": [CALLER], "attributes": {"region": "us"}}}


def tenant_policy(**rule: Any) -> dict[str, Any]:
    return {"name": "orders", "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
            "rules": [{"name": "tenant-read", "to": [{"operation": {"paths": ["/t/{tenant}/{**}"]}}],
                       "when": ["source.principal in tenant.callers"], **rule}]}


def blocked(**extra: Any) -> dict[str, Any]:
    return {"name": "blocked", "action": "DENY",
            "rules": [{"name": "admin", "to": [{"operation": {"paths": ["/t/{*}/admin/{**}"]}}]}], **extra}


def checker(tmp_path: Path, policies: list[dict[str, Any]], **kw: Any) -> Checker:
    store = BundleStore(None)
    store.current = policy_set(tmp_path, policies, tenants=TENANTS, **kw)
    return Checker(store, None)


def test_allow_rule_sets_and_removes_upstream_headers(tmp_path: Path) -> None:
    c = checker(tmp_path, [tenant_policy(
        upstreamHeaders={"x-tenant-plan": "tenant.plan", "x-tenant-region": "string(tenant.attributes.region)",
                         "x-caller-ns": "source.namespace", "x-doc": "request.path_params.tenant + '-doc'"},
        removeHeaders=["cookie", "x-debug"])])
    out = c.run(check_request(principal=CALLER, path="/t/acme/orders", headers={"cookie": "a=b"}))
    assert out.decision.allowed
    ok = out.response.ok_response
    headers = [(h.header.key, h.header.value) for h in ok.headers]
    assert headers[:4] == [("x-tenant-plan", "enterprise"), ("x-tenant-region", "eu"),
                           ("x-caller-ns", "prod"), ("x-doc", "acme-doc")]
    assert ("x-authz-tenant", "acme") in headers
    assert list(ok.headers_to_remove) == ["cookie", "x-debug"]
    # Another tenant, another plan: evaluated per request.
    out = c.run(check_request(principal=CALLER, path="/t/globex/orders"))
    assert ("x-tenant-plan", "standard") in [(h.header.key, h.header.value) for h in out.response.ok_response.headers]


def test_failing_header_expression_denies(tmp_path: Path) -> None:
    c = checker(tmp_path, [tenant_policy(upstreamHeaders={"x-missing": "request.headers['x-absent']"})])
    out = c.run(check_request(principal=CALLER, path="/t/acme/orders"))
    assert not out.decision.allowed and out.decision.reason == "upstream header error"
    assert out.response.denied_response.status.code == 403
    # A value with a line break could split the upstream request: denied too.
    c = checker(tmp_path / "2", [tenant_policy(upstreamHeaders={"x-echo": "request.headers['x-in']"})])
    out = c.run(check_request(principal=CALLER, path="/t/acme/x", headers={"x-in": "a\nb"}))
    assert not out.decision.allowed and out.decision.reason == "upstream header error"
    out = c.run(check_request(principal=CALLER, path="/t/acme/x", headers={"x-in": "y" * 2000}))
    assert not out.decision.allowed
    out = c.run(check_request(principal=CALLER, path="/t/acme/x", headers={"x-in": "fine"}))
    assert out.decision.allowed


def test_deny_status_and_message_from_policy_and_bundle(tmp_path: Path) -> None:
    c = checker(tmp_path, [blocked(denyResponse={"status": 404, "message": "no such page"}), tenant_policy()],
                denyResponse={"status": 401, "message": "sign in first"})
    out = c.run(check_request(principal=CALLER, path="/t/acme/admin/x"))
    d = out.response.denied_response
    assert (out.decision.reason, out.decision.http_status, d.status.code) == ("denied by policy", 404, 404)
    assert json.loads(d.body) == {"decision_id": out.decision_id, "reason": "denied by policy",
                                  "message": "no such page"}
    assert "blocked" not in d.body and "admin" not in d.body  # no policy or rule names
    out = c.run(check_request(principal=spiffe("dev", "stranger"), path="/t/acme/orders"))
    assert (out.decision.http_status, out.response.denied_response.status.code) == (401, 401)
    assert json.loads(out.response.denied_response.body)["message"] == "sign in first"
    out = c.run(check_request(principal=CALLER, path="/t/acme/orders"))
    assert out.decision.allowed and out.decision.http_status == 200


def test_without_shapes_nothing_changes(tmp_path: Path) -> None:
    c = checker(tmp_path, [blocked(), tenant_policy()])
    out = c.run(check_request(principal=CALLER, path="/t/acme/admin/x"))
    assert out.response.denied_response.status.code == 403
    assert json.loads(out.response.denied_response.body) == {"decision_id": out.decision_id,
                                                             "reason": "denied by policy"}


@pytest.mark.parametrize(("policies", "manifest", "expected"), [
    ([tenant_policy(upstreamHeaders={"x-authz-tenant": "tenant.id"})], {}, "cannot be set by a policy"),
    ([tenant_policy(upstreamHeaders={"X-Plan": "tenant.plan"})], {}, "lower-case token"),
    ([tenant_policy(upstreamHeaders={"x-envoy-original-path": "request.path"})], {}, "cannot be set"),
    ([tenant_policy(upstreamHeaders={"x-forwarded-client-cert": "source.principal"})], {}, "cannot be set"),
    ([tenant_policy(upstreamHeaders={"x-flag": "tenant.flags.beta"})], {}, "must be a string"),
    ([tenant_policy(upstreamHeaders={"x-port": "source.port"})], {}, "must be a string"),
    ([tenant_policy(upstreamHeaders={"x-bad": "tenant.nope"})], {}, "x-bad"),
    ([tenant_policy(removeHeaders=["x-authz-principal"])], {}, "cannot be removed"),
    ([tenant_policy(upstreamHeaders={"x-a": "tenant.plan"}, removeHeaders=["x-a"])], {}, "both set and removed"),
    ([tenant_policy(upstreamHeaders={f"x-h{i}": "tenant.plan" for i in range(17)})], {}, "at most 16"),
    ([{"name": "p", "action": "ALLOW", "rules": [{"upstreamHeaders": {"x-plan": "tenant.plan"}}]}], {},
     "names no tenant"),
    ([blocked(rules=[{"name": "r", "upstreamHeaders": {"x-a": "request.path"}}])], {}, "only rules of ALLOW"),
    ([tenant_policy(), {**tenant_policy(), "name": "o2", "denyResponse": {"status": 404}}], {},
     "denyResponse is for DENY policies"),
    ([blocked(denyResponse={"status": 500})], {}, "must be one of 401, 403, 404, 429"),
    ([blocked(denyResponse={"message": "x" * 300})], {}, "at most 256"),
    ([blocked()], {"denyResponse": {"status": 302}}, "must be one of 401, 403, 404, 429"),
    # as a condition's would be: a data file the bundle lacks is a load error, not a deny per check
    ([tenant_policy(upstreamHeaders={"x-d": "string(data.nope.x)"})], {}, "reads data.nope"),
])
def test_load_errors_name_file_and_line(tmp_path: Path, policies: list[dict[str, Any]],
                                        manifest: dict[str, Any], expected: str) -> None:
    with pytest.raises(BundleError) as err:
        policy_set(tmp_path, policies, tenants=TENANTS, **manifest)
    text = str(err.value)
    assert expected in text, text
    assert ".yaml:" in text


def test_lint_warns_on_headers_that_may_carry_secrets(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [tenant_policy(upstreamHeaders={
        "x-tenant-plan": "tenant.plan",
        "x-user-token": "request.headers['x-in']",
        "x-forwarded-auth": "request.headers['authorization']",
        "x-api": "string(tenant.attributes.api_key)",
    })], tenants=TENANTS)
    warnings = [str(p) for p in lint_bundle(root) if p.severity == "warning"]
    flagged = {name for name in ("x-tenant-plan", "x-user-token", "x-forwarded-auth", "x-api")
               if any(f"'{name}' may carry a secret" in w for w in warnings)}
    assert flagged == {"x-user-token", "x-forwarded-auth", "x-api"}, warnings


def test_bundle_tests_can_expect_shaped_headers_and_statuses(tmp_path: Path) -> None:
    import yaml

    from authz.cli import main

    root = write_bundle(tmp_path / "b", [blocked(denyResponse={"status": 404, "message": "gone"}),
                                         tenant_policy(upstreamHeaders={"x-tenant-plan": "tenant.plan"})],
                        tenants=TENANTS)

    def cases(plan: str) -> int:
        (root / "tests").mkdir(exist_ok=True)
        (root / "tests" / "shaped.yaml").write_text(yaml.safe_dump({
            "apiVersion": "authz/v1", "kind": "BundleTest", "name": "shaped", "cases": [
                {"name": "plan upstream", "request": {"principal": CALLER, "method": "GET", "path": "/t/acme/x"},
                 "expect": {"allowed": True, "headers": {"x-tenant-plan": plan}}},
                {"name": "admin hidden", "request": {"principal": CALLER, "method": "GET", "path": "/t/acme/admin/x"},
                 "expect": {"allowed": False, "status": 404}},
            ]}))
        return main(["test", str(root)])

    assert cases("enterprise") == 0
    assert cases("standard") != 0  # the expectation is really compared


def test_an_upstream_header_sees_the_tenant_callers(tmp_path: Path) -> None:
    """tenant.callers as a CEL map was built only when a condition read it through CEL: an
    upstream header alone saw an empty map and told the upstream the caller was a guest."""
    policy = {"name": "orders", "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
              "rules": [{"name": "r", "to": [{"operation": {"paths": ["/t/{tenant}/{**}"]}}],
                         "upstreamHeaders": {"x-member": "source.principal in tenant.callers ? 'member' : 'guest'",
                                             "x-n": "string(size(tenant.callers))"}}]}
    c = checker(tmp_path, [policy])
    out = c.run(check_request(principal=CALLER, path="/t/acme/orders"))
    headers = dict((h.header.key, h.header.value) for h in out.response.ok_response.headers)
    assert (headers["x-member"], headers["x-n"]) == ("member", "1")
