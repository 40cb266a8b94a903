"""Command line: `authz serve` runs the service, `authz check` decides one request."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from authz import (
    http_authz,
    istio_import,
    limits,
    lint,
    logging_setup,
    options,
    testing,
    tls_server,
    tracing,
)
from authz.audit import AuditLog, Sink, check_header_allowlist, sink_for
from authz.bundle import runtime as bundle_runtime
from authz.bundle.loader import BundleError
from authz.bundle.schema import BUNDLE_SCHEMA
from authz.bundle.store import BundleStore
from authz.bundle.watcher import Reloader
from authz.check import Checker
from authz.engine.compile import load_policy_set
from authz.engine.explain import Explainer, summary
from authz.example import EXIT_USAGE, example_bundle
from authz.metrics import Metrics, new_multiprocess_dir
from authz.redact import echo_free
from authz.request import CheckRequest
from authz.credentials import TokenFile
from authz.tls import ClientTls
from authz.version import VERSION


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and flag (docs/configuration.md lists them with their variables)."""
    parser = options.Parser(prog="authz", description="Envoy ext_authz policy decision service; "
                            "every --flag can also be set as AUTHZ_FLAG (docs/configuration.md)")
    parser.add_argument("--version", action="version", version=f"authz {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC ext_authz server")
    serve.add_argument("--bundle", help="bundle directory (watched), .tar.gz archive, http(s):// "
                       "bundle server URL or oci://REGISTRY/REPO:TAG (default: the example bundle); "
                       "docs/bundles-operations.md")
    serve.add_argument("--allow-empty-bundle", action="store_true",
                       help="serve a bundle without policies (denying every request) instead of "
                            "refusing it")
    serve.add_argument("--grpc-addr", type=options.address, default="0.0.0.0:9191",
                       metavar="HOST:PORT", help="gRPC ext_authz listener (default 0.0.0.0:9191)")
    serve.add_argument("--http-addr", type=options.address, default="0.0.0.0:8181",
                       metavar="HOST:PORT", help="HTTP listener: /metrics, /healthz, /readyz, "
                       "/v1/status (default 0.0.0.0:8181)")
    serve.add_argument("--http-decision-api", action="store_true",
                       help="also serve the decision API as JSON (POST /v1/decide, /v1/explain) on --http-addr; "
                            "off by default: that port authenticates no caller (docs/decision-api.md)")
    serve.add_argument("--grpc-explain", action="store_true",
                       help="also serve the decision API's Explain on --grpc-addr; off by default: an "
                            "explanation shows the bundle's rules to whoever may call Check (docs/decision-api.md)")
    serve.add_argument("--audit-log", action="append", metavar="TARGET",
                       help="'-' for stdout (default), a file path, or an http(s):// collector URL; "
                            "repeatable (docs/audit.md)")
    serve.add_argument("--audit-header", action="append", default=[], metavar="NAME",
                       help="a request header whose value audit records may keep; repeatable "
                            "(never a credential header such as authorization, cookie or x-api-key: "
                            "docs/audit.md, Never logged)")
    serve.add_argument("--audit-allow-sample-rate", type=options.fraction, default=1.0, metavar="RATE",
                       help="share of allows recorded, 0..1 (default 1); denies and AUDIT "
                            "matches are always recorded")
    serve.add_argument("--audit-log-query", action="store_true",
                       help="keep the query string in the recorded path (dropped by default)")
    serve.add_argument("--audit-queue-size", type=options.positive_int, default=10_000, metavar="N",
                       help="records the audit queue and each sink's queue hold before dropping")
    serve.add_argument("--audit-queue-bytes", type=options.positive_int, default=64 * 1024 * 1024,
                       metavar="N", help="bytes the audit queue and each sink's queue hold before "
                       "dropping (default 64 MiB)")
    serve.add_argument("--audit-file-max-bytes", type=options.non_negative_int,
                       default=100 * 1024 * 1024, metavar="N",
                       help="rotate an audit file at this size (0: never)")
    serve.add_argument("--audit-file-backups", type=options.non_negative_int, default=5, metavar="N",
                       help="rotated audit files kept as FILE.1 .. FILE.N")
    serve.add_argument("--metrics-tenant-label", action="store_true",
                       help="add a tenant label (bundle tenants only) to authz_checks_total")
    serve.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA certificates trusted for https:// bundle servers and audit "
                            "collectors (default: the system's)")
    serve.add_argument("--client-cert", type=Path, metavar="PEM",
                       help="client certificate presented to https:// bundle servers and audit "
                            "collectors (mTLS; re-read when it changes)")
    serve.add_argument("--client-key", type=Path, metavar="PEM", help="the private key of --client-cert")
    serve.add_argument("--audit-token-file", type=Path, metavar="FILE",
                       help="send the token in FILE as 'Authorization: Bearer' to http(s):// "
                            "audit collectors (re-read when it changes)")
    serve.add_argument("--status-show-paths", action="store_true",
                       help="show file system paths in /readyz and /v1/status (hidden by default)")
    tls_server.add_arguments(serve)
    serve.add_argument("--workers", type=options.positive_int, default=1, metavar="N",
                       help="worker processes sharing the ports (default 1); one process uses "
                            "about one core")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    options.add_logging_arguments(serve)
    bundle_runtime.add_serve_arguments(serve)
    limits.add_serve_arguments(serve)
    http_authz.add_serve_arguments(serve)
    tracing.add_serve_arguments(serve)

    check = sub.add_parser("check", help="decide one Envoy CheckRequest (protobuf JSON)")
    check.add_argument("--bundle", type=Path, help="bundle directory (default: the example bundle)")
    check.add_argument("--request", required=True, help="CheckRequest JSON file, or - for stdin")
    check.add_argument("--explain", action="store_true",
                       help="show the trace of the decision: policies, rules, fields, conditions, tenant")
    check.add_argument("--format", choices=["text", "json"],
                       help="output format (default: json, or text with --explain)")

    testing.add_arguments(sub.add_parser("test", help="run the bundle's tests (tests/*.yaml) with rule coverage"))
    lint.add_arguments(sub.add_parser("lint", help="report errors and warnings in a bundle, with file:line:column"))
    sub.add_parser("schema", help="print the JSON Schema of the bundle files (for editors)")
    build = sub.add_parser("build", help="pack a bundle directory into a verified, optionally signed .tar.gz")
    build.add_argument("directory", type=Path, help="bundle directory")
    build.add_argument("-o", "--output", type=Path, metavar="FILE.tar.gz")
    build.add_argument("--signing-key", type=Path, metavar="KEY", help="Ed25519 private key (PEM) to sign the manifest")
    build.add_argument("--serial", type=int, metavar="N",
                       help="the manifest serial, which must grow from one bundle to the next "
                            "(default: the build time in Unix seconds)")
    build.add_argument("--push", metavar="oci://REGISTRY/REPO:TAG",
                       help="push the archive to an OCI registry as an authz bundle artifact")
    build.add_argument("--registry-credentials", type=Path, metavar="FILE",
                       help="registry credentials for --push (Docker config.json)")
    build.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA certificates trusted for the registry (default: the system's)")
    build.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                       help="a registry that may be reached over plain http; repeatable")
    istio_import.add_arguments(sub.add_parser(
        "import-istio", help="convert Istio AuthorizationPolicy resources into a bundle directory"))

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a usage error anywhere is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(options.with_environment(parser, argv, os.environ))
        except SystemExit as exc:  # --help, --version
            return int(exc.code or 0) and EXIT_USAGE
        return _run(args, argv)
    except options.UsageError as exc:
        return options.report(exc)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "serve":
        if args.workers > 1 and args.worker_index is None:
            return _supervise(argv, args)
        return _serve(args)
    if args.command == "test":
        return testing.cli(args)
    if args.command == "lint":
        return lint.cli(args)
    if args.command == "build":
        return bundle_runtime.build(args.directory, args.output, args.signing_key, args.serial,
                                    args.push, args.registry_credentials, args.ca_file,
                                    args.insecure_registry)
    if args.command == "schema":
        print(json.dumps(BUNDLE_SCHEMA, indent=2))
        return 0
    if args.command == "import-istio":
        return istio_import.cli(args)
    return _check(args)


