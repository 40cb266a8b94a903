"""A fleet: three `authz serve` processes poll one bundle server started here.

The bundle server is a local HTTP server that honours ETag / If-None-Match. A new revision
must reach all three within the maximum poll delay plus one second; the server going down
must leave all three serving the last good revision; and a restart while it is down must
serve the --persist copy and say so.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from support.bundle_sources import BundleServer

from authz.bundle import archive

from .harness import AuthzProcess
from support.pki import SERVERS, spiffe_id

CHECKOUT = spiffe_id("prod", "checkout-api")
ORDERS_API = SERVERS["orders-api"]
PROBE_PATH = "/v1/probe"


# --- shared with test_reload_under_load ------------------------------------------------


def bundle_files(
    revision: str,
    allow_probe: bool,
    *,
    policy_extra: dict[str, Any] | None = None,
    rule_extra: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict[str, bytes]:
    """A bundle protecting orders-api: GET /v1/probe from checkout-api is allowed or not."""
    rule: dict[str, Any] = {
        "name": "probe" if allow_probe else "other",
        "from": [{"source": {"principals": [CHECKOUT]}}],
        "to": [
            {
                "operation": {
                    "methods": ["GET"],
                    "paths": [PROBE_PATH if allow_probe else "/v1/other"],
                }
            }
        ],
        **(rule_extra or {}),
    }
    policy = {
        "apiVersion": "authz/v1",
        "kind": "Policy",
        "name": "orders-api",
        "target": {"principals": [ORDERS_API]},
        "action": "ALLOW",
        "rules": [rule],
        **(policy_extra or {}),
    }
    manifest = {
        "apiVersion": "authz/v1",
        "kind": "Bundle",
        "name": "fleet",
        "revision": revision,
        "trustDomain": "cluster.local",
        "defaultAction": "DENY",
    }
    files = {
        "bundle.yaml": yaml.safe_dump(manifest),
        "policies/orders-api.yaml": yaml.safe_dump(policy),
    }
    files.update(extra_files or {})
    return {k: v.encode() for k, v in files.items()}


def http_get(proc: AuthzProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{proc.http_addr}{path}", timeout=2) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def status(proc: AuthzProcess) -> dict[str, Any]:
    code, body = http_get(proc, "/v1/status")
    assert code == 200, body
    return dict(json.loads(body))


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def grpc_probe(proc: AuthzProcess) -> external_auth_pb2.CheckResponse:
    """GET /v1/probe from checkout-api to orders-api, straight to authz over gRPC."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.principal = CHECKOUT
    a.source.address.CopyFrom(
        address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=4000)
        )
    )
    a.destination.principal = ORDERS_API
    a.destination.address.CopyFrom(
        address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="10.0.0.2", port_value=8080)
        )
    )
    http = a.request.http
    http.method, http.path, http.host, http.scheme = "GET", PROBE_PATH, "orders", "https"
    with grpc.insecure_channel(proc.grpc_addr) as ch:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


# --- the fleet -----------------------------------------------------------------------------

POLL_MIN, POLL_MAX = 0.5, 1.5


@pytest.fixture
def bundle_server() -> Iterator[BundleServer]:
    server = BundleServer()
    try:
        yield server
    finally:
        server.close()


def test_fleet_follows_one_bundle_server(tmp_path: Path, bundle_server: BundleServer) -> None:
    bundle_server.publish(
        archive.build_archive(bundle_files("f1", allow_probe=False), "fleet", "f1"), "f1"
    )
    flags = [
        "--poll-min",
        str(POLL_MIN),
        "--poll-max",
        str(POLL_MAX),
        "--poll-backoff-max",
        "2",
        "--poll-timeout",
        "2",
    ]
    fleet = [
        AuthzProcess(
            bundle_server.url,
            tmp_path / f"authz-{i}",  # type: ignore[arg-type]
            extra_args=[
                *flags,
                "--persist",
                str(tmp_path / f"state-{i}"),
                "--audit-log",
                str(tmp_path / f"audit-{i}.log"),
            ],
        )
        for i in range(3)
    ]
    started: list[AuthzProcess] = []
    try:
        for proc in fleet:
            started.append(proc.start())
        for proc in fleet:
            assert status(proc)["revision"] == "f1"
            assert grpc_probe(proc).status.code == 7  # f1 denies the probe

        # Polling with ETags: after a few rounds the server has answered 304s.
        assert wait_for(lambda: bundle_server.not_modified >= 3, POLL_MAX * 3)

        # A new revision reaches all three within the maximum poll delay plus one second.
        bundle_server.publish(
            archive.build_archive(bundle_files("f2", allow_probe=True), "fleet", "f2"), "f2"
        )
        published = time.monotonic()
        arrived: dict[int, float] = {}

        def all_arrived() -> bool:
            for i, proc in enumerate(fleet):
                if i not in arrived and status(proc)["revision"] == "f2":
                    arrived[i] = time.monotonic() - published
            return len(arrived) == len(fleet)

        assert wait_for(all_arrived, POLL_MAX + 1.0 + 2.0), f"arrived: {arrived}"
        assert max(arrived.values()) <= POLL_MAX + 1.0, f"seconds to arrive per process: {arrived}"
        for proc in fleet:
            assert grpc_probe(proc).status.code == 0  # f2 allows it

        # The server goes down: all three keep serving f2.
        bundle_server.close()
        down_at = time.monotonic()
        assert wait_for(
            lambda: all(status(p)["last_result"] == "error" for p in fleet), POLL_MAX + 2
        )
        time.sleep(max(0.0, down_at + 2 * POLL_MAX - time.monotonic()))
        for proc in fleet:
            st = status(proc)
            assert (st["revision"], st["ready"], st["last_result"]) == ("f2", True, "error"), st
            assert "unreachable" in st["last_error"]
            assert http_get(proc, "/readyz")[0] == 200
            assert grpc_probe(proc).status.code == 0
            assert proc.running

        # A restart while the server is down serves the persisted copy, and says so.
        restarted = fleet[0]
        restarted.stop()
        again = AuthzProcess(
            restarted.bundle, tmp_path / "authz-0-again", extra_args=restarted.extra_args
        )
        started.append(again.start())
        st = status(again)
        assert st["revision"] == "f2" and st["serving_persisted"] is True, st
        assert "unreachable" in st["persisted_reason"]
        code, body = http_get(again, "/readyz")
        assert code == 200 and "persisted" in body
        assert grpc_probe(again).status.code == 0
    finally:
        for proc in started:
            proc.stop()
