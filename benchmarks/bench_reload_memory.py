"""Prints resident memory before and after 100 successive reloads of a bundle with many tenants.

Not a test: it prints numbers. Every reload goes through the whole gate (snapshot, verify,
parse, validate, compile, swap) from a directory whose content alternates between two
revisions, while a thread keeps deciding checks on whatever bundle serves. Resident memory
after the 100 reloads should be about what it was after the second load (old + new is
the most a reload ever holds), and only one PolicySet should be alive.

Run: python benchmarks/bench_reload_memory.py [--tenants 10000] [--reloads 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from authz.bundle.sources import DirectorySource  # noqa: E402
from authz.bundle.store import LOADED, BundleStore  # noqa: E402
from authz.check import Checker  # noqa: E402
from authz.engine.decide import PolicySet  # noqa: E402
from authz.metrics import Metrics  # noqa: E402

ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_bundle(root: Path, revision: str, tenants: int) -> None:
    (root / "policies").mkdir(parents=True, exist_ok=True)
    (root / "tenants").mkdir(exist_ok=True)
    (root / "bundle.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "authz/v1",
                "kind": "Bundle",
                "name": "bench",
                "revision": revision,
                "trustDomain": "cluster.local",
            }
        )
    )
    policy = {
        "apiVersion": "authz/v1",
        "kind": "Policy",
        "name": "orders",
        "target": {"principals": [ORDERS]},
        "action": "ALLOW",
        "tenant": {"pathCapture": "tenant"},
        "rules": [
            {
                "name": "tenant-callers",
                "to": [{"operation": {"paths": ["/v1/tenants/{tenant}/{**}"]}}],
                "when": ["source.principal in tenant.callers"],
            }
        ],
    }
    (root / "policies" / "orders.yaml").write_text(yaml.safe_dump(policy))
    data = {
        "tenants": {
            f"t{i}-{revision}": {
                "plan": "standard",
                "callers": [f"spiffe://cluster.local/ns/prod/sa/svc{i % 97}"],
                "flags": {"beta": i % 2 == 0},
                "attributes": {"region": f"r{i % 7}"},
            }
            for i in range(tenants)
        }
    }
    tmp = root / "tenants" / ".tenants.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, root / "tenants" / "tenants.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--reloads", type=int, default=100)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        roots = [Path(tmp) / "a", Path(tmp) / "b"]
        for i, root in enumerate(roots):
            write_bundle(root, f"rev-{i}", args.tenants)
        size = sum(p.stat().st_size for p in roots[0].rglob("*") if p.is_file())
        store = BundleStore(Metrics())
        sources = [DirectorySource(r) for r in roots]
        print(f"bundle: {args.tenants} tenants, {size / 1024:.0f} KiB on disk")
        print(f"rss at start:                     {rss_mib():8.1f} MiB")

        assert store.fetch_and_load(sources[0]) == LOADED
        gc.collect()
        one = rss_mib()
        print(f"rss with one bundle loaded:       {one:8.1f} MiB")

        stop = threading.Event()
        checks = [0]

        def hammer() -> None:
            from envoy.service.auth.v3 import external_auth_pb2

            checker = Checker(store, Metrics())
            req = external_auth_pb2.CheckRequest()
            req.attributes.destination.principal = ORDERS
            req.attributes.source.principal = "spiffe://cluster.local/ns/prod/sa/svc1"
            req.attributes.request.http.method = "GET"
            req.attributes.request.http.path = "/v1/tenants/t1-rev-0/orders"
            while not stop.is_set():
                checker.run(req)
                checks[0] += 1

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        assert store.fetch_and_load(sources[1]) == LOADED
        gc.collect()
        two = rss_mib()
        print(f"rss after reload 1:               {two:8.1f} MiB")

        started = time.perf_counter()
        samples = []
        for i in range(2, args.reloads + 1):
            assert store.fetch_and_load(sources[i % 2]) == LOADED
            if i % 10 == 0:
                samples.append(rss_mib())
        elapsed = time.perf_counter() - started
        stop.set()
        t.join()
        gc.collect()
        after = rss_mib()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, PolicySet))
        print(f"rss after reload {args.reloads}:             {after:8.1f} MiB")
        print(f"rss every 10 reloads:             {' '.join(f'{s:.0f}' for s in samples)} MiB")
        print(f"peak rss (VmHWM):                 {peak_mib():8.1f} MiB")
        print(f"growth from reload 1 to {args.reloads}:       {after - two:+8.1f} MiB")
        print(
            f"reload time: {elapsed / (args.reloads - 1) * 1000:.0f} ms each; {checks[0]} checks "
            f"decided meanwhile; PolicySets alive: {alive}"
        )


if __name__ == "__main__":
    main()
