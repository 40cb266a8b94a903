"""Which CPUs the threads of a serving process run on (`authz serve --cpu-affinity`).

A check crosses several Python threads (gRPC's poller, a serving thread, the audit writer),
each taking the GIL in turn. Spread over cores, every hand-over wakes a thread on another
core and the GIL's owner changes cores with it: measured here (docs/performance.md, "CPU
affinity"), one process spent 1.7-1.9x the CPU per check of the same process with its Python
threads on one core.

``gil`` (the default): the threads that run Python share one CPU, and gRPC's own C threads
(its network I/O, which needs no GIL) run on any. Only one of the Python threads can run at
a time, so one CPU is all they could use anyway. The CPU is re-chosen every second: when the
rest of the machine keeps it busier than the idlest CPU by MOVE_MARGIN, they move there, so
a busy neighbour does not hold them on a crowded core. The move waits for two looks in a
row, so that two processes that left one CPU together do not both come back at once. A single
process starts on the CPU the kernel put it on (the kernel spreads new processes, so sidecars
on one node do not all start on one CPU); worker ``index`` of --workers on the index-th CPU it
may use, counted from the last (CPU 0 tends to serve interrupts), so workers start apart.

``auto``: every thread of the process on that one CPU, for good: for processes with CPUs of
their own (a dedicated cpuset).

``none``: the kernel places every thread.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable

log = logging.getLogger("authz.affinity")

PERIOD = 1.0  # seconds between two looks at the CPUs' load (jittered by +-20%)
# Move when the rest of the machine keeps our CPU busier than the idlest one by this share
# of a CPU: well above the noise of one second's accounting, so we do not hop back and forth.
MOVE_MARGIN = 0.3
LOOKS_BEFORE_MOVING = 2


def pin_process(index: int) -> int | None:
    """``auto``: pin every thread of this process (and the threads they start) to one CPU;
    returns it, or None where CPU affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = first_cpu(index)
    for tid in _threads():
        _set(tid, {cpu})
    return cpu


def first_cpu(index: int) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-1 - index % len(allowed)]


def current_cpu() -> int | None:
    """The CPU the calling thread last ran on (/proc; None where it cannot be read)."""
    try:
        with open("/proc/thread-self/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def choose(current: int, others: dict[int, float], margin: float = MOVE_MARGIN) -> int:
    """The CPU for the Python threads: ``current`` unless another is idler (load from
    everything but them, in CPUs) by more than ``margin``; ties go to the highest number."""
    best = min(sorted(others, reverse=True), key=lambda c: others[c])
    if others.get(current, 0.0) - others[best] > margin:
        return best
    return current


class GilAffinity:
    """``gil``: keeps the threads that run Python on one CPU, the others free, re-choosing
    the CPU every PERIOD. ``index``: the worker's under --workers, None for a single process.
    ``python_threads`` names the native thread ids that run Python (threading.enumerate by
    default; a test may name its own)."""

    def __init__(self, index: int | None, python_threads: Callable[[], set[int]] | None = None) -> None:
        self.allowed = set(os.sched_getaffinity(0))
        here = current_cpu() if index is None else None
        self.cpu = here if here is not None and here in self.allowed else first_cpu(index or 0)
        self._python_threads = python_threads or _python_threads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[dict[int, tuple[int, int]], int] | None = None
        self._looks = 0  # looks in a row that found a CPU worth moving to
        self._refused = False  # the kernel refused an affinity: said once
        self.moves = 0

    def start(self) -> None:
        """Apply now, then keep applying and re-choosing on a thread of its own."""
        self.apply()
        self._last = self._sample()
        self._thread = threading.Thread(target=self._run, name="authz-affinity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def apply(self) -> None:
        """Python threads on ``cpu``, every other thread (gRPC's C threads, and any started
        by a Python thread since the last look, which inherit its CPU) on all it may use."""
        python = self._python_threads()
        for tid in _threads():
            problem = _set(tid, {self.cpu} if tid in python else self.allowed)
            if problem is not None and not self._refused:
                self._refused = True  # a seccomp profile, a cpuset changed under us...
                log.warning("cannot set the CPU affinity of thread %d (%s): threads stay where the "
                            "kernel puts them; --cpu-affinity none says so without trying", tid, problem)

    def tick(self) -> None:
        now = self._sample()
        if self._last is not None:
            others = _other_load(self._last, now, self.cpu, self.allowed)
            cpu = choose(self.cpu, others) if others else self.cpu
            self._looks = self._looks + 1 if cpu != self.cpu else 0
            if self._looks >= LOOKS_BEFORE_MOVING:
                log.info("Python threads move from CPU %d to CPU %d (the other load on them: "
                         "%.2f and %.2f of a CPU)", self.cpu, cpu, others[self.cpu], others[cpu],
                         extra={"cpu": cpu})
                self.cpu = cpu
                self.moves += 1
                self._looks = 0
        self._last = now
        self.apply()

    def _sample(self) -> tuple[dict[int, tuple[int, int]], int]:
        return _cpu_times(), _thread_ticks(self._python_threads())

    def _run(self) -> None:
        while not self._stop.wait(PERIOD * random.uniform(0.8, 1.2)):  # noqa: S311 - jitter, not secrecy
            try:
                self.tick()
            except (OSError, ValueError, IndexError) as exc:  # /proc unreadable or odd: stay
                log.warning("cannot re-choose the CPU of the Python threads: %s", exc)


def _other_load(before: tuple[dict[int, tuple[int, int]], int], after: tuple[dict[int, tuple[int, int]], int],
                cpu: int, allowed: set[int]) -> dict[int, float]:
    """Per allowed CPU, the share of it (0-1) busy with anything but our Python threads."""
    (cpus0, ours0), (cpus1, ours1) = before, after
    out: dict[int, float] = {}
    for c in allowed:
        if c not in cpus0 or c not in cpus1:
            continue
        busy = cpus1[c][0] - cpus0[c][0]
        total = cpus1[c][1] - cpus0[c][1]
        if total <= 0:
            continue
        if c == cpu:  # our Python threads ran only there
            busy -= ours1 - ours0
        out[c] = max(0.0, busy / total)
    return out


def _cpu_times() -> dict[int, tuple[int, int]]:
    """CPU -> (busy, total) clock ticks since boot, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def _thread_ticks(tids: set[int]) -> int:
    """User and system clock ticks the threads ``tids`` of this process have used."""
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def _python_threads() -> set[int]:
    # The main thread's tid is the pid. Its native_id is not: in a forked worker Python 3.11
    # still gives the supervisor's thread's.
    main = threading.main_thread()
    return {os.getpid() if t is main else t.native_id for t in threading.enumerate() if t.native_id is not None}


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set(tid: int, cpus: set[int]) -> OSError | None:
    """What refused ``cpus`` for thread ``tid``; None when set, or when the thread has ended."""
    try:
        os.sched_setaffinity(tid, cpus)
    except ProcessLookupError:  # the thread ended meanwhile
        return None
    except OSError as exc:
        return exc
    return None
