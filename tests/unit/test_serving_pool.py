"""The serving pool grpcio's threaded server runs calls on: every call runs once, in order,
on at most N threads, and its done callback always fires (grpcio counts calls in flight with
it: a callback lost would hold a slot of maximum_concurrent_rpcs for ever)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from authz.serving_pool import Call, ServingPool

METHOD = "/test.Svc/Echo"


def wait_until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_calls_run_once_each_in_submission_order_on_one_thread() -> None:
    pool = ServingPool(1)
    try:
        ran: list[int] = []
        calls = [pool.submit(ran.append, i) for i in range(200)]
        done: list[Call] = []
        for c in calls:
            c.add_done_callback(done.append)
        wait_until(lambda: len(done) == 200)
        assert ran == list(range(200))
        assert sorted(map(id, done)) == sorted(map(id, calls))
    finally:
        pool.shutdown()


def test_at_most_n_calls_run_at_once_and_all_n_threads_serve() -> None:
    pool = ServingPool(3)
    running = 0
    peak = 0
    names: set[str] = set()
    lock = threading.Lock()
    release = threading.Event()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        release.wait(10)
        with lock:
            running -= 1

    try:
        for _ in range(10):
            pool.submit(work)
        wait_until(lambda: running == 3)
        time.sleep(0.05)  # a fourth thread would have started by now
        assert running == 3
        release.set()
        wait_until(lambda: running == 0)
        assert peak == 3
        assert names == {"authz-grpc_0", "authz-grpc_1", "authz-grpc_2"}
    finally:
        release.set()
        pool.shutdown()


def test_a_callback_added_after_the_call_finished_runs_at_once() -> None:
    pool = ServingPool(1)
    try:
        call = pool.submit(lambda: None)
        pool.shutdown(wait=True)  # the call has run
        seen: list[Call] = []
        call.add_done_callback(seen.append)
        assert seen == [call]
    finally:
        pool.shutdown()


def test_a_failing_call_still_fires_its_callback_and_the_thread_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = ServingPool(1)
    try:
        def boom() -> None:
            raise ValueError("boom")

        done: list[str] = []
        pool.submit(boom).add_done_callback(lambda _c: done.append("failed"))
        pool.submit(done.append, "next")
        wait_until(lambda: len(done) == 2)
        assert done == ["failed", "next"]
        assert "a gRPC call failed in its serving thread" in caplog.text
    finally:
        pool.shutdown()


def test_shutdown_runs_what_was_queued_refuses_the_rest_and_ends_the_threads() -> None:
    pool = ServingPool(2)
    gate = threading.Event()
    ran: list[int] = []
    pool.submit(gate.wait, 10)
    pool.submit(gate.wait, 10)
    for i in range(5):
        pool.submit(ran.append, i)
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(ran.append, 99)
    gate.set()
    pool.shutdown(wait=True)
    assert ran == [0, 1, 2, 3, 4]
    assert not any(t.is_alive() for t in pool._threads)


def test_callbacks_race_with_completion_and_none_is_lost() -> None:
    """grpcio adds the callback on its polling thread just after submit, while a serving
    thread may be finishing the call: every callback must fire exactly once."""
    pool = ServingPool(4)
    fired = 0
    lock = threading.Lock()

    def count(_c: Call) -> None:
        nonlocal fired
        with lock:
            fired += 1

    try:
        for _ in range(20_000):
            pool.submit(int).add_done_callback(count)
        wait_until(lambda: fired == 20_000)
        time.sleep(0.05)
        assert fired == 20_000
    finally:
        pool.shutdown()


@pytest.mark.parametrize("pool_kind", ["serving", "executor"])
def test_grpcio_counts_calls_in_flight_back_to_zero(pool_kind: str) -> None:
    """On a real grpcio threaded server with maximum_concurrent_rpcs: after many calls, also
    failing and cancelled ones, its count of calls in flight is back to zero, as with the
    ThreadPoolExecutor grpcio documents (run side by side)."""
    pool = ServingPool(4) if pool_kind == "serving" else ThreadPoolExecutor(max_workers=4)
    server = grpc.server(pool, maximum_concurrent_rpcs=8)  # type: ignore[arg-type]

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            raise RuntimeError("handler failed")
        if request == b"slow":
            time.sleep(0.2)
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Svc", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(METHOD)
            state = server._state  # grpcio's count, the one maximum_concurrent_rpcs is compared with
            for batch in range(40):  # 8 at a time: the bound, every slot used again and again
                sent = [b"x%d" % (batch * 8 + i) for i in range(8)]
                futures = [call.future(m) for m in sent]
                assert [f.result(timeout=30) for f in futures] == sent
                # a call's slot is freed just after its answer leaves, so a client can be faster
                wait_until(lambda: state.active_rpc_count == 0)
            with pytest.raises(grpc.RpcError) as failed:
                call(b"fail", timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNKNOWN
            slow = [call.future(b"slow", timeout=0.05) for _ in range(4)]
            for f in slow:
                with pytest.raises(grpc.RpcError):
                    f.result(timeout=10)
            wait_until(lambda: state.active_rpc_count == 0)
            # and the full bound is usable again: 8 concurrent slow calls all succeed
            again = [call.future(b"slow", timeout=30) for _ in range(8)]
            assert all(f.result(timeout=30) == b"slow" for f in again)
    finally:
        server.stop(None).wait(10)
        pool.shutdown(wait=False)
