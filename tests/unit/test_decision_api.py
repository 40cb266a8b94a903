"""The decision API (proto/authz/v1/decision.proto) over gRPC and JSON, and authz.client,
against `authz serve` serving the example bundle: same engine, audit records and metrics
(caller="api") as Envoy checks; malformed input is INVALID_ARGUMENT / 400, never an allow."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from served import Served, free_port, serve, wait_for

from authz.client import AsyncClient, Client, DecisionError
from authz.v1 import decision_pb2, decision_pb2_grpc

TD = "spiffe://cluster.local"
ORDERS = f"{TD}/ns/prod/sa/orders-api"
CHECKOUT = f"{TD}/ns/prod/sa/checkout-api"
STRANGER = f"{TD}/ns/dev/sa/stranger"
REVISION = "2026-11-25.1"


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(tmp_path_factory.mktemp("decision-api"), "--http-decision-api", "--grpc-explain")
    try:
        yield served
    finally:
        served.stop()


def test_the_json_api_and_grpc_explain_are_off_unless_asked_for(tmp_path: Path) -> None:
    """The probe port authenticates no caller, and an explanation shows every policy's rules:
    without --http-decision-api, /v1/decide and /v1/explain are not there; without
    --grpc-explain, neither is gRPC Explain (whoever may call Check may call it). gRPC Decide
    answers no more than Check: it stays."""
    served = serve(tmp_path)
    try:
        for path in ("/v1/decide", "/v1/explain"):
            req = urllib.request.Request(f"http://127.0.0.1:{served.http_port}{path}", data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 404
        channel, api = stub(served)
        with channel:
            assert api.Decide(tenant_request(), timeout=10).decision_id
            with pytest.raises(grpc.RpcError) as rpc_err:
                api.Explain(tenant_request(), timeout=10)
            assert rpc_err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        served.stop()


def tenant_request(**over: object) -> decision_pb2.DecideRequest:
    fields: dict[str, object] = dict(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                                     path="/v1/tenants/acme/orders", host="orders.prod")
    fields.update(over)
    return decision_pb2.DecideRequest(**fields)  # type: ignore[arg-type]


def stub(authz: Served) -> tuple[grpc.Channel, decision_pb2_grpc.DecisionServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{authz.grpc_port}")
    return channel, decision_pb2_grpc.DecisionServiceStub(channel)


def post(authz: Served, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{authz.http_port}{path}", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- gRPC -------------------------------------------------------------------------------


def test_grpc_decide_allow_deny_and_tenant_hint(authz: Served) -> None:
    channel, s = stub(authz)
    with channel:
        ok = s.Decide(tenant_request(), timeout=10)
        assert (ok.allowed, ok.reason, ok.policy, ok.rule, ok.tenant) == (
            True, "allowed by policy", "orders-api", "tenant-callers", "acme")
        assert ok.revision == REVISION and ok.http_status == 200 and len(ok.decision_id) == 32
        assert ok.upstream_headers["x-authz-tenant"] == "acme"
        assert ok.upstream_headers["x-authz-principal"] == CHECKOUT

        no = s.Decide(tenant_request(principal=STRANGER), timeout=10)
        assert (no.allowed, no.reason, no.http_status) == (False, "no allow rule matched", 403)
        assert not no.upstream_headers

        # The application says the request is for globex; the bundle decided for acme.
        hint = s.Decide(tenant_request(tenant="globex"), timeout=10)
        assert (hint.allowed, hint.reason, hint.tenant) == (False, "tenant mismatch", "acme")
        assert s.Decide(tenant_request(tenant="acme"), timeout=10).allowed


def test_grpc_malformed_is_invalid_argument(authz: Served) -> None:
    channel, s = stub(authz)
    with channel:
        raw = channel.unary_unary("/authz.v1.DecisionService/Decide",
                                  request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff not a protobuf", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a DecideRequest" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            s.Decide(tenant_request(method=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request has no method" in err.value.details()

        with pytest.raises(grpc.RpcError) as err:
            s.Explain(tenant_request(path=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_explain_is_the_check_trace(authz: Served) -> None:
    channel, s = stub(authz)
    with channel:
        ex = s.Explain(tenant_request(), timeout=10)
    assert ex.decision.allowed and ex.decision.rule == "tenant-callers"
    assert ex.text.startswith("ALLOW (HTTP 200) by orders-api/tenant-callers: allowed by policy, tenant acme")
    rules = [(st.step, st.policy, st.rule, st.ok) for st in ex.steps if st.step == "rule"]
    assert rules == [("rule", "orders-api", "tenant-callers", True)]
    info = [st for st in ex.steps if st.step == "policy"]
    assert info and not info[0].HasField("ok")  # neither matched nor failed


# --- JSON over HTTP -----------------------------------------------------------------------


def test_json_decide_uses_the_proto_json_mapping(authz: Served) -> None:
    body = {"principal": CHECKOUT, "destinationPrincipal": ORDERS, "method": "POST",
            "path": "/v1/tenants/acme/orders", "tenant": "acme"}
    status, answer = post(authz, "/v1/decide", json.dumps(body).encode())
    assert status == 200, answer
    assert answer["allowed"] is True and answer["tenant"] == "acme" and answer["rule"] == "tenant-callers"
    assert answer["httpStatus"] == 200 and answer["revision"] == REVISION
    assert isinstance(answer["decisionId"], str) and len(answer["decisionId"]) == 32
    # Field names as written in the proto are accepted too (proto3 JSON mapping).
    body = {"principal": STRANGER, "destination_principal": ORDERS, "method": "GET", "path": "/v1/orders/1"}
    status, answer = post(authz, "/v1/decide", json.dumps(body).encode())
    assert status == 200 and answer["allowed"] is False and answer["reason"] == "no allow rule matched"


@pytest.mark.parametrize("body", [
    b"{", b"[]", b"\xff\xfe", b'{"methd": "GET", "path": "/"}', b'{"method": 7, "path": "/"}',
    b"{}", b'{"method": "GET", "path": ""}', b'{"method": "GET", "path": "/a#frag"}',
])
def test_json_malformed_body_is_400_never_an_allow(authz: Served, body: bytes) -> None:
    status, answer = post(authz, "/v1/decide", body)
    assert status == 400, answer
    assert answer["code"] == 3 and "malformed request" in str(answer["message"])
    assert "allowed" not in answer


def test_json_explain_and_unknown_paths(authz: Served) -> None:
    body = {"principal": CHECKOUT, "destinationPrincipal": ORDERS, "method": "POST",
            "path": "/v1/tenants/acme/orders"}
    status, answer = post(authz, "/v1/explain", json.dumps(body).encode())
    assert status == 200
    assert answer["decision"]["allowed"] is True  # type: ignore[index]
    assert str(answer["text"]).startswith("ALLOW (HTTP 200) by orders-api/tenant-callers")
    assert any(s["step"] == "rule" and s["ok"] is True for s in answer["steps"])  # type: ignore[attr-defined]
    req = urllib.request.Request(f"http://127.0.0.1:{authz.http_port}/v1/decidex", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404


def test_decisions_are_audited_and_counted_as_api(authz: Served) -> None:
    channel, s = stub(authz)
    with channel:
        ok = s.Decide(tenant_request(), timeout=10)
    records = wait_for("the audit record", lambda: [
        json.loads(line) for line in authz.audit_records() if ok.decision_id in line])
    assert records[0]["caller"] == "api" and records[0]["allowed"] is True
    assert records[0]["source_principal"] == CHECKOUT and records[0]["tenant"] == "acme"
    text = authz.metrics()
    assert ('authz_checks_total{caller="api",decision="allow",policy="orders-api",'
            'reason="allowed by policy"}') in text
    assert 'authz_checks_total{caller="api",decision="deny",policy="default",reason="malformed request' in text


# --- authz.client -------------------------------------------------------------------------


def test_client_sync(authz: Served) -> None:
    with Client(f"127.0.0.1:{authz.grpc_port}", timeout=10) as c:
        r = c.decide(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                     path="/v1/tenants/acme/orders", tenant="acme")
        assert r.allowed and r.tenant == "acme" and r.error == "" and r.revision == REVISION
        r = c.decide(principal=STRANGER, destination_principal=ORDERS, method="POST",
                     path="/v1/tenants/acme/orders")
        assert not r.allowed and r.reason == "no allow rule matched" and r.error == ""
        bad = c.decide(principal=CHECKOUT, destination_principal=ORDERS, method="", path="/x")
        assert not bad.allowed and bad.error.startswith("INVALID_ARGUMENT")
        ex = c.explain(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                       path="/v1/tenants/acme/orders")
        assert ex.result.allowed and "tenant-callers" in ex.text
        assert any(st["step"] == "rule" and st["ok"] for st in ex.steps)


def test_client_async(authz: Served) -> None:
    async def run() -> tuple[bool, bool, str]:
        async with AsyncClient(f"127.0.0.1:{authz.grpc_port}", timeout=10) as c:
            yes = await c.decide(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                                 path="/v1/tenants/acme/orders")
            no = await c.decide(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                                path="/v1/tenants/acme/orders", tenant="globex")
            ex = await c.explain(principal=CHECKOUT, destination_principal=ORDERS, method="POST",
                                 path="/v1/tenants/acme/orders")
            return yes.allowed, no.allowed, ex.text

    yes, no, text = asyncio.run(run())
    assert yes and not no and text.startswith("ALLOW")


def test_client_fails_closed(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(dead, timeout=2) as c:
        r = c.decide(principal=CHECKOUT, method="GET", path="/")
        assert not r.allowed and r.http_status == 403 and r.error.startswith(("UNAVAILABLE", "DEADLINE"))
        assert c.explain(method="GET", path="/").result.allowed is False
    with Client(dead, timeout=2, raise_errors=True) as c, pytest.raises(DecisionError):
        c.decide(method="GET", path="/")

    async def run() -> bool:
        async with AsyncClient(dead, timeout=2) as c:
            return (await c.decide(method="GET", path="/")).allowed

    assert asyncio.run(run()) is False


def test_client_timeout_is_a_deny() -> None:
    """A server that would allow, but only after the client's timeout: the client denies."""
    import threading
    from concurrent import futures

    release = threading.Event()

    def slow_allow(data: bytes, context: grpc.ServicerContext) -> bytes:
        release.wait(30)
        return decision_pb2.DecideResponse(allowed=True, reason="allowed by policy").SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "authz.v1.DecisionService", {"Decide": grpc.unary_unary_rpc_method_handler(slow_allow)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=0.5) as c:
            r = c.decide(principal=CHECKOUT, method="POST", path="/v1/tenants/acme/orders")
        assert not r.allowed and r.error.startswith("DEADLINE_EXCEEDED"), r
    finally:
        release.set()
        server.stop(None)


