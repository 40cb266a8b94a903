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
from authz.istio_import import (
    IMPORTED_MARK,
    IstioImportError,
    Options,
    UsageError,
    import_files,
    parse_workload,
)
from authz.request import from_check_request

TD = "cluster.local"


def sa(ns: str, name: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


HTTPBIN_FOO = sa("foo", "httpbin")
HTTPBIN_BAR = sa("bar", "httpbin")
SLEEP = sa("default", "sleep")


def write_bundle(tmp_path: Path, text: str, workloads: tuple[str, ...] = (), **opts: Any) -> tuple[Path, list[str]]:
    """Import ``text``; (bundle directory, notes the command would print)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "policies.yaml"
    src.write_text(textwrap.dedent(text))
    o = Options(workloads=[parse_workload(w) for w in workloads], **opts)
    out = tmp_path / "out"
    _, notes = import_files([src], out, o)
    return out, notes


def imported(tmp_path: Path, text: str, workloads: tuple[str, ...] = (), **opts: Any) -> PolicySet:
    return load_policy_set(write_bundle(tmp_path, text, workloads, **opts)[0])


def produced(tmp_path: Path, text: str, workloads: tuple[str, ...] = (), **opts: Any) -> dict[str, Any]:
    """The written bundle as data: {"bundle.yaml": manifest, "<policy name>": policy}."""
    out, _ = write_bundle(tmp_path, text, workloads, **opts)
    files = {"bundle.yaml": yaml.safe_load((out / "bundle.yaml").read_text())}
    for path in sorted((out / "policies").glob("*.yaml")):
        policy = yaml.safe_load(path.read_text())
        assert path.name == f"{policy['name']}.yaml"
        files[policy["name"]] = policy
    return files


def decide(ps: PolicySet, dest: str = HTTPBIN_FOO, principal: str = "", method: str = "GET", path: str = "/",
           host: str = "httpbin.foo", headers: dict[str, str] | None = None, source_ip: str = "10.0.0.1",
           port: int = 8000, dest_ip: str = "", sni: str = "") -> Decision:
    cr = check_request(principal, method, path, host, headers, dest, source_ip, port)
    if dest_ip:
        cr.attributes.destination.address.socket_address.address = dest_ip
    if sni:
        cr.attributes.tls_session.sni = sni
    return ps.decide(from_check_request(cr, ps.trust_domains))


def allowed(ps: PolicySet, **kw: Any) -> bool:
    return decide(ps, **kw).allowed


def import_errors(tmp_path: Path, text: str, workloads: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(IstioImportError) as err:
        write_bundle(tmp_path, text, workloads)
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


@pytest.mark.parametrize(("value", "dry_run"), [("1", True), ("t", True), ("TRUE", True), ("True", True),
                                             ("F", False), ("0", False), ("tRuE", False), ("yes", False)])
def test_dry_run_annotation_is_read_as_istiod_reads_it(tmp_path: Path, value: str, dry_run: bool) -> None:
    """istiod reads istio.io/dry-run with Go's strconv.ParseBool: '1' and 't' are dry runs, which
    authz enforced (granting what the ALLOW allows); anything else is enforced, and said."""
    out, notes = write_bundle(tmp_path, AP.replace("metadata: {name: p, namespace: foo}",
                                                   f"metadata: {{name: p, namespace: foo, annotations: "
                                                   f"{{istio.io/dry-run: '{value}'}}}}") + """\
      action: DENY
      rules: [{to: [{operation: {paths: ["/x"]}}]}]
    """)
    d = decide(load_policy_set(out), path="/x")
    assert d.allowed is dry_run
    assert any("is no boolean to istiod" in n for n in notes) is (value in ("tRuE", "yes"))


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
    ("destination.labels[version]", "replaced by the selector"),
    ("destination.name", "unknown condition key"),
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


JWT_POLICIES = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: need-jwt, namespace: foo}
    spec:
      action: DENY
      rules:
      - from: [{source: {notRequestPrincipals: ["*"]}}]
        to: [{operation: {paths: ["/private/*"]}}]
      - to: [{operation: {paths: ["/audited/*"]}}]
        when: [{key: "request.auth.claims[groups]", values: ["blocked"]}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow, namespace: foo}
    spec:
      rules:
      - from: [{source: {requestPrincipals: ["issuer.example/alice"]}}, {source: {principals: ["PRINCIPAL"]}}]
        to: [{operation: {paths: ["/api/*"]}}]
      - to: [{operation: {paths: ["/jwt-only/*"]}}]
        when: [{key: "request.auth.audiences", values: ["orders"]}]
      - to: [{operation: {paths: ["/private/*", "/audited/*", "/open/*"]}}]
    """


@pytest.mark.parametrize(("principal", "path", "expected"), [
    (SLEEP, "/api/x", True),  # the from entry without a JWT field still allows
    (sa("default", "other"), "/api/x", False),  # the JWT entry never matches
    (SLEEP, "/jwt-only/x", False),  # an ALLOW condition on a claim never holds
    (SLEEP, "/private/x", False),  # the DENY's JWT field is left out: it matches
    (SLEEP, "/audited/x", False),  # so is the DENY's condition on a claim
    (SLEEP, "/open/x", True),
])
def test_jwt_fields_take_the_stricter_reading(tmp_path: Path, principal: str, path: str, expected: bool) -> None:
    """authz never sees a verified JWT: an ALLOW rule on one never matches, and a DENY rule
    matches as if the JWT field held; each such field is named in a note with file:line."""
    ps = imported(tmp_path, JWT_POLICIES.replace("PRINCIPAL", SLEEP.removeprefix("spiffe://")), workloads=(f"app=httpbin={HTTPBIN_FOO}",))
    assert allowed(ps, principal=principal, path=path) is expected


def test_jwt_fields_are_named_in_notes(tmp_path: Path) -> None:
    _, notes = write_bundle(tmp_path, JWT_POLICIES.replace("PRINCIPAL", SLEEP.removeprefix("spiffe://")))
    jwt_notes = [n for n in notes if "never sees" in n]
    assert [n.split(": ", 2)[1] for n in jwt_notes] == [
        "spec.rules[0].from[0].source.notRequestPrincipals", "spec.rules[1].when[0].key",
        "spec.rules[0].from[0].source.requestPrincipals", "spec.rules[1].when[0].key"]
    assert jwt_notes[0].startswith(f"{tmp_path}/policies.yaml:7:22: ") and "left out of this DENY" in jwt_notes[0]
    assert "this ALLOW `from` entry never matches" in jwt_notes[2]
    assert "this ALLOW rule never matches" in jwt_notes[3]


def test_untranslatable_fields_are_errors_naming_the_field(tmp_path: Path) -> None:
    """CUSTOM: 'The CUSTOM action allows an extension to handle the user request'; targetRef; and
    anything the CRD does not know (the JWT policy's misspelt `method`)."""
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
    assert a == b and "when" not in a["rules"][0]
    assert [t["operation"]["headers"] for t in a["rules"][0]["to"]] == [{"x-env": ["prod"]}] * 2


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


@pytest.mark.parametrize(("field", "value"), [
    ("ports", "\uff11\uff18\uff10\uff19\uff11"),  # fullwidth 18091
    ("ports", "8\u00b2"),  # '²' passes str.isdigit(), then int() raised: a traceback
    ("when", "\u0661\u0668\u0660\u0669\u0661"),  # Arabic-Indic 18091 in destination.port
])
def test_ports_in_digits_other_than_ascii_are_errors(tmp_path: Path, field: str, value: str) -> None:
    """istiod's convertToPort (strconv.ParseUint) refuses them and skips the rule; read as
    port 18091 the ALLOW rule allowed what Istio's sidecar denies."""
    rule = (f"{{to: [{{operation: {{ports: ['{value}']}}}}]}}" if field == "ports"
            else f"{{when: [{{key: destination.port, values: ['{value}']}}]}}")
    errors = import_errors(tmp_path, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                           f"metadata: {{name: p, namespace: foo}}\nspec:\n  action: ALLOW\n  rules: [{rule}]\n")
    assert len(errors) == 1 and "must be a number from 0 to 65535" in errors[0], errors


def test_hosts_fold_ascii_case_only(tmp_path: Path) -> None:
    """Envoy's ignoreCase folds ASCII letters; str.lower() makes U+212A (Kelvin) a 'k', so an
    ALLOW on '\u212aelvin.example.com' allowed kelvin.example.com, which Istio denies."""
    ps = imported(tmp_path, """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          action: ALLOW
          rules: [{to: [{operation: {hosts: ["\u212aelvin.example.com", "Other.Example.com"]}}]}]
        """)
    assert not allowed(ps, host="kelvin.example.com")
    assert allowed(ps, host="other.example.COM")


# --- what the importer writes: FORMAT-8 native fields ----------------------------------------
# These read the written YAML; the decide-level tests above run the same bundles through the engine.

AP = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: p, namespace: foo}
    spec:
    """)


def one_policy(tmp_path: Path, spec: str, workloads: tuple[str, ...] = (), **opts: Any) -> dict[str, Any]:
    files = produced(tmp_path, AP + textwrap.indent(textwrap.dedent(spec), "  "), workloads, **opts)
    return files["foo.p"]


@pytest.mark.parametrize("text", [
    "---\n{ap}---\n",  # a leading and a trailing '---'
    "{ap}---\n# nothing but a comment\n---\n",
    "{ap}--- null\n",
    "---\n---\n{ap}",
    "apiVersion: v1\nkind: List\nitems:\n- null\n- {flow}\n",  # a List with an empty item
])
def test_empty_documents_are_skipped(tmp_path: Path, text: str) -> None:
    """kubectl and editors leave empty documents (a trailing '---'); they are no resource."""
    ap = textwrap.dedent(AP) + "  rules: [{}]\n"
    flow = yaml.safe_dump(yaml.safe_load(ap), default_flow_style=True, width=1000).strip()
    files = produced(tmp_path, text.format(ap=ap, flow=flow))
    assert sorted(files) == ["bundle.yaml", "foo.p"]


def test_empty_documents_from_stdin_and_an_empty_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import io
    empty = tmp_path / "empty.yaml"
    empty.write_text("---\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(textwrap.dedent(AP) + "  rules: [{}]\n---\n"))
    out = tmp_path / "b"
    assert main(["import-istio", "-", str(empty), "-o", str(out)]) == 0
    assert "<stdin>:1" in yaml.safe_load((out / "policies" / "foo.p.yaml").read_text())["description"]


def test_only_empty_documents_is_an_error(tmp_path: Path) -> None:
    errors = import_errors(tmp_path, "---\n---\n")
    assert len(errors) == 1 and "no AuthorizationPolicy in the input" in errors[0]


def test_trust_domains_are_native(tmp_path: Path) -> None:
    """trustDomains/notTrustDomains are copied as patterns on the trust-domain part, not principal prefixes."""
    p = one_policy(tmp_path, """\
        rules:
        - from:
          - source: {trustDomains: ["bad*", "td1"], notTrustDomains: ["*-td2"], principals: ["*/sa/admin"]}
        """)
    source = p["rules"][0]["from"][0]["source"]
    assert source == {"principals": ["*/sa/admin"], "trustDomains": ["bad*", "td1"], "notTrustDomains": ["*-td2"]}


def test_principals_are_copied_as_written(tmp_path: Path) -> None:
    """No spiffe:// added, aliases not rewritten, cluster.local kept: the engine expands as istiod does."""
    p = one_policy(tmp_path, """\
        rules:
        - from:
          - source:
              principals: ["cluster.local/ns/default/sa/sleep", "old.td/ns/a/sa/b", "*bar/ns/foo/sa/p1"]
              notPrincipals: ["new.td/ns/x/sa/y"]
        """, trust_domain="new.td", trust_domain_aliases=("old.td",))
    assert p["rules"][0]["from"][0]["source"] == {
        "principals": ["cluster.local/ns/default/sa/sleep", "old.td/ns/a/sa/b", "*bar/ns/foo/sa/p1"],
        "notPrincipals": ["new.td/ns/x/sa/y"]}


