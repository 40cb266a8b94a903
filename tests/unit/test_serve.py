"""`authz serve` as a process: gRPC health, probes, checks over gRPC, SIGTERM exits 0."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def start(*args: str) -> tuple[subprocess.Popen[str], int, int]:
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:  # up, and the first load done (it runs once the ports are open)
            urllib.request.urlopen(f"http://127.0.0.1:{h}/healthz", timeout=1).read()
            code, body = http_get(h, "/readyz")
            if code == 200 or "no bundle loaded yet" not in body:
                return proc, g, h
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("authz serve did not come up")


@contextlib.contextmanager
def running(*args: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """``start(*args)``, stopped with SIGTERM when the block ends (its exit code then in
    ``proc.returncode``)."""
    proc, g, h = start(*args)
    try:
        yield proc, g, h
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serves_example_bundle_and_stops_on_sigterm() -> None:
    proc, g, h = start()
    try:
        assert http_get(h, "/readyz")[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "envoy.service.auth.v3.Authorization"):
                resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            ok = stub.Check(check_request(principal=spiffe("order", "order-service"), method="POST",
                                          path="/v1/charges", destination=spiffe("payment", "payment-service"),
                                          headers={"cookie": "session=topsecret"}), timeout=5)
            assert ok.status.code == 0
            denied = stub.Check(check_request(principal=spiffe("order", "order-service"), method="DELETE",
                                              path="/v1/charges", destination=spiffe("payment", "payment-service")),
                                timeout=5)
            assert denied.status.code == 7 and denied.denied_response.status.code == 403
        status, metrics = http_get(h, "/metrics")
        assert status == 200 and 'authz_checks_total{caller="envoy_grpc",decision="allow"' in metrics
        assert 'authz_bundle_info{name="example",revision="2026-11-25.1"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    audit_lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(audit_lines) == 2
    assert "topsecret" not in out + err


def test_invalid_bundle_is_not_serving(tmp_path: Path) -> None:
    (tmp_path / "bundle.yaml").write_text("apiVersion: authz/v1\nkind: Bundle\nname: x\n")
    proc, g, h = start("--bundle", str(tmp_path))
    try:
        status, body = http_get(h, "/readyz")
        assert status == 503 and "bundle.yaml:1:1" in body
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            denied = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(), timeout=5)
            assert denied.status.code == 7 and b"no policy bundle loaded" in denied.denied_response.body.encode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_unparseable_request_over_grpc_is_denied_not_errored() -> None:
    proc, g, _ = start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            call = ch.unary_unary("/envoy.service.auth.v3.Authorization/Check")
            raw = call(b"\xff\xff\xff\xff", timeout=5)
            resp = external_auth_pb2.CheckResponse.FromString(raw)
            assert resp.status.code == 7 and resp.denied_response.status.code == 403
            assert b"not a CheckRequest" in resp.denied_response.body.encode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
