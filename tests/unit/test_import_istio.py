"""`authz import-istio`: imported bundles decide as Istio documents it.

Every expectation below is written from Istio's documentation, quoted in each test's
docstring: the AuthorizationPolicy reference
(https://istio.io/latest/docs/reference/config/security/authorization-policy/, from the
comments of istio/api security/v1beta1/authorization_policy.proto) and the conditions page
(https://istio.io/latest/docs/reference/config/security/conditions/).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import check_request

from authz.cli import main
from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet
from authz.engine.model import Decision
from authz.istio_import import IstioImportError, Options, import_files, parse_workload
from authz.request import from_check_request
from authz.spiffe import TrustDomains

TD = "cluster.local"


def sa(ns: str, name: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


HTTPBIN_FOO = sa("foo", "httpbin")
HTTPBIN_BAR = sa("bar", "httpbin")
SLEEP = sa("default", "sleep")


def imported(tmp_path: Path, text: str, workloads: tuple[str, ...] = (), **opts: Any) -> PolicySet:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "policies.yaml"
    src.write_text(textwrap.dedent(text))
    o = Options(workloads=[parse_workload(w, TrustDomains(TD)) for w in workloads], **opts)
    out = tmp_path / "out"
    import_files([src], out, o)
    return load_policy_set(out)


def decide(ps: PolicySet, dest: str = HTTPBIN_FOO, principal: str = "", method: str = "GET", path: str = "/",
           host: str = "httpbin.foo", headers: dict[str, str] | None = None, source_ip: str = "10.0.0.1",
           port: int = 8000, dest_ip: str = "") -> Decision:
    cr = check_request(principal, method, path, host, headers, dest, source_ip, port)
    if dest_ip:
        cr.attributes.destination.address.socket_address.address = dest_ip
    return ps.decide(from_check_request(cr, ps.trust_domains))


def allowed(ps: PolicySet, **kw: Any) -> bool:
    return decide(ps, **kw).allowed


def import_errors(tmp_path: Path, text: str, workloads: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(IstioImportError) as err:
        imported(tmp_path, text, workloads)
    return [str(p) for p in err.value.problems]


# --- evaluation order ---------------------------------------------------------------------


def test_no_allow_policy_allows(tmp_path: Path) -> None:
    """'If there are no ALLOW policies for the workload, allow the request.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-post, namespace: foo}
        spec:
          action: DENY
          rules: [{to: [{operation: {methods: [POST]}}]}]
        """)
    assert ps.default_allow
    assert allowed(ps, method="GET")
    assert not allowed(ps, method="POST")
    assert allowed(ps, dest=HTTPBIN_BAR, method="POST")  # DENY is scoped to namespace foo


def test_deny_is_evaluated_before_allow(tmp_path: Path) -> None:
    """'If there are any DENY policies that match the request, deny the request.' (before ALLOW)"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec:
          rules: [{}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-dev-post, namespace: foo}
        spec:
          action: DENY
          rules:
          - from: [{source: {namespaces: [dev]}}]
            to: [{operation: {methods: [POST]}}]
        """)
    assert not allowed(ps, principal=sa("dev", "x"), method="POST")
    assert allowed(ps, principal=sa("dev", "x"), method="GET")
    assert allowed(ps, principal=sa("prod", "x"), method="POST")


def test_allow_policies_then_deny(tmp_path: Path) -> None:
    """'If any of the ALLOW policies match the request, allow the request.' then 'Deny the request.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: get-only, namespace: foo}
        spec:
          action: ALLOW
          rules: [{to: [{operation: {methods: [GET]}}]}]
        """)
    assert allowed(ps, method="GET")
    assert not allowed(ps, method="POST")
    assert allowed(ps, dest=HTTPBIN_BAR, method="POST")  # bar has no ALLOW policy


def test_allow_nothing(tmp_path: Path) -> None:
    """'applies to all workloads in namespace foo. It allows nothing and effectively denies all requests'
    (spec: {}); rules: 'If not set, the match will never occur.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: foo}
        spec: {}
        """)
    assert not allowed(ps, principal=SLEEP, method="GET", path="/")
    assert not allowed(ps, dest=sa("foo", "other"))
    assert allowed(ps, dest=HTTPBIN_BAR)


def test_allow_all(tmp_path: Path) -> None:
    """'The following authorization policy allows all requests to workloads in namespace foo' (rules: [{}]);
    'An empty rule is always matched.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: foo}
        spec: {}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec:
          rules:
          - {}
        """)
    for method, path in (("GET", "/"), ("DELETE", "/admin")):
        assert allowed(ps, method=method, path=path)


def test_deny_without_rules_denies_nothing(tmp_path: Path) -> None:
    """rules: 'If not set, the match will never occur.' - for a DENY policy too."""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-nothing, namespace: foo}
        spec: {action: DENY}
        """)
    assert allowed(ps, method="DELETE", path="/anything")


