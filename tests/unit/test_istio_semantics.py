"""Issue-8 semantics, class by class and in both directions: what matches now, what no
longer does. Each class names the Istio behaviour it follows, or the documented way authz
is stricter (docs/bundle-format.md, "Differences from Istio")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import check_request, policy_set, spiffe
from hypothesis import given, settings
from hypothesis import strategies as st
from support.pki import forwarded_certificate

from authz.engine.decide import PolicySet
from authz.engine.model import Decision
from authz.request import MalformedRequest, from_check_request

CHECKOUT = spiffe("prod", "checkout")
ADMIN = spiffe("ops", "admin")


def decide(ps: PolicySet, **kw: Any) -> Decision:
    """As the Checker decides: a request that cannot be judged is a deny with its reason."""
    try:
        req = from_check_request(check_request(**kw), ps.trust_domains, ps.path_normalization)
    except MalformedRequest as exc:
        return Decision(False, f"malformed request: {exc}", "default", "default", "DENY")
    return ps.decide(req)


def rule(name: str = "r", **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    src = {k: v for k, v in fields.items() if k in SOURCE_FIELDS}
    ops = {k: v for k, v in fields.items() if k not in SOURCE_FIELDS and k != "when"}
    if src:
        out["from"] = [{"source": src}]
    if ops:
        out["to"] = [{"operation": ops}]
    if "when" in fields:
        out["when"] = fields["when"]
    return out


SOURCE_FIELDS = {"principals", "notPrincipals", "trustDomains", "notTrustDomains", "namespaces",
                 "notNamespaces", "serviceAccounts", "notServiceAccounts", "ipBlocks", "remoteIpBlocks"}
ALLOW_ALL = {"name": "allow-all", "action": "ALLOW", "rules": [{}]}


def deny(**fields: Any) -> dict[str, Any]:
    return {"name": "deny", "action": "DENY", "rules": [rule("d", **fields)]}


def allow(**fields: Any) -> dict[str, Any]:
    return {"name": "allow", "action": "ALLOW", "rules": [rule("a", **fields)]}


# --- 1. methods --------------------------------------------------------------------------

def test_methods_are_case_sensitive_for_allow(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(methods=["GET"])])
    assert decide(ps, method="GET").allowed
    assert not decide(ps, method="get").allowed  # Istio: exact match
    assert decide(ps, method="get").reason == "no allow rule matched"


def test_a_method_denied_only_case_insensitively_is_denied_as_ambiguous(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [deny(methods=["DELETE"]), ALLOW_ALL])
    for m in ("DELETE", "delete", "Delete"):
        d = decide(ps, method=m)
        assert not d.allowed and (d.policy, d.rule) == ("deny", "d"), m
    assert decide(ps, method="GET").allowed


def test_request_method_is_kept_as_received(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [ALLOW_ALL])
    req = from_check_request(check_request(method="post"), ps.trust_domains)
    assert req.method == "post"


def test_a_method_that_is_no_http_token_is_refused(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [ALLOW_ALL])
    d = decide(ps, method="GET /x")
    assert not d.allowed and d.reason.startswith("malformed request")


# --- 2. paths ----------------------------------------------------------------------------

def test_dot_segments_resolve_before_anything_else(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(paths=["/public/*"])])
    assert not decide(ps, path="/admin//../public/x").allowed  # it is /admin/public/x
    assert decide(ps, path="/admin/../public/x").allowed


def test_repeated_slashes_are_not_merged_by_default(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(paths=["/another"])])
    assert decide(ps, path="/another").allowed
    assert not decide(ps, path="//another").allowed
    merged = policy_set(tmp_path / "m", [allow(paths=["/another"])], pathNormalization="MERGE_SLASHES")
    assert decide(merged, path="//another").allowed


@pytest.mark.parametrize("path", ["/admin/x", "//admin/x", "/admin%2Fx", "/admin%2fx", "/admin%5Cx",
                                  "/admin;v=1/x", "/x%2F..%2Fadmin/y", "/%61dmin/x", "/./admin/x"])
def test_no_spelling_slips_past_a_deny(tmp_path: Path, path: str) -> None:
    ps = policy_set(tmp_path, [deny(paths=["/admin/*"]), ALLOW_ALL])
    d = decide(ps, path=path)
    assert not d.allowed and d.policy == "deny", path


@pytest.mark.parametrize("mode", ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"])
def test_deny_holds_in_every_normalization_mode(tmp_path: Path, mode: str) -> None:
    ps = policy_set(tmp_path, [deny(paths=["/admin/*"]), ALLOW_ALL], pathNormalization=mode)
    for path in ["/admin/x", "//admin/x", "/admin%2Fx", "/public/../admin/x", "/public/..%2Fadmin/x"]:
        assert not decide(ps, path=path).allowed, (mode, path)
    assert decide(ps, path="/public/x").allowed


def test_an_allow_needs_every_reading_of_the_path(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(paths=["/api/*"])])
    assert decide(ps, path="/api/x%2Fy").allowed  # every reading stays under /api/
    d = decide(ps, path="/api/x%2F..%2F..%2Fadmin")  # an upstream decoding %2F reads /admin
    assert not d.allowed and d.reason == "ambiguous path"


def test_percent_encoded_policy_paths_compare_in_the_proxys_form(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(paths=["/files/a%20b", "/data/na%c3%afve", "/%7Euser"])])
    assert decide(ps, path="/files/a%20b").allowed
    assert not decide(ps, path="/files/a%2520b").allowed
    # escapes the proxy keeps are compared as forwarded, hex case included (as Envoy's RBAC)
    assert decide(ps, path="/data/na%c3%afve").allowed
    assert not decide(ps, path="/data/na%C3%AFve").allowed
    # the proxy decodes %7E in every request, so an ALLOW keeping it matches nothing (Istio too) ...
    assert not decide(ps, path="/~user").allowed
    assert not decide(ps, path="/%7Euser").allowed
    # ... while a DENY may take it for '~' (stricter)
    deny_ps = policy_set(tmp_path / "d", [deny(paths=["/%7Euser"]), ALLOW_ALL])
    assert not decide(deny_ps, path="/~user").allowed


def test_suffix_principals_are_read_as_both_istiods_read_them(tmp_path: Path) -> None:
    """Older istiod pastes a '*suffix' into a regex unescaped, patched istiod (CVE-2026-39350)
    escapes it: an ALLOW grants what both readings match, a DENY denies what either does."""
    ps = policy_set(tmp_path, [allow(principals=["*/ns/foo/sa/w[1]", "*.local/ns/a/sa/b"])])
    assert not decide(ps, principal="spiffe://td1/ns/foo/sa/w1").allowed  # a class to older istiod only
    assert not decide(ps, principal="spiffe://td1/ns/foo/sa/w[1]").allowed  # text to patched istiod only
    assert decide(ps, principal="spiffe://cluster.local/ns/a/sa/b").allowed
    assert not decide(ps, principal="spiffe://xlocal/ns/a/sa/b").allowed  # '.' is any character to older istiod only
    assert not decide(ps, principal="td1/ns/foo/sa/w1").allowed  # needs the scheme
    # the suffix follows the scheme: `spiffe://ns/foo/sa/p4` does not end in `<any>/ns/foo/sa/p4`
    ps = policy_set(tmp_path / "s", [allow(principals=["*/ns/foo/sa/p4"])])
    assert not decide(ps, principal="spiffe://ns/foo/sa/p4").allowed
    assert decide(ps, principal="spiffe://td/ns/foo/sa/p4").allowed
    deny = {"name": "d", "action": "DENY", "rules": [{"name": "r", "from": [{"source": {"principals": ["*/sa/a.b"]}}]}]}
    ps = policy_set(tmp_path / "d", [deny, ALLOW_ALL])
    for caller in ("spiffe://td/ns/x/sa/aXb", "spiffe://td/ns/x/sa/a.b"):
        assert not decide(ps, principal=caller).allowed, caller


def test_namespace_values_are_read_as_both_istiods_read_them(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(namespaces=["a[12]", "b.c"])])
    assert not decide(ps, principal="spiffe://td/ns/a1/sa/x").allowed
    assert not decide(ps, principal="spiffe://td/ns/a[12]/sa/x").allowed
    assert decide(ps, principal="spiffe://td/ns/b.c/sa/x").allowed


def test_invalid_istio_regexes_are_load_errors(tmp_path: Path) -> None:
    from authz.bundle.loader import BundleError
    with pytest.raises(BundleError, match="regular expression"):
        policy_set(tmp_path, [allow(principals=["*/ns/a/sa/b(["])])
    with pytest.raises(BundleError, match="regular expressions"):
        policy_set(tmp_path / "2", [allow(namespaces=["a("])])


@pytest.mark.parametrize("path", ["/v1/．．/admin", "/v1/a／b", "/v1/‥/x", "/v1/%EF%BC%8F"])
def test_lookalikes_are_refused_with_or_without_percent(tmp_path: Path, path: str) -> None:
    ps = policy_set(tmp_path, [ALLOW_ALL])
    d = decide(ps, path=path)
    assert not d.allowed and "normalise to separators" in d.reason


def test_templates_take_envoys_characters(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(paths=["/v1/{*}/x", "/files/{**}"])])
    assert decide(ps, path="/v1/a:b@c/x").allowed
    assert not decide(ps, path="/v1/[a]/x").allowed
    assert decide(ps, path="/files/").allowed  # '**' is zero or more segments, as Envoy's
    assert decide(ps, path="/files/a/b/").allowed
    assert not decide(ps, path="/files").allowed


# --- 3. principals, trust domains, namespaces, service accounts ----------------------------

def test_wildcard_trust_domains_are_patterns_on_the_trust_domain(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [deny(trustDomains=["bad*", "*-td1"]), ALLOW_ALL])
    assert not decide(ps, principal="spiffe://bad.example/ns/a/sa/b").allowed
    assert not decide(ps, principal="spiffe://old-td1/ns/a/sa/b").allowed
    assert decide(ps, principal="spiffe://good/ns/bad/sa/b").allowed
    assert decide(ps, principal="spiffe://td1/ns/a/sa/b").allowed
    assert decide(ps, principal="").allowed  # no principal, no trust domain


def test_trust_domain_aliases_expand_policy_principals_not_the_caller(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(principals=["td1/ns/foo/sa/p1", "*bar/ns/foo/sa/p2"])],
                    trustDomain="td1", trustDomainAliases=["old-td"])
    assert decide(ps, principal="spiffe://td1/ns/foo/sa/p1").allowed
    assert decide(ps, principal="spiffe://old-td/ns/foo/sa/p1").allowed
    assert not decide(ps, principal="spiffe://other/ns/foo/sa/p1").allowed
    # the suffix pattern sees the caller as received, alias or not
    assert decide(ps, principal="spiffe://old-bar/ns/foo/sa/p2").allowed
    assert decide(ps, principal="spiffe://foobar/ns/foo/sa/p2").allowed
    assert not decide(ps, principal="spiffe://td1/ns/foo/sa/p2").allowed
    # non-strict SPIFFE IDs still match (Istio compares strings)
    ps2 = policy_set(tmp_path / "2", [allow(principals=["td1/ns/a[1]/sa/b:c"])],
                     trustDomain="td1", trustDomainAliases=["old-td"])
    assert decide(ps2, principal="spiffe://old-td/ns/a[1]/sa/b:c").allowed


def test_cluster_local_points_at_the_local_trust_domain(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(principals=["cluster.local/ns/foo/sa/p1"])], trustDomain="td1")
    assert decide(ps, principal="spiffe://td1/ns/foo/sa/p1").allowed
    assert not decide(ps, principal="spiffe://cluster.local/ns/foo/sa/p1").allowed


def test_namespaces_follow_istios_regex(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(namespaces=["foo"])])
    assert decide(ps, principal="spiffe://cluster.local/ns/foo/sa/x").allowed
    assert not decide(ps, principal="spiffe://cluster.local/ns/foo").allowed  # needs '/ns/foo/'
    assert decide(ps, principal="spiffe://cluster.local/ns/foo/sa/a[1]").allowed  # non-strict
    assert not decide(ps, principal="").allowed
    deny_ps = policy_set(tmp_path / "d", [deny(namespaces=["te*"]), ALLOW_ALL])
    assert not decide(deny_ps, principal="spiffe://td/ns/test/sa/x").allowed
    assert decide(deny_ps, principal="spiffe://td/ns/prod/sa/x").allowed


def test_service_accounts_without_namespace_are_in_the_policys_namespace(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [{**allow(serviceAccounts=["sleep", "other/curl"]), "namespace": "foo"}])
    assert decide(ps, principal="spiffe://cluster.local/ns/foo/sa/sleep").allowed
    assert not decide(ps, principal="spiffe://cluster.local/ns/bar/sa/sleep").allowed
    assert decide(ps, principal="spiffe://cluster.local/ns/other/sa/curl").allowed
    assert not decide(ps, principal="spiffe://cluster.local/ns/foo/sa/sleeper").allowed


def test_a_bare_service_account_without_a_policy_namespace_is_a_load_error(tmp_path: Path) -> None:
    from authz.bundle.loader import BundleError
    with pytest.raises(BundleError, match="names no namespace"):
        policy_set(tmp_path, [allow(serviceAccounts=["sleep"])])


# --- 4. headers --------------------------------------------------------------------------

def test_star_matches_a_present_empty_header(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(headers={"x-token": ["*"]})])
    assert decide(ps, headers={"x-token": ""}).allowed
    assert not decide(ps).allowed


def test_repeated_headers_deny_on_any_element_allow_on_the_whole(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [deny(headers={"x-role": ["guest"]}), allow(headers={"x-role": ["admin"]})])
    assert decide(ps, headers={"x-role": "admin"}).allowed
    d = decide(ps, headers={"x-role": "admin,guest"})  # two header lines as ext_authz sees them
    assert not d.allowed and d.policy == "deny"
    assert not decide(ps, headers={"x-role": "user,admin"}).allowed  # stricter than Istio, documented


def test_allow_not_headers_exclude_on_any_element(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(notHeaders={"x-env": ["test"]})])
    assert decide(ps, headers={"x-env": "prod"}).allowed
    assert not decide(ps, headers={"x-env": "prod, test"}).allowed


def test_deny_header_values_match_as_an_http1_upstream_trims_them(tmp_path: Path) -> None:
    """Envoy does not trim an HTTP/2 header value (` admin`, `admin\t`); an HTTP/1.1 upstream's
    parser does: a DENY on `admin`, in the field and in a condition, matches the trimmed value.
    An ALLOW's values still take it as sent; its notHeaders exclude on the trimmed value."""
    ps = policy_set(tmp_path, [deny(headers={"x-role": ["admin", "root*"]}), allow()])
    cond = policy_set(tmp_path / "c", [deny(when=["request.headers['x-role'] == 'admin'"]), allow()])
    for value in (" admin", "admin ", "admin\t", "\t admin \t", "user, admin "):
        assert decide(ps, headers={"x-role": value}).policy == "deny", value
        assert decide(cond, headers={"x-role": value}).policy == "deny", value
    assert decide(ps, headers={"x-role": " root-1"}).policy == "deny"
    for value in (" user", "ad min", "admin\u00a0", "\"admin\""):
        assert decide(ps, headers={"x-role": value}).allowed, value
        assert decide(cond, headers={"x-role": value}).allowed, value
    ps = policy_set(tmp_path / "a", [allow(headers={"x-role": ["admin"]})])
    assert not decide(ps, headers={"x-role": " admin"}).allowed
    ps = policy_set(tmp_path / "n", [allow(notHeaders={"x-env": ["test"]})])
    assert not decide(ps, headers={"x-env": "test "}).allowed
    ps = policy_set(tmp_path / "w", [allow(when=["request.headers['x-role'] == 'admin'"])])
    assert not decide(ps, headers={"x-role": " admin"}).allowed  # an ALLOW condition reads it as sent
    started = time.perf_counter()  # 60 KB of blanks: one strip per reading
    for padded in (" " * 60_000 + "user", "\t" * 30_000 + "user" + " " * 30_000):
        assert decide(cond, headers={"x-role": padded}).allowed
        assert decide(policy_set(tmp_path / "f", [deny(headers={"x-role": ["admin"]}), allow()]),
                      headers={"x-role": padded}).allowed
    assert time.perf_counter() - started < 2.0