@pytest.mark.parametrize(("value", "message"), [
    ("spiffe://cluster.local/ns/a/sa/b", "Istio adds 'spiffe://' to principals itself"),
    ("*admin*", "suffix match on 'admin*'"),
    ("**", "suffix match on '*'"),
])
def test_principals_istio_reads_differently_are_errors(tmp_path: Path, value: str, message: str) -> None:
    errors = import_errors(tmp_path, AP + f"  rules: [{{from: [{{source: {{principals: ['{value}']}}}}]}}]\n")
    assert len(errors) == 1 and "spec.rules[0].from[0].source.principals[0]: " in errors[0] and message in errors[0]


def test_service_accounts_with_and_without_namespace(tmp_path: Path) -> None:
    """serviceAccounts: '<name>' is in the policy's namespace, which the policy now says (namespace:)."""
    p = one_policy(tmp_path, """\
        rules:
        - from: [{source: {serviceAccounts: ["reader", "ns1/writer"], notServiceAccounts: ["ns1/bad"]}}]
        """)
    assert p["namespace"] == "foo"
    assert p["rules"][0]["from"][0]["source"] == {"serviceAccounts": ["reader", "ns1/writer"],
                                                  "notServiceAccounts": ["ns1/bad"]}


@pytest.mark.parametrize(("source", "message"), [
    ("{serviceAccounts: ['a/b/c']}", "a service account is '<name>' or '<namespace>/<name>'"),
    ("{serviceAccounts: ['ns/*']}", "without wildcards"),
    ("{serviceAccounts: ['/x']}", "a service account is"),
    ("{serviceAccounts: [a], principals: ['cluster.local/ns/x/sa/y']}", "Istio rejects serviceAccounts next to principals"),
])
def test_invalid_service_accounts_are_errors(tmp_path: Path, source: str, message: str) -> None:
    errors = import_errors(tmp_path, AP + f"  rules: [{{from: [{{source: {source}}}]}}]\n")
    assert len(errors) == 1 and message in errors[0]


def test_header_conditions_go_into_every_operation(tmp_path: Path) -> None:
    """request.headers[...] conditions become headers/notHeaders (name lower-cased), ANDed into each `to`."""
    p = one_policy(tmp_path, """\
        rules:
        - to:
          - operation: {methods: ["GET"]}
          - operation: {paths: ["/data"]}
          when:
          - {key: "request.headers[X-Env]", values: ["prod", "stage*"]}
          - {key: "request.headers[x-tier]", notValues: ["free"]}
          - {key: "request.headers[x-tier]", notValues: ["trial", "*"]}
        """)
    rule = p["rules"][0]
    assert "when" not in rule
    ops = [t["operation"] for t in rule["to"]]
    assert ops == [
        {"methods": ["GET"], "headers": {"x-env": ["prod", "stage*"]}, "notHeaders": {"x-tier": ["free", "trial", "*"]}},
        {"paths": ["/data"], "headers": {"x-env": ["prod", "stage*"]}, "notHeaders": {"x-tier": ["free", "trial", "*"]}},
    ]


