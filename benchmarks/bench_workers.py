"""Checks per second of `authz serve --workers 1` versus `--workers 2`, on this machine, in one run.

    python benchmarks/bench_workers.py [--seconds 5] [--connections 8] [--streams 16]

Prints numbers; asserts nothing (not a test). Each configuration is a real `authz serve` on the
example bundle, auditing to a file. The load comes from h2load (Debian's nghttp2-client, as in
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
from common import check_load, free_port, wait_http  # noqa: E402

# One allowed check, as Envoy would send it for payment-service.
REQUEST = check_request(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
                        destination=spiffe("payment", "payment-service"))


def measure(workers: int, seconds: float, connections: int, streams: int) -> float:
    g, h = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--workers", str(workers), "--grpc-addr",
             f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}", "--audit-log", f"{tmp}/audit.log",
             "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{h}/readyz", timeout=30)
            time.sleep(1.0)  # every worker up
            return check_load(g, seconds, connections, streams, Path(tmp), REQUEST.SerializeToString()).rps
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=8, help="HTTP/2 connections")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per h2load connection")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("bench_workers needs h2load: apt-get install nghttp2-client")
    results: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for workers in (1, 2):
            rate = measure(workers, args.seconds, args.connections, args.streams)
            results[workers].append(rate)
            print(f"round {r + 1}: --workers {workers}: {rate:8.0f} checks/s", flush=True)
    one, two = sorted(results[1])[len(results[1]) // 2], sorted(results[2])[len(results[2]) // 2]
    print(f"load from h2load, {args.connections} connections x {args.streams} streams")
    print(f"median: --workers 1 {one:.0f} checks/s, --workers 2 {two:.0f} checks/s ({two / one:.2f}x)")


if __name__ == "__main__":
    main()
