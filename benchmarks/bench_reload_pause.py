"""The worst check latency seen while a large candidate bundle loads, and memory after a rejected one.

    python benchmarks/bench_reload_pause.py [--tenants 100000] [--rules 10000]

Prints numbers; asserts nothing (not a test). A real `authz serve` watches a bundle directory
on 127.0.0.1; a client decides one check after another (one in flight) the whole time and
records each latency. The directory is then replaced by (1) a candidate with --tenants
tenants, (2) one with --rules rules, (3) a broken candidate as large as (1), which the gate
rejects. For each, the worst and p99 check latency while it was read, compiled and swapped
are printed beside the same figures before it, with the server's resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import check_request, spiffe  # noqa: E402

CALLER = spiffe("prod", "svc1")
TARGET = spiffe("prod", "orders-api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manifest(revision: str) -> str:
    return yaml.safe_dump({"apiVersion": "authz/v1", "kind": "Bundle", "name": "bench",
                           "revision": revision, "trustDomain": "cluster.local"})


def tenants_bundle(root: Path, revision: str, tenants: int, broken: bool = False) -> None:
    (root / "policies").mkdir(parents=True)
    (root / "tenants").mkdir()
    (root / "bundle.yaml").write_text(manifest(revision))
    (root / "policies" / "orders.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Policy", "name": "orders", "target": {"principals": [TARGET]},
        "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
        "rules": [{"name": "tenant-callers", "to": [{"operation": {"paths": ["/v1/tenants/{tenant}/{**}"]}}],
                   "when": ["source.principal in tenant.callers"]}]}))
    data = {"tenants": {f"t{i}": {"plan": "standard", "callers": [spiffe("prod", f"svc{i % 97}")],
                                  "flags": {"beta": i % 2 == 0}, "attributes": {"region": f"r{i % 7}"}}
                        for i in range(tenants)}}
    if broken:  # the very last tenant is malformed: everything is parsed before it is found
        data["tenants"][f"t{tenants - 1}"]["callers"] = "not-a-list"
    (root / "tenants" / "tenants.json").write_text(json.dumps(data))


def rules_bundle(root: Path, revision: str, rules: int) -> None:
    (root / "policies").mkdir(parents=True)
    (root / "bundle.yaml").write_text(manifest(revision))
    (root / "policies" / "orders.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Policy", "name": "orders", "target": {"principals": [TARGET]},
        "action": "ALLOW",
        "rules": [{"name": f"r{i}", "from": [{"source": {"principals": [spiffe("prod", f"svc{i % 97}")]}}],
                   "to": [{"operation": {"methods": ["GET"], "paths": [f"/v1/items/{i}/{{*}}"]}}]}
                  for i in range(rules)]}))


def publish(live: Path, build: callable, *args: object) -> None:  # type: ignore[valid-type]
    """Build the candidate beside ``live`` and swap it in with renames (like a ConfigMap)."""
    new = live.with_name(live.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    build(new, *args)
    old = live.with_name(live.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    live.rename(old)
    new.rename(live)
    shutil.rmtree(old, ignore_errors=True)


class Prober:
    """One check after another, forever; (when, latency) of each."""

    def __init__(self, port: int) -> None:
        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc

        self.ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = external_auth_pb2_grpc.AuthorizationStub(self.ch)
        self.req = check_request(principal=CALLER, method="GET", path="/v1/tenants/t1/x", destination=TARGET)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            self.stub.Check(self.req, timeout=30)
            self.samples.append((t0, time.monotonic() - t0))

    def window(self, start: float, end: float) -> list[float]:
        return sorted(lat for t, lat in self.samples if start <= t <= end)


def status(http: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/status", timeout=10) as r:
        return json.loads(r.read())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summary(lat: list[float]) -> str:
    if not lat:
        return "no checks"
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return f"{len(lat):6d} checks, p50 {lat[len(lat) // 2] * 1000:6.2f} ms, p99 {p99 * 1000:7.2f} ms, worst {lat[-1] * 1000:7.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--rules", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as tmp:
        live = Path(tmp) / "bundle"
        tenants_bundle(live, "small", 100)
        g, h = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--bundle", str(live), "--grpc-addr", f"127.0.0.1:{g}",
             "--http-addr", f"127.0.0.1:{h}", "--audit-log", str(Path(tmp) / "audit.log"),
             "--watch-interval", "0.2", "--log-level", "WARNING", "--drain-grace", "0"],
            stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if status(h).get("revision") == "small":
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("authz serve did not load the first bundle")
                time.sleep(0.2)
            prober = Prober(g)
            prober.thread.start()
            time.sleep(3.0)
            print(f"baseline (3 s, small bundle):      {summary(prober.window(0, time.monotonic()))}, "
                  f"rss {rss_mib(server.pid):.0f} MiB")
            steps = [
                (f"{args.tenants} tenants", "tenants", tenants_bundle, (args.tenants,), "tenants"),
                (f"{args.rules} rules", "rules", rules_bundle, (args.rules,), "rules"),
                ("back to 100 tenants", "small2", tenants_bundle, (100,), "small2"),
                (f"rejected: {args.tenants} tenants, one broken", "broken", tenants_bundle,
                 (args.tenants, True), None),
            ]
            for label, revision, build, extra, expect in steps:
                before = status(h)
                rss_before = rss_mib(server.pid)
                t0 = time.monotonic()
                publish(live, build, revision, *extra)
                written = time.monotonic()
                while True:
                    st = status(h)
                    if expect is not None and st.get("revision") == expect:
                        break
                    if expect is None and st.get("last_attempt_at") != before.get("last_attempt_at") \
                            and st.get("last_result") == "rejected":
                        break
                    if time.monotonic() - written > 300:
                        raise SystemExit(f"{label}: no load after 300 s: {st}")
                    time.sleep(0.05)
                done = time.monotonic()
                time.sleep(1.0)
                lat = prober.window(written, done + 0.5)
                print(f"{label:34s} loaded in {done - written:5.1f} s (written in {written - t0:4.1f} s): "
                      f"{summary(lat)}; rss {rss_before:.0f} -> {rss_mib(server.pid):.0f} MiB"
                      + (f"; {st.get('last_error', '')[:80]}" if expect is None else ""))
            time.sleep(2.0)
            print(f"rss 3 s after the rejected candidate: {rss_mib(server.pid):.0f} MiB")
            prober.stop.set()
            prober.thread.join(30)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    _ = os


if __name__ == "__main__":
    main()
