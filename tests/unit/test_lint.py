"""`authz lint`: each listed error and warning, at its line and column."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from authz.cli import main
from authz.lint import lint_bundle

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"

MANIFEST = """\
apiVersion: authz/v1
kind: Bundle
name: lint
revision: "1"
trustDomain: cluster.local
"""


def bundle(tmp_path: Path, policies: str, manifest_extra: str = "", **files: str) -> Path:
    root = tmp_path / "b"
    (root / "policies").mkdir(parents=True)
    (root / "bundle.yaml").write_text(MANIFEST + textwrap.dedent(manifest_extra))
    (root / "policies" / "p.yaml").write_text(textwrap.dedent(policies))
    for name, text in files.items():
        path = root / name.replace("__", "/").replace("_yaml", ".yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def lint(root: Path) -> list[str]:
    return [str(p) for p in lint_bundle(root)]


def has(problems: list[str], start: str, text: str) -> bool:
    return any(p.startswith(start) and text in p for p in problems)


def test_example_bundle_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lint", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip() == "0 errors, 0 warnings"


# --- errors ---------------------------------------------------------------------------

ERRORS = """\
apiVersion: authz/v1
kind: Policy
name: api
action: ALLOW
tenant:
  pathCapture: tenant
rules:
  - name: bad-cel
    to:
      - operation:
          paths: ["/v1/{tenant}/x"]
    when:
      - request.method == "GET" && data.blocklist.size() == 0
      - request.methd == "GET"
      - "tenant.plan == 'gold' &&"
  - name: bad-template
    to:
      - operation:
          paths: ["/v1/{**}/{*}"]
"""


def test_compile_errors_at_their_positions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = bundle(tmp_path, ERRORS)
    problems = lint(root)
    # invalid CEL: the column inside the expression, and the file column of that character
    assert has(problems, "policies/p.yaml:14:16: error: invalid CEL at column 8 of the expression",
               "undeclared reference to 'request.methd'")
    assert has(problems, "policies/p.yaml:15:34: error: invalid CEL at column 25 of the expression", "Syntax error")
    # invalid template
    assert has(problems, "policies/p.yaml:19:19: error: invalid path template '/v1/{**}/{*}'",
               "no operator may follow")
    # data the policy needs but the bundle lacks: tenant data, and a data file
    assert has(problems, "policies/p.yaml:5:1: error: policy reads a tenant but the bundle has no tenant data", "")
    assert has(problems, "policies/p.yaml:13:9: error: condition reads data.blocklist", "no data/blocklist.yaml")
    assert main(["lint", str(root)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "5 errors, 0 warnings"


def test_unknown_fields_and_unknown_tenant_source(tmp_path: Path) -> None:
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: ALLOW
        tenant:
          query: tenant
        rules:
          - name: r
            to:
              - operation:
                  methd: [GET]
        """)
    problems = lint(root)
    assert has(problems, "policies/p.yaml:6:3: error: unknown field 'query' in tenant",
               "known: pathCapture, header, principalSegment")
    assert has(problems, "policies/p.yaml:11:11: error: unknown field 'methd' in rules/0/to/0/operation", "")


def test_tenant_capture_no_path_has(tmp_path: Path) -> None:
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: ALLOW
        tenant:
          pathCapture: org
        rules:
          - to:
              - operation:
                  paths: ["/v1/{tenant}/x"]
        """, tenants__t_yaml="tenants: {acme: {}}\n")
    assert has(lint(root), "policies/p.yaml:6:16: error: tenant capture '{org}' appears in no path", "")


# --- warnings -------------------------------------------------------------------------

WARNINGS = """\
apiVersion: authz/v1
kind: Policy
name: api
target:
  principals: ["spiffe://cluster.local/ns/prod/sa/api"]
action: ALLOW
rules:
  - name: anyone
    from:
      - source:
          principals: ["*"]
    to:
      - operation:
          methods: [GET]
  - name: admin-read
    from:
      - source:
          principals: ["spiffe://other.example/ns/ops/sa/admin", "old.local/ns/ops/sa/admin"]
    to:
      - operation:
          methods: [GET]
          paths: ["/admin/users"]
---
apiVersion: authz/v1
kind: Policy
name: block-admin
action: DENY
rules:
  - name: admin
    to:
      - operation:
          paths: ["/admin*"]
