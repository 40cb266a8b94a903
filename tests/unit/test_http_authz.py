"""HTTP ext_authz (Envoy's http_service protocol): XFCC believed only from a trusted proxy,
path_prefix, framing limits, keep-alive; decisions audited and counted as envoy_http.
The real Envoy in front of it is in tests/e2e/test_http_ext_authz.py."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from served import Served, serve, wait_for
from support.pki import forwarded_certificate

from authz.http_authz import TrustedProxies, Xfcc, XfccError, parse_xfcc, strip_prefix

TD = "spiffe://cluster.local"
ORDERS = f"{TD}/ns/prod/sa/orders-api"
CHECKOUT = f"{TD}/ns/prod/sa/checkout-api"
CERT = forwarded_certificate(CHECKOUT)  # URL-encoded PEM, as Envoy writes `Cert=`
XFCC = f'By={ORDERS};Hash=00ff;Cert="{CERT}";Subject="CN=checkout,O=a\\"b";URI={CHECKOUT}'
TRUSTED_SOURCE = "127.0.0.2"  # the test's stand-in for the proxy; 127.0.0.1 is anyone else


# --- pure parts ---------------------------------------------------------------------------


def test_parse_xfcc_takes_the_last_element() -> None:
    assert parse_xfcc(XFCC) == Xfcc(CHECKOUT, ORDERS, CERT, True)
    # An earlier element (written by whoever sent the request) never wins over the last one.
    spoof = f"URI={TD}/ns/prod/sa/admin;By={ORDERS};Cert=\"x\""
    assert parse_xfcc(f"{spoof},{XFCC}") == Xfcc(CHECKOUT, ORDERS, CERT, True)
    assert parse_xfcc(f'By={ORDERS};Subject="a,b;c=d";Cert={CERT};URI={CHECKOUT}') == Xfcc(CHECKOUT, ORDERS, CERT, True)
    assert parse_xfcc(f"By={ORDERS};Hash=1") == Xfcc("", ORDERS, "", True)  # a certificate without URI SAN
    assert parse_xfcc(f"By={ORDERS}") == Xfcc("", ORDERS)  # a plaintext caller


def test_a_certificate_that_splits_xfcc_is_refused() -> None:
    """Envoy writes URI SANs unquoted: a certificate whose URI SAN is `.../sa/x,URI=<other>`
    ends the proxy's element early, and the piece after it names another caller (with a
    `Cert=` of that caller's, which is public). With `Cert=` the certificate that split the
    header shows."""
    assert parse_xfcc(f"By={ORDERS};URI={CHECKOUT}") == Xfcc(CHECKOUT, ORDERS, "", True)  # Istio's sidecars send none
    admin = f"{TD}/ns/prod/sa/admin"
    crafted = forwarded_certificate(f"{TD}/ns/prod/sa/x,URI={admin};Cert={forwarded_certificate(admin)}")
    split = f'By={ORDERS};Hash=00;Cert="{crafted}";URI={TD}/ns/prod/sa/x,URI={admin};Cert={forwarded_certificate(admin)}'
    with pytest.raises(XfccError, match="XFCC delimiters"):
        parse_xfcc(split)
    for sep in (";", '"'):
        odd = forwarded_certificate(f"{TD}/ns/prod/sa/x{sep}y")
        with pytest.raises(XfccError, match="XFCC delimiters"):
            parse_xfcc(f'Cert="{odd}";URI={CHECKOUT},{XFCC}')
    with pytest.raises(XfccError, match="more elements"):
        parse_xfcc(",".join([XFCC] * 17))


@pytest.mark.parametrize("bad", [
    f"URI={CHECKOUT};URI={TD}/ns/prod/sa/admin",  # two identities in one certificate
    f'URI={CHECKOUT};Cert="a";Cert="b"',  # two certificates
    'URI="unterminated', "no-equals-sign",
])
def test_parse_xfcc_refuses_ambiguous_or_broken(bad: str) -> None:
    with pytest.raises(XfccError):
        parse_xfcc(bad)


def test_a_broken_xfcc_is_not_quoted_in_the_reason() -> None:
    """The reason goes to the client, the audit record and a metric label: a token sent
    where the certificate should be must not end up there."""
    with pytest.raises(XfccError) as info:
        parse_xfcc("Bearer eyJhbGciOiJIUzI1NiJ9.SECRETPART.sig")
    assert "SECRET" not in str(info.value) and "eyJ" not in str(info.value)


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


def test_a_denied_head_has_no_body(authz: Served) -> None:
    """The JSON body of a denied HEAD was read by Envoy as the start of the next answer on
    the connection ("extraneous data"): it dropped the pooled connection."""
    head = (f"HEAD /check/v1/orders/7 HTTP/1.1\r\nHost: orders.prod\r\nX-Forwarded-Client-Cert: {XFCC}\r\n\r\n"
            f"GET /check/v1/orders/7 HTTP/1.1\r\nHost: orders.prod\r\nX-Forwarded-Client-Cert: {XFCC}\r\n"
            "Connection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", authz.authz_port), timeout=10, source_address=(TRUSTED_SOURCE, 0)) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 403") and b"content-length: " in first
    assert rest.startswith(b"HTTP/1.1 403"), rest[:80]  # the next answer, not the HEAD's body
    assert b'"reason": "no allow rule matched"' in rest or b'"no allow rule matched"' in rest


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
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nContent-Length: \xc2\xb2\r\n\r\n", b"413"),  # '\u00b2'.isdigit()
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", b"413"),  # int() refuses
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-Pad: 1\nContent-Length: 9\r\n\r\n", b"400"),  # a bare LF
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", b"400"),
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX(a)@b: 1\r\n\r\n", b"400"),  # no token
    (b"GET /check/ HTTP/1.1x\r\nHost: a\r\n\r\n", b"400"),
    (b"GET /check/ HTTP/1.1\r\nHost: admin.example.com\r\nHost: x\r\n\r\n", b"400"),
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-User: zo\xeb\r\n\r\n", b"400"),  # latin-1, not UTF-8
    (b"GET /check/x/\xc0\xaf HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),  # an overlong '/', raw
    (b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
def test_malformed_http_is_denied_and_closed(authz: Served, data: bytes, status: bytes) -> None:
    answer = raw(authz, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"connection: close" in answer and b"x-authz-decision-id" in answer


def test_rules_on_uncarried_attributes_deny_every_http_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A DENY rule on the caller's address cannot fire over HTTP (Envoy does not send it), and
    an ALLOW rule on `notPorts` would match any port: rather than be looser than the gRPC
    path, every HTTP check is denied while such a bundle serves."""
    from bundle_factory import policy_set, write_bundle

    from authz.check import UNCARRIED

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    block = {"name": "block-net", "action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}
    by_port = {"name": "block-port", "action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}
    by_cel = {"name": "block-cel", "action": "DENY", "rules": [{"when": ["destination.port == 9000"]}]}
    not_port = {"name": "not-admin-port", "action": "ALLOW", "rules": [{"to": [{"operation": {"notPorts": ["9000"]}}]}]}
    not_net = {"name": "not-net", "action": "ALLOW", "rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]}
    allow_cel = {"name": "allow-cel", "action": "ALLOW", "rules": [{"when": ["destination.port != 9000"]}]}
    on_port = {"name": "on-port", "action": "ALLOW", "target": {"ports": ["9000"]}, "rules": [{"name": "none",
               "when": ["false"]}]}
    remote = {"name": "block-remote", "action": "DENY", "rules": [{"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]}]}
    assert policy_set(tmp_path / "a", [allow]).needs_socket == ""
    assert policy_set(tmp_path / "b", [allow, {**block, "dryRun": True}]).needs_socket == ""
    # Positive socket matchers of an ALLOW rule only fail to match without the attributes.
    only_ports = {"name": "only-port", "action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    assert policy_set(tmp_path / "p", [only_ports]).needs_socket == ""
    for i, p in enumerate((block, by_port, by_cel, not_port, not_net, allow_cel, on_port)):
        assert policy_set(tmp_path / f"c{i}", [allow, p]).needs_socket == p["name"]
    with_remote = policy_set(tmp_path / "r", [allow, remote])
    assert (with_remote.needs_socket, with_remote.needs_remote_address) == ("", "block-remote")

    served = serve(tmp_path / "served", "--trusted-proxy", "127.0.0.2/32",
                   bundle=write_bundle(tmp_path / "bundle", [not_port]))
    try:
        conn = connect(served, trusted=True)
        try:
            status, _, body = ask(conn, "GET", "/anything", {"Host": "a", "X-Forwarded-Client-Cert": XFCC})
        finally:
            conn.close()
        assert status == 403 and UNCARRIED in json.loads(body)["reason"]
    finally:
        served.stop()
    # A DENY on the caller's address holds when x-forwarded-for names it; without it, deny.
    served = serve(tmp_path / "served2", "--trusted-proxy", "127.0.0.2/32",
                   bundle=write_bundle(tmp_path / "bundle2", [allow, remote]))
    try:
        conn = connect(served, trusted=True)
        try:
            answers = [ask(conn, "GET", "/x", {"Host": "a", "X-Forwarded-Client-Cert": XFCC, **extra})
                       for extra in ({}, {"X-Forwarded-For": "10.1.2.3"}, {"X-Forwarded-For": "192.0.2.7"})]
        finally:
            conn.close()
        reasons = [(status, json.loads(body)["reason"] if body else "") for status, _, body in answers]
        assert reasons[0] == (403, UNCARRIED)
        assert reasons[1] == (403, "denied by policy")
        assert reasons[2][0] == 200, reasons
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


def test_a_malformed_reason_names_nothing_the_client_chose(authz: Served) -> None:
    """The reason is a metric label: naming the header made one series per request (240 MB
    of /metrics from 2,000 requests with long names)."""
    for i in range(3):
        answer = raw(authz, b"GET /check/ HTTP/1.1\r\nHost: a\r\nX-Attacker-%d: zo\xeb\r\n\r\n" % i)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    with urllib.request.urlopen(f"http://127.0.0.1:{authz.http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "x-attacker" not in metrics.lower()
    assert 'reason="malformed request: a header value is not UTF-8"' in metrics


def test_utf8_header_values_are_decided_as_envoy_sends_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Read as latin-1, `zoë` was `zoÃ«` and a DENY on it never fired over HTTP."""
    from bundle_factory import write_bundle

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    deny = {"name": "no-zoe", "action": "DENY", "rules": [{"to": [{"operation": {"headers": {"x-user": ["zoë"]}}}]}]}
    served = serve(tmp_path / "served", "--http-authz-headers", "x-user",
                   bundle=write_bundle(tmp_path / "bundle", [allow, deny]))
    try:
        answer = raw(served, "GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\nx-user: zoë\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert b"denied by policy" in answer
    finally:
        served.stop()


def test_a_trusted_proxy_pattern_stays_within_its_path_segment() -> None:
    """A string prefix `.../ns/prod*` trusted `.../ns/production-evil`, which could then write
    the caller's identity in x-forwarded-client-cert."""
    t = TrustedProxies.parse(["spiffe://cluster.local/ns/prod/sa/envoy*"])
    assert t.trusts("", "spiffe://cluster.local/ns/prod/sa/envoy-1")
    assert not t.trusts("", "spiffe://cluster.local/ns/prod/sa/envoy-1/x")
    t = TrustedProxies.parse(["spiffe://cluster.local/ns/prod*/sa/envoy"])
    assert not t.trusts("", "spiffe://cluster.local/ns/production-evil/sa/envoy/x")
    with pytest.raises(ValueError, match="--trusted-proxy"):
        TrustedProxies.parse(["spiffe://cluster.local*"])


def test_what_envoy_does_not_forward_cannot_loosen_a_decision(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Envoy's HTTP filter forwards only its allowed_headers, never the client's protocol,
    scheme or context extensions, and adds x-envoy-internal: true to every call. A DENY on a
    header it did not forward, on HTTP/1.0 or on a context extension never fired, and an
    ALLOW on x-envoy-internal allowed everything: every HTTP check now denies while such a
    bundle serves, unless --http-authz-headers names the header."""
    from bundle_factory import write_bundle

    from authz.check import UNCARRIED_REQUEST

    allow = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
    debug = {"name": "no-debug", "action": "DENY", "rules": [{"to": [{"operation": {"headers": {"x-debug": ["*"]}}}]}]}
    http10 = {"name": "no-http10", "action": "DENY", "rules": [{"when": ["request.protocol == 'HTTP/1.0'"]}]}
    ctx = {"name": "public", "action": "DENY", "target": {"contextExtensions": {"listener": "public"}},
           "rules": [{"name": "all"}]}
    internal = {"name": "internal", "action": "ALLOW", "rules": [{"to": [{"operation": {
        "headers": {"x-envoy-internal": ["true"]}}}]}]}
    cases = [([allow, debug], (), UNCARRIED_REQUEST), ([allow, http10], (), UNCARRIED_REQUEST),
             ([allow, ctx], (), UNCARRIED_REQUEST), ([internal], (), UNCARRIED_REQUEST),
             ([allow, debug], ("--http-authz-headers", "x-request-id,x-debug"), "denied by policy")]
    for i, (policies, flags, reason) in enumerate(cases):
        served = serve(tmp_path / f"s{i}", *flags, bundle=write_bundle(tmp_path / f"b{i}", policies))
        try:
            answer = raw(served, b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\nx-debug: 1\r\n"
                                 b"x-envoy-internal: true\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 403"), (i, answer[:300])
            assert reason.encode() in answer, (i, answer[-300:])
        finally:
            served.stop()


def test_a_uri_in_xfcc_must_be_the_certificates() -> None:
    """The URI the proxy's element names is the caller only if it is its certificate's URI SAN."""
    from authz.http_authz import to_check_request
    from authz.request import MalformedRequest, from_check_request
    from authz.spiffe import TrustDomains

    crafted = (f"By={ORDERS};URI={TD}/ns/evil/sa/x;Cert={CERT},By={ORDERS};URI={CHECKOUT};Cert={CERT}")
    assert parse_xfcc(crafted).uri == CHECKOUT  # two elements: the last one is read
    odd = f"{TD}/ns/evil/sa/x%2C"
    cr, _ = to_check_request("GET", "/", {"host": "a", "x-forwarded-client-cert": f"Cert={CERT};URI={odd}"}, True)
    with pytest.raises(MalformedRequest, match="not the client certificate's URI SAN"):
        from_check_request(cr, TrustDomains("cluster.local"))
    upper = "spiffe://CLUSTER.LOCAL/ns/prod/sa/x"  # no SPIFFE ID, but a URI SAN Istio reads
    assert parse_xfcc(f"Cert={CERT};URI={upper}").uri == upper


def test_a_prefix_ending_in_a_slash_leaves_the_path_as_sent() -> None:
    """Envoy sends path_prefix + path: '/check/' + '/a' is '/check//a', which was read as '//a'."""
    assert strip_prefix("/check//a/any", "/check/") == "/a/any"
    assert strip_prefix("/check/a", "/check/") == "/a"
    assert strip_prefix("/check/a", "/check") == "/a"
    assert strip_prefix("/checkx/a", "/check") is None


OPEN = {"name": "open", "action": "ALLOW", "rules": [{"name": "all"}]}
EVIL = "spiffe://cluster.local/ns/evil/sa/x"


@pytest.mark.parametrize(("policies", "headers"), [
    # a tenant from a header Envoy did not forward: no tenant, no tenant check
    ([{"name": "t", "action": "ALLOW", "tenant": {"header": "x-tenant"}, "rules": [{"name": "all"}]}],
     {"x-tenant": "nope"}),
    # request.id is x-request-id's value
    ([OPEN, {"name": "d", "action": "DENY", "rules": [{"when": ["request.id.startsWith('bad')"]}]}],
     {"x-request-id": "bad-1"}),
    # names in a comment or a string are no reads; a concatenated key is not its last literal
    ([OPEN, {"name": "d", "action": "DENY", "rules": [{"when": [
        "size(request.headers) > 1 // unlike request.headers['x-request-id']"]}]}], {"x-a": "1"}),
    ([OPEN, {"name": "d", "action": "DENY", "rules": [{"when": ["'x-debug-' + 'host' in request.headers"]}]}],
     {"x-debug-host": "1"}),
    # an AUDIT condition's error denies too
    ([OPEN, {"name": "a", "action": "AUDIT", "rules": [{"when": [
        "'x-n' in request.headers && int(request.headers['x-n']) > 5"]}]}], {"x-n": "abc"}),
    # an ALLOW's positive header decides which rule, with its condition, is reached first
    ([{"name": "p", "action": "ALLOW", "rules": [
        {"name": "v2", "to": [{"operation": {"headers": {"x-v": ["2"]}}}], "when": ["int(request.query) > 0"]},
        {"name": "all"}]}], {"x-v": "2"}),
])
def test_http_checks_deny_while_the_bundle_reads_what_envoy_did_not_forward(
        tmp_path, policies: list[dict], headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Each of these is denied by Envoy's gRPC check of the request; over HTTP (the headers
    not forwarded) it was allowed."""
    from bundle_factory import check_request
    from test_checker import checker

    from support.pki import forwarded_certificate

    from authz.check import UNCARRIED_CERTIFICATE, UNCARRIED_REQUEST
    from authz.http_authz import HttpAuthzServer, TrustedProxies, to_check_request

    c = checker(tmp_path, policies, tenants={"acme": {"callers": [EVIL]}})
    grpc_answer = c.run(check_request(path="/x?abc", headers=headers, principal=EVIL))
    assert not grpc_answer.decision.allowed
    server = HttpAuthzServer(c, "127.0.0.1:0", TrustedProxies(), headers=frozenset({"x-user"}))
    http = c.run(to_check_request("GET", "/x?abc", {"host": "app"}, False)[0], caller="envoy_http", socket=False,
                 carries=server.carries_trusted)
    assert (http.decision.allowed, http.decision.reason) == (False, UNCARRIED_REQUEST)


def test_the_principal_is_carried_only_from_a_trusted_proxy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without a believed x-forwarded-client-cert the request has no principal: a DENY on the
    caller never fired and an ALLOW's notPrincipals matched."""
    from test_checker import checker

    from support.pki import forwarded_certificate

    from authz.check import UNCARRIED_CERTIFICATE, UNCARRIED_REQUEST
    from authz.http_authz import HttpAuthzServer, TrustedProxies, to_check_request

    deny = {"name": "d", "action": "DENY", "rules": [{"from": [{"source": {"principals": [EVIL]}}]}]}
    c = checker(tmp_path, [OPEN, deny])
    server = HttpAuthzServer(c, "127.0.0.1:0", TrustedProxies())

    def run(xfcc: str, trusted: bool):  # type: ignore[no-untyped-def]
        cr, unseen = to_check_request("GET", "/x", {"host": "app", "x-forwarded-client-cert": xfcc}, trusted)
        carries = server.carries if not trusted else server.carries_unseen if unseen else server.carries_trusted
        return c.run(cr, caller="envoy_http", socket=False, carries=carries).decision

    xfcc = f'URI={EVIL};Cert="{forwarded_certificate(EVIL)}"'
    assert run(xfcc, False).reason == UNCARRIED_REQUEST
    assert run(xfcc, True).reason == "denied by policy"
    # The certificate is what a gRPC check's include_peer_certificate forwards: without it a
    # DNS SAN or subject naming EVIL would go unseen (Envoy's RBAC denies on it).
    assert run(f"URI={EVIL}", True).reason == UNCARRIED_CERTIFICATE
    checkout_only = {"name": "a", "action": "ALLOW", "rules": [{"from": [{"source": {"principals": [EVIL]}}]}]}
    only = checker(tmp_path / "a", [checkout_only])
    cr, unseen = to_check_request("GET", "/x", {"host": "app", "x-forwarded-client-cert": f"URI={EVIL}"}, True)
    assert unseen and only.run(cr, caller="envoy_http", socket=False, carries=server.carries_unseen).decision.allowed
    checkout = "spiffe://cluster.local/ns/prod/sa/checkout"
    assert run(f'URI={checkout};Cert="{forwarded_certificate(checkout)}"', True).allowed
    hidden = forwarded_certificate(checkout, EVIL)
    assert run(f'URI={checkout};Cert="{hidden}"', True).reason.startswith("malformed request: client certificate")
    other = forwarded_certificate(EVIL)  # a URI that is not the certificate's
    assert run(f'URI={checkout};Cert="{other}"', True).reason.startswith("malformed request: caller principal")


@pytest.mark.parametrize("name", ["x-envoy-peer-metadata-id", "upgrade", "te", "content-length",
                                  "x-forwarded-client-cert", "traceparent", "*", ":scheme"])
def test_headers_that_do_not_reach_authz_as_sent_cannot_be_declared(name: str) -> None:
    from authz.http_authz import header_names_problem

    assert header_names_problem(frozenset({name})) is not None
    assert header_names_problem(frozenset({"x-debug"})) is None


def test_the_headers_that_name_another_method_path_or_host_must_be_carried(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Over gRPC, `x-http-method-override: DELETE` meets a DENY on DELETE (and so do
    X-Original-URL and X-Forwarded-Host a DENY on their path and host); over HTTP, where Envoy
    forwards only its allowed_headers, the same request was allowed. Not carried, they deny."""
    from test_checker import checker

    from authz.check import UNCARRIED_REQUEST
    from authz.http_authz import DEFAULT_HEADERS, HttpAuthzServer, TrustedProxies, to_check_request

    no_delete = {"name": "d", "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}
    c = checker(tmp_path, [OPEN, no_delete])
    bare = HttpAuthzServer(c, "127.0.0.1:0", TrustedProxies(), headers=frozenset({"x-request-id"}))
    shipped = HttpAuthzServer(c, "127.0.0.1:0", TrustedProxies(), headers=DEFAULT_HEADERS)

    def run(server: HttpAuthzServer, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        cr, _ = to_check_request("POST", "/x", {"host": "app", **headers}, False)
        return c.run(cr, caller="envoy_http", socket=False, carries=server.carries).decision

    assert run(bare, {}).reason == UNCARRIED_REQUEST
    assert run(shipped, {}).allowed
    assert run(shipped, {"x-http-method-override": "DELETE"}).reason == "denied by policy"


def test_xfcc_names_envoys_rbac_reads_as_identities_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Envoy's RBAC matches principals and namespaces on every DNS SAN and the subject; XFCC
    (as Istio's sidecars write it, without Cert=) shows them, and they are read as a gRPC
    check reads the forwarded certificate. A certificate with no URI SAN is still one the
    caller presented: under a bundle its other names could decide, it is denied."""
    from test_checker import checker

    from authz.check import UNCARRIED_CERTIFICATE
    from authz.http_authz import HttpAuthzServer, TrustedProxies, to_check_request

    for bad in (f'Hash=00;Subject="CN=x/ns/blocked/y";URI={CHECKOUT}',
                f"Hash=00;URI={CHECKOUT};DNS=spiffe://cluster.local/ns/prod/sa/evil",
                f"Hash=00;URI={CHECKOUT};DNS=x/ns/blocked/y",
                f"By={ORDERS};Hash=00;URI={CHECKOUT};By={TD}/ns/prod/sa/other",  # By= twice
                f'By={ORDERS};Cert="{CERT}";URI={TD}/ns/a/sa/x,URI={CHECKOUT}',  # the last without Cert=
                f'Cert="{forwarded_certificate(CHECKOUT, "x,By=a;URI=b")}";URI={CHECKOUT}'):  # DNS SAN with ','
        with pytest.raises(XfccError):
            parse_xfcc(bad)
    deny = {"name": "d", "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["blocked"]}}]}]}
    c = checker(tmp_path, [OPEN, deny])
    server = HttpAuthzServer(c, "127.0.0.1:0", TrustedProxies())
    cr, unseen = to_check_request("GET", "/x", {"host": "a", "x-forwarded-client-cert": "Hash=00;URI="}, True)
    assert unseen
    assert c.run(cr, caller="envoy_http", socket=False, carries=server.carries_unseen).decision.reason == UNCARRIED_CERTIFICATE


def test_a_certificate_cryptography_cannot_read_is_a_deny_with_a_reason() -> None:
    """A certificate with two SAN extensions raised DuplicateExtension (no ValueError): the
    connection was reset without an answer or an audit record."""
    import datetime as dt
    import urllib.parse

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from authz.http_authz import to_check_request

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CHECKOUT)])
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
               .public_key(key.public_key()).serial_number(1).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(hours=1)).add_extension(san, critical=False))
    builder._extensions.append(builder._extensions[0])  # two SAN extensions: what a builder refuses to make
    pem = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    dup = urllib.parse.quote(pem)
    xfcc = f'Hash=00;Cert="{dup}";URI={CHECKOUT}'
    cr, unseen = to_check_request("GET", "/", {"host": "a", "x-forwarded-client-cert": xfcc}, True)
    from authz.request import MalformedRequest, from_check_request
    from authz.spiffe import TrustDomains
    with pytest.raises(MalformedRequest, match="not the client certificate's URI SAN"):
        from_check_request(cr, TrustDomains("cluster.local"))
