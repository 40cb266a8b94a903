"""The reload loop: one background thread that watches or polls a source and feeds the gate.

File sources (a directory or an archive) are watched by polling a cheap fingerprint
(path, size, mtime, inode of every non-hidden file; the ``..data`` target of a ConfigMap
mount) every ``interval`` seconds. A change is loaded once the fingerprint has settled,
that is, stayed the same for ``settle`` seconds; a ConfigMap's atomic symlink swap
therefore causes exactly one load, and a burst of edits one load after the burst.

HTTP sources are fetched after each ``source.next_delay()`` (jittered, backing off after
errors).

``trigger()`` (SIGHUP) wakes the thread to reload at once, without waiting for a change
or a poll delay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from authz.bundle.sources import Source
from authz.bundle.store import ERROR, LOADED, UNCHANGED, BundleStore

if TYPE_CHECKING:
    from authz.tracing import Tracing

log = logging.getLogger("authz.bundle")


class Reloader:
    def __init__(
        self,
        store: BundleStore,
        source: Source,
        *,
        interval: float = 1.0,
        settle: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.source = source
        self.tracing = tracing
        self.interval = interval
        self.settle = interval if settle is None else settle
        self.loads = 0  # load attempts made by this reloader (for tests and logs)
        self._wake = threading.Event()
        self._forced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loaded_fp: Hashable = None
        self._last_ok = True
        self._first: Callable[[], object] | None = None
        self._clock = clock  # tests drive it to step through settling deterministically
        self._seen: Hashable = None  # the fingerprint at the last look
        self._changed_at = 0.0  # when it last changed

    # --- control -------------------------------------------------------------------------

    def initial_load(self) -> str:
        """The first load, in the caller's thread; later changes are picked up by the thread."""
        self._loaded_fp = self._seen = self.source.fingerprint()
        self._changed_at = self._clock()
        return self._load(force=False)

    def start(self, first: Callable[[], object] | None = None) -> Reloader:
        """Run the loop in its thread; ``first``, when given, runs there before it (the first
        load, so the ports can open and /healthz answer while it is in flight)."""
        self._first = first
        self._thread = threading.Thread(target=self._run, name="authz-bundle-reloader", daemon=True)
        self._thread.start()
        return self

    def trigger(self) -> None:
        """Reload now (SIGHUP). Safe from any thread and from a signal handler."""
        self._forced = True
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop ------------------------------------------------------------------------

    def _load(self, force: bool) -> str:
        self.loads += 1
        started = time.time_ns()
        result = self.store.fetch_and_load(self.source, force=force)
        self._last_ok = result != ERROR
        if self.tracing is not None and result != UNCHANGED:  # a span per load, not per poll
            st = self.store.status()
            self.tracing.bundle_load(self.source.description, result, st.revision,
                                     st.served_from, st.last_error if result != LOADED else None,
                                     started)
        return result

    def _take_forced(self) -> bool:
        if self._forced:
            self._forced = False
            self._wake.clear()
            return True
        self._wake.clear()
        return False

    def _run(self) -> None:
        try:
            if self._first is not None:
                self._first()
            if self.source.polled:
                self._poll_loop()
            else:
                self._watch_loop()
        except Exception:  # noqa: BLE001 - never die silently; the last good bundle keeps serving
            log.exception("bundle reloader stopped on an unexpected error")

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.source.next_delay(self._last_ok))
            if self._stop.is_set():
                return
            forced = self._take_forced()
            if forced:
                log.info("reloading %s now (signal)", self.source.description)
            self._guarded(lambda: self._load(force=forced))

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._stop.is_set():
                return
            self._guarded(self.watch_once)

    @staticmethod
    def _guarded(step: Callable[[], object]) -> None:
        # One failed look must not end the reloader: the next revision would never load.
        try:
            step()
        except Exception:  # noqa: BLE001
            log.exception("bundle reloader: unexpected error; it goes on watching")

    def watch_once(self) -> None:
        """One look at a file source: load a change once it has settled, or now if triggered.

        The thread calls this every ``interval``; a test calls it directly with its own clock.
        """
        if self._take_forced():
            log.info("reloading %s now (signal)", self.source.description)
            fp = self.source.fingerprint()
            self._load(force=True)
            self._loaded_fp = self._seen = fp
            return
        fp = self.source.fingerprint()
        now = self._clock()
        if fp != self._seen:
            self._seen, self._changed_at = fp, now  # still changing: wait for it to settle
            return
        if fp != self._loaded_fp and now - self._changed_at >= self.settle:
            self._loaded_fp = fp
            self._load(force=False)