# --- 5. unidentified destination -------------------------------------------------------------

def test_a_request_without_destination_principal_is_not_let_past_a_targeted_deny(tmp_path: Path) -> None:
    target = {"principals": [spiffe("prod", "db")]}
    ps = policy_set(tmp_path, [{"name": "deny-all", "action": "DENY", "target": target, "rules": [{}]}],
                    defaultAction="ALLOW")
    d = decide(ps, destination="")
    assert not d.allowed and d.reason == "destination not identified"
    assert not decide(ps, destination=spiffe("prod", "db")).allowed
    assert decide(ps, destination=spiffe("prod", "web")).allowed


def test_a_destination_targeted_by_port_or_host_is_decided_without_principal(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [
        {"name": "db", "action": "DENY", "target": {"principals": [spiffe("prod", "db")]}, "rules": [{}]},
        {"name": "web", "action": "ALLOW", "target": {"ports": ["8080"]}, "rules": [rule(paths=["/ok"])]},
    ])
    assert decide(ps, destination="", port=8080, path="/ok").allowed
    assert not decide(ps, destination="", port=8080, path="/no").allowed
    assert decide(ps, destination="", port=9090, path="/ok").reason == "destination not identified"


# --- 6. caller identity --------------------------------------------------------------------

def _cert(uri: str | None, dns: str | None, *more_uris: str, subject_cn: str | None = None) -> str:
    return forwarded_certificate(uri, dns, *more_uris, subject_cn=subject_cn)