def _serve(args: argparse.Namespace) -> int:
    logging_setup.configure(args.log_level, args.log_format, args.worker_index)
    metrics = Metrics(tenant_label=args.metrics_tenant_label)
    try:
        listener_tls = tls_server.from_args(args, metrics)
        client_tls = ClientTls(args.ca_file, args.client_cert, args.client_key, metrics)
        audit = _audit_log(args, metrics, client_tls)
    except (OSError, ValueError) as exc:  # bad TLS or credential files are ValueErrors
        print(f"authz serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        spans = tracing.from_args(args, metrics)
    except ValueError as exc:
        audit.close()
        print(f"authz serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        store, reloader = bundle_runtime.open_bundles(args, metrics, example_bundle(), client_tls, spans)
    except SystemExit:
        audit.close()
        if spans is not None:
            spans.close()
        return EXIT_USAGE
    checker = Checker(store, metrics, audit, spans, limits.request_limits(args))
    from authz.server import serve

    first_load_done = threading.Event()

    def first_load() -> None:  # in the reloader thread, once the ports are open
        try:
            bundle_runtime.first_load(store, reloader, args.persist)
        finally:
            first_load_done.set()

    try:
        http_authz_server = http_authz.server_from_args(args, checker)
    except ValueError as exc:
        print(f"authz serve: {exc}", file=sys.stderr)
        reloader.stop()
        audit.close()
        if spans is not None:
            spans.close()
        return EXIT_USAGE
    try:
        asyncio.run(serve(checker, store, metrics, args.grpc_addr, args.http_addr,
                          options=limits.serve_limits(args), on_reload=reloader.trigger,
                          worker=args.worker_index, http_authz=http_authz_server,
                          on_started=lambda: _start(reloader, first_load), tls=listener_tls,
                          hidden=None if args.status_show_paths else _hidden_paths(args),
                          first_load_done=first_load_done, http_decision_api=args.http_decision_api,
                          grpc_explain=args.grpc_explain))
    except OSError as exc:  # a listener cannot bind: the message names the address
        print(f"authz serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        reloader.stop()
        audit.close()
        if spans is not None:
            spans.close()
    return 0


def _start(reloader: Reloader, first: Callable[[], None]) -> None:
    reloader.start(first)


_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')


def _parse_check_request(text: str) -> CheckRequest:
    """Protobuf JSON of a CheckRequest. Fields this Envoy API version does not know (a newer
    Envoy, or a dump from another tool) are skipped with a warning, as Envoy would; a
    misspelt known field is reported the same way, so it cannot pass unnoticed."""
    try:
        return json_format.Parse(text, CheckRequest())
    except json_format.ParseError as exc:
        m = _UNKNOWN_FIELD.search(str(exc))
        if m is None:
            raise
        request = json_format.Parse(text, CheckRequest(), ignore_unknown_fields=True)
        print(f"authz check: warning: ignored field {m.group(2)}.{m.group(1)} unknown to "
              "CheckRequest (and any other unknown fields)", file=sys.stderr)
        return request


def _supervise(argv: list[str], args: argparse.Namespace) -> int:
    logging_setup.configure(args.log_level, args.log_format)
    for flag, addr in (("--grpc-addr", args.grpc_addr), ("--http-addr", args.http_addr),
                       ("--http-authz-addr", args.http_authz_addr or "")):
        if not addr:
            continue
        if addr.rpartition(":")[2] == "0":
            print(f"authz serve: --workers needs a fixed port for {flag}, not {addr}", file=sys.stderr)
            return EXIT_USAGE
    # Become the supervisor (authz.supervisor), same pid. It is a new interpreter because
    # prometheus-client picks its multi-process mode on import, which this one has done.
    command = [sys.executable, "-m", "authz.supervisor", "--workers", str(args.workers),
               "--log-level", args.log_level, "--log-format", args.log_format]
    for addr in (args.grpc_addr, args.http_addr, args.http_authz_addr):
        if addr:
            command += ["--addr", addr]
    env = dict(os.environ)
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = new_multiprocess_dir()
        command.append("--own-metrics-dir")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [*command, "--", *_without_workers(argv)], env)


def _without_workers(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _hidden_paths(args: argparse.Namespace) -> dict[str, str]:
    """The configured paths that /readyz and /v1/status show only by label."""
    hidden: dict[str, str] = {}
    bundle = str(args.bundle or example_bundle())
    if not bundle.startswith(("http://", "https://", "oci://")):  # URLs are not machine paths
        hidden[bundle] = "<bundle>"
        hidden[str(Path(bundle).resolve())] = "<bundle>"
    if args.persist is not None:
        hidden[str(args.persist)] = "<persist dir>"
        hidden[str(Path(args.persist).resolve())] = "<persist dir>"
    return hidden


def _audit_log(args: argparse.Namespace, metrics: Metrics, tls: ClientTls) -> AuditLog:
    """The sinks of --audit-log (stdout by default) behind one AuditLog; see docs/audit.md."""
    header_allowlist = check_header_allowlist(args.audit_header)  # refuses credential headers
    sinks: list[Sink] = []
    token = None
    if args.audit_token_file is not None:
        if not any(t.startswith(("http://", "https://")) for t in args.audit_log or []):
            raise ValueError("--audit-token-file is for http(s):// audit collectors (--audit-log URL)")
        token = TokenFile(args.audit_token_file, "--audit-token-file")
    for target in args.audit_log or ["-"]:
        if args.worker_index is not None and target != "-" and not target.startswith(("http://", "https://")):
            target = f"{target}.w{args.worker_index}"  # one file per worker: each rotates its own
        sinks.append(sink_for(target, file_max_bytes=args.audit_file_max_bytes,
                              file_backups=args.audit_file_backups, tls=tls, token=token))
    return AuditLog(sinks, metrics, queue_size=args.audit_queue_size,
                    sink_queue_size=args.audit_queue_size, queue_bytes=args.audit_queue_bytes,
                    sink_queue_bytes=args.audit_queue_bytes, header_allowlist=header_allowlist,
                    log_query=args.audit_log_query, allow_sample_rate=args.audit_allow_sample_rate)


def _check(args: argparse.Namespace) -> int:
    bundle = args.bundle or example_bundle()
    try:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"authz check: cannot read request: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_request = _parse_check_request(text)
    except json_format.ParseError as exc:
        print(f"authz check: request is not a CheckRequest in protobuf JSON: {echo_free(exc)}", file=sys.stderr)
        return EXIT_USAGE
    metrics = Metrics()
    store = BundleStore(metrics)
    try:
        store.current = load_policy_set(bundle)
    except BundleError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    tracer = Explainer() if args.explain else None
    outcome = Checker(store, metrics).run(check_request, tracer)
    d = outcome.decision
    headers = {}
    if outcome.response.HasField("ok_response"):
        headers = {h.header.key: h.header.value for h in outcome.response.ok_response.headers}
    if (args.format or ("text" if args.explain else "json")) == "text":
        print(summary(d))
        print(f"decision id {outcome.decision_id}, bundle revision {outcome.revision}")
        for key, value in headers.items():
            print(f"upstream header {key}: {value}")
        if tracer is not None:
            print("trace:")
            print("\n".join("  " + line for line in tracer.lines()))
        return 0
    result = {
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
    }
    if tracer is not None:
        result["explain"] = tracer.to_json()
    print(json.dumps(result, indent=2))
    return 0