def test_header_condition_without_to_makes_one_operation(tmp_path: Path) -> None:
    p = one_policy(tmp_path, """\
        rules:
        - when: [{key: "request.headers[x-a]", values: ["*"]}]
        """)
    assert p["rules"][0] == {"name": "rule-1", "to": [{"operation": {"headers": {"x-a": ["*"]}}}]}


def test_two_header_conditions_on_one_name_are_anded(tmp_path: Path) -> None:
    """Exact values: their intersection; none in common: the rule matches nothing and is left out."""
    p = one_policy(tmp_path, """\
        rules:
        - when:
          - {key: "request.headers[x-a]", values: ["1", "2"]}
          - {key: "request.headers[x-a]", values: ["2", "3"]}
        - when:
          - {key: "request.headers[x-a]", values: ["1"]}
          - {key: "request.headers[x-a]", values: ["2"]}
        """)
    assert [r["name"] for r in p["rules"]] == ["rule-1"]
    assert p["rules"][0]["to"][0]["operation"]["headers"] == {"x-a": ["2"]}
    errors = import_errors(tmp_path / "e", AP + """\
      rules:
      - when:
        - {key: "request.headers[x-a]", values: ["a*"]}
        - {key: "request.headers[x-a]", values: ["*b"]}
    """)
    assert len(errors) == 1 and "headers[x-a]: the AND of the condition and the operation's own values has no exact" in errors[0]


def test_sni_destination_ip_and_port_conditions_are_native(tmp_path: Path) -> None:
    """connection.sni -> sni/notSni, destination.ip (CIDR, IPv4 and IPv6) -> destinationIpBlocks,
    destination.port -> ports/notPorts, ANDed with the operation's own ports."""
    p = one_policy(tmp_path, """\
        rules:
        - to: [{operation: {ports: ["80", "443", "8080"]}}]
          when:
          - {key: connection.sni, values: ["*.example.com"], notValues: ["admin.example.com"]}
          - {key: destination.ip, values: ["10.0.0.0/8", "fd00::/8"], notValues: ["10.9.9.9"]}
          - {key: destination.port, values: ["443", "8080"], notValues: ["8080"]}
        """)
    rule = p["rules"][0]
    assert "when" not in rule
    assert rule["to"][0]["operation"] == {
        "ports": ["443", "8080"], "sni": ["*.example.com"], "notSni": ["admin.example.com"],
        "destinationIpBlocks": ["10.0.0.0/8", "fd00::/8"], "notDestinationIpBlocks": ["10.9.9.9"],
        "notPorts": ["8080"]}


def test_disjoint_ports_leave_the_rule_out(tmp_path: Path) -> None:
    p = one_policy(tmp_path, """\
        action: DENY
        rules:
        - to: [{operation: {ports: ["80"]}}, {operation: {ports: ["81"]}}]
          when: [{key: destination.port, values: ["81"]}]
        - to: [{operation: {ports: ["80"]}}]
          when: [{key: destination.port, values: ["81"]}]
        """)
    assert [r["name"] for r in p["rules"]] == ["rule-1"]
    assert p["rules"][0]["to"] == [{"operation": {"ports": ["81"]}}]


def test_source_conditions_are_native(tmp_path: Path) -> None:
    """source.ip / remote.ip (IPv4 and IPv6 CIDR), source.namespace, source.principal and
    source.serviceAccount become the source's own fields, in every `from` entry."""
    p = one_policy(tmp_path, """\
        rules:
        - from:
          - source: {ipBlocks: ["10.0.0.0/8"]}
          - source: {namespaces: ["a", "b"]}
          when:
          - {key: source.ip, values: ["10.1.0.0/16", "2001:db8::/32"]}
          - {key: remote.ip, notValues: ["2001:db8:1::/48"]}
          - {key: source.namespace, values: ["b", "c"]}
          - {key: source.principal, values: ["cluster.local/ns/b/sa/x"], notValues: ["*/sa/bad"]}
        - when:
          - {key: source.serviceAccount, values: ["reader", "ns1/writer"]}
        """)
    first, second = p["rules"]
    assert "when" not in first and "when" not in second
    common = {"remoteIpBlocks": None, "notRemoteIpBlocks": ["2001:db8:1::/48"], "principals": ["cluster.local/ns/b/sa/x"],
              "notPrincipals": ["*/sa/bad"]}
    common.pop("remoteIpBlocks")
    assert first["from"] == [
        {"source": {"ipBlocks": ["10.1.0.0/16"], "namespaces": ["b", "c"], **common}},
        {"source": {"namespaces": ["b"], "ipBlocks": ["10.1.0.0/16", "2001:db8::/32"], **common}},
    ]
    assert second["from"] == [{"source": {"serviceAccounts": ["reader", "ns1/writer"]}}]


def test_source_condition_with_patterns_on_both_sides_is_an_error(tmp_path: Path) -> None:
    errors = import_errors(tmp_path, AP + """\
      rules:
      - from: [{source: {principals: ["*/sa/a"]}}]
        when: [{key: source.principal, values: ["cluster.local/*"]}]
    """)
    assert len(errors) == 1 and "spec.rules[0].when[0]: principals: the AND of the condition and the source's own" in errors[0]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("destination.ip", "10.0.0.0/33", "is not an IP address or CIDR block"),
    ("source.ip", "fd00::zz", "is not an IP address or CIDR block"),
    ("destination.port", "65536", "must be a number from 0 to 65535"),
    ("connection.sni", "*x*", "suffix match"),
])
def test_invalid_condition_values_are_errors(tmp_path: Path, key: str, value: str, message: str) -> None:
    errors = import_errors(tmp_path, AP + f"  rules: [{{when: [{{key: {key}, values: ['{value}']}}]}}]\n")
    assert len(errors) == 1 and "spec.rules[0].when[0].values[0]: " in errors[0] and message in errors[0]


def test_methods_stay_as_written(tmp_path: Path) -> None:
    """Istio compares methods case-sensitively: 'get' stays 'get' (lint warns about it)."""
    p = one_policy(tmp_path, "rules: [{to: [{operation: {methods: [get, GET], notMethods: [Delete]}}]}]\n")
    assert p["rules"][0]["to"][0]["operation"] == {"methods": ["get", "GET"], "notMethods": ["Delete"]}


def test_hosts_native_only_where_the_engine_reads_them_as_istio(tmp_path: Path) -> None:
    """A prefix of the authority ('api.*') or '*' means the same in the bundle's field; an exact or
    suffix host does not (Istio compares the whole authority, port included): CEL."""
    p = one_policy(tmp_path, """\
        rules:
        - to: [{operation: {hosts: ["api.*", "*"], notHosts: ["api.internal*"]}}]
        - to: [{operation: {hosts: ["API.example.com", "*.example.org"]}}]
        """)
    first, second = p["rules"]
    assert first["to"][0]["operation"] == {"hosts": ["api.*", "*"], "notHosts": ["api.internal*"]}
    assert "when" not in first
    assert "hosts" not in second["to"][0]["operation"]
    assert second["when"] == ['request.host == "api.example.com" || request.host.endsWith(".example.org")']


def test_path_templates_are_native(tmp_path: Path) -> None:
    """{*} and {**} follow Envoy's URI template matcher in the engine as in Istio: copied as written."""
    p = one_policy(tmp_path, """\
        rules: [{to: [{operation: {paths: ["/foo/{*}", "/v2/{*}/bar/{**}", "/x*"], notPaths: ["/{**}"]}}]}]
        """)
    assert p["rules"][0]["to"][0]["operation"] == {"paths": ["/foo/{*}", "/v2/{*}/bar/{**}", "/x*"],
                                                   "notPaths": ["/{**}"]}
    assert "when" not in p["rules"][0]


