"""The threads that serve gRPC calls: a fixed pool leaner than concurrent.futures' executor.

grpcio's threaded server hands every call to its pool with ``submit(fn, *args)`` and adds one
done callback to what it gets back (its count of calls in flight, which
``maximum_concurrent_rpcs`` is compared with). That is all it uses of the future.
``ThreadPoolExecutor`` pays for much more on every call: a ``Future`` with its own
``Condition``, a lock and a semaphore probe in ``submit``, a ``notify_all`` when the result
is set. On a saturated worker that was about a tenth of the process's CPU, as much as the
policy decision itself (docs/performance.md, "Serving pool"). Here a call is a small object
with one lock, handed over on a C ``SimpleQueue``; the threads all start with the pool.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("authz.serving_pool")

DoneCallback = Callable[[Any], object]


class Call:
    """What ``submit`` returns: the one part of a future grpcio uses (``add_done_callback``).

    The callback runs once the call has run, on the serving thread, or at once on the
    caller's thread when the call has already finished.
    """

    __slots__ = ("_fn", "_args", "_lock", "_callbacks", "_done")

    def __init__(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._fn = fn
        self._args = args
        self._lock = threading.Lock()
        self._callbacks: list[DoneCallback] = []
        self._done = False

    def add_done_callback(self, callback: DoneCallback) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except BaseException:  # noqa: BLE001 - a failed call must not end a serving thread
            log.exception("a gRPC call failed in its serving thread")
        finally:
            self._fn = self._args = None  # type: ignore[assignment]  # drop references early
            with self._lock:
                self._done = True
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:  # noqa: BLE001 - as concurrent.futures does
                    log.exception("a done callback of a gRPC call failed")


class ServingPool:
    """``threads`` daemon threads taking calls in the order they were submitted."""

    def __init__(self, threads: int, name: str = "authz-grpc") -> None:
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., object], /, *args: Any) -> Call:
        if self._shutdown:
            raise RuntimeError("cannot submit a call to a pool that has been shut down")
        call = Call(fn, args)
        self._queue.put(call)
        return call

    def shutdown(self, wait: bool = True) -> None:
        """No new calls; each thread ends after the calls queued before this."""
        if not self._shutdown:
            self._shutdown = True
            for _ in self._threads:
                self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()

    def _work(self) -> None:
        get = self._queue.get
        while (call := get()) is not None:
            call._run()
