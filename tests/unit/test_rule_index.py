"""The rule index never changes a decision: indexed and unindexed engines agree exactly.

Bundles and requests are generated from small pools so that rules overlap, collide and
shadow each other (the same path as exact, prefix, suffix and template; methods in several
cases; callers as exact principals, prefixes and namespaces), and every decision is
compared whole: allowed, reason, deciding policy and rule (so rule order and the
DENY > AUDIT > ALLOW precedence), tenant, audit and dry-run marks.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from bundle_factory import check_request, spiffe, write_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.engine import index
from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet
from authz.request import MalformedRequest, from_check_request

METHODS = ["GET", "get", "Get", "POST", "PUT", "DELETE", "HEAD"]
PATHS = ["/", "/a", "/a/", "/a/b", "/a/b/c", "/a/bc", "/ab", "/b", "/b/a", "/a/b/a", "/x/y/z", "/A/b"]
PATH_PATTERNS = PATHS + ["/a*", "/a/*", "/a/b*", "*", "*/a", "*b", "*/c", "/a/{*}", "/a/{**}", "/{*}/b",
                         "/a/{*}/c", "/{**}", "/b/{x}", "/A/{*}", "/A*", "*/B", "/{*}/B"]
CALLERS = [spiffe("ns1", "sa1"), spiffe("ns1", "sa2"), spiffe("ns2", "sa1"), "spiffe://other.td/ns/ns1/sa/sa1",
           spiffe("ns1", "s.1"), spiffe("ns1", "sX1")]
# `*/sa/s.1` and `*/sa/sa[12]`: suffixes older and patched istiod read otherwise (pattern readings)
PRINCIPAL_PATTERNS = CALLERS + ["*", "spiffe://cluster.local/ns/ns1/*", "*/sa/sa1", "cluster.local/ns/ns2/sa/sa1",
                                "*/sa/s.1", "*/sa/sa[12]"]
DESTINATIONS = [spiffe("d", "one"), spiffe("d", "two"), spiffe("d", "o.e")]


def sub(values: list[str], max_size: int = 3) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=max_size, unique=True)


def maybe(key: str, strategy: st.SearchStrategy[Any], p_empty: int = 2) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(*([st.just({})] * p_empty), strategy.map(lambda v: {key: v}))


def merged(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


operations = merged(
    maybe("methods", sub(METHODS), 1), maybe("notMethods", sub(METHODS), 4),
    maybe("headers", st.sampled_from([{"x-flag": ["1"]}, {"x-flag": ["*"]}, {"x-flag": ["2*"]}]), 6),
    maybe("paths", sub(PATH_PATTERNS), 1), maybe("notPaths", sub(PATH_PATTERNS), 4),
    maybe("ports", sub(["8080", "9090"]), 5), maybe("hosts", sub(["svc.example", "*.example", "other"]), 5),
)
sources = merged(
    maybe("principals", sub(PRINCIPAL_PATTERNS), 1), maybe("notPrincipals", sub(PRINCIPAL_PATTERNS), 4),
    maybe("namespaces", sub(["ns1", "ns2", "ns*"]), 4), maybe("ipBlocks", sub(["10.0.0.0/8", "192.168.0.1"]), 6),
)
rules = merged(
    maybe("from", st.lists(sources.map(lambda s: {"source": s}), min_size=1, max_size=2), 1),
    maybe("to", st.lists(operations.map(lambda o: {"operation": o}), min_size=1, max_size=2), 0),
    maybe("when", st.sampled_from([["request.headers['x-flag'] == '1'"], ["request.method == 'GET'"],
                                   ["request.headers['x-missing'] == 'boom'"]]), 6),
)
policies = st.lists(
    st.tuples(
        st.sampled_from(["ALLOW", "ALLOW", "DENY", "AUDIT"]),
        st.booleans().map(lambda b: {"dryRun": True} if b else {}) | st.just({}),
        st.one_of(st.just({}), st.sampled_from([*DESTINATIONS, "*/sa/o.e"]).map(lambda d: {"target": {"principals": [d]}})),
        st.lists(rules, min_size=0, max_size=14),
        st.booleans(),  # tenant from a path capture
    ),
    min_size=1, max_size=4,
)
TENANTS = {"known": {"plan": "gold", "callers": [CALLERS[0]]}}
# In a tenant policy, rule 0 reads the tenant; the generated rules follow it.
TENANT_RULE = {"name": "tenant", "from": [{"source": {"principals": [CALLERS[1]]}}],
               "to": [{"operation": {"paths": ["/t/{t}/{**}", "/a/{t}"]}}]}
requests = st.lists(
    st.tuples(st.sampled_from(METHODS + ["PATCH", "pOST"]),
              # and paths an upstream may read another way: merged slashes, escapes, ';'
              st.sampled_from(PATHS + ["/t/known/x", "/t/other/x", "/a/known", "/a/b/c/d", "/zzz", "/a//b", "//a/b", "/a/%62", "/%61/b", "/a/b;x",
                                       "/a/b%3Bc", "/a/./b", "/a/b/../c", "/a%2Fb", "/a/b/", "/A/B", "/a/B/c", "/AB"]),
              st.sampled_from(CALLERS + [""]), st.sampled_from(DESTINATIONS),
              st.sampled_from([{}, {"x-flag": "1"}, {"x-flag": "1,2"}, {"x-flag": ""}]),
              st.sampled_from([8080, 9090])),
    min_size=1, max_size=12,
)

_counter = itertools.count()


def compile_bundle(tmp: Path, specs: list[Any], default: str, normalization: str) -> PolicySet | None:
    docs = []
    for i, (action, dry, target, rs, tenant) in enumerate(specs):
        named = [{"name": f"r{j}", **r} for j, r in enumerate(rs)]
        extra: dict[str, Any] = {}
        if tenant:
            named.insert(0, TENANT_RULE)
            extra["tenant"] = {"pathCapture": "t"}
        docs.append({"name": f"p{i}", "action": action, **dry, **target, **extra, "rules": named})
    root = write_bundle(tmp / f"b{next(_counter)}", docs, tenants=TENANTS, defaultAction=default,
                        pathNormalization=normalization)
    return load_policy_set(root)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(specs=policies, reqs=requests, default=st.sampled_from(["DENY", "ALLOW"]),
       normalization=st.sampled_from(["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]))
def test_indexed_and_unindexed_engines_decide_alike(tmp_path: Path, specs: list[Any], reqs: list[Any],
                                                    default: str, normalization: str) -> None:
    ps = compile_bundle(tmp_path, specs, default, normalization)
    assert ps is not None
    plain = dataclasses.replace(ps, rule_index={})
    indexed = dataclasses.replace(ps, rule_index=index.build(ps.policies, min_rules=0))
    assert set(indexed.rule_index) == {p.name for p in ps.policies}
    for method, path, caller, dest, headers, port in reqs:
        cr = check_request(principal=caller, method=method, path=path, destination=dest, headers=headers, port=port)
        try:
            req = from_check_request(cr, ps.trust_domains, ps.path_normalization)
        except MalformedRequest:
            continue  # denied before any rule is read, with or without the index
        assert indexed.decide(req) == plain.decide(req), (method, path, caller, dest, headers)


def test_the_index_narrows_a_large_policy_to_the_rules_that_can_match(tmp_path: Path) -> None:
    rules = [{"name": f"r{i}", "from": [{"source": {"principals": [spiffe("ns", f"c{i % 7}")]}}],
              "to": [{"operation": {"methods": ["GET"], "paths": [f"/api/{i}/items", f"/api/{i}/{{*}}/x"]}}]}
             for i in range(500)]
    rules.append({"name": "catch-all", "to": [{"operation": {"paths": ["/api/*"]}}]})
    ps = load_policy_set(write_bundle(tmp_path / "b", [{"name": "big", "action": "ALLOW", "rules": rules}]))
    pi = ps.rule_index["big"]
    names = [r.name for r in pi.candidates("get", ["/api/42/items"], spiffe("ns", "c0"))]
    assert names == ["r42", "catch-all"]
    names = [r.name for r in pi.candidates("GET", ["/api/42/items"], spiffe("ns", "nobody"))]
    assert names == ["catch-all"]  # r42 wants caller c0
    names = [r.name for r in pi.candidates("GET", ["/api/43/abc/x"], spiffe("ns", "c1"))]
    assert names == ["r43", "catch-all"]
    assert [r.name for r in pi.candidates("GET", ["/other"], spiffe("ns", "c0"))] == []
    req = from_check_request(check_request(principal=spiffe("ns", "c6"), method="GET", path="/api/496/items"),
                             ps.trust_domains)
    assert (ps.decide(req).policy, ps.decide(req).rule) == ("big", "r496")


def test_small_policies_are_scanned_and_large_ones_indexed(tmp_path: Path) -> None:
    small = {"name": "small", "action": "ALLOW", "rules": [{"name": f"r{i}"} for i in range(index.MIN_RULES - 1)]}
    large = {"name": "large", "action": "ALLOW", "rules": [{"name": f"r{i}"} for i in range(index.MIN_RULES)]}
    ps = load_policy_set(write_bundle(tmp_path / "b", [small, large]))
    assert set(ps.rule_index) == {"large"}


def test_template_literal_prefix_stops_at_the_first_variable_or_escape() -> None:
    assert index.template_literal_prefix("/v1/tenants/{tenant}/orders") == "/v1/tenants/"
    assert index.template_literal_prefix("/{**}") == "/"
    assert index.template_literal_prefix("/files/a%20b/{*}") == "/files/a"
