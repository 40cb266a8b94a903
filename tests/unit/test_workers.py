"""`authz serve --workers N`: one port, N processes, metrics and audit adding up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2_grpc
from test_serve import free_port, http_get

CHARGE = dict(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
              destination=spiffe("payment", "payment-service"))


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as r:
        return json.loads(r.read())


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def workers_seen(port: int, attempts: int = 60, loaded: bool = False) -> dict[int, int]:
    """index -> pid of the workers that answered; each request is a new connection.
    ``loaded``: only workers serving a bundle on their gRPC port. A worker's HTTP port opens
    before its first load finishes; its gRPC port only after."""
    seen: dict[int, int] = {}
    for _ in range(attempts):
        st = status(port)
        if not loaded or (st["revision"] is not None and st["worker"]["grpc_listening"]):
            seen[st["worker"]["index"]] = st["worker"]["pid"]
    return seen


def shared_dirty_mb(pid: int) -> float:
    """Written pages this process still shares with another (after a fork, until either writes)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no Shared_Dirty for {pid}")


def test_two_workers_share_the_ports_and_add_up(tmp_path: Path) -> None:
    g, h = free_port(), free_port()
    audit = tmp_path / "audit.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
         "--http-addr", f"127.0.0.1:{h}", "--audit-log", str(audit), "--audit-log", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30), proc.stderr
        assert wait_for(lambda: len(workers_seen(h, 10, loaded=True)) == 2, 20)  # both answer on one port
        # The supervisor (same pid, exec'd) forks its workers from a heap that already holds
        # what they run, so the bulk of it is one copy the workers share; then it replaces
        # its image (same pid again) with one that imports none of it.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"authz.supervisor" in cmdline and b"--resume" in cmdline
        assert b"cygrpc" not in Path(f"/proc/{proc.pid}/maps").read_bytes()  # no gRPC in it
        for pid in workers_seen(h, 10).values():
            assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
            worker_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            # forked from the template image, not exec'd
            assert b"authz.supervisor" in worker_cmdline and b"--resume" not in worker_cmdline
            assert shared_dirty_mb(pid) >= 10, shared_dirty_mb(pid)  # with the other worker
        sent = 60
        for _ in range(sent):  # a new connection each time, so both workers get some
            with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
                resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=5)
                assert resp.status.code == 0
        # /metrics, whichever worker answers, counts every worker's checks and only those
        # (the bundle tests the gate ran at load are not served checks).
        for _ in range(4):
            text = http_get(h, "/metrics")[1]
            assert f'authz_checks_total{{caller="envoy_grpc",decision="allow",policy="payment-service",reason="allowed by policy"}} {sent}.0' in text
            assert f"authz_check_duration_seconds_count {sent}.0" in text
            assert 'authz_bundle_info{name="example",revision="2026-11-25.1"} 1.0' in text
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["audit.log.w0", "audit.log.w1"]
        assert wait_for(lambda: sum(len(p.read_text().splitlines()) for p in tmp_path.iterdir()) == sent, 10)
        assert all(p.read_text() for p in tmp_path.iterdir())  # both workers served checks

        # a worker that dies is replaced; the service keeps answering
        before = workers_seen(h)
        os.kill(before[1], signal.SIGKILL)
        assert wait_for(lambda: workers_seen(h, 20, loaded=True).get(1, before[1]) != before[1], 30)
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            assert external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=5).status.code == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # stdout is shared by the workers: every record is a whole line
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(records) == sent + 1
    assert all(r["allowed"] for r in records)