def test_json_body_over_1_mib_is_refused(authz: Served) -> None:
    status, answer = post(authz, "/v1/decide", b" " * (1024 * 1024 + 1))
    assert status == 413 and answer["code"] == 3 and "allowed" not in answer


def test_a_refused_body_is_drained_not_reset(authz: Served) -> None:
    """The 413 comes before the body is read. The server then reads and drops what the client
    still sends before it closes: closing on unread data resets the connection, and a client
    still sending (urllib, most HTTP clients) gets a broken pipe instead of the answer."""
    with socket.create_connection(("127.0.0.1", authz.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n")
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.0 413") or head.startswith(b"HTTP/1.1 413"), head
        s.sendall(b" " * (1024 * 1024 + 1))  # the body the server did not wait for
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := s.recv(65536):  # a reset raises ConnectionResetError here
            rest += chunk


def test_decide_denies_when_the_bundle_reads_what_the_api_cannot_carry(tmp_path: Path) -> None:
    """A DecideRequest has no socket addresses, destination port or SNI: a DENY rule on them
    could never fire and an ALLOW on `notPorts` would always match, so while such a bundle
    serves every decision is a deny with a fixed reason; without such rules it decides."""
    from bundle_factory import write_bundle

    from authz.bundle.store import BundleStore
    from authz.check import UNCARRIED, Checker
    from authz.decision_api import decide
    from authz.metrics import Metrics

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    deny_net = {"name": "no-outside", "action": "DENY",
                "rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}], "to": [{"operation": {"paths": ["/internal/*"]}}]}]}
    req = decision_pb2.DecideRequest(principal="spiffe://cluster.local/ns/a/sa/b", method="GET", path="/internal/x")
    for name, policies, allowed, reason in (("plain", [allow], True, "allowed by policy"),
                                            ("socket", [allow, deny_net], False, UNCARRIED)):
        store = BundleStore(Metrics())
        assert store.load(write_bundle(tmp_path / name, policies))
        answer, error = decide(Checker(store, None), req, explain=False)
        assert isinstance(answer, decision_pb2.DecideResponse)
        assert (answer.allowed, answer.reason, error) == (allowed, reason, None)
        assert answer.decision_id


def test_a_bundle_reading_the_scheme_or_protocol_denies_decide_requests(tmp_path: Path) -> None:
    """A DecideRequest carries no scheme or protocol: a DENY on HTTP/1.0 never fired and the
    API allowed what Envoy's gRPC check denies. Headers and context extensions it carries."""
    from bundle_factory import check_request
    from test_checker import checker

    from authz.check import UNCARRIED_REQUEST
    from authz.decision_api import CARRIES

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    for i, (extra, reason) in enumerate([
            ({"name": "no-http10", "action": "DENY", "rules": [{"when": ["request.protocol == 'HTTP/1.0'"]}]},
             UNCARRIED_REQUEST),
            ({"name": "no-debug", "action": "DENY", "rules": [{"when": ["'x-debug' in request.headers"]}]},
             "allowed by policy")]):
        outcome = checker(tmp_path / str(i), [allow, extra]).run(check_request(path="/x"), caller="api",
                                                                   socket=False, carries=CARRIES)
        assert outcome.decision.reason == reason, (i, outcome.decision.reason)



def test_decide_requests_carry_the_request_line_as_pseudo_headers_but_not_the_scheme(tmp_path: Path) -> None:
    """Envoy's CheckRequest has :method, :path and :authority among its headers; a DENY on
    them never fired through the API. :scheme it has too, a DecideRequest not."""
    from bundle_factory import check_request
    from test_checker import checker

    from authz.check import UNCARRIED_REQUEST
    from authz.decision_api import CARRIES, to_check_request

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    admin = {"name": "no-admin", "action": "DENY", "rules": [{"to": [{"operation": {"headers": {":path": ["/admin*"]}}}]}]}
    c = checker(tmp_path / "a", [allow, admin])
    req = decision_pb2.DecideRequest(method="GET", path="/admin/x", host="app")
    assert c.run(to_check_request(req), caller="api", socket=False, carries=CARRIES).decision.reason == "denied by policy"
    scheme = {"name": "no-http", "action": "DENY", "rules": [{"when": ["request.headers[':scheme'] == 'http'"]}]}
    c = checker(tmp_path / "b", [allow, scheme])
    assert c.run(to_check_request(req), caller="api", socket=False,
                 carries=CARRIES).decision.reason == UNCARRIED_REQUEST
    assert not c.run(check_request(path="/x", headers={":scheme": "http"})).decision.allowed
