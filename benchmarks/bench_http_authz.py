"""Checks per second of the HTTP ext_authz path next to the gRPC ext_authz path, in one run.

    python benchmarks/bench_http_authz.py [--seconds 5] [--inflight 64] [--rounds 3]

Prints numbers; asserts nothing (not a test). One real `authz serve` on the example bundle,
auditing to a file, answers both protocols; the same allowed check (order-service POST
/v1/charges to payment-service) is sent over each, with the same number of requests in
flight, by h2load (Debian's nghttp2-client, as in design/measurements.md):

  gRPC:  HTTP/2, gRPC-framed CheckRequest, --connections connections x (inflight/connections) streams
  HTTP:  HTTP/1.1 (h2load --h1), one request in flight per connection as Envoy's pool sends them,
         --inflight connections, identity in x-forwarded-client-cert from a --trusted-proxy

Before measuring, each path is asked once and must answer allow, so both numbers are for the
same decision. Only 127.0.0.1; bounded by --seconds per measurement.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from bundle_factory import check_request, spiffe  # noqa: E402
from common import check_load, free_port, h2load  # noqa: E402

CALLER = spiffe("order", "order-service")
DESTINATION = spiffe("payment", "payment-service")
REQUEST = check_request(principal=CALLER, method="POST", path="/v1/charges", host="payments",
                        destination=DESTINATION)
XFCC = f"By={DESTINATION};Hash=0123456789abcdef;URI={CALLER}"


def grpc_load(port: int, seconds: float, connections: int, streams: int, tmp: str) -> tuple[float, str]:
    res = check_load(port, seconds, connections, streams, Path(tmp), REQUEST.SerializeToString())
    return res.rps, res.status_codes


def http_load(port: int, seconds: float, connections: int, tmp: str) -> tuple[float, str]:
    # h2load cannot send an empty file; a one-byte body makes it POST (authz reads and drops it).
    res = h2load(f"http://127.0.0.1:{port}/v1/charges", seconds, connections, 1, Path(tmp), body=b"x",
                 headers=(f"x-forwarded-client-cert: {XFCC}", "host: payments"), h1=True)
    return res.rps, res.status_codes


def answers(grpc_port: int, authz_port: int) -> tuple[str, str]:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        check = ch.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=external_auth_pb2.CheckResponse.FromString)
        g = check(REQUEST, timeout=10)
    conn = http.client.HTTPConnection("127.0.0.1", authz_port, timeout=10)
    try:
        conn.request("POST", "/v1/charges", body=b"", headers={"x-forwarded-client-cert": XFCC, "host": "payments"})
        h = conn.getresponse()
        h.read()
    finally:
        conn.close()
    return ("allow" if g.status.code == 0 else "deny"), ("allow" if h.status == 200 else f"deny ({h.status})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inflight", type=int, default=64, help="requests in flight on each path")
    ap.add_argument("--connections", type=int, default=8, help="HTTP/2 connections of the gRPC load")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("bench_http_authz needs h2load: apt-get install nghttp2-client")
    g, h, a = free_port(), free_port(), free_port()
    streams = max(1, args.inflight // args.connections)
    with tempfile.TemporaryDirectory(prefix="authz-bench-http-") as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
             "--http-addr", f"127.0.0.1:{h}", "--http-authz-addr", f"127.0.0.1:{a}",
             "--trusted-proxy", "127.0.0.1/32", "--audit-log", f"{tmp}/audit.log",
             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{h}/readyz", timeout=1).read()
                    socket.create_connection(("127.0.0.1", a), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("authz serve did not become ready") from None
                    time.sleep(0.2)
            grpc_answer, http_answer = answers(g, a)
            print(f"the benchmarked check: gRPC {grpc_answer}, HTTP {http_answer}")
            if (grpc_answer, http_answer) != ("allow", "allow"):
                raise SystemExit("both paths must allow the benchmarked check")
            results: dict[str, list[float]] = {"grpc": [], "http": []}
            for r in range(args.rounds):
                rate, codes = grpc_load(g, args.seconds, args.connections, streams, tmp)
                results["grpc"].append(rate)
                print(f"round {r + 1}: gRPC ext_authz  {rate:8.0f} checks/s", flush=True)
                rate, codes = http_load(a, args.seconds, args.inflight, tmp)
                results["http"].append(rate)
                print(f"round {r + 1}: HTTP ext_authz  {rate:8.0f} checks/s  (status codes: {codes})", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print(f"{args.inflight} requests in flight on each path; gRPC over {args.connections} HTTP/2 "
          f"connections x {streams} streams, HTTP over {args.inflight} HTTP/1.1 connections")
    print(f"median: gRPC {med['grpc']:.0f} checks/s, HTTP {med['http']:.0f} checks/s "
          f"(HTTP/gRPC {med['http'] / med['grpc']:.2f}x)")


if __name__ == "__main__":
    main()
