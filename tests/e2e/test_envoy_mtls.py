"""Envoy -> authz over mTLS: Envoy's authz cluster has an UpstreamTlsContext with its own
SPIFFE certificate and checks authz's; authz admits only the Envoy identities it was told to
(--allow-caller). An Envoy whose identity is not allowed gets every request denied."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pki import PKI, CertKey, issue, spiffe_id

from .conftest import EXAMPLE_BUNDLE
from .harness import (
    ORDERS,
    AuthzProcess,
    AuthzUpstreamTls,
    EchoUpstream,
    EnvoyProcess,
    Mesh,
    listener_specs,
)

AUTHZ_ID = spiffe_id("authz", "authz")
SIDECAR = "orders-api"  # the Envoy in front of orders-api calls authz with orders-api's SVID
STRANGER_SIDECAR = "payment-service"  # a real workload identity, just not an allowed caller


@pytest.fixture(scope="module")
def authz_cert(pki: PKI) -> CertKey:
    return issue(pki, pki.directory / "authz-mtls", "authz", AUTHZ_ID, server=True)


@pytest.fixture(scope="module")
def mtls_authz(tmp_path_factory: pytest.TempPathFactory, pki: PKI, authz_cert: CertKey) -> Iterator[AuthzProcess]:
    proc = AuthzProcess(EXAMPLE_BUNDLE, tmp_path_factory.mktemp("authz-mtls"), extra_args=[
        "--grpc-tls-cert", str(authz_cert.cert), "--grpc-tls-key", str(authz_cert.key),
        "--grpc-client-ca", str(pki.ca_cert),
        "--allow-caller", pki.servers[SIDECAR].spiffe_id,
    ])
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


def envoy_as(tmp: Path, pki: PKI, upstream: EchoUpstream, authz: AuthzProcess, identity: str) -> EnvoyProcess:
    return EnvoyProcess(
        tmp, pki, listener_specs(pki), authz_grpc_port=authz.grpc_port, upstream_port=upstream.port,
        authz_tls=AuthzUpstreamTls(pki.servers[identity], pki.ca_cert, AUTHZ_ID),
    )


def metrics(authz: AuthzProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{authz.http_addr}/metrics", timeout=5) as resp:
        return resp.read().decode()


def refused_total(authz: AuthzProcess) -> float:
    m = re.search(r'^authz_callers_refused_total\{reason="not_allowed"\} (\S+)$', metrics(authz), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def call(mesh: Mesh, client: str, method: str, path: str) -> tuple[int, int]:
    """(status, how many times the upstream saw this request)."""
    marker = uuid.uuid4().hex
    resp = mesh.call(ORDERS, client, method, path, headers={"x-test-marker": marker},
                     body=b"{}" if method == "POST" else None)
    return resp.status, len(mesh.upstream.seen(marker=marker))


def test_envoy_over_mtls_gets_decisions(
    tmp_path: Path, pki: PKI, upstream: EchoUpstream, mtls_authz: AuthzProcess
) -> None:
    with envoy_as(tmp_path / "envoy", pki, upstream, mtls_authz, SIDECAR) as envoy:
        mesh = Mesh(pki, upstream, mtls_authz, envoy)
        assert call(mesh, "checkout-api", "POST", "/v1/orders") == (200, 1)
        assert call(mesh, "fulfillment-worker", "GET", "/v1/orders/o-1") == (200, 1)
        assert call(mesh, "fulfillment-worker", "POST", "/v1/orders") == (403, 0)  # the policy's deny
    assert any(line.startswith("authz_checks_total{") and 'decision="allow"' in line
               for line in metrics(mtls_authz).splitlines())


def test_envoy_with_an_identity_not_allowed_is_denied_everything(
    tmp_path: Path, pki: PKI, upstream: EchoUpstream, mtls_authz: AuthzProcess
) -> None:
    before = refused_total(mtls_authz)
    with envoy_as(tmp_path / "envoy", pki, upstream, mtls_authz, STRANGER_SIDECAR) as envoy:
        mesh = Mesh(pki, upstream, mtls_authz, envoy)
        for client, method, path in [("checkout-api", "POST", "/v1/orders"),
                                     ("fulfillment-worker", "GET", "/v1/orders/o-1"),
                                     ("checkout-api", "GET", "/health")]:
            status, seen = call(mesh, client, method, path)
            assert status == 403 and seen == 0, (client, path, status)
    assert refused_total(mtls_authz) >= before + 3
    log = mtls_authz.stderr_path.read_text()
    assert pki.servers[STRANGER_SIDECAR].spiffe_id in log and "PERMISSION_DENIED" in log