def test_literal_braces_stay_exact_in_cel(tmp_path: Path) -> None:
    """Without {*} or {**}, Istio's braces are literal; the bundle's would be a capture: CEL, the whole field."""
    p = one_policy(tmp_path, 'rules: [{to: [{operation: {paths: ["/a/{literal}", "/b/{*}", "/c*"]}}]}]\n')
    rule = p["rules"][0]
    assert "paths" not in rule["to"][0]["operation"]
    expected = ('request.path == "/a/{literal}" || request.path.matches('
                '"^/b/[A-Za-z0-9\\\\-._~%!$&\'()*+,;=:@]+$") || request.path.startsWith("/c")')
    assert rule["when"] == [expected]


@pytest.mark.parametrize(("value", "message"), [
    ("/a/{*}.txt", "mixes an operator with other text"),
    ("/{**}/{*}", "'{**}' must be the last operator"),
    ("/a[b]/{*}", "characters Envoy's URI template matcher rejects"),
    ("*admin*", "suffix match on 'admin*'"),
    ("//{*}", "has an empty segment"),  # istiod lets it through; Envoy 1.40 exits on it
    ("/a/{*}//", "has an empty segment"),
    ("/a//{**}", "has an empty segment"),
])
def test_paths_istio_or_envoy_reject_are_errors(tmp_path: Path, value: str, message: str) -> None:
    errors = import_errors(tmp_path, AP + f"  rules: [{{to: [{{operation: {{paths: ['{value}']}}}}]}}]\n")
    assert len(errors) == 1 and "spec.rules[0].to[0].operation.paths[0]: " in errors[0] and message in errors[0]


# --- workloads: principal, host, port ---------------------------------------------------------


def test_parse_workload_forms() -> None:
    w = parse_workload("app=orders,version=v1=cluster.local/ns/prod/sa/orders")
    assert (w.labels, w.kind, w.value, w.namespace) == (
        {"app": "orders", "version": "v1"}, "principal", "spiffe://cluster.local/ns/prod/sa/orders", "prod")
    w = parse_workload("app=orders=host:Orders.Prod.svc.cluster.local:8080")
    assert (w.kind, w.value, w.namespace) == ("host", "orders.prod.svc.cluster.local:8080", "prod")
    w = parse_workload("app=orders=host:orders.example.com@shop")
    assert (w.kind, w.value, w.namespace) == ("host", "orders.example.com", "shop")
    w = parse_workload("app=orders=port:8080@prod")
    assert (w.kind, w.value, w.namespace) == ("port", "8080", "prod")
    for bad in ("app=orders=port:8080", "app=orders=host:orders.example.com", "app=orders=port:99999@p",
                "app=orders=port:x@p", "app=orders=host:@p", "orders=spiffe://td/sa/x", "nolabels",
                "app=orders=host:h@"):
        with pytest.raises(ValueError):
            parse_workload(bad)


WORKLOADS = ("app=httpbin=spiffe://cluster.local/ns/foo/sa/httpbin", "app=httpbin=host:httpbin.foo.svc",
             "app=httpbin,v=2=port:8000@foo", "app=other=port:9000@foo", "app=httpbin=port:7000@bar")


def test_selector_maps_to_principals_hosts_and_ports(tmp_path: Path) -> None:
    """A target ANDs its fields, so each way of knowing the selected workloads is its own policy."""
    files = produced(tmp_path, AP + "  selector: {matchLabels: {app: httpbin}}\n  rules: [{}]\n", WORKLOADS)
    assert files["foo.p"]["target"] == {"principals": ["spiffe://cluster.local/ns/foo/sa/httpbin"]}
    assert files["foo.p.by-host"]["target"] == {"hosts": ["httpbin.foo.svc"]}
    assert files["foo.p.by-port"]["target"] == {"ports": ["8000"]}  # not 7000: namespace bar
    assert files["foo.p"]["rules"] == files["foo.p.by-host"]["rules"] == files["foo.p.by-port"]["rules"]
    assert len(files) == 4


def test_namespace_wide_policy_also_targets_hosts_and_ports_of_the_namespace(tmp_path: Path) -> None:
    """Plaintext traffic to a workload of the namespace carries no principal: its host and port say it."""
    files = produced(tmp_path, AP + "  action: DENY\n  rules: [{}]\n", WORKLOADS, trust_domain="td",
                     trust_domain_aliases=("old",))
    # and a declared workload of the namespace whose certificate names another trust domain
    assert files["foo.p"]["target"] == {"principals": ["spiffe://td/ns/foo/sa/*", "spiffe://old/ns/foo/sa/*",
                                                       "spiffe://cluster.local/ns/foo/sa/httpbin"]}
    assert files["foo.p.by-host"]["target"] == {"hosts": ["httpbin.foo.svc"]}
    assert files["foo.p.by-port"]["target"] == {"ports": ["8000", "9000"]}


def test_only_host_workloads_selected(tmp_path: Path) -> None:
    files = produced(tmp_path, AP + "  selector: {matchLabels: {app: web}}\n  rules: [{}]\n",
                     ("app=web=host:web.example.com@foo",))
    assert files["foo.p"]["target"] == {"hosts": ["web.example.com"]} and len(files) == 2


def test_selector_splitting_a_shared_port_is_an_error(tmp_path: Path) -> None:
    errors = import_errors(tmp_path, AP + "  selector: {matchLabels: {v: '2'}}\n", WORKLOADS[:3] +
                           ("app=httpbin,v=3=port:8000@foo",))
    assert len(errors) == 1 and "with port 8000 but not the one labelled" in errors[0]


# --- trust domain: from the input, said on stderr -----------------------------------------------

MESH_CONFIG = textwrap.dedent("""\
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: istio, namespace: istio-system}
    data:
      mesh: |-
        trustDomain: example.org
        trustDomainAliases: [old.example.org]
        pathNormalization:
          normalization: MERGE_SLASHES
    ---
    """)


def test_trust_domain_from_the_mesh_config(tmp_path: Path) -> None:
    out, notes = write_bundle(tmp_path, MESH_CONFIG + textwrap.dedent(AP) + "  rules: [{}]\n")
    manifest = yaml.safe_load((out / "bundle.yaml").read_text())
    assert (manifest["trustDomain"], manifest["trustDomainAliases"], manifest["pathNormalization"]) == (
        "example.org", ["old.example.org"], "MERGE_SLASHES")
    assert notes == [f"trust domain example.org from the Istio mesh config at {tmp_path}/policies.yaml:1:1"]
    assert sorted(p.name for p in (out / "policies").iterdir()) == ["foo.p.yaml"]


def test_root_namespace_from_the_mesh_config(tmp_path: Path) -> None:
    """meshConfig.rootNamespace names where selector-less policies apply mesh-wide; read as
    istio-system, a DENY in istio-config protected one namespace instead of the mesh."""
    mesh = MESH_CONFIG.replace("trustDomain: example.org", "trustDomain: example.org\n    rootNamespace: istio-config")
    text = mesh + textwrap.dedent(AP).replace("namespace: foo", "namespace: istio-config") + (
        "  action: DENY\n  rules: [{to: [{operation: {paths: ['/blocked/*']}}]}]\n")
    out, _ = write_bundle(tmp_path / "a", text)
    ps = load_policy_set(out)
    assert not allowed(ps, dest="spiffe://example.org/ns/bar/sa/x", path="/blocked/x")
    assert allowed(ps, dest="spiffe://example.org/ns/bar/sa/x", path="/ok")
    with pytest.raises(IstioImportError, match="rootNamespace 'istio-config' is not --root-namespace 'other'"):
        write_bundle(tmp_path / "b", text, root_namespace="other")


