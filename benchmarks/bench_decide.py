"""Prints decide() and whole-check latency percentiles and memory, at 1k and 100k tenants.

Not a test: it prints numbers. Run: python benchmarks/bench_decide.py [--tenants 1000 100000]
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import check_request  # noqa: E402

from authz.bundle.store import BundleStore  # noqa: E402
from authz.check import Checker  # noqa: E402
from authz.engine.compile import load_policy_set  # noqa: E402
from authz.metrics import Metrics  # noqa: E402
from authz.request import CheckRequest, from_check_request  # noqa: E402

ORDERS = "spiffe://cluster.local/ns/prod/sa/orders-api"


def make_bundle(root: Path, tenants: int) -> Path:
    shutil.copytree(REPO / "policies" / "example", root, ignore=shutil.ignore_patterns("tests"))
    data = {"tenants": {f"t{i}": {"plan": "standard", "callers": [f"spiffe://cluster.local/ns/prod/sa/svc{i % 97}"],
                                  "flags": {"beta": i % 2 == 0}} for i in range(tenants)}}
    data["tenants"]["acme"] = {"plan": "enterprise", "callers": ["spiffe://cluster.local/ns/prod/sa/checkout-api"]}
    (root / "tenants" / "tenants.yaml").unlink()
    (root / "tenants" / "tenants.json").write_text(__import__("json").dumps(data))
    return root


def percentiles(samples: list[float]) -> str:
    samples.sort()
    n = len(samples)
    return (f"p50 {samples[n // 2] * 1e6:6.1f} µs  p99 {samples[int(n * 0.99)] * 1e6:6.1f} µs  "
            f"mean {statistics.fmean(samples) * 1e6:6.1f} µs")


def measure(label: str, fn, n: int) -> None:  # noqa: ANN001
    for _ in range(500):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    print(f"  {label:<44} {percentiles(samples)}")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    for count in args.tenants:
        with tempfile.TemporaryDirectory() as tmp:
            gc.collect()
            before = rss_mb()
            t0 = time.perf_counter()
            ps = load_policy_set(make_bundle(Path(tmp) / "b", count))
            load_s = time.perf_counter() - t0
            gc.collect()
            print(f"{count} tenants: bundle compiled in {load_s:.2f} s; RSS {rss_mb():.0f} MB "
                  f"(+{rss_mb() - before:.0f} MB for the bundle)")
            cases = {
                "allow, plain rule": check_request(principal="spiffe://cluster.local/ns/prod/sa/checkout-api",
                                                   method="POST", path="/v1/orders", destination=ORDERS),
                "allow, tenant rule (set lookup)": check_request(
                    principal="spiffe://cluster.local/ns/prod/sa/checkout-api", method="GET",
                    path="/v1/tenants/acme/orders", destination=ORDERS),
                "deny, wrong tenant": check_request(principal="spiffe://cluster.local/ns/prod/sa/svc3",
                                                    method="GET", path=f"/v1/tenants/t{count // 2}/orders",
                                                    destination=ORDERS),
                "deny, default": check_request(principal="spiffe://cluster.local/ns/dev/sa/x", method="GET",
                                               path="/v1/orders/1", destination=ORDERS),
            }
            metrics = Metrics()
            store = BundleStore(metrics)
            store.current = ps
            checker = Checker(store, metrics)
            for label, cr in cases.items():
                req = from_check_request(cr, ps.trust_domains)
                measure("decide: " + label, lambda req=req, ps=ps: ps.decide(req), args.n)
            for label, cr in cases.items():
                raw = cr.SerializeToString()
                measure("parse+check+serialize: " + label,
                        lambda raw=raw, checker=checker: checker.check(CheckRequest.FromString(raw)).SerializeToString(),
                        args.n)
            del ps, store, checker


if __name__ == "__main__":
    main()
