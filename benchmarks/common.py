"""Helpers shared by the benchmarks: bundles, the realistic request, h2load, /proc readings.

Not a test module. Everything here targets 127.0.0.1 only and every load run is bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO))

from bundle_factory import check_request  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402

ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_bundle(root: Path, tenants: int) -> Path:
    """The example bundle with ``tenants`` generated tenants (callers svc0..svc96) plus acme."""
    shutil.copytree(REPO / "policies" / "example", root, ignore=shutil.ignore_patterns("tests"))
    data = {"tenants": {f"t{i}": {"plan": "standard", "callers": [f"spiffe://cluster.local/ns/prod/sa/svc{i % 97}"],
                                  "flags": {"beta": i % 2 == 0}} for i in range(tenants)}}
    data["tenants"]["acme"] = {"plan": "enterprise", "callers": ["spiffe://cluster.local/ns/prod/sa/checkout-api"]}
    (root / "tenants" / "tenants.yaml").unlink()
    (root / "tenants" / "tenants.json").write_text(json.dumps(data))
    return root


def envoy_like_request(tenants: int) -> external_auth_pb2.CheckRequest:
    """An allowed tenant-route check shaped like Envoy's: 15 headers incl. a 1 KB authorization."""
    k = tenants // 2
    headers = {
        ":authority": "orders.prod.svc.cluster.local", ":method": "GET", ":path": f"/v1/tenants/t{k}/orders",
        ":scheme": "https", "accept": "application/json", "accept-encoding": "gzip, deflate",
        "authorization": "Bearer " + "x" * 1017, "content-length": "0", "user-agent": "bench/1.0",
        "x-b3-sampled": "1", "x-b3-spanid": "a2fb4a1d1a96d312", "x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124",
        "x-envoy-expected-rq-timeout-ms": "15000", "x-forwarded-proto": "https",
        "x-request-id": "5b9f8f0e-6c55-4c1a-9d0b-4f1b0c0de111",
    }
    cr = check_request(principal=f"spiffe://cluster.local/ns/prod/sa/svc{k % 97}", method="GET",
                       path=f"/v1/tenants/t{k}/orders", host="orders.prod.svc.cluster.local",
                       headers=headers, destination=ORDERS)
    cr.attributes.request.http.scheme = "https"
    cr.attributes.request.http.protocol = "HTTP/2"
    cr.attributes.request.http.id = "1234567890"
    return cr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.2)


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"port {port} did not open within {timeout:.0f} s") from None
            time.sleep(0.1)


# --- /proc --------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            continue
    return total / CLK_TCK


def rss_mb(pids: list[int], field: str = "VmRSS") -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def pss_mb(pids: list[int]) -> float:
    """Proportional set size: memory shared between workers counted once in total."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def distinct_mb(pids: list[int]) -> float | None:
    """The memory of the physical pages the processes map, each page counted once however
    many of them map it (shared libraries included): for one process that is its RSS, for a
    supervisor and its forked workers what RSS would be if they were one process. PSS splits a
    shared library's pages with every other process on the machine; this does not. None where
    /proc/<pid>/pagemap gives no frame numbers (they need CAP_SYS_ADMIN)."""
    page = os.sysconf("SC_PAGE_SIZE")
    frames: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    try:
                        pagemap.seek(start // page * 8)
                        entries = pagemap.read((end - start) // page * 8)
                    except OSError:  # [vsyscall]
                        continue
                    for (entry,) in struct.iter_unpack("Q", entries):
                        if entry >> 63:  # present in memory
                            frames.add(entry & ((1 << 55) - 1))
        except OSError:  # the process ended meanwhile
            continue
    if frames == {0} or (not frames and pids):
        return None
    return len(frames) * page / 2**20


def machine_load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- h2load -------------------------------------------------------------------------------


@dataclass
class LoadResult:
    rps: float
    succeeded: int
    failed: int
    latencies_us: list[float]
    status_codes: str = ""  # h2load's "status codes:" line, e.g. "2xx 1000, 3xx 0, 4xx 0, 5xx 0"

    def pct(self, q: float) -> float:
        s = sorted(self.latencies_us)
        return s[min(len(s) - 1, int(len(s) * q))] / 1000 if s else float("nan")


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


CHECK_URL = "http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def check_load(port: int, seconds: float, connections: int, streams: int, tmp: Path, message: bytes,
               **kw: object) -> LoadResult:
    """h2load posting one gRPC-framed CheckRequest (``message``, serialized) to ``port`` repeatedly."""
    return h2load(CHECK_URL.format(port=port), seconds, connections, streams, Path(tmp), body=grpc_frame(message),
                  headers=GRPC_HEADERS, **kw)  # type: ignore[arg-type]


def h2load(url: str, seconds: float, connections: int, streams: int, tmp: Path, body: bytes | None = None,
           headers: tuple[str, ...] = (), rps: float | None = None, method: str | None = None,
           latencies: bool = False, warmup: float = 0.0, h1: bool = False) -> LoadResult:
    """One bounded h2load run (whole seconds, as h2load takes them); with ``latencies`` each
    request's time is read from --log-file; ``h1``: HTTP/1.1 instead of HTTP/2."""
    args = ["h2load", "-t", "1", "-c", str(connections), "-m", str(streams), "-D", str(max(1, round(seconds)))]
    if h1:
        args.append("--h1")
    if warmup:
        args += ["--warm-up-time", str(warmup)]
    if body is not None:
        frame = tmp / "body.bin"
        frame.write_bytes(body)
        args += ["-d", str(frame)]
    if method:
        args += ["-H", f":method: {method}"]
    for h in headers:
        args += ["-H", h]
    if rps is not None:
        args += ["--rps", str(rps / connections)]
    log_file = tmp / "h2load.log"
    if latencies:
        args += ["--log-file", str(log_file)]
    args.append(url)
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + warmup + 60).stdout
    rate = succeeded = failed = 0
    codes = ""
    for line in out.splitlines():
        if line.startswith("finished in"):
            rate = float(line.split(",")[1].split()[0])  # "finished in 5.00s, 4321.00 req/s, ..."
        elif line.startswith("status codes:"):
            codes = line.split(":", 1)[1].strip()
        elif line.startswith("requests:"):
            parts = line.split(",")
            succeeded = int(next(p for p in parts if "succeeded" in p).split()[0])
            failed = int(next(p for p in parts if "failed" in p).split()[0])
    if not rate:
        raise SystemExit(f"unexpected h2load output:\n{out}")
    lat: list[float] = []
    if latencies:
        for line in log_file.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1].startswith("2"):
                lat.append(float(cols[2]))
        log_file.unlink()
    return LoadResult(rate, succeeded, failed, lat, codes)


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