def test_a_principal_that_is_not_the_certificates_uri_san_is_denied(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(principals=[ADMIN])])
    assert decide(ps, principal=ADMIN, certificate=_cert(ADMIN, None)).allowed
    d = decide(ps, principal=ADMIN, certificate=_cert(None, ADMIN))  # DNS SAN only: Envoy reports it
    assert not d.allowed and "URI SAN" in d.reason
    assert not decide(ps, principal=ADMIN, certificate=_cert(CHECKOUT, None)).allowed
    assert decide(ps, principal=ADMIN).allowed  # no certificate forwarded: nothing to check


def test_a_certificate_with_more_than_one_identity_is_refused(tmp_path: Path) -> None:
    """Envoy's RBAC tries every SAN of the certificate, ext_authz reports the first: a DENY on
    the second would fire in Istio and not here. An X509-SVID has exactly one URI SAN."""
    ps = policy_set(tmp_path, [ALLOW_ALL, {"name": "d", "action": "DENY", "rules": [{"from": [
        {"source": {"principals": [ADMIN]}}]}]}])
    assert decide(ps, principal=CHECKOUT, certificate=_cert(CHECKOUT, None)).allowed
    assert decide(ps, principal=CHECKOUT, certificate=_cert(CHECKOUT, "checkout.prod.svc")).allowed  # a plain DNS SAN
    for cert in (_cert(CHECKOUT, None, ADMIN), _cert(CHECKOUT, ADMIN)):
        d = decide(ps, principal=CHECKOUT, certificate=cert)
        assert (d.allowed, d.reason) == (False, "malformed request: client certificate names more than one identity")


