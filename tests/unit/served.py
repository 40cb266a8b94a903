"""`authz serve` as a process on free 127.0.0.1 ports, for tests of its listeners."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from support import ports
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "policies" / "example"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (tests/support/ports.py)."""
    return ports.free_port()


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    authz_port: int
    audit: Path
    stderr: Path

    def audit_records(self) -> list[str]:
        return self.audit.read_text().splitlines() if self.audit.exists() else []

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def serve(workdir: Path, *args: str, bundle: Path = EXAMPLE) -> Served:
    """Started and ready (/readyz 200), audit records in workdir/audit.jsonl."""
    workdir.mkdir(parents=True, exist_ok=True)
    g, h, a = free_port(), free_port(), free_port()
    audit = workdir / "audit.jsonl"
    stderr = workdir / "authz.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz", "serve", "--bundle", str(bundle),
             "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}",
             "--http-authz-addr", f"127.0.0.1:{a}", "--audit-log", str(audit), *args],
            stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
    served = Served(proc, g, h, a, audit, stderr)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"authz serve exited {proc.returncode}: {stderr.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{h}/readyz", timeout=1):
                pass
            with socket.create_connection(("127.0.0.1", a), timeout=1):
                return served
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    served.stop()
    raise AssertionError(f"authz serve not ready: {stderr.read_text()[-3000:]}")


def wait_for(what: str, predicate, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