def test_audit_does_not_decide(tmp_path: Path) -> None:
    """'AUDIT policies do not affect whether requests are allowed or denied to the workload.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: anyname, namespace: foo}
        spec:
          action: AUDIT
          rules: [{to: [{operation: {methods: [GET], paths: ["/user/profile/*"]}}]}]
        """)
    d = decide(ps, path="/user/profile/1")
    assert d.allowed and d.audit == ("foo.anyname/rule-1",)
    d = decide(ps, path="/other")
    assert d.allowed and d.audit == ()


def test_dry_run_annotation(tmp_path: Path) -> None:
    """'istio.io/dry-run' - 'to dry-run the policy without actually enforcing it.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: dry-run-example
          namespace: foo
          annotations: {"istio.io/dry-run": "true"}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/headers"]}}]}]
        """)
    d = decide(ps, path="/headers")
    assert d.allowed and d.dry_run == ("foo.dry-run-example/rule-1=deny",)


# --- scope: namespace, selector, root namespace ------------------------------------------


def test_selector_applies_to_labelled_workloads_in_the_namespace(tmp_path: Path) -> None:
    """'applies to workloads containing label app: httpbin in namespace bar. It allows nothing'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: bar}
        spec:
          selector: {matchLabels: {app: httpbin}}
        """, workloads=(f"app=httpbin={HTTPBIN_BAR}", f"app=sleep={sa('bar', 'sleep')}",
                        f"app=httpbin={HTTPBIN_FOO}"))
    assert not allowed(ps, dest=HTTPBIN_BAR)
    assert allowed(ps, dest=sa("bar", "sleep"))  # other labels
    assert allowed(ps, dest=HTTPBIN_FOO)  # same labels, other namespace


def test_root_namespace_selector_applies_mesh_wide(tmp_path: Path) -> None:
    """'applies to workloads containing label version: v1 in all namespaces in the mesh. (Assuming the root
    namespace is configured to istio-system).'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: istio-system}
        spec:
          selector: {matchLabels: {version: v1}}
        """, workloads=(f"app=httpbin,version=v1={HTTPBIN_FOO}", f"app=httpbin,version=v1={HTTPBIN_BAR}",
                        f"app=reviews,version=v2={sa('bar', 'reviews')}"))
    assert not allowed(ps, dest=HTTPBIN_FOO)
    assert not allowed(ps, dest=HTTPBIN_BAR)
    assert allowed(ps, dest=sa("bar", "reviews"))


def test_root_namespace_without_selector_applies_to_every_workload(tmp_path: Path) -> None:
    """'If set to root namespace, the policy applies to all namespaces in a mesh.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-admin, namespace: mesh-root}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
        """, root_namespace="mesh-root")
    assert not allowed(ps, dest=HTTPBIN_FOO, path="/admin/x")
    assert not allowed(ps, dest=sa("zzz", "any"), path="/admin")
    assert allowed(ps, dest=HTTPBIN_FOO, path="/x")


# --- rule structure ----------------------------------------------------------------------