def test_a_certificate_naming_a_namespace_outside_its_uri_san_is_refused(tmp_path: Path) -> None:
    """istiod's namespace matcher is the regex `.*/ns/<ns>/.*`, which Envoy's RBAC tries on
    every DNS SAN and the subject too: a DNS SAN `x/ns/blocked/y` met a DENY on namespace
    `blocked` in Istio, never here."""
    ps = policy_set(tmp_path, [ALLOW_ALL, {"name": "d", "action": "DENY", "rules": [{"from": [
        {"source": {"namespaces": ["blocked"]}}]}]}])
    for cert in (_cert(CHECKOUT, "x/ns/blocked/y"), _cert(CHECKOUT, None, subject_cn="x/ns/blocked/y")):
        d = decide(ps, principal=CHECKOUT, certificate=cert)
        assert (d.allowed, d.reason) == (False, "malformed request: client certificate names more than one identity")
    assert decide(ps, principal=CHECKOUT, certificate=_cert(CHECKOUT, "web.blocked.svc.cluster.local")).allowed


def test_server_names_and_hosts_are_lower_cased_as_envoy_does(tmp_path: Path) -> None:
    """Envoy lower-cases ASCII only: U+212A KELVIN SIGN stays, where str.lower() makes it 'k'."""
    ps = policy_set(tmp_path, [{"name": "a", "action": "ALLOW", "rules": [{"to": [{"operation": {"sni": ["kiosk.example.com"]}}]}]}])
    assert decide(ps, sni="KIOSK.example.com").allowed
    assert not decide(ps, sni="\u212aiosk.example.com").allowed


