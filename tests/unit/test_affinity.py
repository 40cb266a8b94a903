"""`authz serve --cpu-affinity`: by default (gil) the threads that run Python share one CPU,
re-chosen when the rest of the machine crowds it, while gRPC's C threads run on any; auto
puts every thread of each serving process on one CPU, workers on different CPUs; none leaves
every thread on every CPU the process was given."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2_grpc
from test_serve import free_port, http_get, running
from test_workers import wait_for, workers_seen

from authz import affinity

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


def test_none_lets_every_thread_run_on_every_cpu_given() -> None:
    with running("--cpu-affinity", "none") as (proc, g, _):
        check_allowed(g)
        assert all(c == set(ALLOWED) for c in thread_cpus(proc.pid))


def python_and_other_threads(pid: int) -> tuple[list[set[int]], list[set[int]]]:
    """The CPUs of ``pid``'s threads that run Python, and of the others. Python names no
    thread of its own, so they carry the process's name; gRPC's C threads name themselves
    (event_engine, grpc_global_timer...)."""
    main = Path(f"/proc/{pid}/comm").read_text()
    python, other = [], []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
            cpus = os.sched_getaffinity(int(tid))
        except OSError:  # ended meanwhile
            continue
        (python if comm == main else other).append(cpus)
    return python, other


def test_by_default_python_threads_share_one_cpu_and_grpc_threads_run_anywhere() -> None:
    with running() as (proc, g, _):
        check_allowed(g)  # serving threads are up
        python, other = python_and_other_threads(proc.pid)
        assert len(python) >= 10  # main, gRPC's poller, 8 serving threads, the reloader...
        assert len(python[0]) == 1 and python[0] <= set(ALLOWED)  # the CPU the kernel started it on
        assert all(c == python[0] for c in python), python
        assert other and all(c == set(ALLOWED) for c in other), other
    assert proc.returncode == 0


def test_python_threads_leave_a_cpu_that_something_else_keeps_busy(tmp_path: Path) -> None:
    """A busy loop pinned to the CPU authz's Python threads are on: within a few seconds they
    move to the idler one, and say so. (With one CPU there is nowhere to go: they stay.)"""
    log = tmp_path / "serve.log"
    g, h = free_port(), free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
                                 "--http-addr", f"127.0.0.1:{h}"], stdout=subprocess.DEVNULL, stderr=err)
    hog = None
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        python = python_and_other_threads(proc.pid)[0]
        (first,) = python[0]
        assert all(c == {first} for c in python)
        hog = subprocess.Popen([sys.executable, "-c", f"import os, time\nos.sched_setaffinity(0, {{{first}}})\n"
                                "end = time.monotonic() + 20\nwhile time.monotonic() < end: pass"])
        moved = wait_for(lambda: all(first not in c for c in python_and_other_threads(proc.pid)[0]), 15)
        assert moved == (len(ALLOWED) > 1)
        python = python_and_other_threads(proc.pid)[0]
        assert len({frozenset(c) for c in python}) == 1 and len(python[0]) == 1  # still together
        check_allowed(g)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert (f"Python threads move from CPU {first} to CPU" in log.read_text()) == (len(ALLOWED) > 1)


def test_choose_stays_unless_another_cpu_is_idler_by_the_margin() -> None:
    assert affinity.choose(1, {0: 0.1, 1: 0.3}) == 1  # 0.2 idler: not worth a move
    assert affinity.choose(1, {0: 0.1, 1: 0.5}) == 0
    assert affinity.choose(3, {0: 0.9, 1: 0.2, 2: 0.2, 3: 1.0}) == 2  # ties: the highest number
    assert affinity.choose(0, {0: 0.0, 1: 0.0}) == 0


def test_a_move_waits_for_two_looks_in_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """One look that finds our CPU crowded is not enough (a neighbour may just have left it
    with us); the second in a row moves."""
    keeper = affinity.GilAffinity(0, python_threads=set)
    keeper.cpu, keeper.allowed = 1, {0, 1}
    samples = iter([({0: (0, 100), 1: (0, 100)}, 0),
                    ({0: (0, 200), 1: (90, 200)}, 0),    # CPU 1 90% busy with others: look 1
                    ({0: (0, 300), 1: (100, 300)}, 0),   # only 10%: the count starts again
                    ({0: (0, 400), 1: (190, 400)}, 0),   # look 1
                    ({0: (10, 500), 1: (280, 500)}, 0)])  # look 2: move to CPU 0
    monkeypatch.setattr(keeper, "_sample", lambda: next(samples))
    monkeypatch.setattr(keeper, "apply", lambda: None)
    keeper._last = keeper._sample()
    cpus = []
    for _ in range(4):
        keeper.tick()
        cpus.append(keeper.cpu)
    assert cpus == [1, 1, 1, 0] and keeper.moves == 1


def test_other_load_leaves_out_what_our_python_threads_used_on_their_cpu() -> None:
    before = ({0: (100, 1000), 1: (500, 1000)}, 40)
    after = ({0: (150, 1100), 1: (590, 1100)}, 120)  # CPU 1: 90 busy ticks of 100, 80 ours
    others = affinity._other_load(before, after, 1, {0, 1})
    assert others == pytest.approx({0: 0.5, 1: 0.1})
    assert affinity._other_load(before, ({0: (100, 1000), 1: (500, 1000)}, 40), 1, {0, 1}) == {}


def test_gil_affinity_sorts_threads_and_follows_the_choice() -> None:
    """In this process: the Python threads it is told of go to its CPU, the rest stay free."""
    import threading

    here = threading.get_native_id()
    other = threading.Event()
    tids: list[int] = []
    t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), other.wait(10)))
    t.start()
    try:
        while not tids:
            time.sleep(0.01)
        keeper = affinity.GilAffinity(0, python_threads=lambda: {here})
        keeper.apply()
        assert os.sched_getaffinity(0) == {ALLOWED[-1]}
        assert os.sched_getaffinity(tids[0]) == set(ALLOWED)
        keeper.cpu = ALLOWED[0]
        keeper.apply()
        assert os.sched_getaffinity(0) == {ALLOWED[0]}
    finally:
        other.set()
        t.join()
        os.sched_setaffinity(0, set(ALLOWED))


@pytest.mark.parametrize("mode", ["auto", "gil"])
def test_workers_each_take_their_own_cpu(tmp_path: Path, mode: str) -> None:
    """auto: every thread of worker i on the i-th CPU from the last; gil: its Python threads
    start there (and stay: nothing else keeps these CPUs busy)."""
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--workers", "2", "--cpu-affinity", mode,
         "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10)) == 2, 20)
        pids = workers_seen(h)
        per_worker = {index: thread_cpus(pid) if mode == "auto" else python_and_other_threads(pid)[0]
                      for index, pid in pids.items()}
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


def test_an_affinity_the_kernel_refuses_is_said_once_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A CPU this process may not use (here one the machine does not have; in a container, one
    its cpuset lost): a warning, once, and the threads keep the CPUs they had."""
    import threading

    here = threading.get_native_id()
    keeper = affinity.GilAffinity(0, python_threads=lambda: {here})
    keeper.cpu = 1000
    with caplog.at_level("WARNING", logger="authz.affinity"):
        keeper.apply()
        keeper.apply()
    warnings = [r for r in caplog.records if "cannot set the CPU affinity" in r.getMessage()]
    assert len(warnings) == 1
    assert os.sched_getaffinity(0) == set(ALLOWED)
