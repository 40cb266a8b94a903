"""Checks per second and memory of `authz serve --workers 1` versus `--workers 2`, on this machine, in one run.

    python benchmarks/bench_workers.py [--seconds 5] [--connections 8] [--streams 16] [--tenants N]

Prints numbers; asserts nothing (not a test). Each configuration is a real `authz serve` on the
example bundle (or, with --tenants, a generated bundle of that many tenants), auditing to a
file, running alone: memory is the PSS of its process tree (supervisor and workers), once the
bundle is loaded and again after the load. PSS divides a page that processes share between
them, so the tree's PSS is the memory it holds; RSS would count a shared page once per process.
PSS also splits a shared library's pages with every other process on the machine, so where
frame numbers can be read (root) the distinct physical pages of the tree are printed too:
each page counted once, shared libraries whole, which for one worker is its RSS (the
measure issue 11's memory target names). The load comes from h2load (Debian's nghttp2-client, as in
design/measurements.md) over several HTTP/2 connections, since the kernel spreads connections,
not requests, over the workers. (A Python load generator costs more CPU per call than the
server and would hide the gain on a small machine.)
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import check_request, spiffe  # noqa: E402
from common import (check_load, distinct_mb, envoy_like_request, free_port, make_bundle, median,  # noqa: E402
                    pss_mb, tree, wait_http)

# One allowed check, as Envoy would send it for payment-service.
REQUEST = check_request(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
                        destination=spiffe("payment", "payment-service"))


def measure(workers: int, seconds: float, connections: int, streams: int, tenants: int | None,
            ) -> tuple[float, float, float, float | None, float | None]:
    """checks/s; PSS in MB with the bundle loaded and after the load; the same for the
    distinct pages of the tree (None without the rights to read frame numbers)."""
    g, h = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        bundle = ["--bundle", str(make_bundle(Path(tmp) / "bundle", tenants))] if tenants else []
        message = (envoy_like_request(tenants) if tenants else REQUEST).SerializeToString()
        server = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--workers", str(workers), "--grpc-addr",
             f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}", "--audit-log", f"{tmp}/audit.log",
             "--log-level", "WARNING", *bundle], stdout=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{h}/readyz", timeout=60)
            time.sleep(3.0)  # every worker up and loaded
            pids = tree(server.pid)
            loaded, loaded_pages = pss_mb(pids), distinct_mb(pids)
            rate = check_load(g, seconds, connections, streams, Path(tmp), message).rps
            pids = tree(server.pid)
            return rate, loaded, pss_mb(pids), loaded_pages, distinct_mb(pids)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=8, help="HTTP/2 connections")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per h2load connection")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tenants", type=int, help="a generated bundle of this many tenants instead of the example")
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("bench_workers needs h2load: apt-get install nghttp2-client")
    results: dict[int, list[tuple[float, ...]]] = {1: [], 2: []}
    pages_known = True
    for r in range(args.rounds):
        for workers in (1, 2):
            rate, loaded, after, loaded_pages, after_pages = measure(
                workers, args.seconds, args.connections, args.streams, args.tenants)
            pages_known = pages_known and loaded_pages is not None and after_pages is not None
            results[workers].append((rate, loaded, after, loaded_pages or 0.0, after_pages or 0.0))
            pages = (f"; distinct pages {loaded_pages:5.0f} MB loaded, {after_pages:5.0f} MB after"
                     if loaded_pages is not None and after_pages is not None else "")
            print(f"round {r + 1}: --workers {workers}: {rate:8.0f} checks/s, PSS {loaded:5.0f} MB loaded, "
                  f"{after:5.0f} MB after the load{pages}", flush=True)
    one = [median([row[i] for row in results[1]]) for i in range(5)]
    two = [median([row[i] for row in results[2]]) for i in range(5)]
    print(f"load from h2load, {args.connections} connections x {args.streams} streams; "
          f"{f'{args.tenants} tenants' if args.tenants else 'the example bundle'}")
    print(f"median: --workers 1 {one[0]:.0f} checks/s, --workers 2 {two[0]:.0f} checks/s ({two[0] / one[0]:.2f}x)")
    print(f"median PSS loaded: --workers 1 {one[1]:.0f} MB, --workers 2 {two[1]:.0f} MB ({two[1] / one[1]:.2f}x)")
    print(f"median PSS after the load: --workers 1 {one[2]:.0f} MB, --workers 2 {two[2]:.0f} MB "
          f"({two[2] / one[2]:.2f}x)")
    if pages_known:  # one worker's distinct pages are its RSS: the measure issue 11 names
        print(f"median distinct pages (the tree's RSS, each page once) loaded: --workers 1 {one[3]:.0f} MB "
              f"(its RSS), --workers 2 {two[3]:.0f} MB ({two[3] / one[3]:.2f}x); after the load: "
              f"{one[4]:.0f} MB, {two[4]:.0f} MB ({two[4] / one[4]:.2f}x)")
    else:
        print("distinct pages: not measured (reading frame numbers from /proc/<pid>/pagemap needs "
              "CAP_SYS_ADMIN)")

if __name__ == "__main__":
    main()