"""


@pytest.fixture
def warned(tmp_path: Path) -> list[str]:
    root = bundle(tmp_path, WARNINGS, "trustDomainAliases: [old.local]\ndefaultAction: ALLOW\n",
                  tenants__t_yaml="tenants:\n  acme:\n    callers: [spiffe://cluster.local/ns/prod/sa/web]\n",
                  data__blocklist_yaml="blocked: []\n")
    return lint(root)


def test_wildcard_principal_in_allow(warned: list[str]) -> None:
    assert has(warned, "policies/p.yaml:11:24: warning: ALLOW rule 'api/anyone' has wildcard principal '*'", "")


def test_rule_unreachable_after_deny(warned: list[str]) -> None:
    assert has(warned, "policies/p.yaml:15:5: warning: rule 'api/admin-read' is unreachable: DENY rule "
               "'block-admin/admin' (policies/p.yaml:29:5)", "")
    assert not any("'api/anyone' is unreachable" in p for p in warned)  # GET /anything is not all /admin*


def test_namespace_without_default_deny(warned: list[str]) -> None:
    assert has(warned, "policies/p.yaml:5:16: warning: namespace 'prod' has ALLOW policies but no default deny", "")


def test_foreign_trust_domain(warned: list[str]) -> None:
    assert has(warned, "policies/p.yaml:18:24: warning: principal 'spiffe://other.example/ns/ops/sa/admin' is in "
               "trust domain 'other.example'", "")
    assert not any("old.local/ns/ops" in p for p in warned)  # an alias is fine


def test_unused_tenant_and_data(warned: list[str]) -> None:
    assert has(warned, "tenants/t.yaml:1:1: warning: tenant data that no policy reads", "")
    assert has(warned, "data/blocklist.yaml:1:1: warning: data file 'data/blocklist.yaml' is read by no condition", "")
    assert len(warned) == 6 and all(": warning: " in p for p in warned)


def test_warnings_alone_exit_0_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = bundle(tmp_path, WARNINGS, "defaultAction: ALLOW\n")
    assert main(["lint", str(root), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["errors"] == 0 and result["warnings"] == 5
    assert {"file": "policies/p.yaml", "line": 11, "column": 24, "severity": "warning",
            "message": "ALLOW rule 'api/anyone' has wildcard principal '*': it admits every workload of the "
                       "mesh, not one caller"} in result["problems"]


def test_no_false_warnings(tmp_path: Path) -> None:
    """A conditional DENY does not shadow, a namespace-wide ALLOW is a default deny, data that is read is used."""
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: ns-default
        target:
          principals: ["spiffe://cluster.local/ns/prod/sa/*"]
        action: ALLOW
        ---
        apiVersion: authz/v1
        kind: Policy
        name: api
        target:
          principals: ["spiffe://cluster.local/ns/prod/sa/api"]
        action: ALLOW
        rules:
          - name: admin-read
            from:
              - source:
                  principals: ["spiffe://cluster.local/ns/ops/sa/admin"]
            to:
              - operation:
                  paths: ["/admin/users"]
        ---
        apiVersion: authz/v1
        kind: Policy
        name: block-admin
        action: DENY
        rules:
          - name: admin
            to:
              - operation:
                  paths: ["/admin*"]
            when:
              - request.headers["x-break-glass"] in data.blocklist
        """, "defaultAction: ALLOW\n", data__blocklist_yaml="[]\n")
    assert lint(root) == []


# --- methods ------------------------------------------------------------------------------

METHODS = """\
apiVersion: authz/v1
kind: Policy
name: api
action: ALLOW
rules:
  - name: r
    to:
      - operation:
          methods: [GET, get, Post, "GET ", PURGE, M-SEARCH, "*"]
          notMethods: [delete]
"""


def test_methods_not_upper_case_tokens(tmp_path: Path) -> None:
    """Methods match case-sensitively (as in Istio): 'get' matches only a request sent as 'get'."""
    problems = lint(bundle(tmp_path, METHODS))
    assert has(problems, "policies/p.yaml:9:26: warning: method 'get' is not an upper-case HTTP token: methods "
               "match case-sensitively, as in Istio, so it matches only a request whose method is exactly 'get'", "")
    assert has(problems, "policies/p.yaml:9:31: warning: method 'Post' is not an upper-case HTTP token", "")
    assert has(problems, "policies/p.yaml:9:37: warning: method 'GET ' is not an upper-case HTTP token: "
               "no request method can hold those characters", "")
    assert has(problems, "policies/p.yaml:10:24: warning: method 'delete' is not an upper-case HTTP token", "")
    assert len(problems) == 4  # GET, PURGE, M-SEARCH and '*' are fine


# --- patterns whose '*' never matches -----------------------------------------------------

