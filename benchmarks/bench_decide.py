"""Prints decide() and whole-check latency percentiles and memory, at 1k and 100k tenants, and
decide() latency as rules grow: 10 / 1,000 / 10,000 rules on one destination and spread over many.

Not a test: it prints numbers. Run: python benchmarks/bench_decide.py [--tenants 1000 100000]
[--rules 10 1000 10000]  (``--tenants`` or ``--rules`` with no value skips that part)
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import check_request, write_bundle  # noqa: E402
from common import ORDERS, make_bundle  # noqa: E402

from authz.bundle.store import BundleStore  # noqa: E402
from authz.check import Checker  # noqa: E402
from authz.engine.compile import load_policy_set  # noqa: E402
from authz.metrics import Metrics  # noqa: E402
from authz.request import CheckRequest, from_check_request  # noqa: E402



def percentiles(samples: list[float]) -> str:
    samples.sort()
    n = len(samples)
    return (f"p50 {samples[n // 2] * 1e6:6.1f} µs  p99 {samples[int(n * 0.99)] * 1e6:6.1f} µs  "
            f"mean {statistics.fmean(samples) * 1e6:6.1f} µs")


def measure(label: str, fn, n: int, budget: float = 10.0) -> tuple[float, float]:  # noqa: ANN001
    """Prints and returns (p50, p99) in seconds: ``n`` samples, fewer (at least 200) if they
    would take more than ``budget`` seconds."""
    warm_until = time.perf_counter() + budget / 20
    for i in range(500):
        fn()
        if time.perf_counter() > warm_until and i >= 20:
            break
    samples = []
    stop_at = time.perf_counter() + budget
    for i in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if i >= 200 and t > stop_at:
            break
    print(f"  {label:<52} {percentiles(samples)}")
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def caller(i: int) -> str:
    return f"spiffe://cluster.local/ns/apps/sa/caller{i % 50}"


def dest(i: int) -> str:
    return f"spiffe://cluster.local/ns/apps/sa/dest{i}"


def generated_rule(i: int) -> tuple[dict, tuple[str, str]]:
    """Rule i of a varied table (exact paths, templates, prefixes, methods, callers) and a
    (method, path) that it, and no earlier rule, matches."""
    kind = i % 4
    if kind == 0:
        op, hit = {"methods": ["GET"], "paths": [f"/api/v{i}/items"]}, ("GET", f"/api/v{i}/items")
    elif kind == 1:
        op, hit = {"paths": [f"/api/r{i}/{{*}}/detail"]}, ("PUT", f"/api/r{i}/abc/detail")
    elif kind == 2:
        op, hit = {"methods": ["GET", "HEAD"], "paths": [f"/api/p{i}/*"]}, ("HEAD", f"/api/p{i}/x/y")
    else:
        op, hit = {"methods": ["POST"], "paths": [f"/api/s{i}/{{**}}"]}, ("POST", f"/api/s{i}/a/b/c")
    return {"name": f"r{i}", "from": [{"source": {"principals": [caller(i)]}}], "to": [{"operation": op}]}, hit


def rules_bundle(root: Path, rules: int, destinations: int) -> tuple[Path, list[tuple[str, str, str, str]]]:
    """``rules`` rules over ``destinations`` ALLOW policies (one per destination principal);
    returns the bundle and, per policy, a request for its last rule (the one a scan reaches last)."""
    per = rules // destinations
    policies, hits = [], []
    for d in range(destinations):
        body = [generated_rule(d * per + j) for j in range(per)]
        policies.append({"name": f"p{d}", "target": {"principals": [dest(d)]}, "action": "ALLOW",
                         "rules": [b[0] for b in body]})
        last = d * per + per - 1
        hits.append((dest(d), caller(last), *body[-1][1]))
    # One DENY policy over every destination: a deny must be checked first on every request.
    policies.append({"name": "deny-banned", "action": "DENY",
                     "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/bad/sa/banned"]}}]}]})
    return write_bundle(root, policies), hits


def rules_scaling(counts: list[int], n: int, rounds: int = 20, budget: float = 20.0) -> None:
    """Per layout, every rule count's bundle is loaded first, then sampled in interleaved
    rounds (a batch of each count in turn), so a busy neighbour slows all of them alike."""
    print("decide() as rules grow (request for the LAST rule of its destination, and a request matching none);\n"
          f" samples taken in {rounds} interleaved rounds:")
    for layout in ("one destination", "many destinations"):
        cases: dict[tuple[int, str], tuple[object, object]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for count in counts:
                destinations = 1 if layout == "one destination" else max(1, count // 10)
                root, hits = rules_bundle(Path(tmp) / f"b{count}", count, destinations)
                t0 = time.perf_counter()
                ps = load_policy_set(root)
                load_s = time.perf_counter() - t0
                target, principal, method, path = hits[-1]
                hit = from_check_request(check_request(principal=principal, method=method, path=path,
                                                       destination=target), ps.trust_domains)
                miss = from_check_request(check_request(principal=principal, method="DELETE", path="/nothing/here",
                                                        destination=target), ps.trust_domains)
                assert ps.decide(hit).allowed and not ps.decide(miss).allowed
                print(f" {count} rules, {layout}: {destinations} ALLOW policies + 1 DENY; compiled in {load_s:.2f} s")
                cases[(count, "last rule matches")] = (ps, hit)
                cases[(count, "no rule matches")] = (ps, miss)
        samples: dict[tuple[int, str], list[float]] = {k: [] for k in cases}
        per_round = max(1, n // rounds)
        deadline = time.perf_counter() + budget
        for _ in range(rounds):
            for key, (ps, req) in cases.items():
                decide = ps.decide  # type: ignore[attr-defined]
                for _ in range(min(per_round, 20)):  # warm
                    decide(req)
                out = samples[key]
                for _ in range(per_round):
                    t = time.perf_counter()
                    decide(req)
                    out.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and all(len(v) >= 200 for v in samples.values()):
                break
        stats: dict[tuple[int, str], tuple[float, float]] = {}
        for key, values in samples.items():
            print(f"  {layout}, {key[0]:>5} rules, {key[1]:<18} {percentiles(values)}  ({len(values)} samples)")
            stats[key] = (values[len(values) // 2], values[int(len(values) * 0.99)])
        lo, hi = min(counts), max(counts)
        if lo != hi:
            for what in ("last rule matches", "no rule matches"):
                (a50, a99), (b50, b99) = stats[(lo, what)], stats[(hi, what)]
                print(f" {layout}, {what}: {hi} rules / {lo} rules: p50 {b50 / a50:.2f}x, p99 {b99 / a99:.2f}x "
                      "(target <= 1.5x)")
        del cases


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, nargs="*", default=[1000, 100000])
    ap.add_argument("--rules", type=int, nargs="*", default=[10, 1000, 10000])
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args()
    if args.rules:
        rules_scaling(args.rules, args.n)
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
