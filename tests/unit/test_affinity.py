"""`authz serve --cpu-affinity auto`: every thread of each serving process on one CPU, workers
on different CPUs; by default the threads may run on every CPU the process was given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2_grpc
from test_serve import free_port, http_get, running
from test_workers import wait_for, workers_seen

ALLOWED = sorted(os.sched_getaffinity(0))
CHARGE = dict(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
              destination=spiffe("payment", "payment-service"))


def thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of ``pid`` may run on."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.append(os.sched_getaffinity(int(tid)))
        except OSError:  # ended meanwhile
            pass
    return out


def check_allowed(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=5)
    assert resp.status.code == 0


def test_auto_puts_every_thread_of_serve_on_the_last_cpu() -> None:
    with running("--cpu-affinity", "auto") as (proc, g, _):
        check_allowed(g)  # serving threads are up
        cpus = thread_cpus(proc.pid)
        assert len(cpus) >= 3  # gRPC's, the serving pool's, the reloader...
        assert all(c == {ALLOWED[-1]} for c in cpus), cpus
    assert proc.returncode == 0


def test_by_default_threads_may_run_on_every_cpu_given() -> None:
    with running() as (proc, g, _):
        check_allowed(g)
        assert all(c == set(ALLOWED) for c in thread_cpus(proc.pid))


def test_workers_each_take_their_own_cpu(tmp_path: Path) -> None:
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--cpu-affinity", "auto",
         "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10)) == 2, 20)
        pids = workers_seen(h)
        per_worker = {index: thread_cpus(pid) for index, pid in pids.items()}
        for index, cpus in per_worker.items():
            want = {ALLOWED[-1 - index % len(ALLOWED)]}
            assert all(c == want for c in cpus), (index, cpus)
        if len(ALLOWED) > 1:
            assert per_worker[0][0] != per_worker[1][0]
        # the supervisor itself only waits: it keeps every CPU
        assert os.sched_getaffinity(proc.pid) == set(ALLOWED)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
