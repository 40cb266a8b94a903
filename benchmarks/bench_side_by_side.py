"""authz serve against the floor (a trivial grpc.aio Check server answering a prebuilt OK), side by side.

    python benchmarks/bench_side_by_side.py [--tenants 1000 100000] [--workers 1 2] [--rounds 3]
                                            [--seconds 5] [--stack aio sync]

Prints numbers; asserts nothing (not a test). For each tenant count, every server is started
once (the floor with N processes, authz serve --workers N on the same bundle, auditing to a
file), then the rounds run the same h2load loads against each in turn (interleaved, so a noisy
neighbour hits both alike):

  saturated   h2load, 8 connections x 16 streams: checks/s, server CPU µs per check
              (utime+stime of the server's process tree from /proc over the run)
  one stream  h2load, 1 connection x 1 stream: p50 / p99 ms from h2load's per-request log

and prints per-round ratios authz/floor and their medians. Rows named "authz aio" are `authz serve`
itself (grpcio's threaded server since the serving-stack switch) against the grpc.aio floor;
``--stack sync`` adds a threaded floor and authz's Checker on that floor's server, and
``--baseline-src`` an older checkout's `authz serve` (docs/performance.md, "Serving stack").
Everything is on 127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (REPO, check_load, cpu_seconds, envoy_like_request, free_port, machine_load,
                    make_bundle, median, pss_mb, rss_mb, tree, wait_http, wait_port)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    results: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_floor(workers: int, stack: str) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "floor_server.py"), "--port", str(port),
                             "--processes", str(workers), "--stack", stack])
    wait_port(port)
    time.sleep(0.5 * workers)
    return Server(f"floor {stack} x{workers}", proc, port)


def start_authz(workers: int, bundle: Path, tmp: Path, stack: str, extra: list[str],
                baseline: Path | None = None) -> Server:
    g, h = free_port(), free_port()
    env = dict(os.environ)
    cwd = None
    if baseline is not None:  # another checkout of authz (e.g. `git archive` of an older commit)
        # `python -m` puts the working directory first on sys.path, before PYTHONPATH: run
        # from the baseline, or started from this checkout it would run this checkout's code.
        env["PYTHONPATH"] = str(baseline)
        cwd = baseline
        imported = subprocess.run([sys.executable, "-c", "import authz; print(authz.__file__)"], env=env,
                                  cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(imported).resolve().is_relative_to(baseline.resolve()):
            raise SystemExit(f"--baseline-src {baseline}: authz would be imported from {imported}")
    if stack != "aio":  # authz's check path on grpcio's threaded server (benchmarks/floor_server.py)
        proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "floor_server.py"), "--port", str(g),
                                 "--processes", str(workers), "--stack", stack, "--authz-bundle", str(bundle),
                                 "--audit-log", str(tmp / f"audit-{stack}-{workers}.log")])
        wait_port(g, timeout=300)
        time.sleep(2.0 * workers)
        return Server(f"authz {stack} x{workers}", proc, g)
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--bundle", str(bundle), "--workers", str(workers),
         "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}",
         "--audit-log", str(tmp / f"audit-{stack}-{workers}{'-base' if baseline else ''}.log"),
         "--log-level", "WARNING", *extra],
        stdout=subprocess.DEVNULL, env=env, cwd=cwd)
    wait_http(f"http://127.0.0.1:{h}/readyz", timeout=300)
    wait_port(g)
    time.sleep(1.0 + workers)  # every worker up and its bundle loaded
    if workers > 1:
        deadline = time.monotonic() + 300
        while len(tree(proc.pid)) < workers + 1 and time.monotonic() < deadline:
            time.sleep(0.5)
    return Server(f"{'before' if baseline else 'authz'} {stack} x{workers}", proc, g)


def verify_allowed(port: int, body: bytes) -> None:
    """The benchmarked check must be a real allow, or the numbers measure a deny."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        resp = external_auth_pb2.CheckResponse.FromString(call(body, timeout=10))
    if resp.status.code != 0:
        raise SystemExit(f"benchmark request is not allowed by authz: {resp}")


def run_round(srv: Server, body: bytes, seconds: float, tmp: Path, one_stream: bool) -> None:
    pids = tree(srv.proc.pid)
    c0 = cpu_seconds(pids)
    sat = check_load(srv.port, seconds, 8, 16, tmp, body)
    c1 = cpu_seconds(pids)
    if sat.failed or not sat.succeeded:
        print(f"  !! {srv.name}: {sat.failed} failed requests", flush=True)
    srv.add("rps", sat.rps)
    srv.add("cpu_us", (c1 - c0) / max(1, sat.succeeded) * 1e6)
    srv.add("cores", (c1 - c0) / seconds)
    line = f"  {srv.name:<16} saturated {sat.rps:7.0f} checks/s  CPU {srv.results['cpu_us'][-1]:5.0f} µs/check " \
           f"({srv.results['cores'][-1]:.2f} cores)"
    if one_stream:
        one = check_load(srv.port, seconds, 1, 1, tmp, body, latencies=True)
        srv.add("p50", one.pct(0.50))
        srv.add("p99", one.pct(0.99))
        line += f"  one stream {one.rps:6.0f}/s p50 {srv.results['p50'][-1]:.3f} p99 {srv.results['p99'][-1]:.3f} ms"
    print(line, flush=True)