HTTPBIN_EXAMPLE = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: httpbin, namespace: foo}
    spec:
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
        - source: {namespaces: ["test"]}
        to:
        - operation: {methods: ["GET"], paths: ["/info*"]}
        - operation: {methods: ["POST"], paths: ["/data"]}
        when:
        - key: request.headers[X-Env]
          values: ["prod"]
    """


@pytest.mark.parametrize(("principal", "method", "path", "env", "expected"), [
    (SLEEP, "GET", "/info", "prod", True),
    (SLEEP, "GET", "/information/x", "prod", True),
    (sa("test", "anyone"), "POST", "/data", "prod", True),
    (sa("test", "anyone"), "GET", "/data", "prod", False),  # GET only on /info*
    (sa("prod", "web"), "GET", "/info", "prod", False),  # neither source
    (SLEEP, "GET", "/info", "dev", False),  # the condition fails
    (SLEEP, "POST", "/info", "prod", False),
])
def test_from_to_when(tmp_path: Path, principal: str, method: str, path: str, env: str, expected: bool) -> None:
    """'A match occurs when at least one source, one operation and all conditions matches the request.'
    (the reference's first example, its JWT condition replaced by a header one)"""
    ps = imported(tmp_path, HTTPBIN_EXAMPLE)
    assert allowed(ps, principal=principal, method=method, path=path, headers={"x-env": env}) is expected


@pytest.mark.parametrize(("principal", "source_ip", "expected"), [
    (sa("prod", "admin"), "10.0.0.1", True),
    (sa("test", "dev"), "10.0.0.1", True),
    (sa("prod", "other"), "10.0.0.1", False),  # principal
    (sa("stage", "admin"), "10.0.0.1", False),  # namespace
    (sa("prod", "admin"), "203.0.113.4", False),  # notIpBlocks
])
def test_source_fields_are_anded(tmp_path: Path, principal: str, source_ip: str, expected: bool) -> None:
    """'the following source matches if the principal is "admin" or "dev" and the namespace is "prod" or
    "test" and the ip is not "203.0.113.4".'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from:
            - source:
                principals: ["*/sa/admin", "*/sa/dev"]
                namespaces: ["prod", "test"]
                notIpBlocks: ["203.0.113.4"]
        """)
    assert allowed(ps, principal=principal, source_ip=source_ip) is expected


@pytest.mark.parametrize(("host", "method", "path", "expected"), [
    ("api.example.com", "GET", "/x", True),
    ("API.Example.COM", "HEAD", "/x", True),  # hosts: 'The match is case-insensitive.'
    ("api.example.org", "GET", "/x", False),
    ("api.example.com", "POST", "/x", False),
    ("api.example.com", "GET", "/admin/x", False),
])
def test_operation_fields_are_anded(tmp_path: Path, host: str, method: str, path: str, expected: bool) -> None:
    """'the following operation matches if the host has suffix ".example.com" and the method is "GET" or
    "HEAD" and the path doesn't have prefix "/admin".'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - to:
            - operation:
                hosts: ["*.example.com"]
                methods: ["GET", "HEAD"]
                notPaths: ["/admin*"]
        """)
    assert allowed(ps, host=host, method=method, path=path) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/abc", True), ("/abcd", True),  # 'Prefix match: "abc*" will match on value "abc" and "abcd".'
    ("/xabc", False),
    ("/x/suffix", True), ("/suffix", True),  # 'Suffix match: "*abc" will match on value "abc" and "xabc".'
    ("/exact", True), ("/exact/", False),  # 'Exact match: "abc" will match on value "abc".'
])
def test_string_match_forms(tmp_path: Path, path: str, expected: bool) -> None:
    """'Any string field in the rule supports Exact, Prefix, Suffix and Presence match'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules: [{to: [{operation: {paths: ["/abc*", "*/suffix", "/exact"]}}]}]
        """)
    assert allowed(ps, path=path) is expected


