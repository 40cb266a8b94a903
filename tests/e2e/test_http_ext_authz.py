"""End-to-end: client --mTLS--> Envoy --ext_authz http_service (mTLS, SPIFFE)--> authz serve.

    client ──mTLS──▶ Envoy "proxy" (trusted: its SPIFFE ID is --trusted-proxy)
                       ├─ ext_authz http_service ──mTLS──▶ authz --http-authz-addr (path_prefix /check)
                       └─ router ──▶ echo upstream
    client ──mTLS──▶ Envoy "rogue" (not trusted; forwards the client's own x-forwarded-client-cert)
                       └─ ext_authz http_service ──mTLS──▶ the same authz

Envoy sets x-forwarded-client-cert (SANITIZE_SET: By = its own URI SAN, URI = the client's)
before ext_authz runs; authz believes it only from the trusted proxy identity.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.pki import CLIENTS, PKI, SERVERS, CertKey, generate_pki, issue, spiffe_id

from authz.request import OVERRIDING_HEADERS

from .harness import (
    LOCALHOST,
    ORDERS,
    AuthzProcess,
    EchoUpstream,
    EnvoyProcess,
    ListenerSpec,
    Response,
    SeenRequest,
    free_port,
    https_request,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_BUNDLE = REPO_ROOT / "policies" / "example"
CHECKOUT = CLIENTS["checkout-api"]
PROXY_ID = spiffe_id("mesh", "envoy-proxy")
ROGUE_ID = spiffe_id("mesh", "rogue-proxy")
AUTHZ_ID = spiffe_id("authz-system", "authz")
PREFIX = "/check"


class HttpAuthzEnvoy(EnvoyProcess):
    """The harness's Envoy, with ext_authz over http_service (mTLS to authz) instead of gRPC."""

    def __init__(self, workdir: Path, pki: PKI, authz_port: int, upstream_port: int, identity: CertKey,
                 forward_client_cert: str = "SANITIZE_SET", extra_upstream_headers: list[str] | None = None) -> None:
        super().__init__(workdir, pki, [ListenerSpec(ORDERS, pki.servers["orders-api"])],
                         authz_grpc_port=authz_port, upstream_port=upstream_port)
        self.identity = identity
        self.forward_client_cert = forward_client_cert
        self.extra_upstream_headers = extra_upstream_headers or []

    def bootstrap(self) -> dict[str, Any]:
        config = super().bootstrap()
        for listener in config["static_resources"]["listeners"]:
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["forward_client_cert_details"] = self.forward_client_cert
            for f in hcm["http_filters"]:
                if f["name"] == "envoy.filters.http.ext_authz":
                    f["typed_config"] = self._ext_authz()
        clusters = config["static_resources"]["clusters"]
        authz = next(c for c in clusters if c["name"] == "authz")
        authz.pop("typed_extension_protocol_options", None)  # HTTP/1.1
        authz["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": str(self.identity.cert)},
                                          "private_key": {"filename": str(self.identity.key)}}],
                    "validation_context": {
                        "trusted_ca": {"filename": str(self.pki.ca_cert)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": AUTHZ_ID}}],
                    },
                },
            },
        }
        return config

    def _ext_authz(self) -> dict[str, Any]:
        upstream = [{"prefix": "x-authz-"}] + [{"exact": h} for h in self.extra_upstream_headers]
        return {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "allowed_headers": {"patterns": [
                {"exact": "x-forwarded-client-cert"}, {"exact": "x-request-id"},
                {"exact": "x-test-marker"}, {"prefix": "x-tenant"},
                *({"exact": h} for h in sorted(OVERRIDING_HEADERS))]},
            "http_service": {
                "server_uri": {"uri": f"https://{LOCALHOST}:{self.authz_grpc_port}", "cluster": "authz",
                               "timeout": "2s"},
                "path_prefix": PREFIX,
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": upstream},
                    "allowed_client_headers": {"patterns": [
                        {"exact": "content-type"}, {"exact": "x-authz-decision-id"}]},
                },
            },
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki-http"),
                        servers={**SERVERS, "authz": AUTHZ_ID},
                        clients={**CLIENTS, "envoy-proxy": PROXY_ID, "rogue-proxy": ROGUE_ID})


