"""HTTP ext_authz (Envoy's http_service protocol): XFCC believed only from a trusted proxy,
path_prefix, framing limits, keep-alive; decisions audited and counted as envoy_http.
The real Envoy in front of it is in tests/e2e/test_http_ext_authz.py."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest
from served import Served, serve, wait_for

from authz.http_authz import TrustedProxies, XfccError, parse_xfcc, strip_prefix

TD = "spiffe://cluster.local"
ORDERS = f"{TD}/ns/prod/sa/orders-api"
CHECKOUT = f"{TD}/ns/prod/sa/checkout-api"
XFCC = f'By={ORDERS};Hash=00ff;Subject="CN=checkout,O=a\\"b";URI={CHECKOUT}'
TRUSTED_SOURCE = "127.0.0.2"  # the test's stand-in for the proxy; 127.0.0.1 is anyone else


# --- pure parts ---------------------------------------------------------------------------


def test_parse_xfcc_takes_the_last_element() -> None:
    assert parse_xfcc(XFCC) == (CHECKOUT, ORDERS)
    # An earlier element (written by whoever sent the request) never wins over the last one.
    spoof = f"URI={TD}/ns/prod/sa/admin;By={ORDERS}"
    assert parse_xfcc(f"{spoof},{XFCC}") == (CHECKOUT, ORDERS)
    assert parse_xfcc(f'By={ORDERS};Subject="a,b;c=d";URI={CHECKOUT}') == (CHECKOUT, ORDERS)
    assert parse_xfcc(f"By={ORDERS};Hash=1") == ("", ORDERS)


@pytest.mark.parametrize("bad", [
    f"URI={CHECKOUT};URI={TD}/ns/prod/sa/admin",  # two identities in one certificate
    'URI="unterminated', "no-equals-sign",
])
def test_parse_xfcc_refuses_ambiguous_or_broken(bad: str) -> None:
    with pytest.raises(XfccError):
        parse_xfcc(bad)


def test_strip_prefix() -> None:
    assert strip_prefix("/v1/orders?x=1", "") == "/v1/orders?x=1"
    assert strip_prefix("/authz/v1/orders", "/authz") == "/v1/orders"
    assert strip_prefix("/authz/v1/orders", "/authz/") == "/v1/orders"
    assert strip_prefix("/authz?x", "/authz") == "/?x"
    assert strip_prefix("/authzfoo/x", "/authz") is None
    assert strip_prefix("/other/x", "/authz") is None


def test_trusted_proxies() -> None:
    t = TrustedProxies.parse(["10.0.0.0/8", "127.0.0.2", f"{TD}/ns/istio-system/sa/*", f"{TD}/ns/a/sa/gw"])
    assert t.trusts("10.1.2.3", "") and t.trusts("127.0.0.2", "") and t.trusts("::ffff:10.0.0.1", "")
    assert not t.trusts("127.0.0.1", "") and not t.trusts("", "") and not t.trusts("bogus", "")
    assert t.trusts("", f"{TD}/ns/istio-system/sa/ingress") and t.trusts("", f"{TD}/ns/a/sa/gw")
    assert not t.trusts("", f"{TD}/ns/a/sa/gw2") and not t.trusts("192.168.0.1", f"{TD}/ns/b/sa/x")
    for bad in ("spiffe://*", "not-an-address", "10.0.0.0/33"):
        with pytest.raises(ValueError):
            TrustedProxies.parse([bad])


# --- served ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(tmp_path_factory.mktemp("http-authz"), "--trusted-proxy", f"{TRUSTED_SOURCE}/32",
                   "--http-authz-path-prefix", "/check")
    try:
        yield served
    finally:
        served.stop()


def connect(authz: Served, trusted: bool) -> http.client.HTTPConnection:
    source = (TRUSTED_SOURCE, 0) if trusted else ("127.0.0.1", 0)
    return http.client.HTTPConnection("127.0.0.1", authz.authz_port, timeout=10, source_address=source)


def ask(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]
        ) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def test_trusted_proxy_xfcc_decides(authz: Served) -> None:
    conn = connect(authz, trusted=True)
    try:
        status, headers, body = ask(conn, "POST", "/check/v1/tenants/acme/orders",
                                    {"Host": "orders.prod", "X-Forwarded-Client-Cert": XFCC})
        assert (status, body) == (200, b"")
        assert headers["x-authz-principal"] == CHECKOUT and headers["x-authz-tenant"] == "acme"
        # Same connection (keep-alive): a route that needs no tenant removes x-authz-tenant.
        status, headers, _ = ask(conn, "POST", "/check/v1/orders",
                                 {"Host": "orders.prod", "X-Forwarded-Client-Cert": XFCC})
        assert status == 200 and headers["x-envoy-auth-headers-to-remove"] == "x-authz-tenant"
        # Policy deny: checkout-api may not read orders.
        status, headers, body = ask(conn, "GET", "/check/v1/orders/7",
                                    {"Host": "orders.prod", "X-Forwarded-Client-Cert": XFCC})
        assert status == 403 and headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer == {"decision_id": headers["x-authz-decision-id"], "reason": "no allow rule matched"}
    finally:
        conn.close()


def test_untrusted_hop_xfcc_is_ignored(authz: Served) -> None:
    conn = connect(authz, trusted=False)
    try:
        status, headers, body = ask(conn, "POST", "/check/v1/tenants/acme/orders",
                                    {"Host": "orders.prod", "X-Forwarded-Client-Cert": XFCC})
    finally:
        conn.close()
    assert status == 403 and "x-authz-principal" not in headers
    decision_id = json.loads(body)["decision_id"]
    record = wait_for("the audit record", lambda: [
        json.loads(line) for line in authz.audit_records() if decision_id in line])[0]
    assert record["source_principal"] is None and record["caller"] == "envoy_http"
    assert "caller=\"envoy_http\"" in authz.metrics()


def test_path_outside_prefix_and_bad_xfcc_deny(authz: Served) -> None:
    conn = connect(authz, trusted=True)
    try:
        status, _, body = ask(conn, "POST", "/v1/tenants/acme/orders",
                              {"Host": "orders.prod", "X-Forwarded-Client-Cert": XFCC})
        assert status == 403 and "configured prefix" in json.loads(body)["reason"]
    finally:
        conn.close()
    conn = connect(authz, trusted=True)
    try:
        status, _, body = ask(conn, "POST", "/check/v1/tenants/acme/orders",
                              {"Host": "orders.prod", "X-Forwarded-Client-Cert": f"URI={CHECKOUT};URI={ORDERS}"})
        assert status == 403 and "x-forwarded-client-cert" in json.loads(body)["reason"]
    finally:
        conn.close()


def raw(authz: Served, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", authz.authz_port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.parametrize(("data", "status"), [
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET /check/ HTTP/1.1\r\n\r\n", b"400"),  # no host
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
def test_malformed_http_is_denied_and_closed(authz: Served, data: bytes, status: bytes) -> None:
    answer = raw(authz, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"connection: close" in answer and b"x-authz-decision-id" in answer


def test_deny_rules_on_uncarried_attributes_deny_every_http_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A DENY rule on the caller's address cannot fire over HTTP (Envoy does not send it):
    rather than be looser than the gRPC path, every HTTP check is denied."""
    from bundle_factory import policy_set, write_bundle

    from authz.http_authz import UNCARRIED, connection_dependent

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    block = {"name": "block-net", "action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}
    by_port = {"name": "block-port", "action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}
    by_cel = {"name": "block-cel", "action": "DENY", "rules": [{"when": ["destination.port == 9000"]}]}
    assert connection_dependent(policy_set(tmp_path / "a", [allow])) is None
    assert connection_dependent(policy_set(tmp_path / "b", [allow, {**block, "dryRun": True}])) is None
    for i, p in enumerate((block, by_port, by_cel)):
        assert connection_dependent(policy_set(tmp_path / f"c{i}", [allow, p])) == p["name"]

    served = serve(tmp_path / "served", "--trusted-proxy", "127.0.0.2/32",
                   bundle=write_bundle(tmp_path / "bundle", [allow, block]))
    try:
        conn = connect(served, trusted=True)
        try:
            status, _, body = ask(conn, "GET", "/anything", {"Host": "a", "X-Forwarded-Client-Cert": XFCC})
        finally:
            conn.close()
        assert status == 403 and UNCARRIED in json.loads(body)["reason"]
    finally:
        served.stop()


def test_connection_bound_answers_503(tmp_path) -> None:  # type: ignore[no-untyped-def]
    served = serve(tmp_path, "--http-authz-max-connections", "2")
    held = [socket.create_connection(("127.0.0.1", served.authz_port), timeout=10) for _ in range(2)]
    try:
        # Both held connections are idle; the third is over the bound: answered 503 and closed.
        answer = raw(served, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503"), answer
    finally:
        for s in held:
            s.close()
        served.stop()


@pytest.mark.parametrize(("args", "message"), [
    (["--trusted-proxy", "10.0.0.0/8"], "--trusted-proxy needs --http-authz-addr"),
    (["--http-authz-addr", "127.0.0.1:0", "--trusted-proxy", "spiffe://cluster.local/ns/a/sa/b"],
     "needs mTLS on the HTTP ext_authz listener"),
    (["--http-authz-addr", "127.0.0.1:0", "--trusted-proxy", "not-an-address"], "neither spiffe://"),
    (["--http-authz-addr", "127.0.0.1:0", "--http-authz-path-prefix", "check"], "must start with '/'"),
])
def test_bad_flags_exit_2(tmp_path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from served import REPO, free_port

    proc = subprocess.run([sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{free_port()}",
                           "--http-addr", f"127.0.0.1:{free_port()}", "--audit-log", str(tmp_path / "a"), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