STARS = """\
apiVersion: authz/v1
kind: Policy
name: api
target:
  hosts: ["api*example.com"]
action: DENY
rules:
  - name: r
    from:
      - source:
          principals: ["bad*x/ns/a/sa/b", "*admin*", "cluster.local/ns/*/sa/x", "*-td1/ns/a/sa/b", "td*", "*/ns/*/sa/x"]
          namespaces: ["team-*-prod", "*"]
          notServiceAccounts: ["ns/*"]
    to:
      - operation:
          paths: ["/a*b", "**", "/x/{id}/*", "/v1/{*}/y", "/ok*", "*.json"]
          hosts: ["*.example.com"]
"""


def test_stars_that_never_match(tmp_path: Path) -> None:
    problems = lint(bundle(tmp_path, STARS))
    assert has(problems, "policies/p.yaml:5:11: error: host 'api*example.com' has a '*' inside: only a leading or "
               "trailing '*' is a wildcard, and no host holds a '*', so it can never match", "")
    assert has(problems, "policies/p.yaml:11:24: error: principal 'bad*x/ns/a/sa/b' has a '*' inside its trust "
               "domain", "it can never match")
    assert has(problems, "policies/p.yaml:11:43: error: principal '*admin*' has '*' at both ends: that is no "
               "'contains' match", "authz reads a prefix match on '*admin', Istio a suffix match on 'admin*'")
    assert has(problems, "policies/p.yaml:11:54: warning: principal 'cluster.local/ns/*/sa/x' has a '*' inside",
               "this one is a literal character")
    assert has(problems, "policies/p.yaml:11:107: warning: principal '*/ns/*/sa/x': after a leading '*' the rest "
               "is a regular expression", "this inner '*' repeats the character before it")
    assert has(problems, "policies/p.yaml:13:32: error: service account 'ns/*' has a '*'", "")
    assert has(problems, "policies/p.yaml:16:19: warning: path '/a*b' has a '*' inside", "")
    assert has(problems, "policies/p.yaml:16:27: error: path '**' has '*' at both ends", "")
    assert has(problems, "policies/p.yaml:16:33: error: path '/x/{id}/*' mixes a '*' wildcard with a '{}' template", "")
    # '*-td1' and 'td*' are trust domain patterns, namespaces take '*' anywhere, '/v1/{*}/y' is a template.
    assert len(problems) == 9, problems


def test_stars_in_tenant_callers(tmp_path: Path) -> None:
    root = bundle(tmp_path, "apiVersion: authz/v1\nkind: Policy\nname: p\naction: ALLOW\ntenant: {header: x-t}\n",
                  tenants__t_yaml="tenants:\n  acme:\n    callers: ['spiffe://c*l/ns/a/sa/b']\n")
    assert has(lint(root), "tenants/t.yaml:3:15: error: principal 'spiffe://c*l/ns/a/sa/b' has a '*' inside its "
               "trust domain", "")


# --- imported bundles keep Istio's decisions -----------------------------------------------

NS_POLICY = """\
apiVersion: authz/v1
kind: Policy
name: api
target:
  principals: ["spiffe://cluster.local/ns/prod/sa/api"]
action: ALLOW
rules: [{}]
"""


def test_imported_bundle_gets_no_default_deny_advice(tmp_path: Path) -> None:
    """Istio allows what no policy selects: lint must not tell an imported bundle to decide otherwise."""
    from authz.istio_import import IMPORTED_MARK

    plain = lint(bundle(tmp_path / "a", NS_POLICY, "defaultAction: ALLOW\n"))
    assert has(plain, "policies/p.yaml:5:16: warning: namespace 'prod' has ALLOW policies but no default deny", "")
    imported = lint(bundle(tmp_path / "b", NS_POLICY, f"defaultAction: ALLOW\ndescription: '{IMPORTED_MARK} x'\n"))
    assert imported == []


def test_cluster_local_principal_is_the_local_trust_domain(tmp_path: Path) -> None:
    """Istio's 'cluster.local' in a td/ns/x/sa/y principal names the local trust domain, whatever it is."""
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: DENY
        rules:
          - from:
              - source:
                  principals: ["cluster.local/ns/a/sa/b", "cluster.local/other"]
        """)
    (root / "bundle.yaml").write_text(MANIFEST.replace("cluster.local", "example.org"))
    problems = lint(root)
    assert problems == [("policies/p.yaml:8:51: warning: principal 'cluster.local/other' is in trust domain "
                         "'cluster.local', which is neither the bundle's nor an alias (example.org)")]


def test_stars_in_the_new_fields(tmp_path: Path) -> None:
    """trustDomains, headers and SNI patterns are checked like every other pattern."""
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: DENY
        rules:
          - from:
              - source:
                  trustDomains: ["bad*td", "*-td1", "td*"]
            to:
              - operation:
                  headers: {x-a: ["a*b", "*x*"]}
                  notSni: ["api.*.example.com"]
        """)
    problems = lint(root)
    assert has(problems, "policies/p.yaml:8:26: error: trust domain 'bad*td' has a '*' inside", "can never match")
    assert has(problems, "policies/p.yaml:11:27: warning: header 'a*b' has a '*' inside", "literal character")
    assert has(problems, "policies/p.yaml:11:34: error: header '*x*' has '*' at both ends", "")
    assert has(problems, "policies/p.yaml:12:20: error: SNI 'api.*.example.com' has a '*' inside", "")
    assert len(problems) == 4, problems


