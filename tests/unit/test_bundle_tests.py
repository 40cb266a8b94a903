"""`authz test` and authz.bundle.cases.run_cases: bundle tests through the real check path."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml

from authz.bundle.loader import BundleError, read_bundle
from authz.cli import main
from authz.engine.compile import compile_bundle
from authz.bundle.cases import run_cases

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"
CHECKOUT = "spiffe://cluster.local/ns/prod/sa/checkout-api"
ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"


def copy_example(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(EXAMPLE, root)
    shutil.rmtree(root / "tests")
    (root / "tests").mkdir()
    return root


def write_test(root: Path, cases: list[dict], name: str = "t", file: str = "t.yaml") -> Path:
    doc = {"apiVersion": "authz/v1", "kind": "BundleTest", "name": name, "cases": cases}
    path = root / "tests" / file
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def report_for(root: Path, pattern: str | None = None):
    files = read_bundle(root)
    return run_cases(compile_bundle(files), files.tests, pattern)


GOOD = {"name": "checkout creates", "request": {"principal": CHECKOUT, "destination": ORDERS,
                                                "method": "POST", "path": "/v1/orders"},
        "expect": {"allowed": True, "status": 200, "policy": "orders-api", "rule": "checkout-creates-orders"}}


def test_example_bundle_passes_and_covers_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["test", str(EXAMPLE), "--require-coverage"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "uncovered" not in out
    assert "coverage: 6/6 rules exercised" in out
    last = out.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed") and not last.startswith("0 passed")


def test_example_tests_include_allow_deny_and_tenant_cases() -> None:
    report = report_for(EXAMPLE)
    assert report.ok and report.coverage.complete
    names = " ".join(r.name for r in report.results)
    for needle in ("unknown tenant", "encoded slash", "dot segments", "CheckRequest"):
        assert needle in names


def test_wrong_expectation_fails_naming_the_case_with_expected_and_actual(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_example(tmp_path)
    wrong = {**GOOD, "name": "wrong rule", "expect": {"allowed": True, "rule": "fulfillment-reads-orders"}}
    write_test(root, [GOOD, wrong])
    rc = main(["test", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "PASS  t/checkout creates  (tests/t.yaml:" in out
    assert "FAIL  t/wrong rule  (tests/t.yaml:" in out
    assert "rule: expected 'fulfillment-reads-orders', got 'checkout-creates-orders'" in out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


def test_failure_shows_each_mismatch_and_the_trace(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    case = {"name": "denied expected", "request": {"principal": CHECKOUT, "destination": ORDERS,
                                                  "path": "/v1/tenants/acme/orders"},
            "expect": {"allowed": False, "status": 403, "tenant": "globex", "headers": {"x-authz-tenant": None}}}
    write_test(root, [case])
    report = report_for(root)
    [r] = report.failed
    assert r.name == "t/denied expected" and r.location == "tests/t.yaml:5"
    assert "allowed: expected false, got true" in r.message
    assert "status: expected 403, got 200" in r.message
    assert "tenant: expected 'globex', got 'acme'" in r.message
    assert "header x-authz-tenant: expected (absent), got 'acme'" in r.message
    assert any("tenant-callers" in line and "matched" in line for line in r.explanation)


def test_checkrequest_cases_and_headers(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    cr = {"attributes": {"source": {"principal": CHECKOUT}, "destination": {"principal": ORDERS},
                         "request": {"http": {"method": "GET", "path": "/v1/tenants/acme/orders",
                                              "headers": {"x-authz-tenant": "globex"}}}}}
    write_test(root, [{"name": "full", "checkRequest": cr,
                       "expect": {"allowed": True, "tenant": "acme",
                                  "headers": {"x-authz-tenant": "acme", "x-authz-principal": CHECKOUT}}}])
    assert report_for(root).ok


def test_a_case_with_neither_or_both_request_forms_fails(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    write_test(root, [{"name": "none", "expect": {"allowed": True}},
                      {"name": "bad json", "checkRequest": {"attributes": {"nope": 1}}, "expect": {}}])
    report = report_for(root)
    assert [r.passed for r in report.results] == [False, False]
    assert "exactly one of 'request' or 'checkRequest'" in report.results[0].message
    assert "not an Envoy CheckRequest" in report.results[1].message


def test_a_case_that_does_not_parse_echoes_no_value(tmp_path: Path) -> None:
    """The message goes to the reload log and /v1/status, where a test's value (a token in a
    header, a port field holding one) must not appear."""
    root = copy_example(tmp_path)
    bad = {"attributes": {"destination": {"address": {"socketAddress": {"portValue": "SECRET-TOKEN"}}}}}
    write_test(root, [{"name": "bad", "checkRequest": bad, "expect": {}}])
    (result,) = report_for(root).results
    assert "not an Envoy CheckRequest" in result.message and "SECRET" not in result.message, result.message


def test_pattern_selects_cases(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    write_test(root, [GOOD, {**GOOD, "name": "another"}])
    assert [r.name for r in report_for(root, "ANOTHER").results] == ["t/another"]
    assert [r.name for r in report_for(root, "t/check*").results] == ["t/checkout creates"]


def test_coverage_names_uncovered_rules_with_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_example(tmp_path)
    write_test(root, [GOOD])
    report = report_for(root)
    assert report.ok
    uncovered = [r.name for r in report.coverage.uncovered]
    assert "orders-api/checkout-creates-orders" not in uncovered
    assert "payment-service/probes" in uncovered and len(uncovered) == 5
    assert main(["test", str(root)]) == 0
    assert main(["test", str(root), "--require-coverage"]) == 1
    out = capsys.readouterr().out
    assert "uncovered rules:" in out and "payment-service/probes  (policies/payment-service.yaml:" in out


def test_deny_and_audit_rules_count_as_exercised(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "policies").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "bundle.yaml").write_text(textwrap.dedent("""\
        apiVersion: authz/v1
        kind: Bundle
        name: b
        revision: "1"
        trustDomain: cluster.local
        defaultAction: ALLOW
        """))
    (root / "policies" / "p.yaml").write_text(textwrap.dedent("""\
        apiVersion: authz/v1
        kind: Policy
        name: no-admin
        action: DENY
        rules:
          - name: admin
            to: [{operation: {paths: ["/admin*"]}}]
        ---
        apiVersion: authz/v1
        kind: Policy
        name: watch
        action: AUDIT
        rules:
          - name: writes
            to: [{operation: {methods: [POST]}}]
        """))
    write_test(root, [{"name": "admin", "request": {"path": "/admin/x"}, "expect": {"allowed": False, "rule": "admin"}},
                      {"name": "post", "request": {"method": "POST", "path": "/x"},
                       "expect": {"allowed": True, "reason": "allowed by default"}}])
    report = report_for(root)
    assert report.ok, [r.message for r in report.failed]
    assert report.coverage.complete


def test_junit_xml(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    write_test(root, [GOOD, {**GOOD, "name": "bad", "expect": {"allowed": False}}])
    xml = tmp_path / "out.xml"
    assert main(["test", str(root), "--junit-xml", str(xml)]) == 1
    tree = ET.parse(xml).getroot()
    assert tree.tag == "testsuites" and tree.get("tests") == "2" and tree.get("failures") == "1"
    suite = tree.find("testsuite")
    assert suite is not None and suite.get("name") == "t"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["checkout creates"].find("failure") is None
    failure = cases["bad"].find("failure")
    assert failure is not None and "allowed: expected false, got true" in (failure.text or "")


def test_test_files_are_validated_with_positions(tmp_path: Path) -> None:
    root = copy_example(tmp_path)
    (root / "tests" / "t.yaml").write_text(textwrap.dedent("""\
        apiVersion: authz/v1
        kind: BundleTest
        name: t
        cases:
          - name: typo
            request: {path: /, methd: GET}
            expect: {allowed: true}
        """))
    with pytest.raises(BundleError) as err:
        read_bundle(root)
    assert "tests/t.yaml:6:24: error: unknown field 'methd'" in str(err.value)


def test_bundle_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_example(tmp_path)
    (root / "bundle.yaml").write_text("apiVersion: authz/v1\nkind: Bundle\n")
    assert main(["test", str(root)]) == 2
    assert "missing required field" in capsys.readouterr().err


def test_a_case_that_would_pass_whatever_the_policy_does_fails(tmp_path: Path) -> None:
    """`expect: {}` passed every time, and `allowed: false` passed when the DENY's condition
    only errored (a DENY that errors denies everything, the traffic it should let through too)."""
    root = copy_example(tmp_path)
    deny = {"apiVersion": "authz/v1", "kind": "Policy", "name": "debug-in-prod", "action": "DENY",
            "rules": [{"name": "r", "when": ["request.headers['x-debug'] == '1' && request.headers['x-env'] == 'prod'"]}]}
    (root / "policies" / "debug.yaml").write_text(yaml.safe_dump(deny, sort_keys=False))
    debug_only = {"principal": CHECKOUT, "destination": ORDERS, "method": "POST", "path": "/v1/orders",
                  "headers": {"x-debug": "1"}}
    write_test(root, [
        {"name": "nothing", "request": GOOD["request"], "expect": {}},
        {"name": "error passes for a deny", "request": debug_only, "expect": {"allowed": False}},
        {"name": "error named", "request": debug_only, "expect": {"allowed": False, "reason": "condition error"}},
    ])
    report = report_for(root)
    assert [r.passed for r in report.results] == [False, False, True]
    assert "expects nothing" in report.results[0].message
    assert "decided by an evaluation error (condition error in debug-in-prod/r)" in report.results[1].message


def test_a_failing_case_shows_a_credential_header_by_length(tmp_path: Path) -> None:
    """A stale test of an upstream token printed the bundle's token into the reload error and
    /v1/status: `expected 'Bearer old', got 'Bearer UPSTREAM-SECRET-123'`."""
    from bundle_factory import write_bundle

    policy = {"name": "p", "action": "ALLOW", "rules": [{"name": "r", "upstreamHeaders": {
        "x-upstream-auth": "'Bearer ' + data.upstream.token", "x-plan": "'gold'"}}]}
    root = write_bundle(tmp_path / "b", [policy], data={"upstream": {"token": "UPSTREAM-SECRET-123"}})
    (root / "tests").mkdir(exist_ok=True)
    write_test(root, [{"name": "stale", "request": {"path": "/"},
                       "expect": {"allowed": True, "headers": {"x-upstream-auth": "Bearer old", "x-plan": "silver"}}}])
    (result,) = report_for(root).results
    assert "SECRET" not in result.message, result.message
    assert "header x-upstream-auth: expected <redacted, 10 characters>, got <redacted, 26 characters>" in result.message
    assert "header x-plan: expected 'silver', got 'gold'" in result.message
