"""Time from `./scripts/serve` to a ready service (/readyz 200), with the venv already installed.

    python benchmarks/bench_start.py [--rounds 5]

Prints numbers; asserts nothing (not a test). The network is made unusable for the child
(proxies pointing at a blackhole address, pip told to use no index), so a start that tried to
install would fail or stall instead of passing unnoticed. The target in issue 12: under 2 s.
Ports are free ones on 127.0.0.1; the audit log goes to /dev/null.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "PIP_NO_INDEX": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_start() -> float:
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, **OFFLINE}
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "serve"), "--grpc-addr", f"127.0.0.1:{grpc_port}",
         "--http-addr", f"127.0.0.1:{http_port}", "--audit-log", "/dev/null"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        while time.monotonic() - started < 60:
            if proc.poll() is not None:
                raise SystemExit(f"scripts/serve exited with {proc.returncode}")
            try:
                if opener.open(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status == 200:
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.01)
        raise SystemExit("not ready within 60 s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = [one_start() for _ in range(args.rounds)]
    print("scripts/serve to ready, offline, ready venv: " +
          ", ".join(f"{t:.2f}" for t in times) + f" s; median {statistics.median(times):.2f} s (target < 2 s)")


if __name__ == "__main__":
    main()