def test_presence_match(tmp_path: Path) -> None:
    """'Presence match: "*" will match when value is not empty.' (no peer certificate: empty principal)"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules: [{from: [{source: {principals: ["*"]}}]}]
        """)
    assert allowed(ps, principal=SLEEP)
    assert not allowed(ps, principal="")


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, True),
    ({"principal": sa("bad", "actor")}, False),  # notPrincipals
    ({"principal": sa("legacy", "x")}, False),  # notNamespaces
    ({"source_ip": "192.168.1.9"}, False),  # notIpBlocks
    ({"headers": {"x-forwarded-for": "198.51.100.7"}}, False),  # notRemoteIpBlocks
    ({"method": "DELETE"}, False),  # notMethods
    ({"path": "/private/x"}, False),  # notPaths
    ({"port": 9090}, False),  # notPorts
    ({"host": "internal.example"}, False),  # notHosts
])
def test_not_forms_mean_none_of(tmp_path: Path, kw: dict[str, Any], expected: bool) -> None:
    """'notPrincipals: A list of negative match of peer identities.' and likewise for every not field."""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from:
            - source:
                notPrincipals: ["cluster.local/ns/bad/sa/actor"]
                notNamespaces: ["legacy"]
                notIpBlocks: ["192.168.0.0/16"]
                notRemoteIpBlocks: ["198.51.100.0/24"]
            to:
            - operation:
                notMethods: ["DELETE"]
                notPaths: ["/private/*"]
                notPorts: ["9090"]
                notHosts: ["internal.example"]
        """)
    assert allowed(ps, **{"principal": SLEEP, **kw}) is expected


@pytest.mark.parametrize(("source_ip", "xff", "expected"), [
    ("203.0.113.4", "", True), ("203.0.113.9", "", False),
    ("10.9.1.1", "", True),
    ("172.16.0.1", "198.51.100.20", True), ("172.16.0.1", "192.0.2.1", False),
])
def test_ip_blocks(tmp_path: Path, source_ip: str, xff: str, expected: bool) -> None:
    """ipBlocks: 'Single IP (e.g. "203.0.113.4") and CIDR (e.g. "203.0.113.0/24") are supported.';
    remoteIpBlocks: 'populated from X-Forwarded-For header or proxy protocol.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from: [{source: {ipBlocks: ["203.0.113.4", "10.9.0.0/16"]}}]
          - from: [{source: {remoteIpBlocks: ["198.51.100.0/24"]}}]
        """)
    headers = {"x-forwarded-for": xff} if xff else {}
    assert allowed(ps, source_ip=source_ip, headers=headers) is expected


@pytest.mark.parametrize(("method", "port", "expected"), [
    ("POST", 8080, False), ("POST", 8000, True), ("GET", 8080, True)])
def test_ports(tmp_path: Path, method: str, port: int, expected: bool) -> None:
    """'It denies all the requests with POST method on port 8080 on all workloads in the foo namespace.'"""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: httpbin, namespace: foo}
        spec:
          action: DENY
          rules: [{to: [{operation: {methods: ["POST"], ports: ["8080"]}}]}]
        """)
    assert allowed(ps, method=method, port=port) is expected


@pytest.mark.parametrize(("principal", "expected"), [
    (sa("ns1", "reader"), True), (sa("ns2", "reader"), False), (sa("ns1", "writer"), False)])
def test_service_accounts(tmp_path: Path, principal: str, expected: bool) -> None:
    """serviceAccounts: the peer's '<namespace>/<service account>' (CRD field Source.serviceAccounts)."""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules: [{from: [{source: {serviceAccounts: ["ns1/reader"]}}]}]
        """)
    assert allowed(ps, principal=principal) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/foo/bar", True), ("/foo/bar/baz", False), ("/foo/", False),  # {*}: one segment
    ("/v2/buzz/bar/", True), ("/v2/buzz/bar/baz", True), ("/v2/buzz/bar/baz/qux", True),  # {**}: the rest
    ("/v2/buzz/bar", False), ("/v2/buzz/other/baz", False),
    ("/a/{literal}", True), ("/a/b", False),  # no template operator: braces are literal
])
def test_path_templates(tmp_path: Path, path: str, expected: bool) -> None:
    """paths: 'If a path in the list contains the {*} or {**} operator, it will be interpreted as an Envoy
    Uri Template': {*} matches a single path segment, {**} matches what follows, and must be the last
    operator ('/foo/{*}' matches /foo/bar, not /foo/bar/baz; '/foo/{*}/bar/{**}' matches /foo/buzz/bar/
    and /foo/buzz/bar/baz)."""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules: [{to: [{operation: {paths: ["/foo/{*}", "/v2/{*}/bar/{**}", "/a/{literal}"]}}]}]
        """)
    assert allowed(ps, path=path) is expected


