"""SIGTERM drains: health NOT_SERVING at once, checks answered through --drain-grace, in-flight
checks finished, exit 0; also under --workers."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_serve import free_port, http_get, start
from test_workers import wait_for, workers_seen

CHARGE = dict(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
              destination=spiffe("payment", "payment-service"))


def fire(port: int, n: int) -> tuple[grpc.Channel, list[Future]]:  # type: ignore[type-arg]
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    stub = external_auth_pb2_grpc.AuthorizationStub(ch)
    req = check_request(**CHARGE)
    return ch, [stub.Check.future(req, timeout=60) for _ in range(n)]


def outcomes(futures: list[Future]) -> dict[str, int]:  # type: ignore[type-arg]
    seen: dict[str, int] = {}
    for f in futures:
        try:
            key = "allowed" if f.result().status.code == 0 else "denied"
        except grpc.RpcError as exc:
            key = exc.code().name
        seen[key] = seen.get(key, 0) + 1
    return seen


def test_200_concurrent_checks_and_sigterm_all_answered() -> None:
    proc, g, h = start("--drain-grace", "1", "--drain-timeout", "20")
    try:
        ch, futures = fire(g, 200)
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        seen = outcomes(futures)
        ch.close()
    finally:
        out, err = proc.communicate(timeout=60)
    assert seen == {"allowed": 200}, (seen, err)
    assert proc.returncode == 0, err


def test_not_serving_at_once_answering_during_grace_then_refusing() -> None:
    proc, g, h = start("--drain-grace", "4", "--drain-timeout", "5")
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{g}")
        health = health_pb2_grpc.HealthStub(ch)
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        == health_pb2.HealthCheckResponse.NOT_SERVING, 3)
        code, body = http_get(h, "/readyz")
        assert code == 503 and "shutting down" in body
        assert http_get(h, "/healthz")[0] == 200  # alive, just not ready
        answered = 0
        while time.monotonic() - t0 < 2.5:  # well inside the 4 s grace
            assert stub.Check(check_request(**CHARGE), timeout=5).status.code == 0
            answered += 1
        assert answered > 0
        ch.close()
        # after the grace and the drain the process exits 0 and the port refuses
        proc.wait(timeout=30)
        assert proc.returncode == 0
        with grpc.insecure_channel(f"127.0.0.1:{g}") as late:
            try:
                external_auth_pb2_grpc.AuthorizationStub(late).Check(check_request(**CHARGE), timeout=2)
                raise AssertionError("a check was answered after the drain")
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_workers_drain_too(tmp_path) -> None:  # noqa: ANN001
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
         "--http-addr", f"127.0.0.1:{h}", "--drain-grace", "1", "--audit-log", str(tmp_path / "a.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10, loaded=True)) == 2, 20)  # both serving a bundle
        results: list[dict[str, int]] = []
        chans = []
        for _ in range(4):  # several connections: the kernel spreads them over both workers
            ch, futures = fire(g, 50)
            chans.append(ch)
            results.append(futures)  # type: ignore[arg-type]
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        seen: dict[str, int] = {}
        for futures in results:
            for k, v in outcomes(futures).items():  # type: ignore[arg-type]
                seen[k] = seen.get(k, 0) + v
        for ch in chans:
            ch.close()
    finally:
        _, err = proc.communicate(timeout=90)
    assert seen == {"allowed": 200}, (seen, err)
    assert proc.returncode == 0, err


def test_second_sigterm_cuts_the_grace_short() -> None:
    proc, g, h = start("--drain-grace", "60")
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: http_get(h, "/readyz")[0] == 503, 10)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and time.monotonic() - t0 < 30




def test_a_restart_on_the_same_ports_comes_up_while_old_connections_linger() -> None:
    """The stopped instance closed its clients' connections first, so they linger in TIME_WAIT
    on its port: that is not "in use" (gRPC binds with SO_REUSEADDR); the next instance on
    the same ports must start, as it must when Kubernetes or an operator restarts it."""
    proc, g, h = start("--drain-grace", "0")
    client = socket.create_connection(("127.0.0.1", g))
    client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface, SETTINGS
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    client.settimeout(2)
    try:  # read what the server sent (GOAWAY), then close: a clean FIN, the server side in TIME_WAIT
        while client.recv(65536):
            pass
    except OSError:
        pass
    client.close()
    time.sleep(0.2)
    lingering = [line for line in subprocess.run(["ss", "-tan"], capture_output=True, text=True, check=False)
                 .stdout.splitlines() if f":{g} " in line]
    assert any(line.startswith("TIME-WAIT") for line in lingering), lingering
    again = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
         "--http-addr", f"127.0.0.1:{h}", "--drain-grace", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: again.poll() is not None or http_get(h, "/readyz")[0] == 200, 30)
        assert again.poll() is None, again.communicate()[1]
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            assert stub.Check(check_request(**CHARGE), timeout=10).status.code == 0
    finally:
        if again.poll() is None:
            again.send_signal(signal.SIGTERM)
        again.communicate(timeout=60)
