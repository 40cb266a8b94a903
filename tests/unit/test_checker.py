"""The pipeline fails closed and shapes Envoy responses as documented."""

from __future__ import annotations

import json
from pathlib import Path

from bundle_factory import check_request, spiffe, write_bundle
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.engine.compile import load_policy_set
from authz.metrics import Metrics

CHECKOUT = spiffe("prod", "checkout")


def checker(tmp_path: Path, policies: list[dict], **kw: object) -> Checker:
    metrics = Metrics()
    store = BundleStore(metrics)
    store.current = load_policy_set(write_bundle(tmp_path / "b", policies, **kw))  # type: ignore[arg-type]
    return Checker(store, metrics)


ALLOW_ALL = [{"name": "all", "action": "ALLOW", "rules": [{"name": "any"}]}]
TENANTED = [{"name": "t", "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
             "rules": [{"name": "r", "to": [{"operation": {"paths": ["/t/{tenant}"]}}]}]}]


def headers_of(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def test_allow_sets_and_overwrites_upstream_headers(tmp_path: Path) -> None:
    c = checker(tmp_path, TENANTED, tenants={"acme": {}})
    out = c.run(check_request(principal=CHECKOUT, path="/t/acme",
                              headers={"x-authz-tenant": "globex", "x-authz-principal": "spiffe://evil"}))
    resp = out.response
    assert resp.status.code == code_pb2.OK
    assert headers_of(resp) == {"x-authz-principal": CHECKOUT, "x-authz-decision-id": out.decision_id,
                                "x-authz-tenant": "acme"}
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in resp.ok_response.headers)
    assert list(resp.ok_response.headers_to_remove) == []


def test_allow_without_tenant_removes_client_tenant_header(tmp_path: Path) -> None:
    c = checker(tmp_path, ALLOW_ALL)
    resp = c.check(check_request(principal=CHECKOUT, headers={"x-authz-tenant": "globex"}))
    assert "x-authz-tenant" not in headers_of(resp)
    assert list(resp.ok_response.headers_to_remove) == ["x-authz-tenant"]
    resp = c.check(check_request(principal="", headers={"x-authz-principal": "spiffe://evil"}))
    assert set(resp.ok_response.headers_to_remove) == {"x-authz-tenant", "x-authz-principal"}


def test_deny_response_and_metadata(tmp_path: Path) -> None:
    c = checker(tmp_path, [{"name": "secret-policy-name", "action": "DENY", "rules": [{"name": "secret-rule"}]}])
    out = c.run(check_request(principal=CHECKOUT))
    resp = out.response
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    assert resp.denied_response.status.code == 403
    body = json.loads(resp.denied_response.body)
    assert body == {"decision_id": out.decision_id, "reason": "denied by policy"}
    assert "secret" not in resp.denied_response.body
    hdrs = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert hdrs["content-type"] == "application/json"
    md = dict(resp.dynamic_metadata)
    assert md == {"decision_id": out.decision_id, "allowed": False, "policy": "secret-policy-name",
                  "rule": "secret-rule", "revision": "r1", "tenant": ""}


def test_no_http_attributes_denies(tmp_path: Path) -> None:
    out = checker(tmp_path, ALLOW_ALL).run(external_auth_pb2.CheckRequest())
    assert not out.decision.allowed
    assert out.decision.reason == "malformed request: check request carries no HTTP attributes"
    assert json.loads(out.response.denied_response.body)["decision_id"] == out.decision_id


def test_ambiguous_path_denied_even_when_everything_is_allowed(tmp_path: Path) -> None:
    c = checker(tmp_path, ALLOW_ALL)
    for path in ["/a%00", "/a%0a", "/a#b", "/a/..;/b", "/a/%252e%252e/b", "/a/%C0%AE%C0%AE/b"]:
        d = c.run(check_request(principal=CHECKOUT, path=path)).decision
        assert not d.allowed and d.reason.startswith("malformed request:"), path
    # An encoded separator is not malformed: it is one more way to read the path, and an
    # allow-everything rule allows every reading (as Istio does).
    for path in ["/a%2Fb", "/a%5cb"]:
        assert c.run(check_request(principal=CHECKOUT, path=path)).decision.allowed, path


