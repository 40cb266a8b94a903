"""`authz serve` as a process: SIGHUP, health following the store, --persist, --verification-key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from bundle_factory import write_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_sources import POLICY, BundleServer, bundle_bytes

from authz.bundle import archive, signing
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


class Serve:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.grpc, self.http = free_port(), free_port()
        self.stderr_path = tmp_path / f"serve-{self.http}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "authz",
                    "serve",
                    "--grpc-addr",
                    f"127.0.0.1:{self.grpc}",
                    "--http-addr",
                    f"127.0.0.1:{self.http}",
                    "--audit-log",
                    str(tmp_path / "audit.log"),
                    *args,
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        assert wait_for(lambda: self.get("/healthz")[0] == 200, 20), self.stderr()
        # The first load runs once the ports are open: wait for it to finish (its attempt time
        # is set as it starts), and for the fall-back to the --persist copy, which follows a
        # failed first load at once.
        assert wait_for(lambda: self.status()["last_result"] is not None, 20), self.stderr()
        if "--persist" in args:
            wait_for(lambda: self.status()["revision"] is not None, 2)

    def get(self, path: str) -> tuple[int | None, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None, ""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/v1/status")
        assert code == 200, body
        return dict(json.loads(body))

    def health(self) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
                timeout=5,
            )
            return int(resp.status)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        s = Serve(tmp_path, *args)
        started.append(s)
        return s

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sighup_reloads_at_once(tmp_path: Path, serve: Callable[..., Serve]) -> None:
    root = write_bundle(tmp_path / "b", [POLICY], revision="r1")
    s = serve("--bundle", str(root), "--watch-interval", "3600")
    assert s.status()["revision"] == "r1" and s.health() == SERVING
    write_bundle(root, [POLICY], revision="r2")
    time.sleep(0.5)
    assert s.status()["revision"] == "r1"  # the watcher is not due for an hour
    s.proc.send_signal(signal.SIGHUP)
    # the watcher is not due for an hour: r2 within seconds is the signal's doing
    assert wait_for(lambda: s.status()["revision"] == "r2", 10), s.stderr()
    st = s.status()
    assert st["last_result"] == "loaded" and st["ready"] is True and st["loaded_at"] > 0
    assert s.proc.poll() is None and s.health() == SERVING
    assert s.stop() == 0


def test_no_bundle_is_not_serving_with_the_reason_then_serves_once_one_arrives(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    server = BundleServer()
    url = server.url
    server.close()  # nothing listens there now
    s = serve(
        "--bundle", url, "--poll-min", "0.2", "--poll-max", "0.4", "--poll-backoff-max", "0.5"
    )
    code, body = s.get("/readyz")
    assert code == 503 and "unreachable" in body
    assert s.health() == NOT_SERVING
    assert "no bundle to serve" in s.stderr() and "unreachable" in s.stderr()
    st = s.status()
    assert st["ready"] is False and st["revision"] is None and st["last_result"] == "error"
    # The bundle server comes up on the same port: health turns SERVING by itself.
    port = int(url.split(":")[2].split("/")[0])
    revived = BundleServer(port)
    try:
        revived.publish(archive.build_archive(bundle_bytes(tmp_path, "r1"), "t", "r1"), '"r1"')
        assert wait_for(lambda: s.get("/readyz")[0] == 200, 5), s.stderr()
        assert wait_for(lambda: s.health() == SERVING, 2)
        assert s.status()["revision"] == "r1"
    finally:
        revived.close()


def test_persisted_bundle_serves_after_a_restart_while_the_server_is_down(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "verify.pem"
    pub.write_bytes(signing.public_pem(key))
    state = tmp_path / "state"
    server = BundleServer()
    server.publish(archive.build_archive(bundle_bytes(tmp_path, "p1"), "t", "p1", key), '"p1"')
    flags = [
        "--bundle",
        server.url,
        "--persist",
        str(state),
        "--verification-key",
        str(pub),
        "--poll-min",
        "0.2",
        "--poll-max",
        "0.4",
        "--poll-backoff-max",
        "0.5",
    ]
    first = serve(*flags)
    assert first.status()["revision"] == "p1" and not first.status()["serving_persisted"]
    assert first.stop() == 0
    server.close()
    second = serve(*flags)
    code, body = second.get("/readyz")
    assert code == 200 and "revision p1" in body and "persisted" in body
    st = second.status()
    assert st["revision"] == "p1" and st["serving_persisted"] is True
    assert "unreachable" in st["persisted_reason"] and st["served_from"].endswith("bundle.tar.gz")
    assert second.health() == SERVING
    time.sleep(1.0)  # polls keep failing: still the persisted bundle, still ready
    st = second.status()
    assert st["revision"] == "p1" and st["serving_persisted"] and st["last_result"] == "error"


def test_verification_key_refuses_an_unsigned_archive(
    tmp_path: Path, serve: Callable[..., Serve]
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "verify.pem"
    pub.write_bytes(signing.public_pem(key))
    path = tmp_path / "bundle.tar.gz"
    archive.write_atomic(path, archive.build_archive(bundle_bytes(tmp_path, "s1"), "t", "s1", key))
    s = serve("--bundle", str(path), "--verification-key", str(pub), "--watch-interval", "0.1")
    assert s.status()["revision"] == "s1"
    archive.write_atomic(path, archive.build_archive(bundle_bytes(tmp_path, "u2"), "t", "u2"))
    assert wait_for(lambda: s.status()["last_result"] == "rejected", 5)
    st = s.status()
    assert st["revision"] == "s1" and "not signed" in st["last_error"]
    metrics = s.get("/metrics")[1]
    assert 'authz_bundle_loads_total{result="rejected"} 1.0' in metrics
    unsigned_only = serve("--bundle", str(path), "--verification-key", str(pub))
    code, body = unsigned_only.get("/readyz")
    assert code == 503 and "not signed" in body and unsigned_only.health() == NOT_SERVING