def authz_args(pki: PKI, port: int) -> list[str]:
    return ["--http-authz-addr", f"{LOCALHOST}:{port}", "--http-authz-path-prefix", PREFIX,
            "--http-authz-tls-cert", str(pki.servers["authz"].cert),
            "--http-authz-tls-key", str(pki.servers["authz"].key),
            "--http-authz-client-ca", str(pki.ca_cert), "--trusted-proxy", PROXY_ID]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Deployment:
    def __init__(self, pki: PKI, upstream: EchoUpstream, authz: AuthzProcess, envoy: HttpAuthzEnvoy,
                 rogue: HttpAuthzEnvoy | None, authz_port: int) -> None:
        self.pki, self.upstream, self.authz, self.envoy, self.rogue = pki, upstream, authz, envoy, rogue
        self.authz_port = authz_port

    def call(self, client: str, method: str, path: str, headers: dict[str, str] | None = None,
             via: HttpAuthzEnvoy | None = None) -> tuple[Response, list[SeenRequest]]:
        marker = uuid.uuid4().hex
        envoy = via or self.envoy
        resp = https_request(envoy.port(ORDERS), method, path, ca_cert=self.pki.ca_cert,
                             client=self.pki.clients[client],
                             headers={"x-test-marker": marker, **(headers or {})})
        return resp, self.upstream.seen(marker=marker)


def deploy(tmp: Path, pki: PKI, upstream: EchoUpstream, bundle: Path, rogue: bool,
           extra_upstream_headers: list[str] | None = None) -> Deployment:
    port = free_port()
    authz = AuthzProcess(bundle, tmp / "authz", extra_args=authz_args(pki, port)).start()
    envoys: list[HttpAuthzEnvoy] = []
    try:
        wait_port(port)
        envoys.append(HttpAuthzEnvoy(tmp / "envoy", pki, port, upstream.port, pki.clients["envoy-proxy"],
                                     extra_upstream_headers=extra_upstream_headers).start())
        if rogue:
            # A hop that is not trusted and passes on whatever x-forwarded-client-cert it is sent.
            envoys.append(HttpAuthzEnvoy(tmp / "rogue", pki, port, upstream.port, pki.clients["rogue-proxy"],
                                         forward_client_cert="ALWAYS_FORWARD_ONLY").start())
    except BaseException:
        for e in envoys:
            e.stop()
        authz.stop()
        raise
    return Deployment(pki, upstream, authz, envoys[0], envoys[1] if rogue else None, port)


def stop(d: Deployment) -> None:
    for e in (d.envoy, d.rogue):
        if e is not None:
            e.stop()
    d.authz.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, pki: PKI, upstream: EchoUpstream) -> Iterator[Deployment]:
    d = deploy(tmp_path_factory.mktemp("http-mesh"), pki, upstream, EXAMPLE_BUNDLE, rogue=True)
    try:
        yield d
    finally:
        stop(d)


