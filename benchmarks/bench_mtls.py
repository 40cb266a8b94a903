"""What mTLS and the caller allow-list cost a check, measured against plaintext.

    python benchmarks/bench_mtls.py [--calls 2000] [--rounds 3]

Prints numbers; asserts nothing (not a test). Three `authz serve` processes on 127.0.0.1
serve the same bundle: plaintext; TLS with required client certificates (--grpc-client-ca);
and the same plus --allow-caller (the interceptor reading the peer's URI SAN on every call).
This process calls each over one long-lived channel, one call at a time (so the numbers are
latencies, not throughput), rounds alternating between the three so machine drift hits all
alike. The handshake happens once per connection and is not in these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import write_bundle  # noqa: E402
from support.pki import generate_pki, issue  # noqa: E402
from support.tls_serve import AUTHZ_ID, Serve, channel, check_request, wait_for  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
POLICY = {"name": "probe", "action": "ALLOW",
          "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}]}


def measure(ch: grpc.Channel, payload: bytes, calls: int) -> list[float]:
    call = ch.unary_unary(CHECK)
    for _ in range(50):  # warm up
        call(payload, timeout=10)
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        call(payload, timeout=10)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = generate_pki(tmp / "pki")
        cert = issue(pki, tmp / "authz", "authz", AUTHZ_ID, server=True)
        caller = pki.clients["checkout-api"]
        bundle = write_bundle(tmp / "bundle", [POLICY])
        base = ["--bundle", str(bundle), "--audit-log", str(tmp / "audit.log"), "--log-level", "WARNING"]
        tls = ["--grpc-tls-cert", str(cert.cert), "--grpc-tls-key", str(cert.key),
               "--grpc-client-ca", str(pki.ca_cert)]
        configs = {
            "plaintext": base,
            "mTLS": base + tls,
            "mTLS + --allow-caller": base + tls + ["--allow-caller", caller.spiffe_id],
        }
        servers = {name: Serve(tmp / name.replace(" ", ""), *flags) for name, flags in configs.items()}
        try:
            for s in servers.values():
                assert wait_for(lambda s=s: s.get("/readyz")[0] == 200), s.stderr()
            channels = {
                name: (grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") if name == "plaintext"
                       else channel(s.grpc_port, pki, caller))
                for name, s in servers.items()
            }
            payload = check_request(caller.spiffe_id)
            results: dict[str, list[float]] = {name: [] for name in servers}
            for r in range(args.rounds):
                for name, ch in channels.items():
                    lat = measure(ch, payload, args.calls)
                    results[name].append(statistics.median(lat))
                    q = statistics.quantiles(lat, n=100)
                    print(f"round {r + 1} {name:>22}: median {statistics.median(lat) * 1e6:7.1f} us, "
                          f"p99 {q[98] * 1e6:7.1f} us")
            print()
            plain = statistics.median(results["plaintext"])
            for name, medians in results.items():
                m = statistics.median(medians)
                print(f"{name:>22}: median of round medians {m * 1e6:7.1f} us "
                      f"({(m - plain) * 1e6:+.1f} us vs plaintext)")
            for ch in channels.values():
                ch.close()
        finally:
            for s in servers.values():
                s.stop()


if __name__ == "__main__":
    main()
