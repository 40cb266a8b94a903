"""The floor: a trivial Envoy Check server that answers every call with one prebuilt OK.

What any Python gRPC service pays for a unary call, with no policy work at all. Used by
bench_side_by_side.py and bench_envoy.py; not part of authz.

    python benchmarks/floor_server.py --port P [--stack aio|sync] [--processes N]
                                      [--authz-bundle DIR --audit-log FILE]

``--processes N`` runs N copies sharing the port (SO_REUSEPORT), as `authz serve --workers N` does.
``--authz-bundle`` answers with authz's Checker (bundle, metrics, audit to a file) instead of the
prebuilt OK: authz's check path on another serving stack, for the comparison in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2, status_pb2

OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()


def _handler(fn: object) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "envoy.service.auth.v3.Authorization", {"Check": grpc.unary_unary_rpc_method_handler(fn)})  # type: ignore[arg-type]


async def _serve_aio(port: int, reuse: bool) -> None:
    async def check(data: bytes, context: object) -> bytes:
        return _answer(data)

    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse))])
    server.add_generic_rpc_handlers((_handler(check),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def _serve_sync(port: int, reuse: bool, threads: int) -> None:
    def check(data: bytes, context: object) -> bytes:
        return _answer(data)

    server = grpc.server(futures.ThreadPoolExecutor(threads), options=[("grpc.so_reuseport", int(reuse))])
    server.add_generic_rpc_handlers((_handler(check),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1)


def _authz_answer(bundle: str, audit_log: str) -> None:
    global _answer
    from pathlib import Path

    from authz.audit import AuditLog, sink_for
    from authz.bundle.store import BundleStore
    from authz.check import Checker
    from authz.metrics import Metrics

    metrics = Metrics()
    store = BundleStore(metrics)
    if not store.load(Path(bundle)):
        raise SystemExit(f"cannot load {bundle}")
    audit = AuditLog([sink_for(f"{audit_log}.{os.getpid()}")], metrics)
    _answer = Checker(store, metrics, audit).check_bytes


def _prebuilt(data: bytes) -> bytes:
    return OK


_answer = _prebuilt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--stack", choices=["aio", "sync"], default="aio")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--authz-bundle")
    ap.add_argument("--audit-log", default=os.devnull)
    args = ap.parse_args()
    reuse = args.processes > 1
    children = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    if args.authz_bundle:  # after the fork: each process loads its own bundle and audit threads
        _authz_answer(args.authz_bundle, args.audit_log)
    try:
        if args.stack == "aio":
            asyncio.run(_serve_aio(args.port, reuse))
        else:
            _serve_sync(args.port, reuse, args.threads)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