def audit_record(d: Deployment, decision_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in d.authz.stdout_path.read_text().splitlines():
            if decision_id in line and line.startswith("{"):
                return dict(json.loads(line))
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {decision_id}")


def test_allowed_call_reaches_upstream_with_authz_headers(mesh: Deployment) -> None:
    resp, seen = mesh.call("checkout-api", "POST", "/v1/tenants/acme/orders",
                           headers={"x-authz-tenant": "forged", "x-authz-principal": "forged"})
    assert resp.status == 200, resp
    assert len(seen) == 1
    req = seen[0]
    # The upstream sees the original path (not authz's path_prefix) and authz's own headers,
    # never the client's forged ones.
    assert req.path == "/v1/tenants/acme/orders"
    assert req.header_values("x-authz-principal") == [CHECKOUT]
    assert req.header_values("x-authz-tenant") == ["acme"]
    record = audit_record(mesh, req.header("x-authz-decision-id") or "")
    assert record["caller"] == "envoy_http" and record["allowed"] is True
    assert record["source_principal"] == CHECKOUT
    assert record["destination_principal"] == SERVERS["orders-api"]
    assert record["path"] == "/v1/tenants/acme/orders"


def test_policy_deny_is_403_with_json_body(mesh: Deployment) -> None:
    resp, seen = mesh.call("checkout-api", "GET", "/v1/orders/7")  # checkout may not read orders
    assert resp.status == 403 and seen == []
    body = resp.json()
    assert body == {"decision_id": resp.headers["x-authz-decision-id"], "reason": "no allow rule matched"}
    assert resp.headers["content-type"] == "application/json"


def test_wrong_tenant_is_denied(mesh: Deployment) -> None:
    resp, seen = mesh.call("checkout-api", "POST", "/v1/tenants/globex/orders")  # acme's caller only
    assert resp.status == 403 and seen == []
    resp, seen = mesh.call("billing", "POST", "/v1/tenants/globex/orders")  # globex's caller
    assert resp.status == 200 and seen[0].header("x-authz-tenant") == "globex"


def test_client_xfcc_through_the_trusted_proxy_is_replaced(mesh: Deployment) -> None:
    # The stranger claims to be checkout-api; Envoy (SANITIZE_SET) replaces the header with
    # what the stranger's certificate says, so the claim never reaches authz.
    spoof = f"By={SERVERS['orders-api']};URI={CHECKOUT}"
    resp, seen = mesh.call("stranger", "POST", "/v1/tenants/acme/orders",
                           headers={"x-forwarded-client-cert": spoof})
    assert resp.status == 403 and seen == []
    record = audit_record(mesh, resp.headers["x-authz-decision-id"])
    assert record["source_principal"] == CLIENTS["stranger"]


def test_spoofed_xfcc_from_an_untrusted_hop_is_ignored(mesh: Deployment) -> None:
    assert mesh.rogue is not None
    spoof = f"By={SERVERS['orders-api']};URI={CHECKOUT}"
    # Through the untrusted Envoy, which forwards the client's header unchanged: the same call
    # the trusted proxy allows for checkout-api is denied, and authz saw no principal.
    resp, seen = mesh.call("stranger", "POST", "/v1/tenants/acme/orders",
                           headers={"x-forwarded-client-cert": spoof}, via=mesh.rogue)
    assert resp.status == 403 and seen == []
    record = audit_record(mesh, resp.headers["x-authz-decision-id"])
    assert record["source_principal"] is None and record["caller"] == "envoy_http"
    # Straight to authz with a mesh certificate that is not the trusted proxy's: ignored too.
    direct = https_request(mesh.authz_port, "POST", PREFIX + "/v1/tenants/acme/orders",
                           ca_cert=mesh.pki.ca_cert, client=mesh.pki.clients["checkout-api"],
                           headers={"x-forwarded-client-cert": spoof, "host": "orders"})
    assert direct.status == 403 and "x-authz-principal" not in direct.headers


def test_authz_stopped_is_403(tmp_path: Path, pki: PKI, upstream: EchoUpstream) -> None:
    d = deploy(tmp_path, pki, upstream, EXAMPLE_BUNDLE, rogue=False)
    try:
        resp, seen = d.call("checkout-api", "POST", "/v1/tenants/acme/orders")
        assert resp.status == 200 and len(seen) == 1
        d.authz.stop()
        resp, seen = d.call("checkout-api", "POST", "/v1/tenants/acme/orders")
        assert resp.status == 403 and seen == []
    finally:
        stop(d)


# --- policy-shaped responses, through Envoy over both protocols --------------------------------


def shaped_bundle(root: Path) -> Path:
    """The example bundle plus: the tenant rule tells the upstream the tenant's plan and strips
    a debug header; a DENY policy answers 404 with a message; every other deny is 401."""
    import shutil

    import yaml

    # Without the example's bundle tests: they expect the default 403 everywhere.
    shutil.copytree(EXAMPLE_BUNDLE, root, ignore=shutil.ignore_patterns("tests"))
    orders = root / "policies" / "orders-api.yaml"
    doc = yaml.safe_load(orders.read_text())
    rule = next(r for r in doc["rules"] if r["name"] == "tenant-callers")
    rule["upstreamHeaders"] = {"x-tenant-plan": "tenant.plan", "x-caller-sa": "source.service_account"}
    rule["removeHeaders"] = ["x-internal-debug"]
    orders.write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "policies" / "hidden.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Policy", "name": "hide-admin", "action": "DENY",
        "target": {"principals": [SERVERS["orders-api"]]},
        "denyResponse": {"status": 404, "message": "no such resource"},
        "rules": [{"name": "admin-paths", "to": [{"operation": {"paths": ["/v1/admin/{**}"]}}]}],
    }, sort_keys=False))
    (root / "policies" / "blocked.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Policy", "name": "no-blocked-namespace", "action": "DENY",
        "rules": [{"name": "blocked", "from": [{"source": {"namespaces": ["blocked"]}}]}],
    }, sort_keys=False))
    manifest = root / "bundle.yaml"
    m = yaml.safe_load(manifest.read_text())
    m["denyResponse"] = {"status": 401, "message": "present a workload identity this service accepts"}
    manifest.write_text(yaml.safe_dump(m, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory, pki: PKI, upstream: EchoUpstream
           ) -> Iterator[tuple[Deployment, EnvoyProcess]]:
    from .harness import listener_specs

    tmp = tmp_path_factory.mktemp("shaped")
    d = deploy(tmp, pki, upstream, shaped_bundle(tmp / "bundle"), rogue=False,
               extra_upstream_headers=["x-tenant-plan", "x-caller-sa"])
    grpc_envoy: EnvoyProcess | None = None
    try:
        grpc_envoy = EnvoyProcess(tmp / "envoy-grpc", pki, listener_specs(pki), authz_grpc_port=d.authz.grpc_port,
                                  upstream_port=upstream.port).start()
        yield d, grpc_envoy
    finally:
        if grpc_envoy is not None:
            grpc_envoy.stop()
        stop(d)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_policy_set_upstream_headers(shaped: tuple[Deployment, EnvoyProcess], protocol: str) -> None:
    d, grpc_envoy = shaped
    marker = uuid.uuid4().hex
    port = d.envoy.port(ORDERS) if protocol == "http" else grpc_envoy.port(ORDERS)
    resp = https_request(port, "POST", "/v1/tenants/acme/orders", ca_cert=d.pki.ca_cert,
                         client=d.pki.clients["checkout-api"],
                         headers={"x-test-marker": marker, "x-internal-debug": "1", "x-tenant-plan": "forged"})
    assert resp.status == 200, resp
    (seen,) = d.upstream.seen(marker=marker)
    assert seen.header_values("x-tenant-plan") == ["enterprise"]  # the tenant's plan, not the client's
    assert seen.header_values("x-caller-sa") == ["checkout-api"]
    assert seen.header("x-internal-debug") is None
    assert seen.header_values("x-authz-tenant") == ["acme"]
    # billing calls for globex (plan standard): evaluated per request.
    marker = uuid.uuid4().hex
    resp = https_request(port, "POST", "/v1/tenants/globex/orders", ca_cert=d.pki.ca_cert,
                         client=d.pki.clients["billing"], headers={"x-test-marker": marker})
    assert resp.status == 200 and d.upstream.seen(marker=marker)[0].header("x-tenant-plan") == "standard"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_policy_deny_statuses_and_messages(shaped: tuple[Deployment, EnvoyProcess], protocol: str) -> None:
    d, grpc_envoy = shaped
    port = d.envoy.port(ORDERS) if protocol == "http" else grpc_envoy.port(ORDERS)

    def call(client: str, method: str, path: str) -> tuple[Response, list[SeenRequest]]:
        marker = uuid.uuid4().hex
        r = https_request(port, method, path, ca_cert=d.pki.ca_cert, client=d.pki.clients[client],
                          headers={"x-test-marker": marker})
        return r, d.upstream.seen(marker=marker)

    resp, seen = call("checkout-api", "GET", "/v1/admin/users")  # the DENY policy: 404
    assert resp.status == 404 and seen == []
    body = resp.json()
    assert body == {"decision_id": resp.headers["x-authz-decision-id"], "reason": "denied by policy",
                    "message": "no such resource"}
    resp, seen = call("stranger", "POST", "/v1/orders")  # no allow rule: the bundle's 401
    assert resp.status == 401 and seen == []
    assert resp.json()["message"] == "present a workload identity this service accepts"
    for r in (resp,):
        text = r.body.decode()
        # No internals: policy and rule names, revision and principals stay in the audit log.
        assert "hide-admin" not in text and "admin-paths" not in text and "orders-api" not in text
        assert "spiffe://" not in text and "2026-11-25.1" not in text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_name_on_the_certificate_besides_its_uri_san_is_seen(
        shaped: tuple[Deployment, EnvoyProcess], protocol: str, tmp_path: Path) -> None:
    """Envoy's RBAC matches istiod's namespace regex `.*/ns/blocked/.*` on every SAN and the
    subject; ext_authz reports the URI SAN. authz reads the certificate Envoy forwards
    (include_peer_certificate over gRPC, XFCC `Cert=` over HTTP) and refuses one that names
    another identity, as Istio would deny it."""
    d, grpc_envoy = shaped
    port = d.envoy.port(ORDERS) if protocol == "http" else grpc_envoy.port(ORDERS)
    plain = issue(d.pki, tmp_path, "plain", CHECKOUT, server=False)
    assert https_request(port, "POST", "/v1/tenants/acme/orders", ca_cert=d.pki.ca_cert, client=plain).status == 200
    for name, extra in (("dns", {"dns": ("x/ns/blocked/y",)}), ("cn", {"subject_cn": "x/ns/blocked/y"})):
        hidden = issue(d.pki, tmp_path, name, CHECKOUT, server=False, **extra)  # type: ignore[arg-type]
        resp = https_request(port, "POST", "/v1/tenants/acme/orders", ca_cert=d.pki.ca_cert, client=hidden)
        assert resp.status == 401, (name, resp)  # the bundle's deny status
        record = audit_record(d, resp.headers["x-authz-decision-id"])
        assert record["reason"] == "malformed request: client certificate names more than one identity"


def test_a_uri_san_that_splits_xfcc_names_no_one(mesh: Deployment, tmp_path: Path) -> None:
    """Envoy writes URI SANs into XFCC unquoted: a certificate whose URI SAN is
    `.../sa/x,URI=<checkout-api>` ended the proxy's element early, and authz read the piece
    after it as the caller, checkout-api. Istio's RBAC (and a gRPC check) saw `.../sa/x,...`."""
    crafted = issue(mesh.pki, tmp_path, "split", f"{spiffe_id('prod', 'x')},URI={CHECKOUT}", server=False)
    marker = uuid.uuid4().hex
    resp = https_request(mesh.envoy.port(ORDERS), "POST", "/v1/tenants/acme/orders", ca_cert=mesh.pki.ca_cert,
                         client=crafted, headers={"x-test-marker": marker})
    assert resp.status == 403 and mesh.upstream.seen(marker=marker) == []
    record = audit_record(mesh, resp.headers["x-authz-decision-id"])
    assert "XFCC delimiters" in record["reason"], record["reason"]