def test_trust_domain_flag_and_mesh_config_must_agree(tmp_path: Path) -> None:
    """Which trust domain is the mesh's decides which principals istiod's alias expansion
    rewrites; a flag silently overriding the mesh config would expand the wrong ones."""
    with pytest.raises(IstioImportError, match="trustDomain 'example.org' is not --trust-domain 'flag.td'"):
        write_bundle(tmp_path / "a", MESH_CONFIG + textwrap.dedent(AP), trust_domain="flag.td")
    out, notes = write_bundle(tmp_path / "b", MESH_CONFIG + textwrap.dedent(AP), trust_domain="example.org")
    assert yaml.safe_load((out / "bundle.yaml").read_text())["trustDomain"] == "example.org"
    assert notes == ["trust domain example.org (--trust-domain)"]
    bare = "".join(line for line in MESH_CONFIG.splitlines(keepends=True) if "trustDomain:" not in line)
    out, _ = write_bundle(tmp_path / "c", bare + textwrap.dedent(AP), trust_domain="flag.td")
    assert yaml.safe_load((out / "bundle.yaml").read_text())["trustDomain"] == "flag.td"


def test_trust_domain_from_workloads_then_policies(tmp_path: Path) -> None:
    text = AP + "  rules: [{from: [{source: {principals: ['pol.td/ns/a/sa/b', 'cluster.local/ns/c/sa/d', 'x*']}}]}]\n"
    _, notes = write_bundle(tmp_path / "a", text, ("app=a=wl.td/ns/foo/sa/a",))
    assert notes == ["trust domain wl.td from the --workload principals"]
    # A guess from the policies' principals was wrong whenever they name another mesh's callers
    # (istiod's alias expansion rewrites only the mesh's own): refused, the flag is asked for.
    with pytest.raises(UsageError, match="principals name trust domain pol.td and nothing says which"):
        write_bundle(tmp_path / "b", text)
    out, notes = write_bundle(tmp_path / "c", MESH_CONFIG.replace("    trustDomain: example.org\n", "").replace(
        "    trustDomainAliases: [old.example.org]\n", "") + textwrap.dedent(text))
    assert yaml.safe_load((out / "bundle.yaml").read_text())["trustDomain"] == "cluster.local"
    assert "names none, so it is Istio's default" in notes[0]


def test_trust_domain_default_is_said_and_ambiguity_is_refused(tmp_path: Path) -> None:
    out, notes = write_bundle(tmp_path / "a", AP + "  rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/b']}}]}]\n")
    assert yaml.safe_load((out / "bundle.yaml").read_text())["trustDomain"] == "cluster.local"
    assert "Istio's default, as nothing in the input names another" in notes[0]
    with pytest.raises(UsageError, match=r"trust domains a.td, b.td and nothing says"):
        write_bundle(tmp_path / "b", AP + "  rules: [{from: [{source: {principals: ['a.td/ns/a/sa/b', 'b.td/x']}}]}]\n")
    with pytest.raises(UsageError, match=r"--workload principals are in several trust domains"):
        write_bundle(tmp_path / "c", AP, ("a=1=a.td/ns/foo/sa/a", "a=2=b.td/ns/foo/sa/b"))


def test_cli_says_where_the_trust_domain_came_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ap.yaml"
    src.write_text(textwrap.dedent(AP) + "  rules: [{from: [{source: {principals: ['a.td/ns/a/sa/b', 'b.td/x']}}]}]\n")
    assert main(["import-istio", str(src), "-o", str(tmp_path / "x")]) == 2
    assert "trust domains a.td, b.td and nothing says which is this mesh's" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_manifest_marks_the_bundle_as_imported(tmp_path: Path) -> None:
    files = produced(tmp_path, AP + "  rules: [{}]\n")
    assert files["bundle.yaml"]["description"].startswith(IMPORTED_MARK)
    assert files["bundle.yaml"]["defaultAction"] == "ALLOW" and "pathNormalization" not in files["bundle.yaml"]


# --- imported bundles decide as Istio: the FORMAT-8 translations through the engine -------------


def td_sa(td: str, ns: str, name: str) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{name}"


@pytest.mark.parametrize(("caller", "expected"), [
    (td_sa("bad-td", "a", "b"), False), (td_sa("bad", "a", "b"), False),  # trustDomains: ["bad*"]
    (td_sa("x-td1", "a", "b"), False),  # notTrustDomains would exclude it, but the principal pattern matches
    (td_sa("good", "a", "b"), True),
    (td_sa("foobar", "foo", "p1"), False), (td_sa("foobar", "foo", "p2"), True),  # '*bar/ns/foo/sa/p1'
])
def test_trust_domain_patterns_decide(tmp_path: Path, caller: str, expected: bool) -> None:
    """A DENY on a wildcard trust domain fires (it used to hold a literal '*' and never match)."""
    ps = imported(tmp_path, AP + """\
      action: DENY
      rules:
      - from: [{source: {trustDomains: ["bad*"]}}]
      - from: [{source: {principals: ["*-td1/ns/a/sa/b", "*bar/ns/foo/sa/p1"]}}]
    """)
    assert allowed(ps, principal=caller) is expected


@pytest.mark.parametrize(("caller", "expected"), [
    (td_sa("new.td", "a", "b"), True), (td_sa("old.td", "a", "b"), True),  # either name of the trust domain
    (td_sa("other.td", "a", "b"), False), (td_sa("new.td", "a", "c"), False),
    (td_sa("new.td", "c", "d"), True),  # 'cluster.local' in a policy is this mesh
])
def test_principals_decide_with_aliases(tmp_path: Path, caller: str, expected: bool) -> None:
    ps = imported(tmp_path, AP + """\
      rules:
      - from: [{source: {principals: ["old.td/ns/a/sa/b", "cluster.local/ns/c/sa/d"]}}]
    """, trust_domain="new.td", trust_domain_aliases=("old.td",))
    assert allowed(ps, dest=td_sa("new.td", "foo", "httpbin"), principal=caller) is expected


@pytest.mark.parametrize(("caller", "expected"), [
    (sa("foo", "reader"), True), (sa("bar", "reader"), False), (sa("ns1", "writer"), True)])
def test_service_account_without_namespace_is_the_policys(tmp_path: Path, caller: str, expected: bool) -> None:
    ps = imported(tmp_path, AP + "  rules: [{from: [{source: {serviceAccounts: [reader, ns1/writer]}}]}]\n")
    assert allowed(ps, principal=caller) is expected


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-a": "1"}, False), ({"x-a": "2"}, True), ({}, True),
    ({"x-a": "2", "x-b": ""}, False),  # '*' matches a header that is present, even empty
])
def test_header_conditions_decide(tmp_path: Path, headers: dict[str, str], expected: bool) -> None:
    ps = imported(tmp_path, AP + """\
      action: DENY
      rules:
      - when: [{key: "request.headers[X-A]", values: ["1"]}]
      - when: [{key: "request.headers[x-b]", values: ["*"]}]
    """)
    assert allowed(ps, headers=headers) is expected


@pytest.mark.parametrize(("sni", "dest_ip", "port", "expected"), [
    ("api.example.com", "10.1.2.3", 443, True),
    ("api.example.org", "10.1.2.3", 443, False),  # connection.sni
    ("", "10.1.2.3", 443, False),
    ("api.example.com", "192.168.1.1", 443, False),  # destination.ip 10.0.0.0/8
    ("api.example.com", "fd00::7", 443, True),  # destination.ip fd00::/8
    ("api.example.com", "10.1.2.3", 8443, False),  # destination.port
])
def test_sni_destination_ip_and_port_decide(tmp_path: Path, sni: str, dest_ip: str, port: int,
                                            expected: bool) -> None:
    ps = imported(tmp_path, AP + """\
      rules:
      - when:
        - {key: connection.sni, values: ["*.example.com"]}
        - {key: destination.ip, values: ["10.0.0.0/8", "fd00::/8"]}
        - {key: destination.port, values: ["443"]}
    """)
    assert allowed(ps, sni=sni, dest_ip=dest_ip, port=port) is expected