# --- 7. dry run --------------------------------------------------------------------------

def test_a_dry_run_condition_error_never_changes_the_decision(tmp_path: Path) -> None:
    broken = {"name": "shadow", "action": "DENY", "dryRun": True,
              "rules": [rule("s", when=['request.headers["x-missing"] == "1"'])]}
    ps = policy_set(tmp_path, [broken, ALLOW_ALL])
    d = decide(ps)
    assert d.allowed and not d.condition_error
    assert d.dry_run == ("shadow/s=error",)
    ps2 = policy_set(tmp_path / "2", [{**broken, "action": "ALLOW"}], defaultAction="ALLOW")
    assert decide(ps2).allowed and decide(ps2).dry_run == ("shadow/s=error",)


# --- 8. sni, destination ip ------------------------------------------------------------------

def test_sni_and_destination_ip_blocks(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [allow(sni=["*.example.com"], destinationIpBlocks=["10.0.0.0/8", "2001:db8::/32"])])
    assert decide(ps, sni="a.example.com", destination_ip="10.1.2.3").allowed
    assert decide(ps, sni="a.example.com", destination_ip="2001:db8::7").allowed
    assert not decide(ps, sni="a.example.org", destination_ip="10.1.2.3").allowed
    assert not decide(ps, sni="a.example.com", destination_ip="192.168.1.1").allowed
    # Envoy's RBAC sees the server name lower-cased; so does authz
    assert decide(ps, sni="A.Example.COM", destination_ip="10.1.2.3").allowed
    deny_ps = policy_set(tmp_path / "d", [deny(sni=["blocked.example.org"]), ALLOW_ALL])
    assert not decide(deny_ps, sni="BLOCKED.example.org").allowed