def test_audit_records_a_killed_worker_held_are_counted_as_lost() -> None:
    """A worker SIGKILLed with records queued for a stuck collector: the supervisor counts
    what it last reported holding as dropped (worker_killed); with no check sent meanwhile,
    lost + what the other worker still holds == what both held before."""
    from test_bounds import HungCollector, metric

    collector = HungCollector()
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
         "--http-addr", f"127.0.0.1:{h}", "--audit-log", collector.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    held_series = 'authz_audit_queued_records{sink="http"}'
    lost_series = 'authz_audit_dropped_total{reason="worker_killed"}'
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10, loaded=True)) == 2, 20)
        for _ in range(60):  # a new connection each time: both workers get some
            with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
                external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=5)
        # every record waits for the collector that never answers; the gauges catch up within 1 s
        assert wait_for(lambda: metric(http_get(h, "/metrics")[1], held_series) == 60, 10)
        assert metric(http_get(h, "/metrics")[1], lost_series) == 0
        before = workers_seen(h)
        os.kill(before[1], signal.SIGKILL)
        assert wait_for(lambda: metric(http_get(h, "/metrics")[1], lost_series) > 0, 20)
        text = http_get(h, "/metrics")[1]
        lost, still_held = metric(text, lost_series), metric(text, held_series)
        assert 0 < lost < 60
        assert lost + still_held == 60
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        collector.close()
    assert f"died holding {int(lost)} audit records" in err


def test_workers_need_fixed_ports() -> None:
    proc = subprocess.run([sys.executable, "-m", "authz", "serve", "--workers", "2",
                           "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "fixed port" in proc.stderr


def test_a_port_in_use_stops_the_service_before_any_worker_starts() -> None:
    g, h = free_port(), free_port()
    blocker = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); "
                                f"s.bind(('127.0.0.1',{h})); s.listen(); time.sleep(60)"])
    try:
        time.sleep(0.5)
        proc = subprocess.run([sys.executable, "-m", "authz", "serve", "--workers", "2",
                               "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}"],
                              capture_output=True, text=True, timeout=90, check=False)
    finally:
        blocker.kill()
        blocker.wait()
    # refused before any worker starts: anything listening on a port is another service
    assert proc.returncode != 0
    assert f"127.0.0.1:{h} is already in use" in proc.stderr


def test_a_worker_failing_in_start_up_stops_the_service_with_its_status(tmp_path: Path) -> None:
    """A forked worker failing in start-up (here: a TLS key that is not there) is not
    restarted over and over: the supervisor stops with the worker's exit status, and the
    worker's own message says why."""
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
         "--http-addr", f"127.0.0.1:{h}", "--grpc-tls-cert", str(tmp_path / "missing.pem"),
         "--grpc-tls-key", str(tmp_path / "missing.key")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "gRPC TLS: cannot read certificate file" in err
    assert "while starting; stopping" in err
    assert "restarting it" not in err
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"authz-metrics-{proc.pid}-")]


def test_a_worker_whose_grpc_port_is_not_open_yet_is_not_ready() -> None:
    """Between its first load and the opening of its gRPC port a worker has a bundle but
    takes no checks: /readyz says so, and /v1/status shows the port as closed."""
    from authz.bundle.store import BundleStore
    from authz.example import example_bundle
    from authz.metrics import Metrics
    from authz.server import ProbeServer

    metrics = Metrics()
    store = BundleStore(metrics)
    assert store.load(example_bundle())
    probes = ProbeServer("127.0.0.1:0", store, metrics, worker=0)
    port = probes.port
    probes.grpc_listening = False
    probes.start()
    try:
        assert http_get(port, "/readyz") == (503, "not ready: the gRPC port is not open yet\n")
        assert status(port)["worker"]["grpc_listening"] is False
        probes.grpc_listening = True
        code, text = http_get(port, "/readyz")
        assert code == 200 and text.startswith("ready: revision ")
        assert status(port)["worker"]["grpc_listening"] is True
    finally:
        probes.stop()


def test_a_signal_sent_while_the_supervisor_replaces_its_image_is_handled_by_the_new_one(
        tmp_path: Path) -> None:
    """The supervisor blocks the signals it handles before it execs its lean image; one that
    came meanwhile is pending across the exec and must be handled (not meet the default
    action, not stay blocked) once the resumed supervisor runs. Here a SIGTERM is pending
    when `python -m authz.supervisor --resume` starts: it stops cleanly, exit 0."""
    wrapper = (
        "import os, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'authz.supervisor', '--resume', '{}',\n"
        "         '--workers', '1', '--', 'serve'])\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", wrapper], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
