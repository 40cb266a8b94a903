"""CLI conventions: --version, one-line usage errors with exit 2, AUTHZ_* variables for every flag
(flags win), the documented table of them, and JSON logs from serve, reloads and workers."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from bundle_factory import write_bundle
from test_serve import free_port, http_get, start

from authz import options
from authz.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
POLICY = {"name": "probe", "action": "ALLOW",
          "rules": [{"name": "probe", "to": [{"operation": {"methods": ["GET"], "paths": ["/probe"]}}]}]}


def authz(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    return subprocess.run([sys.executable, "-m", "authz", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=timeout, check=False)


# --- version -----------------------------------------------------------------------------


def test_version() -> None:
    proc = authz("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"authz {metadata.version('authz')}"


def test_version_in_status_and_metrics() -> None:
    proc, _, h = start("--audit-log", "/dev/null")
    try:
        status = json.loads(http_get(h, "/v1/status")[1])
        assert status["version"] == metadata.version("authz")
        metrics = http_get(h, "/metrics")[1]
        assert f'authz_build_info{{version="{metadata.version("authz")}"}} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# --- usage errors: one line, exit 2 ------------------------------------------------------

BAD = [
    (["serve", "--grpc-addr", "bogus"], {}, "argument --grpc-addr: expected HOST:PORT", "'bogus'"),
    (["serve", "--grpc-addr", "127.0.0.1:99999"], {}, "a port from 0 to 65535", "'127.0.0.1:99999'"),
    (["serve", "--http-addr", "127.0.0.1:-1"], {}, "argument --http-addr:", "'127.0.0.1:-1'"),
    (["serve", "--http-addr", "no port"], {}, "argument --http-addr:", "'no port'"),
    (["serve", "--http-authz-addr", "bogus"], {}, "argument --http-authz-addr:", "'bogus'"),
    (["serve", "--log-level", "LOUD"], {}, "argument --log-level: expected one of debug, info", "'LOUD'"),
    (["serve", "--log-format", "xml"], {}, "argument --log-format: invalid choice", "'xml'"),
    (["serve", "--workers", "zero"], {}, "argument --workers:", "'zero'"),
    (["serve", "--audit-allow-sample-rate", "2"], {}, "argument --audit-allow-sample-rate:", "'2'"),
    (["serve", "--watch-interval", "soon"], {}, "argument --watch-interval:", "'soon'"),
    (["serve", "--watch-interval", "-1"], {}, "argument --watch-interval: expected a number of seconds above 0", "'-1'"),
    (["serve", "--poll-timeout", "nan"], {}, "argument --poll-timeout:", "'nan'"),
    (["serve", "--bundle-max-bytes", "-5"], {}, "argument --bundle-max-bytes: expected a whole number from 1", "'-5'"),
    (["serve", "--audit-queue-size", "0"], {}, "argument --audit-queue-size:", "'0'"),
    (["serve", "--audit-file-backups", "1.5"], {}, "argument --audit-file-backups:", "'1.5'"),
    (["serve", "--no-such-flag"], {}, "unrecognized arguments", "--no-such-flag"),
    (["check"], {}, "authz check:", "--request"),
    (["frobnicate"], {}, "authz:", "'frobnicate'"),
    (["serve"], {"AUTHZ_GRPC_ADDR": "bogus"}, "argument --grpc-addr:", "AUTHZ_GRPC_ADDR"),
    (["serve"], {"AUTHZ_LOG_LEVEL": "LOUD"}, "argument --log-level:", "AUTHZ_LOG_LEVEL"),
    (["serve"], {"AUTHZ_METRICS_TENANT_LABEL": "maybe"}, "AUTHZ_METRICS_TENANT_LABEL", "'maybe'"),
]


@pytest.mark.parametrize(("args", "env", "says", "names"), BAD, ids=[" ".join(b[0]) + str(b[1]) for b in BAD])
def test_usage_errors_are_one_line_and_exit_2(args: list[str], env: dict[str, str], says: str, names: str) -> None:
    proc = authz(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert says in lines[0] and names in lines[0]


@pytest.mark.parametrize(("listener", "name"), [("grpc", "gRPC"), ("http", "HTTP"), ("http-authz", "HTTP ext_authz")])
def test_port_in_use_is_one_line_naming_the_address(listener: str, name: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        addrs = {flag: f"127.0.0.1:{free_port()}" for flag in ("grpc", "http", "http-authz")}
        addrs[listener] = taken
        proc = authz("serve", *[x for flag, a in addrs.items() for x in (f"--{flag}-addr", a)],
                     "--audit-log", "/dev/null", "--log-level", "error")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"authz serve: cannot listen on {name} address {taken}: Address already in use"]


# --- environment variables ---------------------------------------------------------------


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(options.with_environment(parser, argv, environ))


def test_every_flag_of_every_subcommand_has_a_variable() -> None:
    parser = build_parser()
    flags = set()
    for command, sub in options.subcommands(parser).items():
        for action in sub._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if longs and longs[0] != "--help" and action.help != argparse.SUPPRESS:
                flags.add((command, longs[0]))
    documented = {(o.command, o.flag) for o in options.options(parser)}
    assert documented == flags and len(flags) > 30
    assert {o.env for o in options.options(parser) if o.command == "serve"} >= {
        "AUTHZ_GRPC_ADDR", "AUTHZ_HTTP_ADDR", "AUTHZ_LOG_FORMAT", "AUTHZ_LOG_LEVEL", "AUTHZ_ALLOW_EMPTY_BUNDLE",
        "AUTHZ_BUNDLE", "AUTHZ_AUDIT_LOG", "AUTHZ_WATCH_INTERVAL"}


def test_variables_fill_flags_and_flags_win() -> None:
    env = {"AUTHZ_GRPC_ADDR": "127.0.0.1:7000", "AUTHZ_HTTP_ADDR": "127.0.0.1:7001", "AUTHZ_LOG_LEVEL": "debug",
           "AUTHZ_AUDIT_LOG": "-, /tmp/a.jsonl", "AUTHZ_METRICS_TENANT_LABEL": "true",
           "AUTHZ_AUDIT_LOG_QUERY": "false", "AUTHZ_WATCH_INTERVAL": "2.5", "AUTHZ_UNRELATED": "x"}
    args = parse(["serve"], env)
    assert (args.grpc_addr, args.http_addr, args.log_level) == ("127.0.0.1:7000", "127.0.0.1:7001", "DEBUG")
    assert args.audit_log == ["-", "/tmp/a.jsonl"] and args.metrics_tenant_label is True
    assert args.audit_log_query is False and args.watch_interval == 2.5
    # A flag on the command line wins, in every spelling argparse accepts, lists included.
    args = parse(["serve", "--grpc-addr", "127.0.0.1:1", "--http-addr=127.0.0.1:2", "--log-lev", "error",
                  "--audit-log", "/tmp/b.jsonl"], env)
    assert (args.grpc_addr, args.http_addr, args.log_level) == ("127.0.0.1:1", "127.0.0.1:2", "ERROR")
    assert args.audit_log == ["/tmp/b.jsonl"]
    # A list whose items hold commas: one item per line.
    args = parse(["serve"], {"AUTHZ_AUDIT_HEADER": "x-a\nx-b, x-c\n"})
    assert args.audit_header == ["x-a", "x-b, x-c"]
    # Variables apply to the subcommand that has the flag, whatever it is.
    args = parse(["check", "--request", "r.json"], {"AUTHZ_EXPLAIN": "1", "AUTHZ_FORMAT": "text"})
    assert args.explain is True and args.format == "text"


def test_a_flag_added_later_gets_its_variable() -> None:
    # Other branches add flags (e.g. --drain-grace): the layer reads the parser, not a list.
    parser = build_parser()
    options.subcommands(parser)["serve"].add_argument("--added-later", type=float, default=5.0)
    args = parser.parse_args(options.with_environment(
        parser, ["serve"], {"AUTHZ_ADDED_LATER": "7", "AUTHZ_DRAIN_GRACE": "3"}))
    assert args.added_later == 7.0
    assert args.drain_grace == 3.0  # one that did arrive from another branch


def test_serve_listens_where_the_variables_say() -> None:
    g, h = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    env.update({"AUTHZ_GRPC_ADDR": f"127.0.0.1:{g}", "AUTHZ_HTTP_ADDR": f"127.0.0.1:{h}", "AUTHZ_AUDIT_LOG": "/dev/null"})
    proc = subprocess.Popen([sys.executable, "-m", "authz", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http_get(h, "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert http_get(h, "/readyz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"gRPC 127.0.0.1:{g}, HTTP 127.0.0.1:{h}" in err


def test_documented_table_matches_the_parser() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text.split(options.TABLE_BEGIN + "\n", 1)[1].split(options.TABLE_END, 1)[0]
    assert section == options.markdown_tables(build_parser()), "run scripts/configuration-doc"
    assert "| `--grpc-addr HOST:PORT` | `AUTHZ_GRPC_ADDR` | `0.0.0.0:9191` |" in section


# --- JSON logs ---------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        doc = json.loads(line)  # every line is one JSON object
        assert isinstance(doc, dict)
        assert {"time", "level", "logger", "message"} <= set(doc), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(doc["time"])), line
        out.append(doc)
    return out


def wait_for(predicate: object, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(predicate())  # type: ignore[operator]


def test_json_logs_from_serve_and_reloads(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    proc, _, h = start("--bundle", str(root), "--log-format", "json", "--watch-interval", "0.1",
                       "--audit-log", "/dev/null")
    try:
        manifest = root / "bundle.yaml"
        doc = yaml.safe_load(manifest.read_text())
        (root / "policies" / "p.yaml").write_text("apiVersion: authz/v1\nkind: Policy\nname: [broken\n")
        manifest.write_text(yaml.safe_dump({**doc, "revision": "r2"}))
        assert wait_for(lambda: json.loads(http_get(h, "/v1/status")[1])["last_result"] == "rejected")
        write_bundle(root, [POLICY], revision="r3")
        assert wait_for(lambda: json.loads(http_get(h, "/v1/status")[1])["revision"] == "r3")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    logs = json_lines(err)
    loaded = [d for d in logs if str(d["message"]).startswith("serving bundle")]
    assert [d["revision"] for d in loaded] == ["r1", "r3"] and loaded[0]["logger"] == "authz.bundle"
    assert loaded[0]["level"] == "info" and loaded[0]["source"] == str(root)
    (rejected,) = [d for d in logs if d["level"] == "error"]
    assert rejected["rejected_revision"] == "r2" and rejected["revision"] == "r1"
    assert any(r.startswith("policies/p.yaml:4:") and "invalid YAML" in r for r in rejected["reason"]), rejected  # type: ignore[union-attr]
    assert any(d.get("grpc_addr") and d.get("version") for d in logs)


def test_json_logs_from_workers(tmp_path: Path) -> None:
    g, h = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHZ_", "PROMETHEUS_MULTIPROC_DIR"))}
    env["AUTHZ_LOG_FORMAT"] = "json"  # from the environment: the workers inherit it as they inherit flags
    proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr",
                             f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}", "--audit-log", "/dev/null"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum('"listening' in x or "listening:" in x for x in lines) < 2:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    logs = json_lines("".join(lines) + err)
    listening = [d for d in logs if "listening" in str(d["message"])]
    assert sorted(d["worker"] for d in listening) == [0, 1]  # type: ignore[type-var]
    assert any(d["logger"] == "authz.supervisor" and "worker" not in d for d in logs)


def test_text_logs_stay_the_default(tmp_path: Path) -> None:
    proc, _, _ = start("--audit-log", "/dev/null")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO authz.bundle: serving bundle example", err, re.M)


def test_json_logs_when_no_bundle_serves(tmp_path: Path) -> None:
    root = tmp_path / "only-manifest"
    root.mkdir()
    (root / "bundle.yaml").write_text((REPO / "policies" / "example" / "bundle.yaml").read_text())
    proc, _, h = start("--bundle", str(root), "--log-format", "json", "--audit-log", "/dev/null")
    try:
        assert http_get(h, "/readyz")[0] == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    logs = json_lines(err)  # every line, the refusal included, is JSON
    (refusal,) = [d for d in logs if str(d["message"]).startswith("no bundle to serve")]
    assert refusal["level"] == "error" and "the bundle has no policies" in str(refusal["reason"])
