"""`authz serve --cpu-affinity auto`: every thread of a serving process on one CPU.

A check crosses several threads (gRPC's poller, a serving thread, the audit writer), each
taking the GIL in turn. Spread over cores, every hand-over wakes a thread on another core:
measured here (docs/performance.md, "CPU affinity"), one process of authz spent 22% less
CPU per check with all its threads on one core, and answered as many checks per second.
Process ``index`` (the worker number under --workers) takes the index-th CPU it may use,
counted from the last (CPU 0 tends to serve interrupts), so workers do not share one.
"""

from __future__ import annotations

import os


def pin_process(index: int) -> int | None:
    """Pin every thread of this process (and the threads they start) to one CPU; returns it,
    or None where CPU affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1 - index % len(allowed)]
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # the thread ended meanwhile
            pass
    return cpu