def ratio_table(floor: Server, authz: Server, rounds: int) -> None:
    keys = [k for k in ("cpu_us", "rps", "p50", "p99") if k in authz.results]
    names = {"cpu_us": "CPU µs/check", "rps": "checks/s", "p50": "1-stream p50", "p99": "1-stream p99"}
    print(f"  ratios {authz.name} / {floor.name}:")
    for k in keys:
        ratios = [a / f for a, f in zip(authz.results[k], floor.results[k])]
        print(f"    {names[k]:<14} per round " + "  ".join(f"{r:.2f}" for r in ratios)
              + f"   median {median(ratios):.2f}x   (medians: authz {median(authz.results[k]):.3f}, "
              f"floor {median(floor.results[k]):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stack", nargs="+", default=["aio"], choices=["aio", "sync"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--authz-arg", action="append", default=[], help="extra argument for authz serve")
    ap.add_argument("--baseline-src", type=Path, metavar="DIR",
                    help="also run authz serve (aio) from this source tree, e.g. `git archive <commit>` "
                         "unpacked, as 'before' beside the floor: before/after in one run")
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load: apt-get install nghttp2-client")
    print(f"machine: {os.cpu_count()} cores, load average {machine_load()} at start", flush=True)
    for count in args.tenants:
        with tempfile.TemporaryDirectory(prefix="authz-sbs-") as tmp_s:
            tmp = Path(tmp_s)
            bundle = make_bundle(tmp / "bundle", count)
            body = envoy_like_request(count).SerializeToString()
            pairs: list[tuple[Server, Server]] = []
            started: list[Server] = []
            try:
                for workers in args.workers:
                    for stack in args.stack:
                        floor = start_floor(workers, stack)
                        started.append(floor)
                        authz = start_authz(workers, bundle, tmp, stack, args.authz_arg)
                        started.append(authz)
                        if args.baseline_src is not None and stack == "aio":
                            before = start_authz(workers, bundle, tmp, stack, args.authz_arg, args.baseline_src)
                            started.append(before)
                            pairs.append((floor, before))
                            verify_allowed(before.port, body)
                        pairs.append((floor, authz))
                        verify_allowed(authz.port, body)
                        pids = tree(authz.proc.pid)
                        print(f"{count} tenants, {authz.name}: RSS {rss_mb(pids):.0f} MB, PSS {pss_mb(pids):.0f} MB "
                              f"after load (floor {rss_mb(tree(floor.proc.pid)):.0f} MB)", flush=True)
                for r in range(args.rounds):
                    print(f"{count} tenants, round {r + 1} (load average {machine_load()})", flush=True)
                    for srv in started:  # each server once a round, floor first, in start order
                        run_round(srv, body, args.seconds, tmp, srv.name.endswith("x1"))
                print(f"{count} tenants, medians of {args.rounds} rounds:")
                for floor, authz in pairs:
                    pids = tree(authz.proc.pid)
                    print(f"  {authz.name}: RSS {rss_mb(pids):.0f} MB, PSS {pss_mb(pids):.0f} MB after the load, "
                          f"peak (sum of VmHWM) {rss_mb(pids, 'VmHWM'):.0f} MB")
                    ratio_table(floor, authz, args.rounds)
                by_name = {srv.name: srv for pair in pairs for srv in pair}
                for workers in args.workers:
                    for kind in ("floor", "authz"):
                        a, b = by_name.get(f"{kind} aio x{workers}"), by_name.get(f"{kind} sync x{workers}")
                        if a is not None and b is not None:
                            print(f"  {kind} x{workers} sync / aio: CPU µs/check "
                                  f"{median(b.results['cpu_us']) / median(a.results['cpu_us']):.2f}x, checks/s "
                                  f"{median(b.results['rps']) / median(a.results['rps']):.2f}x")
                for workers in args.workers:
                    a, b = by_name.get(f"authz aio x{workers}"), by_name.get(f"before aio x{workers}")
                    if a is not None and b is not None:
                        ratios = "  ".join(f"{k} {median(a.results[k]) / median(b.results[k]):.2f}x"
                                           for k in ("cpu_us", "rps", "p50", "p99") if k in a.results)
                        print(f"  authz aio x{workers} after / before (medians): {ratios}")
                base = {s: a for f, a in pairs if f.name.endswith("x1") and a.name.startswith("authz")
                        for s in [a.name.split()[1]]}
                for floor, authz in pairs:
                    stack = authz.name.split()[1]
                    if authz.name.startswith("before"):
                        continue
                    if not authz.name.endswith("x1") and stack in base:
                        gain = median(authz.results["rps"]) / median(base[stack].results["rps"])
                        print(f"  {authz.name} / {base[stack].name} checks/s: {gain:.2f}x")
            finally:
                for srv in started:
                    srv.stop()
    print(f"machine load average at end: {machine_load()}")


if __name__ == "__main__":
    main()
