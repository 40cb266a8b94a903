"""benchmarks/common.py's memory measures, which issue 11's memory figures come from: the
distinct pages of a process tree count a page once however many processes map it."""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from common import distinct_mb, rss_mb  # noqa: E402


def _frame_numbers_readable() -> bool:
    """Whether the kernel shows this process frame numbers: read for a page just written."""
    page = os.sysconf("SC_PAGE_SIZE")
    probe = bytearray(2 * page)
    address = ctypes.addressof((ctypes.c_char * len(probe)).from_buffer(probe))
    inside = (address // page + 1) * page  # a whole page inside the buffer
    probe[inside - address] = 1  # written, so present
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(inside // page * 8)
        (entry,) = struct.unpack("Q", pagemap.read(8))
    assert entry >> 63, "the page just written is not present"
    return entry & ((1 << 55) - 1) != 0


def test_distinct_pages_of_one_process_are_its_rss_and_each_page_counts_once() -> None:
    # Measured on an idle forked child: this process's own memory moves while it measures.
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        os.write(w, b"x")
        import time

        time.sleep(30)  # killed by the parent once measured
        os._exit(0)
    os.close(w)
    try:
        os.read(r, 1)
        one = distinct_mb([child])
        if not _frame_numbers_readable():  # without CAP_SYS_ADMIN the kernel hides frame numbers
            assert one is None
            return
        assert one is not None
        rss = rss_mb([child])
        assert abs(one - rss) <= max(1.0, 0.05 * rss), (one, rss)
        # the same process twice: every page is already counted
        twice = distinct_mb([child, child])
        assert twice is not None and abs(twice - one) <= 0.1, (twice, one)
        # the child shares almost all of its pages with this process until it writes them,
        # so the pair holds little more than this process alone; summing RSS counts them twice
        me = os.getpid()
        pair = distinct_mb([me, child])
        assert pair is not None
        assert pair < rss_mb([me]) + 0.5 * rss, (pair, rss)
        assert rss_mb([me, child]) > pair + 0.5 * rss
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
