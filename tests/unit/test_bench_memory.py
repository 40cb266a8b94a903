"""benchmarks/common.py's memory measures, which issue 11's memory figures come from: the
distinct pages of a process tree count a page once however many processes map it."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from common import distinct_mb, rss_mb  # noqa: E402


def _frame_numbers_readable() -> bool:
    page = os.sysconf("SC_PAGE_SIZE")
    probe = bytearray(page)  # touched, so present
    probe[0] = 1
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        start = int(maps.readline().split("-")[0], 16)
        pagemap.seek(start // page * 8)
        (entry,) = struct.unpack("Q", pagemap.read(8))
    return entry & ((1 << 55) - 1) != 0


def test_distinct_pages_of_one_process_are_its_rss_and_each_page_counts_once() -> None:
    me = os.getpid()
    got = distinct_mb([me])
    if not _frame_numbers_readable():  # without CAP_SYS_ADMIN the kernel hides frame numbers
        assert got is None
        return
    assert got is not None
    rss = rss_mb([me])
    assert abs(got - rss) <= max(2.0, 0.05 * rss), (got, rss)
    # the same process twice: every page is already counted
    twice = distinct_mb([me, me])
    assert twice is not None and abs(twice - got) <= 1.0
    # a forked child shares almost all of its pages with its parent until it writes them
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
        pair = distinct_mb([me, child])
        assert pair is not None
        assert pair < got + 0.5 * rss, (pair, got)  # far less than two RSS
        assert rss_mb([me, child]) > pair + 0.25 * rss  # where summing RSS counts them twice
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