@pytest.mark.parametrize(("source_ip", "xff", "expected"), [
    ("2001:db8::5", "", True), ("2001:db9::1", "", False), ("10.0.0.1", "", False),
    ("2001:db8::5", "2001:db8:1::9", False),  # remote.ip notValues
])
def test_ipv6_source_conditions_decide(tmp_path: Path, source_ip: str, xff: str, expected: bool) -> None:
    ps = imported(tmp_path, AP + """\
      rules:
      - when:
        - {key: source.ip, values: ["2001:db8::/32"]}
        - {key: remote.ip, notValues: ["2001:db8:1::/48"]}
    """)
    headers = {"x-forwarded-for": xff} if xff else {}
    assert allowed(ps, source_ip=source_ip, headers=headers) is expected


@pytest.mark.parametrize(("method", "expected"), [("GET", True), ("get", False), ("Get", False), ("post", True)])
def test_methods_are_case_sensitive(tmp_path: Path, method: str, expected: bool) -> None:
    """Istio matches methods exactly: an ALLOW for GET does not admit 'get'; one for 'post' admits only 'post'."""
    ps = imported(tmp_path, AP + "  rules: [{to: [{operation: {methods: [GET, post]}}]}]\n")
    assert allowed(ps, method=method) is expected


@pytest.mark.parametrize(("host", "expected"), [
    ("api.example.com", True), ("API.example.com", True), ("api.example.com:8000", False),  # whole authority
    ("www.example.org", True), ("www.example.org:80", False), ("other.example", False)])
def test_hosts_decide_on_the_whole_authority(tmp_path: Path, host: str, expected: bool) -> None:
    ps = imported(tmp_path, AP + "  rules: [{to: [{operation: {hosts: [api.example.com, '*.example.org']}}]}]\n")
    assert allowed(ps, host=host) is expected


DENY_ADMIN_HOSTS = AP.replace("name: p,", "name: no-admin,") + """\
  action: DENY
  rules: [{to: [{operation: {hosts: [admin.example.com, '*.internal']}}]}]
---
""" + AP + "  rules: [{}]\n"


def test_deny_hosts_are_native_and_its_not_hosts_exact(tmp_path: Path) -> None:
    """A DENY's hosts become the bundle's field, which the engine reads every way; its notHosts
    stay exact in CEL (read more ways, they would exempt more from the DENY)."""
    deny = one_policy(tmp_path, """\
        action: DENY
        rules:
        - to: [{operation: {hosts: ["admin.example.com", "*.internal"]}}]
        - to: [{operation: {notHosts: ["ok.example.com"]}}]
        """)
    first, second = deny["rules"]
    assert first["to"][0]["operation"] == {"hosts": ["admin.example.com", "*.internal"]} and "when" not in first
    assert "notHosts" not in second["to"][0]["operation"]
    assert second["when"] == ['!(request.host == "ok.example.com")']


@pytest.mark.parametrize(("host", "expected"), [
    ("admin.example.com", False), ("admin.example.com:8000", False), ("admin.example.com.", False),
    ("x@admin.example.com", False), ("a.internal.", False),  # Istio allows all but the first: stricter
    ("admin.example.com.evil", True), ("other.example", True)])
def test_an_imported_deny_on_hosts_reads_the_authority_every_way(tmp_path: Path, host: str, expected: bool) -> None:
    ps = imported(tmp_path, DENY_ADMIN_HOSTS)
    assert allowed(ps, host=host) is expected


def test_plaintext_requests_are_targeted_by_host_and_port(tmp_path: Path) -> None:
    """No destination principal (PERMISSIVE mTLS): the by-host / by-port policies still apply."""
    ps = imported(tmp_path, AP + """\
      selector: {matchLabels: {app: httpbin}}
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
    """, ("app=httpbin=spiffe://cluster.local/ns/foo/sa/httpbin", "app=httpbin=host:httpbin.foo.svc.cluster.local",
          "app=httpbin=port:8000@foo"))
    assert not allowed(ps, dest=HTTPBIN_FOO, path="/admin/x")
    assert not allowed(ps, dest="", host="httpbin.foo.svc.cluster.local", port=9999, path="/admin/x")
    assert not allowed(ps, dest="", host="elsewhere", port=8000, path="/admin/x")
    assert allowed(ps, dest="", host="httpbin.foo.svc.cluster.local", port=9999, path="/public")