def test_raw_header_map_is_read_as_envoy_reads_headers(tmp_path: Path) -> None:
    """With encode_raw_headers Envoy sends header_map (bytes) instead of headers. Bytes that
    are not UTF-8 read as '!' each, Envoy's substitution in `headers`; a request carrying
    both forms is malformed (which one would the upstream see?)."""
    deny = {"name": "no-v2", "action": "DENY", "rules": [{"name": "r", "to": [{"operation": {"headers": {"x-ver": ["v2*"]}}}]}]}
    check = checker(tmp_path, [deny, *ALLOW_ALL])
    req = check_request(path="/x")
    req.attributes.request.http.ClearField("headers")
    for key, raw in ((":path", b"/x"), ("X-Ver", b"v2\xff")):
        req.attributes.request.http.header_map.headers.add(key=key, raw_value=raw)
    outcome = check.run(req)
    assert (outcome.decision.allowed, outcome.decision.policy) == (False, "no-v2")
    assert outcome.request is not None and outcome.request.headers["x-ver"] == "v2!"
    req.attributes.request.http.headers["x-ver"] = "v1"
    outcome = check.run(req)
    assert not outcome.decision.allowed
    assert outcome.decision.reason == "malformed request: check request carries both headers and header_map"


def test_no_bundle_denies(tmp_path: Path) -> None:
    metrics = Metrics()
    out = Checker(BundleStore(metrics), metrics).run(check_request())
    assert not out.decision.allowed and out.decision.reason == "no policy bundle loaded"


def test_internal_error_denies_with_id(tmp_path: Path) -> None:
    c = checker(tmp_path, ALLOW_ALL)

    class Exploding:
        revision = "boom"
        trust_domains = c.store.current.trust_domains  # type: ignore[union-attr]

        def decide(self, req: object) -> object:
            raise RuntimeError("bug")

    c.store.current = Exploding()  # type: ignore[assignment]
    out = c.run(check_request(principal=CHECKOUT))
    assert not out.decision.allowed and out.decision.reason == "internal error"
    assert out.response.status.code == code_pb2.PERMISSION_DENIED
    assert json.loads(out.response.denied_response.body)["decision_id"] == out.decision_id


def test_metrics_count_decisions(tmp_path: Path) -> None:
    c = checker(tmp_path, [{"name": "p", "action": "ALLOW", "rules": [{"name": "r", "to": [
        {"operation": {"methods": ["GET"]}}]}]}])
    for method in ["GET", "GET", "POST"]:
        c.check(check_request(method=method))
    text = c.metrics.exposition().decode()
    assert 'authz_checks_total{caller="envoy_grpc",decision="allow",policy="p",reason="allowed by policy"} 2.0' in text
    assert 'authz_checks_total{caller="envoy_grpc",decision="deny",policy="default",reason="no allow rule matched"} 1.0' in text
    assert "authz_check_duration_seconds_count 3.0" in text


def test_decision_ids_are_unique(tmp_path: Path) -> None:
    c = checker(tmp_path, ALLOW_ALL)
    ids = {c.run(check_request()).decision_id for _ in range(200)}
    assert len(ids) == 200


def test_bytes_that_are_not_a_check_request_are_denied(tmp_path: Path) -> None:
    c = checker(tmp_path, ALLOW_ALL)
    for garbage in [b"\xff\xff\xff", b"\x0a\x05\x0a", b"\x08"]:
        resp = external_auth_pb2.CheckResponse.FromString(c.check_bytes(garbage))
        assert resp.status.code == code_pb2.PERMISSION_DENIED
        body = json.loads(resp.denied_response.body)
        assert body["reason"] == "malformed request: not a CheckRequest" and len(body["decision_id"]) == 32
    ok = external_auth_pb2.CheckResponse.FromString(c.check_bytes(check_request(principal=CHECKOUT).SerializeToString()))
    assert ok.status.code == code_pb2.OK


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_an_answer_with_a_decision_id(data: bytes) -> None:
    resp = external_auth_pb2.CheckResponse.FromString(_FUZZ_CHECKER.check_bytes(data))
    assert resp.status.code in (code_pb2.OK, code_pb2.PERMISSION_DENIED)
    if resp.status.code == code_pb2.PERMISSION_DENIED:
        assert len(json.loads(resp.denied_response.body)["decision_id"]) == 32
    else:
        assert resp.ok_response.headers