def test_invalid_path_templates_are_errors(tmp_path: Path) -> None:
    """'{**}' 'must be the last operator'; no other characters in a segment with an operator."""
    errors = import_errors(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules: [{to: [{operation: {paths: ["/{**}/foo/{*}", "/foo/{*}.txt"]}}]}]
        """)
    assert any(e.startswith(f"{tmp_path}/policies.yaml:5:38: ") and "must be the last operator" in e for e in errors)
    assert any("segment '{*}.txt' mixes an operator" in e for e in errors)


# --- conditions ---------------------------------------------------------------------------

CONDITIONS = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: p, namespace: foo}
    spec:
      rules:
      - when:
        - {key: "request.headers[User-Agent]", values: ["Mozilla/*"]}
        - {key: source.ip, values: ["10.1.2.3", "10.2.0.0/16"]}
        - {key: remote.ip, notValues: ["198.51.100.0/24"]}
        - {key: source.namespace, values: ["default"]}
        - {key: source.principal, values: ["cluster.local/ns/default/sa/productpage"]}
        - {key: destination.ip, values: ["10.9.9.9"]}
        - {key: destination.port, values: ["80", "443"]}
        - {key: "request.headers[x-tier]", notValues: ["free"]}
    """

PRODUCTPAGE = sa("default", "productpage")
GOOD = {"principal": PRODUCTPAGE, "source_ip": "10.2.3.4", "headers": {"user-agent": "Mozilla/5.0"},
        "dest_ip": "10.9.9.9", "port": 443}


@pytest.mark.parametrize(("change", "expected"), [
    ({}, True),
    ({"source_ip": "10.1.2.3"}, True),
    ({"headers": {"user-agent": "curl/8"}}, False),  # request.headers
    ({"headers": {}}, False),
    ({"source_ip": "10.3.0.1"}, False),  # source.ip
    ({"headers": {"user-agent": "Mozilla/5.0", "x-forwarded-for": "198.51.100.1"}}, False),  # remote.ip
    ({"principal": sa("other", "productpage")}, False),  # source.namespace and source.principal
    ({"principal": sa("default", "reviews")}, False),  # source.principal
    ({"dest_ip": "10.9.9.8"}, False),  # destination.ip
    ({"port": 8080}, False),  # destination.port
    ({"headers": {"user-agent": "Mozilla/5.0", "x-tier": "free"}}, False),  # notValues
    ({"headers": {"user-agent": "Mozilla/5.0", "x-tier": "gold"}}, True),
])
def test_conditions(tmp_path: Path, change: dict[str, Any], expected: bool) -> None:
    """Conditions page: request.headers ('The header name is surrounded by []'), source.ip ('supports single
    IP or CIDR'), remote.ip ('as determined by X-Forwarded-For header'), source.namespace, source.principal,
    destination.ip, destination.port; and Condition.notValues: 'A list of negative match of values'."""
    ps = imported(tmp_path, CONDITIONS)
    assert allowed(ps, **{**GOOD, **change}) is expected


@pytest.mark.parametrize(("key", "field_"), [
    ("request.auth.claims[iss]", "request.auth.claims[iss]"),
    ("request.auth.principal", "request.auth.principal"),
    ("connection.sni", "connection.sni"),
    ("experimental.envoy.filters.network.mysql_proxy[db.table]", "experimental"),
    ("destination.labels[version]", "unknown condition key"),
])
def test_untranslatable_conditions_are_errors(tmp_path: Path, key: str, field_: str) -> None:
    """Istio's own docs warn that unsupported keys are ignored; here each one is an error naming it."""
    errors = import_errors(tmp_path, f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: foo}}
        spec:
          rules:
          - when:
            - key: "{key}"
              values: ["x"]
        """)
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path}/policies.yaml:7:12: error: spec.rules[0].when[0].key: ")
    assert field_ in errors[0]


def test_untranslatable_fields_are_errors_naming_the_field(tmp_path: Path) -> None:
    """CUSTOM: 'The CUSTOM action allows an extension to handle the user request'; JWT request principals;
    targetRef; and anything the CRD does not know."""
    errors = import_errors(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: foo}
        spec:
          action: CUSTOM
          provider: {name: my-custom-authz}
          rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: jwt, namespace: foo}
        spec:
          rules:
          - from: [{source: {requestPrincipals: ["example.com/sub-1"]}}]
            to: [{operation: {method: ["GET"]}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: gw, namespace: foo}
        spec:
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
        """)
    text = "\n".join(errors)
    assert "policies.yaml:5:11: error: spec.action: CUSTOM actions" in text
    assert "policies.yaml:14:22: error: spec.rules[0].from[0].source.requestPrincipals: JWT" in text
    assert "policies.yaml:15:23: error: spec.rules[0].to[0].operation.method: unknown field" in text
    assert "policies.yaml:21:3: error: spec.targetRefs: " in text


