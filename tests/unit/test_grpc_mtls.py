"""mTLS on the gRPC listener: who may ask for decisions (--grpc-client-ca, --allow-caller)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from bundle_factory import write_bundle
from support.pki import PKI, CertKey, generate_pki, issue
from support.tls_serve import AUTHZ_ID, REPO, Serve, channel, check, metric, wait_for

POLICY = {
    "name": "probe",
    "action": "ALLOW",
    "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}],
}
ALLOW = ["spiffe://cluster.local/ns/prod/sa/checkout-api", "spiffe://cluster.local/ns/order/sa/*"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return generate_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def authz_cert(pki: PKI) -> CertKey:
    return issue(pki, pki.directory / "authz", "authz", AUTHZ_ID, server=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: PKI, authz_cert: CertKey) -> Iterator[Serve]:
    work = tmp_path_factory.mktemp("mtls")
    bundle = write_bundle(work / "bundle", [POLICY], revision="m1")
    args = ["--bundle", str(bundle), "--audit-log", str(work / "audit.log"),
            "--grpc-tls-cert", str(authz_cert.cert), "--grpc-tls-key", str(authz_cert.key),
            "--grpc-client-ca", str(pki.ca_cert)]
    for pattern in ALLOW:
        args += ["--allow-caller", pattern]
    proc = Serve(work, *args)
    proc.audit_path = work / "audit.log"  # type: ignore[attr-defined]
    try:
        assert wait_for(lambda: proc.get("/readyz")[0] == 200), proc.stderr()
        yield proc
    finally:
        proc.stop()


def checks_total(server: Serve) -> float:
    text = server.metrics()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("authz_checks_total{"))


def refused(server: Serve, reason: str) -> float:
    return metric(server.metrics(), "authz_callers_refused_total", reason=reason) or 0.0


def test_allowed_callers_get_decisions(server: Serve, pki: PKI) -> None:
    before = checks_total(server)
    for name in ("checkout-api", "order-service"):  # an exact ID and a pattern
        with channel(server.grpc_port, pki, pki.clients[name]) as ch:
            assert check(ch, pki.clients[name].spiffe_id) == 0  # allowed by the bundle
            assert check(ch, pki.clients[name].spiffe_id) == 0
    assert checks_total(server) == before + 4


def test_a_valid_certificate_with_a_spiffe_id_not_allowed_is_refused_and_counted(
    server: Serve, pki: PKI
) -> None:
    before_checks, before_refused = checks_total(server), refused(server, "not_allowed")
    stranger = pki.clients["stranger"]
    with channel(server.grpc_port, pki, stranger) as ch:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                check(ch, pki.clients["checkout-api"].spiffe_id)  # claims another principal
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert stranger.spiffe_id in (err.value.details() or "")
    assert refused(server, "not_allowed") == before_refused + 3
    assert checks_total(server) == before_checks  # never decided
    assert wait_for(lambda: stranger.spiffe_id in server.stderr())
    line = next(x for x in server.stderr().splitlines() if stranger.spiffe_id in x)
    assert "PERMISSION_DENIED" in line and "no decision made" in line
    audit = server.audit_path.read_text() if server.audit_path.exists() else ""  # type: ignore[attr-defined]
    assert stranger.spiffe_id not in audit


def test_health_is_behind_the_same_gate(server: Serve, pki: PKI) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel(server.grpc_port, pki, pki.clients["checkout-api"]) as ch:
        ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a stream passes too
        watch.cancel()
    with channel(server.grpc_port, pki, pki.clients["stranger"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            next(health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA"])
def test_handshake_without_a_trusted_client_certificate_fails(
    server: Serve, pki: PKI, who: str
) -> None:
    before = checks_total(server)
    client = None if who == "no client certificate" else pki.rogue_client
    with channel(server.grpc_port, pki, client) as ch:
        with pytest.raises(grpc.RpcError) as err:
            check(ch, pki.clients["checkout-api"].spiffe_id, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert checks_total(server) == before


def test_plaintext_client_is_refused(server: Serve, pki: PKI) -> None:
    before = checks_total(server)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            check(ch, pki.clients["checkout-api"].spiffe_id, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert checks_total(server) == before


def test_status_shows_the_serving_identity_without_paths(server: Serve, pki: PKI) -> None:
    status, body = server.get("/v1/status")
    assert status == 200
    doc = json.loads(body)
    grpc_tls = doc["tls"]["grpc"]
    assert grpc_tls["certificate"]["spiffe_id"] == AUTHZ_ID
    assert grpc_tls["certificate"]["not_after"] > grpc_tls["certificate"]["not_before"]
    assert grpc_tls["ca"][0]["subject"] == "CN=authz-e2e test CA,O=authz-e2e"
    assert grpc_tls["client_certificates"] == "required"
    assert grpc_tls["allowed_callers"] == ALLOW
    assert str(pki.directory) not in body
    assert str(server.stderr_path.parent) not in body  # the bundle directory is shown by label
    assert doc["source"] == "<bundle>"
    expiry = metric(server.metrics(), "authz_tls_cert_expiry_timestamp_seconds", use="grpc")
    assert expiry == grpc_tls["certificate"]["not_after"]


def _serve_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz", "serve", "--grpc-addr", "127.0.0.1:0",
                           "--http-addr", "127.0.0.1:0", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_bad_tls_flags_are_usage_errors(pki: PKI, authz_cert: CertKey) -> None:
    cert, key = str(authz_cert.cert), str(authz_cert.key)
    other_key = str(pki.clients["stranger"].key)
    cases = {
        "--grpc-tls-cert and --grpc-tls-key go together": ["--grpc-tls-cert", cert],
        "--allow-caller needs --grpc-client-ca": ["--grpc-tls-cert", cert, "--grpc-tls-key", key,
                                                  "--allow-caller", ALLOW[0]],
        "does not belong to the certificate": ["--grpc-tls-cert", cert, "--grpc-tls-key", other_key],
        "the trust domain must be written out": [
            "--grpc-tls-cert", cert, "--grpc-tls-key", key, "--grpc-client-ca", str(pki.ca_cert),
            "--allow-caller", "spiffe://*/ns/prod/sa/x"],
        "holds no PEM certificate": ["--grpc-tls-cert", key, "--grpc-tls-key", key],
    }
    for message, args in cases.items():
        proc = _serve_exit(*args)
        assert proc.returncode == 2, (message, proc.stderr)
        assert message in proc.stderr, proc.stderr