def _example_checker() -> Checker:
    metrics = Metrics()
    store = BundleStore(metrics)
    store.current = load_policy_set(Path(__file__).resolve().parents[2] / "policies" / "example")
    return Checker(store, metrics)


_FUZZ_CHECKER = _example_checker()


def test_a_failing_counter_costs_neither_the_answer_nor_the_audit_record(tmp_path: Path) -> None:
    """Metrics are a side effect: when they fail, the check is still answered and audited."""
    from audit_helpers import MemorySink

    from authz.audit import AuditLog

    c = checker(tmp_path, ALLOW_ALL)
    assert c.metrics is not None

    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("counter broke")

    c.metrics.count_check = broken  # type: ignore[method-assign]
    sink = MemorySink()
    c.audit = AuditLog([sink], c.metrics, poll_interval=0.01)
    try:
        out = c.run(check_request(principal=CHECKOUT, path="/x"))
    finally:
        c.audit.close(timeout=10)
    assert out.decision.allowed
    assert [json.loads(line)["decision_id"] for line in sink.lines] == [out.decision_id]


def test_replaced_bundles_are_not_kept_alive_by_the_checker(tmp_path: Path) -> None:
    """The answer for callers that carry less (HTTP ext_authz, the decision API) was kept per
    bundle in the checker, holding up to 65 replaced bundles (10k tenants: 57 -> 164 MiB)."""
    import gc

    from authz.engine.decide import PolicySet

    metrics = Metrics()
    store = BundleStore(metrics)
    check = Checker(store, metrics)
    allowed = []
    for i in range(6):
        store.current = load_policy_set(write_bundle(tmp_path / f"b{i}", ALLOW_ALL, revision=f"alive-r{i}"))
        allowed.append(check.run(check_request(path="/x"), carries=frozenset({"header:*", "principal"})).decision.allowed)
    gc.collect()
    alive = [o.revision for o in gc.get_objects() if isinstance(o, PolicySet) and o.revision in
             {f"alive-r{i}" for i in range(6)}]  # other tests' bundles (revision r1...) may live on
    assert all(allowed) and alive == ["alive-r5"], alive


def test_a_principal_without_its_certificate_is_denied_where_other_names_could_decide(tmp_path: Path) -> None:
    """Envoy's RBAC matches identities on every SAN and the subject of the caller's
    certificate; ext_authz reports one URI SAN. Where another name could make a DENY fire
    or an ALLOW's not-form fail, a check naming a principal without the certificate behind
    it (include_peer_certificate off, XFCC without Cert) is denied; with it, Request checks
    the other names."""
    from support.pki import forwarded_certificate

    from authz.check import CALLER_API, UNCARRIED_CERTIFICATE

    deny_ns = {"name": "d", "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["blocked"]}}]}]}
    c = checker(tmp_path / "d", [*ALLOW_ALL, deny_ns])
    assert c.run(check_request(principal=CHECKOUT)).decision.reason == UNCARRIED_CERTIFICATE
    assert c.run(check_request(principal=CHECKOUT, certificate=forwarded_certificate(CHECKOUT))).decision.allowed
    hidden = forwarded_certificate(CHECKOUT, "x/ns/blocked/y")
    assert not c.run(check_request(principal=CHECKOUT, certificate=hidden)).decision.allowed
    assert c.run(check_request()).decision.allowed  # plaintext: no certificate, no other names
    # the decision API names an identity, not a certificate
    assert c.run(check_request(principal=CHECKOUT), caller=CALLER_API).decision.allowed
    not_ns = {"name": "a", "action": "ALLOW", "rules": [{"from": [{"source": {"notNamespaces": ["blocked"]}}]}]}
    c = checker(tmp_path / "n", [not_ns])
    assert c.run(check_request(principal=CHECKOUT)).decision.reason == UNCARRIED_CERTIFICATE
    # an ALLOW naming callers only matches fewer without the other names: no certificate needed
    only = {"name": "a", "action": "ALLOW", "rules": [{"from": [{"source": {"principals": [CHECKOUT[9:]]}}]}]}
    c = checker(tmp_path / "a", [only, {**deny_ns, "dryRun": True}])
    assert c.run(check_request(principal=CHECKOUT)).decision.allowed