def test_port_targets_in_lint(tmp_path: Path) -> None:
    """A DENY for one destination port does not shadow rules of other destinations, and an ALLOW
    targeting a port is no namespace-wide default deny."""
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        target:
          principals: ["spiffe://cluster.local/ns/prod/sa/api"]
        action: ALLOW
        rules: [{name: r, to: [{operation: {paths: ["/admin/x"]}}]}]
        ---
        apiVersion: authz/v1
        kind: Policy
        name: by-port
        target: {ports: ["8080"]}
        action: ALLOW
        rules: [{name: r}]
        ---
        apiVersion: authz/v1
        kind: Policy
        name: block-admin
        target: {ports: ["9090"]}
        action: DENY
        rules: [{name: admin, to: [{operation: {paths: ["/admin*"]}}]}]
        """, "defaultAction: ALLOW\n")
    problems = lint(root)
    assert not any("unreachable" in p for p in problems), problems
    assert has(problems, "policies/p.yaml:5:16: warning: namespace 'prod' has ALLOW policies but no default deny", "")
    assert len(problems) == 1


def test_imported_bundle_dead_patterns_are_warnings_without_advice(tmp_path: Path) -> None:
    """A pattern that never matches never matched in Istio either: lint says so, but does not ask for a change."""
    from authz.istio_import import IMPORTED_MARK

    policy = """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: DENY
        rules: [{from: [{source: {principals: ["bad*x/ns/a/sa/b"]}}]}]
        """
    plain = lint(bundle(tmp_path / "a", policy))
    assert len(plain) == 1 and ": error: " in plain[0] and "(write 'prefix*'" in plain[0]
    imported = lint(bundle(tmp_path / "b", policy, f"description: '{IMPORTED_MARK}'\n"))
    assert imported == [("policies/p.yaml:5:40: warning: principal 'bad*x/ns/a/sa/b' has a '*' inside its trust "
                         "domain, which only letters, digits, '.', '-' and '_' make up: it can never match, as in "
                         "the Istio policy it came from")]


def test_a_tenant_segment_not_checked_against_a_header_tenant_is_a_warning(tmp_path: Path) -> None:
    """With the tenant from a header, only a `{tenant}` capture is compared with it: acme's
    caller with `x-tenant: acme` was allowed onto /v1/tenants/globex/orders by `{t}` or `*`."""
    text = """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: ALLOW
        tenant:
          header: x-tenant
        rules:
          - name: r
            to:
              - operation:
                  paths: ["/v1/tenants/{t}/orders", "/v1/Tenants/*", "/v1/tenants/{tenant}/x", "/v2/{**}"]
            when: ["source.principal in tenant.callers"]
        """
    problems = lint(bundle(tmp_path, text, tenants__t_yaml="tenants:\n  acme: {callers: []}\n"))
    assert has(problems, "policies/p.yaml:11:19: warning: ALLOW rule 'api/r': path '/v1/tenants/{t}/orders' names "
               "a tenant segment ('{t}') that is not checked against the tenant of its header", "{tenant}")
    assert has(problems, "policies/p.yaml:11:45: warning: ALLOW rule 'api/r': path '/v1/Tenants/*'", "('*')")
    assert sum("tenant segment" in p for p in problems) == 2, problems


@pytest.mark.parametrize("kind", ["fifo", "link out", "backslash"])
def test_lint_refuses_what_serve_refuses(tmp_path: Path, kind: str) -> None:
    """lint said `0 errors` for a bundle `authz serve` rejects (a FIFO, a link out of it)."""
    root = bundle(tmp_path, """\
        apiVersion: authz/v1
        kind: Policy
        name: api
        action: ALLOW
        rules: [{}]
        """)
    if kind == "fifo":
        os.mkfifo(root / "policies" / "deny.yaml")
    elif kind == "backslash":
        (root / "policies" / "deny.yaml\\x").write_text("x: 1\n")
    else:
        (tmp_path / "outside.yaml").write_text("x: 1\n")
        (root / "policies" / "deny.yaml").symlink_to(tmp_path / "outside.yaml")
    problems = lint(root)
    assert any("policies/deny.yaml" in p and ": error:" in p for p in problems), problems
    assert main(["lint", str(root)]) == 1