# --- tenants cannot be crossed by any reading --------------------------------------------------

TENANT_POLICY = {
    "name": "orders", "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
    "rules": [{"name": "callers", "to": [{"operation": {"paths": ["/v1/tenants/{tenant}/{**}"]}}],
               "when": ["source.principal in tenant.callers"]}],
}
TENANTS = {"acme": {"callers": [CHECKOUT]}, "globex": {"callers": [ADMIN]}}
PIECES = st.sampled_from(["/", "//", ".", "..", "%2F", "%2f", "%5C", ";", ";x", "%2E%2E", "\\\\", "globex",
                          "acme", "orders", "x"])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=10))
def test_no_reading_reaches_another_tenant(tmp_path_factory: pytest.TempPathFactory, pieces: list[str]) -> None:
    ps = _tenant_ps(tmp_path_factory)
    path = "/v1/tenants/acme/" + "".join(pieces)
    d = decide(ps, principal=CHECKOUT, path=path)
    if d.allowed:
        req = from_check_request(check_request(path=path), ps.trust_domains)
        for p in (req.path, *req.path_readings):
            assert p.startswith("/v1/tenants/acme/"), (path, p)


_PS: dict[str, PolicySet] = {}


def _tenant_ps(factory: pytest.TempPathFactory) -> PolicySet:
    if "ps" not in _PS:
        _PS["ps"] = policy_set(factory.mktemp("t"), [TENANT_POLICY], tenants=TENANTS)
    return _PS["ps"]


@pytest.mark.parametrize("path", ["/v1/tenants/acme/orders/..%3B/..%3B/globex/orders",
                                  "/v1/tenants/acme/orders/..%3b/globex"])
def test_encoded_parameter_dot_segments_are_refused(tmp_path: Path, path: str) -> None:
    ps = policy_set(tmp_path, [ALLOW_ALL])
    d = decide(ps, path=path)
    assert not d.allowed and "dot segment with parameters" in d.reason


def test_an_encoded_semicolon_is_read_as_parameters_by_a_deny(tmp_path: Path) -> None:
    ps = policy_set(tmp_path, [deny(paths=["/admin/*"]), ALLOW_ALL])
    assert not decide(ps, path="/admin%3Bx=1/y").allowed


def test_values_read_as_envoy_reads_them(tmp_path: Path) -> None:
    """RE2 POSIX classes in namespaces; '*' hosts true for an empty Host header; a principal
    with a line feed (RE2's '.+' for '*' takes none) refused. Each was looser than Istio."""
    ps = policy_set(tmp_path, [ALLOW_ALL, {"name": "d", "action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["team-[[:digit:]]"]}}]}]}])
    assert not decide(ps, principal=spiffe("team-1", "x")).allowed
    assert decide(ps, principal=spiffe("team-x", "x")).allowed
    hosts = policy_set(tmp_path / "h", [ALLOW_ALL, {"name": "d", "action": "DENY", "rules": [
        {"to": [{"operation": {"hosts": ["*"], "paths": ["/d/*"]}}]}]}])
    assert not decide(hosts, host="", path="/d/x").allowed
    d = decide(ps, principal=spiffe("prod", "x") + "\nq")
    assert (d.allowed, d.reason) == (False, "malformed request: caller principal contains a control character")
