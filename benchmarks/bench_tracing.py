"""Checks per second with OpenTelemetry tracing on (--trace-ratio 1.0) versus off, in one run.

    python benchmarks/bench_tracing.py [--seconds 5] [--rounds 3] [--no-server]

Prints numbers; asserts nothing (not a test). Target: traced / untraced >= 0.9.

Every check carries a sampled W3C traceparent, so with tracing on every check makes a span.
An OTLP/gRPC receiver (tests/support/otlp.py, the published protos) runs in its own process
on this machine and takes every span; the numbers say how many spans it received and how
many authz dropped, since a span dropped costs less than one exported.

Three measurements, each for --rounds rounds. The machine is shared, so medians are
reported, and beside checks/s the CPU time authz spent per check (its whole process: check
path, gRPC, audit, exporter thread), which the neighbours disturb less:
- in process: Checker.check_bytes in a loop, the check path plus the exporter thread that
  shares the interpreter with it;
- server: a real `authz serve` on the example bundle under h2load (as bench_workers.py),
  once without and once with --otlp-endpoint, one after the other;
- side by side: both servers at once, each under its own h2load, so that whatever else runs
  on the machine disturbs both alike.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO / "tests"))

from bundle_factory import check_request, spiffe  # noqa: E402
from common import check_load, free_port  # noqa: E402

from authz.bundle.store import BundleStore  # noqa: E402
from authz.check import Checker  # noqa: E402
from authz.engine.compile import load_policy_set  # noqa: E402
from authz.metrics import Metrics  # noqa: E402
from authz.tracing import Settings, Tracing  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# One allowed check, as Envoy would send it for payment-service, inside a sampled trace.
REQUEST = check_request(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
                        destination=spiffe("payment", "payment-service"),
                        headers={"traceparent": TRACEPARENT, "x-request-id": "bench"})


class Receiver:
    """tests/support/otlp.py as a separate process; counts the spans it receives."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "otlp.py")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)


def dropped_and_exported(metrics_text: str) -> tuple[float, float]:
    dropped = sum(float(v) for v in re.findall(r"^authz_trace_spans_dropped_total\{[^}]*\} (\S+)$",
                                               metrics_text, re.M))
    m = re.search(r"^authz_trace_spans_exported_total (\S+)$", metrics_text, re.M)
    return dropped, float(m.group(1)) if m else 0.0


# --- in process ----------------------------------------------------------------------------


def in_process(endpoint: str | None, seconds: float) -> tuple[float, float, str]:
    metrics = Metrics()
    store = BundleStore(metrics)
    store.current = load_policy_set(REPO / "policies" / "example")
    tracing = Tracing(Settings(endpoint), metrics) if endpoint else None
    checker = Checker(store, metrics, tracing=tracing)
    data = REQUEST.SerializeToString()
    for _ in range(2000):
        checker.check_bytes(data)
    n = 0
    started, cpu = time.perf_counter(), time.process_time()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            checker.check_bytes(data)
        n += 200
    rate = n / (time.perf_counter() - started)
    if tracing is not None:
        tracing.close(timeout=10)  # the exporter's work on these spans counts too
    cpu_per_check = (time.process_time() - cpu) / n
    note = f"  cpu {cpu_per_check * 1e6:6.1f} µs/check"
    if tracing is not None:
        dropped, exported = dropped_and_exported(metrics.exposition().decode())
        note += (f"  (spans: {exported:.0f} exported, {dropped:.0f} dropped; exporter thread "
                 f"{tracing.exporter_cpu / max(exported + dropped, 1) * 1e6:.1f} µs/span)")
    return rate, cpu_per_check, note


