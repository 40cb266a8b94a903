"""Command line: `authz serve` runs the service, `authz check` decides one request."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from google.protobuf import json_format

from authz.audit import AuditLog, FileSink, Sink, stdout_sink
from authz.bundle.loader import BundleError
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.engine.compile import load_policy_set
from authz.metrics import Metrics
from authz.request import CheckRequest

EXIT_USAGE = 2


def example_bundle() -> Path:
    """The example bundle: inside the installed package, or policies/example in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "example_bundle", here.parent / "policies" / "example"):
        if (candidate / "bundle.yaml").is_file():
            return candidate
    raise FileNotFoundError("the example bundle is not installed with this package")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authz", description="Envoy ext_authz policy decision service")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC ext_authz server")
    serve.add_argument("--bundle", type=Path, help="bundle directory (default: the example bundle)")
    serve.add_argument("--grpc-addr", default="0.0.0.0:9191")
    serve.add_argument("--http-addr", default="0.0.0.0:8181")
    serve.add_argument("--audit-log", action="append", metavar="TARGET",
                       help="'-' for stdout (default) or a file path; repeatable")
    serve.add_argument("--audit-header", action="append", default=[], metavar="NAME",
                       help="a request header whose value audit records may keep; repeatable")
    serve.add_argument("--log-level", default="INFO")

    check = sub.add_parser("check", help="decide one Envoy CheckRequest (protobuf JSON)")
    check.add_argument("--bundle", type=Path, help="bundle directory (default: the example bundle)")
    check.add_argument("--request", required=True, help="CheckRequest JSON file, or - for stdin")

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    if args.command == "serve":
        return _serve(args)
    return _check(args)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics()
    store = BundleStore(metrics)
    bundle = args.bundle or example_bundle()
    if not store.load(bundle):
        logging.getLogger("authz").error("no valid bundle at %s; serving denies until one loads", bundle)
    sinks: list[Sink] = []
    for target in args.audit_log or ["-"]:
        sinks.append(stdout_sink() if target == "-" else FileSink(Path(target)))
    audit = AuditLog(sinks, metrics, header_allowlist=args.audit_header)
    checker = Checker(store, metrics, audit)
    from authz.server import serve

    try:
        asyncio.run(serve(checker, store, metrics, args.grpc_addr, args.http_addr))
    except OSError as exc:
        print(f"authz: {exc}", file=sys.stderr)
        return 1
    finally:
        audit.close()
    return 0


def _check(args: argparse.Namespace) -> int:
    bundle = args.bundle or example_bundle()
    try:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"authz check: cannot read request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_request = json_format.Parse(text, CheckRequest())
    except json_format.ParseError as exc:
        print(f"authz check: request is not a CheckRequest in protobuf JSON: {exc}", file=sys.stderr)
        return EXIT_USAGE
    metrics = Metrics()
    store = BundleStore(metrics)
    try:
        store.current = load_policy_set(bundle)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    outcome = Checker(store, metrics).run(check_request)
    d = outcome.decision
    headers = {}
    if outcome.response.HasField("ok_response"):
        headers = {h.header.key: h.header.value for h in outcome.response.ok_response.headers}
    print(json.dumps({
        "allowed": d.allowed,
        "http_status": d.http_status,
        "policy": d.policy,
        "rule": d.rule,
        "action": d.action,
        "reason": d.reason,
        "tenant": d.tenant,
        "decision_id": outcome.decision_id,
        "revision": outcome.revision,
        "audit": list(d.audit),
        "upstream_headers": headers,
    }, indent=2))
    return 0