def test_cli_import_decides_after_empty_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ap.yaml"
    src.write_text("---\n" + AP + "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n---\n")
    out = tmp_path / "b"
    assert main(["import-istio", str(src), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "authz import-istio: trust domain cluster.local: Istio's default" in captured.err
    ps = load_policy_set(out)
    assert not allowed(ps, method="POST") and allowed(ps, method="GET")


# --- what the engine reads otherwise than istiod: exact in CEL, or an error ----------------------


def test_suffix_principal_with_regex_characters_stays_native(tmp_path: Path) -> None:
    """Older istiod writes '*suffix' as the regex 'spiffe://.*<suffix>', unescaped, patched
    istiod escapes it; the engine reads it both ways (StringMatch.suffix_readings)."""
    p = one_policy(tmp_path, 'rules: [{from: [{source: {principals: ["*/ns/foo/sa/w[1]", "*/sa/a.b"]}}]}]\n')
    assert p["rules"][0] == {"name": "rule-1", "from": [{"source": {"principals": ["*/ns/foo/sa/w[1]", "*/sa/a.b"]}}]}


@pytest.mark.parametrize(("caller", "expected"), [
    # ALLOW: older istiod reads '[1]' as a class (w1), patched istiod (CVE-2026-39350) as the
    # literal text (w[1]): only what both allow is allowed, so neither
    (td_sa("td1", "foo", "w1"), False), (td_sa("td1", "foo", "w[1]"), False),
    # DENY: what either reading matches is denied ('.' as any character, and as itself)
    (td_sa("td1", "foo", "aXb"), False), (td_sa("td1", "foo", "a.b"), False),
    (td_sa("td1", "foo", "ok"), True),
])
def test_suffix_principal_regex_decides_as_istio(tmp_path: Path, caller: str, expected: bool) -> None:
    allow = AP + '  rules: [{from: [{source: {principals: ["*/ns/foo/sa/w[1]", "*/sa/ok", "*/sa/aXb", "*/sa/a.b"]}}]}]\n'
    deny = AP.replace("name: p", "name: d") + (
        '  action: DENY\n  rules: [{when: [{key: source.principal, values: ["*/ns/foo/sa/a.b"]}]}]\n')
    ps = imported(tmp_path, allow + "---\n" + deny, trust_domain="td1")
    assert allowed(ps, dest=td_sa("td1", "foo", "httpbin"), principal=caller) is expected


def test_invalid_regexes_and_port_0_are_errors(tmp_path: Path) -> None:
    """istiod pastes '*suffix' principals, namespaces and service accounts into regexes unescaped."""
    errors = import_errors(tmp_path, AP + """\
      rules:
      - from:
        - source: {principals: ["*/sa/w[1"]}
        - source: {namespaces: ["te(st"]}
        - source: {serviceAccounts: ["ns/a+(b"]}
        to: [{operation: {ports: ["0"]}}]
    """)
    text = "\n".join(errors)
    assert "source.principals[0]: '*/sa/w[1': istiod pastes a '*suffix' principal into a regex" in text
    assert "source.namespaces[0]: 'te(st': istiod pastes a namespace into a regex unescaped" in text
    assert "source.serviceAccounts[0]: 'ns/a+(b': istiod pastes a service account into a regex" in text
    assert "operation.ports[0]: port 0 matches no request in Istio" in text
    assert len(errors) == 4


@pytest.mark.parametrize(("caller", "allow_expected", "deny_expected"), [
    # older istiod reads the values as regexes ('.' any character, '[1]' a class), patched
    # istiod (CVE-2026-39350) as text: an ALLOW grants what both match, a DENY what either does
    (sa("te.st", "x"), True, False), (sa("teXst", "x"), False, False), (sa("test", "x"), False, True),
    (sa("ns1", "a1"), False, False), (sa("ns1", "a[1]"), False, False), (sa("ns1", "a11"), False, True)])
def test_namespace_and_service_account_regexes_decide_as_both_istiods(
        tmp_path: Path, caller: str, allow_expected: bool, deny_expected: bool) -> None:
    source = "[{from: [{source: {namespaces: [te.st]}}, {source: {serviceAccounts: ['ns1/a[1]']}}]}]"
    ps = imported(tmp_path / "a", AP + f"  rules: {source}\n")
    assert allowed(ps, principal=caller) is allow_expected
    ps = imported(tmp_path / "d", AP + f"  action: DENY\n  rules: {source}\n")
    assert allowed(ps, principal=caller) is deny_expected


def test_namespace_wildcards_stay_native(tmp_path: Path) -> None:
    """Istio's namespaces are regexes with '*' as '.*' anywhere, and so are the bundle's: '*x*' is fine there."""
    p = one_policy(tmp_path, "rules: [{from: [{source: {namespaces: ['*team*', 'a.b']}}]}]\n")
    assert p["rules"][0]["from"][0]["source"] == {"namespaces": ["*team*", "a.b"]}


@pytest.mark.parametrize(("path", "expected"), [
    ("/v1/a/b/x", True), ("/v1/a/x", True), ("/v1/x", False), ("/v1/a/x/y", False), ("/v2/a/x", False)])
def test_any_segments_followed_by_literals_is_envoys_template(tmp_path: Path, path: str, expected: bool) -> None:
    """Envoy's '**' may be followed by literal segments ('/v1/{**}/x'), and so may the bundle's: native."""
    p = one_policy(tmp_path / "a", "rules: [{to: [{operation: {paths: ['/v1/{**}/x']}}]}]\n")
    assert p["rules"][0]["to"][0]["operation"]["paths"] == ["/v1/{**}/x"] and "when" not in p["rules"][0]
    ps = imported(tmp_path / "b", AP + "  rules: [{to: [{operation: {paths: ['/v1/{**}/x']}}]}]\n")
    assert allowed(ps, path=path) is expected


def test_cli_usage_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ap.yaml"
    src.write_text(AP + "  rules: [{}]\n")
    for extra, message in ((["--workload", "app=a=port:8080"], "name the workload's namespace"),
                           (["--workload", "app=a=host:a.example.com"], "name the workload's namespace"),
                           (["--trust-domain", "Bad_TD!"], "'Bad_TD!' is not a trust domain")):
        assert main(["import-istio", str(src), "-o", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_deny_rule_is_never_dropped_for_an_and_that_only_looks_empty(tmp_path: Path) -> None:
    """`sleep` and `foo/sleep` name one service account in namespace foo, `old-td/...` and
    `cluster.local/...` one identity when old-td is an alias, and two lines of one header can
    carry `a` and `b`: dropping such a DENY rule as "matches nothing" let through what Istio
    denies. Exact where the AND has an exact form; otherwise the condition is left out (the
    rule matches more) and named in a note."""
    text = AP + """\
      action: DENY
      rules:
      - from: [{source: {serviceAccounts: ["sleep"]}}]
        to: [{operation: {paths: ["/sa"]}}]
        when: [{key: source.serviceAccount, values: ["foo/sleep"]}]
      - from: [{source: {principals: ["old-td/ns/foo/sa/evil"]}}]
        to: [{operation: {paths: ["/td"]}}]
        when: [{key: source.principal, values: ["cluster.local/ns/foo/sa/evil"]}]
      - to: [{operation: {paths: ["/hdr"]}}]
        when:
        - {key: "request.headers[x-tag]", values: ["a"]}
        - {key: "request.headers[x-tag]", values: ["b"]}
      - from: [{source: {principals: ["cluster.local/ns/foo/sa/x"]}}]
        to: [{operation: {paths: ["/never"]}}]
        when: [{key: source.principal, values: ["cluster.local/ns/foo/sa/y"]}]
    """
    out, notes = write_bundle(tmp_path, text, trust_domain="cluster.local", trust_domain_aliases=("old-td",))
    ps = load_policy_set(out)
    assert [r.name for r in ps.policies[0].rules] == ["rule-1", "rule-2", "rule-3"]  # x AND y: provably none
    assert not allowed(ps, principal=sa("foo", "sleep"), path="/sa")
    assert not allowed(ps, principal="spiffe://old-td/ns/foo/sa/evil", path="/td")
    assert not allowed(ps, principal=sa("foo", "evil"), path="/td")
    assert not allowed(ps, principal=SLEEP, path="/hdr", headers={"x-tag": "a,b"})
    assert not allowed(ps, principal=SLEEP, path="/hdr", headers={"x-tag": "a"})  # stricter: b left out
    assert allowed(ps, principal=SLEEP, path="/hdr")
    assert allowed(ps, principal=sa("foo", "x"), path="/never")
    left_out = [n for n in notes if "left out of this DENY/AUDIT rule" in n]
    assert len(left_out) == 1 and "spec.rules[2].when[1]: headers[x-tag]" in left_out[0], notes


def test_a_header_envoy_never_sends_to_ext_authz_takes_the_stricter_reading(tmp_path: Path) -> None:
    """Envoy drops a client's x-envoy-auth-partial-body before ext_authz; its RBAC filter still
    sees it. A DENY on it would never fire here: it is left out (the rule matches more)."""
    out, notes = write_bundle(tmp_path, AP + """\
      action: DENY
      rules:
      - to: [{operation: {paths: ["/pb/*"]}}]
        when: [{key: "request.headers[x-envoy-auth-partial-body]", values: ["*"]}]
    """)
    ps = load_policy_set(out)
    assert not allowed(ps, principal=SLEEP, path="/pb/x")
    assert allowed(ps, principal=SLEEP, path="/other")
    assert any("a header Envoy does not send to ext_authz" in n for n in notes)


def test_a_header_name_with_spaces_is_a_header_no_request_has(tmp_path: Path) -> None:
    """istiod keeps `request.headers[ x-token ]` verbatim: its values never hold (the rule never
    matches, in DENY and ALLOW alike) and its notValues always do."""
    ps = imported(tmp_path, AP + """\
      rules:
      - to: [{operation: {paths: ["/h/*"]}}]
        when: [{key: "request.headers[ x-token ]", values: ["abc"]}]
      - to: [{operation: {paths: ["/n/*"]}}]
        when: [{key: "request.headers[ x-token ]", notValues: ["abc"]}]
    """)
    assert not allowed(ps, principal=SLEEP, path="/h/x", headers={"x-token": "abc"})
    assert allowed(ps, principal=SLEEP, path="/n/x", headers={"x-token": "abc"})


def test_header_values_with_a_comma_or_bang_take_the_stricter_reading(tmp_path: Path) -> None:
    """Envoy's RBAC filter matches each header line on its own; ext_authz gets the lines joined
    with ',' (and non-UTF-8 bytes as '!'). Lines `a` and `b` arrive as `a,b`: an ALLOW on `a,b`
    allowed them, and a DENY's notValues `a,b` stepped aside for them, where Istio denies.
    Such values match nothing where a match would allow, each named in a note."""
    out, notes = write_bundle(tmp_path, AP + """\
      action: ALLOW
      rules:
      - to: [{operation: {paths: ["/e/*"]}}]
        when: [{key: "request.headers[x-a]", values: ["a,b"]}]
      - to: [{operation: {paths: ["/m/*"]}}]
        when: [{key: "request.headers[x-a]", values: ["a,b", "c"]}]
---
""" + AP.replace("name: p", "name: d") + """\
      action: DENY
      rules:
      - to: [{operation: {paths: ["/dn/*"]}}]
        when: [{key: "request.headers[x-d]", notValues: ["a,b"]}]
      - to: [{operation: {paths: ["/m/*"]}}]
        when: [{key: "request.headers[x-d]", values: ["q,r"]}]
    """)
    ps = load_policy_set(out)
    assert not allowed(ps, principal=SLEEP, path="/e/x", headers={"x-a": "a,b"})
    assert not allowed(ps, principal=SLEEP, path="/m/x", headers={"x-a": "a,b"})
    assert allowed(ps, principal=SLEEP, path="/m/x", headers={"x-a": "c"})
    assert not allowed(ps, principal=SLEEP, path="/m/x", headers={"x-a": "c", "x-d": "z,q,r,s"})  # a run
    assert not allowed(ps, principal=SLEEP, path="/dn/x", headers={"x-d": "a,b"})  # DENY holds
    unclear = [n for n in notes if "match nothing here" in n]
    assert len(unclear) == 3, notes
    assert "spec.rules[0].when[0].values" in unclear[0] and "never holds" in unclear[0]
    assert "spec.rules[0].when[0].notValues" in unclear[2] and "DENY/AUDIT condition holds" in unclear[2]


def test_a_deny_and_of_two_namespaces_is_left_out_not_dropped(tmp_path: Path) -> None:
    """istiod makes namespaces regexes over the whole principal (`.*/ns/foo/.*`): one principal
    meets foo and bar. Read as strings with nothing in common, the AND dropped the DENY rule."""
    out, notes = write_bundle(tmp_path, AP + """\
      action: DENY
      rules:
      - from: [{source: {namespaces: ["foo"]}}]
        to: [{operation: {paths: ["/ns/*"]}}]
        when: [{key: source.namespace, values: ["bar"]}]
      - from: [{source: {serviceAccounts: ["a"]}}]
        to: [{operation: {paths: ["/sa/*"]}}]
        when: [{key: source.serviceAccount, values: ["foo/a"]}]
    """)
    ps = load_policy_set(out)
    assert not allowed(ps, principal="spiffe://cluster.local/ns/foo/sa/x/ns/bar/y", path="/ns/x")
    assert not allowed(ps, principal=sa("foo", "a"), path="/sa/x")  # `a` and `foo/a`: one, exact
    left_out = [n for n in notes if "left out of this DENY/AUDIT rule" in n]
    assert len(left_out) == 1 and "spec.rules[0].when[0]" in left_out[0], notes


@pytest.mark.parametrize(("rules", "message"), [
    # read as `{}` a null rule matched every request; skipped, as istiod's builder would, it
    # left the policy's other rules granting what a validating cluster never holds
    ("[~]", "a null rule: Istio rejects the policy"),
    ("[~, {to: [{operation: {paths: ['/d/*']}}]}]", "a null rule: Istio rejects the policy"),
    ("[{from: [~], to: [{operation: {paths: ['/x']}}]}]", "a null from entry"),
    ("[{from: [{source: {}}]}]", "a from entry without a source field"),
    ("[{from: [{source: {principals: []}}]}]", "a from entry without a source field"),
    ("[{when: [{key: 'request.auth.claims[]', values: [x]}]}]", "unknown condition key"),
    ("[{to: [{operation: {}}]}]", "a to entry without an operation field"),
    ("[{from: [{source: [1]}]}]", "must be a mapping"),  # an error, not a crash
    ("[{when: [{key: request.auth.foo, values: [x]}]}]", "unknown condition key 'request.auth.foo'"),
    ("[{when: [{key: experimental.foo, values: [x]}]}]", "unknown condition key 'experimental.foo'"),
])
def test_what_istios_validation_refuses_is_refused(tmp_path: Path, rules: str, message: str) -> None:
    """Istio's webhook refuses these policies (ValidateAuthorizationPolicy): imported, their
    other rules granted what a cluster that validates never holds."""
    for action in ("", "  action: DENY\n"):
        errors = import_errors(tmp_path / str(len(action)), AP + action + f"  rules: {rules}\n")
        assert len(errors) == 1 and message in errors[0], errors


def test_a_namespace_wide_policy_covers_a_declared_workload_of_another_trust_domain(tmp_path: Path) -> None:
    """In Istio a policy without a selector applies to every workload of its namespace; its
    target named only the mesh's trust domains, so a workload whose certificate is in another
    (a migration) escaped a namespace-wide DENY."""
    legacy = "spiffe://legacy.example/ns/foo/sa/httpbin"
    ps = imported(tmp_path, AP + "  action: DENY\n  rules: [{to: [{operation: {paths: ['/blocked/*']}}]}]\n",
                  (f"app=httpbin={legacy}",), trust_domain="cluster.local")
    assert not allowed(ps, dest=legacy, principal=SLEEP, path="/blocked/x")
    assert allowed(ps, dest=legacy, principal=SLEEP, path="/ok")


def test_trust_domain_aliases_of_the_mesh_config_and_the_flag_must_agree(tmp_path: Path) -> None:
    with pytest.raises(IstioImportError, match="trustDomainAliases .* are not the --trust-domain-alias values"):
        write_bundle(tmp_path, MESH_CONFIG + textwrap.dedent(AP) + "  rules: [{}]\n", trust_domain_aliases=("x.td",))


def test_an_allow_ip_block_older_and_current_istiod_read_otherwise_is_refused(tmp_path: Path) -> None:
    """`::ffff:127.0.0.1` is 127.0.0.1/32 to older istiod and the one IPv6 address to current
    istiod (net/netip): in an ALLOW, which one the mesh runs decides what it allows."""
    text = AP + "  rules: [{from: [{source: {ipBlocks: ['::ffff:127.0.0.1']}}]}]\n"
    with pytest.raises(IstioImportError, match="older istiod .* current istiod"):
        write_bundle(tmp_path / "a", text)
    deny = AP + "  action: DENY\n  rules: [{from: [{source: {remoteIpBlocks: ['::ffff:127.0.0.1']}}]}]\n"
    write_bundle(tmp_path / "b", deny)  # a DENY matches both readings


def test_anding_ip_blocks_read_two_ways_keeps_a_deny(tmp_path: Path) -> None:
    """Intersected under the older istiod's reading only, `::ffff:10.0.0.1` and
    `::ffff:10.0.0.0/120` had nothing in common and the DENY rule was dropped; current istiod
    matches `::ffff:10.0.0.1` in both."""
    text = AP + """\
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: ["::ffff:10.0.0.1"]}}]
    when: [{key: remote.ip, values: ["::ffff:10.0.0.0/120"]}]
"""
    ps = imported(tmp_path, text, WORKLOADS)
    for xff in ("::ffff:10.0.0.1", "10.0.0.1"):
        assert not allowed(ps, principal=SLEEP, headers={"x-forwarded-for": xff}), xff