# --- server ------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A real `authz serve` on the example bundle, auditing to a file; with --otlp-endpoint
    when ``endpoint`` is given."""

    def __init__(self, endpoint: str | None, tmp: str) -> None:
        self.endpoint = endpoint
        for _ in range(5):  # a free port can be taken by a neighbour before authz binds it
            if self._start(tmp):
                return
        raise SystemExit("authz serve did not start")

    def _start(self, tmp: str) -> bool:
        self.grpc, self.http = free_port(), free_port()
        extra = ["--otlp-endpoint", self.endpoint] if self.endpoint else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{self.grpc}",
             "--http-addr", f"127.0.0.1:{self.http}", "--audit-log",
             f"{tmp}/audit-{self.grpc}.log", "--log-level", "WARNING", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=1).read()
                time.sleep(0.3)
                if self.proc.poll() is None:
                    return True
            except OSError:
                time.sleep(0.2)
        self.stop()
        return False

    def cpu(self) -> float:
        return process_cpu(self.proc.pid)

    def spans(self) -> str:
        if not self.endpoint:
            return ""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=5).read()
        dropped, exported = dropped_and_exported(text.decode())
        return f"  (spans: {exported:.0f} exported, {dropped:.0f} dropped)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def load(srv: Server, seconds: float, connections: int, streams: int, tmp: str) -> float:
    """Checks/s h2load got answered by ``srv`` (its own folder: two may run at once)."""
    folder = Path(tmp) / f"load-{srv.grpc}"
    folder.mkdir(exist_ok=True)
    return check_load(srv.grpc, seconds, connections, streams, folder, REQUEST.SerializeToString()).rps


def server(endpoint: str | None, seconds: float, connections: int,
           streams: int) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        srv = Server(endpoint, tmp)
        try:
            time.sleep(0.5)
            cpu = srv.cpu()
            rate = load(srv, seconds, connections, streams, tmp)
            time.sleep(1.5)  # the exporter's last batch
            cpu_per_check = (srv.cpu() - cpu) / (rate * seconds)
            return rate, cpu_per_check, f"  cpu {cpu_per_check * 1e6:6.1f} µs/check{srv.spans()}"
        finally:
            srv.stop()


def side_by_side(endpoint: str, seconds: float, connections: int, streams: int
                 ) -> tuple[float, float, float, float, str]:
    """Both servers at once, each under its own h2load with the same load: whatever else
    runs on the machine disturbs both alike, and the scheduler gives each server a like
    share of CPU, so the ratio of their checks/s is the ratio of their cost per check."""
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        off, on = Server(None, tmp), Server(endpoint, tmp)
        try:
            time.sleep(0.5)
            cpu_off, cpu_on = off.cpu(), on.cpu()
            with ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(load, srv, seconds, connections, streams, tmp)
                        for srv in (off, on)]
                rate_off, rate_on = (r.result() for r in runs)
            time.sleep(1.5)
            per_off = (off.cpu() - cpu_off) / (rate_off * seconds)
            per_on = (on.cpu() - cpu_on) / (rate_on * seconds)
            return rate_off, rate_on, per_off, per_on, on.spans()
        finally:
            off.stop()
            on.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4, help="h2load HTTP/2 connections")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    ap.add_argument("--no-server", action="store_true", help="only the in-process measurement")
    args = ap.parse_args()
    receiver = Receiver()
    try:
        kinds = [("in process", lambda e: in_process(e, args.seconds))]
        if not args.no_server:
            if shutil.which("h2load") is None:
                raise SystemExit("the server measurement needs h2load: apt-get install nghttp2-client "
                                 "(or --no-server)")
            kinds.append(("authz serve + h2load",
                          lambda e: server(e, args.seconds, args.connections, args.streams)))
        for name, run in kinds:
            rates: dict[bool, list[float]] = {False: [], True: []}
            cpus: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.rounds):
                for on in (False, True):
                    rate, cpu, note = run(receiver.endpoint if on else None)
                    rates[on].append(rate)
                    cpus[on].append(cpu)
                    print(f"{name}, round {r + 1}: tracing {'on ' if on else 'off'}: "
                          f"{rate:9.0f} checks/s{note}", flush=True)
            off, on_ = statistics.median(rates[False]), statistics.median(rates[True])
            cpu_off, cpu_on = statistics.median(cpus[False]), statistics.median(cpus[True])
            print(f"{name}: median off {off:.0f} checks/s, on (ratio 1.0) {on_:.0f} checks/s, "
                  f"on/off {on_ / off:.2f} (target >= 0.90); cpu per check off "
                  f"{cpu_off * 1e6:.1f} µs, on {cpu_on * 1e6:.1f} µs, off/on {cpu_off / cpu_on:.2f}",
                  flush=True)
        if not args.no_server:
            ratios, cpu_ratios = [], []
            for r in range(args.rounds):
                rate_off, rate_on, per_off, per_on, note = side_by_side(
                    receiver.endpoint, args.seconds, args.connections, args.streams)
                ratios.append(rate_on / rate_off)
                cpu_ratios.append(per_off / per_on)
                print(f"side by side, round {r + 1}: off {rate_off:7.0f} checks/s "
                      f"(cpu {per_off * 1e6:5.1f} µs/check), on {rate_on:7.0f} checks/s "
                      f"(cpu {per_on * 1e6:5.1f} µs/check){note}: on/off {rate_on / rate_off:.2f}",
                      flush=True)
            print(f"side by side: median on/off {statistics.median(ratios):.2f} (target >= 0.90), "
                  f"cpu per check off/on {statistics.median(cpu_ratios):.2f}", flush=True)
    finally:
        receiver.close()


if __name__ == "__main__":
    main()