def test_selector_without_declared_workload_is_an_error(tmp_path: Path) -> None:
    """'The selector decides where to apply the authorization policy': without --workload it cannot be mapped."""
    errors = import_errors(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: bar}
        spec:
          selector: {matchLabels: {app: httpbin}}
        """, workloads=(f"app=httpbin={HTTPBIN_FOO}",))
    assert len(errors) == 1 and "spec.selector.matchLabels: selects workloads by labels (app=httpbin)" in errors[0]


def test_selector_splitting_a_shared_principal_is_an_error(tmp_path: Path) -> None:
    errors = import_errors(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: bar}
        spec:
          selector: {matchLabels: {version: v1}}
        """, workloads=(f"app=r,version=v1={sa('bar', 'reviews')}", f"app=r,version=v2={sa('bar', 'reviews')}"))
    assert "tells workloads apart only by principal" in errors[0]


def test_v1beta1_and_v1_import_the_same(tmp_path: Path) -> None:
    """The CRD serves v1 and v1beta1 with the same schema."""
    imported(tmp_path / "a", HTTPBIN_EXAMPLE)
    imported(tmp_path / "b", HTTPBIN_EXAMPLE.replace("security.istio.io/v1", "security.istio.io/v1beta1"))
    a, b = (yaml.safe_load((tmp_path / d / "out" / "policies" / "foo.httpbin.yaml").read_text()) for d in "ab")
    assert "a/policies.yaml:1" in a.pop("description") and "b/policies.yaml:1" in b.pop("description")
    assert a == b and a["rules"][0]["when"] == ['("x-env" in request.headers && (request.headers["x-env"] == "prod"))']


# --- the command --------------------------------------------------------------------------


def test_cli_writes_a_bundle_check_and_serve_accept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ap.yaml"
    src.write_text(textwrap.dedent(HTTPBIN_EXAMPLE))
    out = tmp_path / "bundle"
    assert main(["import-istio", str(src), "-o", str(out)]) == 0
    assert "defaultAction ALLOW" in capsys.readouterr().out
    manifest = yaml.safe_load((out / "bundle.yaml").read_text())
    assert manifest["defaultAction"] == "ALLOW" and "Istio" in manifest["description"]
    assert (out / "policies" / "foo.httpbin.yaml").is_file()
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"attributes": {
        "source": {"principal": SLEEP}, "destination": {"principal": HTTPBIN_FOO},
        "request": {"http": {"method": "GET", "path": "/info", "headers": {"x-env": "prod"}}}}}))
    assert main(["check", "--bundle", str(out), "--request", str(req)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["allowed"] and result["policy"] == "foo.httpbin"
    assert main(["lint", str(out)]) == 0
    # Refuses to overwrite, and --default-deny changes the default.
    assert main(["import-istio", str(src), "-o", str(out)]) == 1
    assert main(["import-istio", str(src), "-o", str(out), "--force", "--default-deny"]) == 0
    assert yaml.safe_load((out / "bundle.yaml").read_text())["defaultAction"] == "DENY"


def test_cli_reports_errors_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ap.yaml"
    src.write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n"
                   "spec: {action: CUSTOM, provider: {name: p}}\n")
    out = tmp_path / "bundle"
    assert main(["import-istio", str(src), "-o", str(out)]) == 1
    assert "spec.action: CUSTOM" in capsys.readouterr().err
    assert not out.exists()
    assert main(["import-istio", str(src), "-o", str(out), "--workload", "nonsense"]) == 2
