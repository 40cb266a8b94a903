"""Helpers for the audit and metrics tests: a bundle with ALLOW, DENY, AUDIT and dry-run
policies and tenants, CheckRequests, in-memory and misbehaving sinks, a local collector."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from envoy.service.auth.v3 import external_auth_pb2

from authz.bundle.store import BundleStore
from authz.metrics import Metrics

TD = "cluster.local"
API = f"spiffe://{TD}/ns/prod/sa/api"
CALLER = f"spiffe://{TD}/ns/prod/sa/caller"
INTRUDER = f"spiffe://{TD}/ns/dev/sa/intruder"

POLICIES: list[dict[str, Any]] = [
    {"name": "block-admin", "action": "DENY", "target": {"principals": [API]},
     "rules": [{"name": "admin-paths", "to": [{"operation": {"paths": ["/admin/*"]}}]}]},
    {"name": "watch-writes", "action": "AUDIT", "target": {"principals": [API]},
     "rules": [{"name": "writes", "to": [{"operation": {"methods": ["POST"]}}]}]},
    {"name": "shadow", "action": "DENY", "dryRun": True, "target": {"principals": [API]},
     "rules": [{"name": "no-deletes", "to": [{"operation": {"methods": ["DELETE"]}}]}]},
    {"name": "api", "action": "ALLOW", "target": {"principals": [API]},
     "tenant": {"pathCapture": "tenant"},
     "rules": [
         {"name": "caller", "from": [{"source": {"principals": [CALLER]}}],
          "to": [{"operation": {"paths": ["/v1/items", "/v1/items/*", "/admin/*"]}}]},
         {"name": "tenant-route",
          "to": [{"operation": {"paths": ["/v1/tenants/{tenant}/items"]}}],
          "when": ["source.principal in tenant.callers"]},
     ]},
]
TENANTS = {"acme": {"plan": "gold", "callers": [CALLER]}, "globex": {"plan": "free", "callers": []}}


def write_bundle(root: Path, revision: str = "rev-7") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.yaml").write_text(yaml.safe_dump({
        "apiVersion": "authz/v1", "kind": "Bundle", "name": "audit-test", "revision": revision,
        "trustDomain": TD, "defaultAction": "DENY"}))
    (root / "policies").mkdir(exist_ok=True)
    docs = [{"apiVersion": "authz/v1", "kind": "Policy", **p} for p in POLICIES]
    (root / "policies" / "p.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (root / "tenants").mkdir(exist_ok=True)
    (root / "tenants" / "t.yaml").write_text(yaml.safe_dump({"tenants": TENANTS}))
    return root


def loaded_store(tmp_path: Path, metrics: Metrics) -> BundleStore:
    store = BundleStore(metrics)
    assert store.load(write_bundle(tmp_path / "bundle")), "test bundle rejected"
    return store


def check_request(
    principal: str = CALLER,
    method: str = "GET",
    path: str = "/v1/items",
    host: str = "api.example:8443",
    headers: dict[str, str] | None = None,
    destination: str = API,
    request_id: str = "",
) -> external_auth_pb2.CheckRequest:
    cr = external_auth_pb2.CheckRequest()
    a = cr.attributes
    a.source.principal = principal
    a.source.address.socket_address.address = "10.1.2.3"
    a.source.address.socket_address.port_value = 40000
    a.destination.principal = destination
    a.destination.address.socket_address.port_value = 8443
    http = a.request.http
    http.method = method
    http.path = path
    http.host = host
    if request_id:
        http.id = request_id
    for k, v in (headers or {}).items():
        http.headers[k] = v
    return cr


class MemorySink:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = False
        self._lock = threading.Lock()

    def write(self, lines: list[str]) -> None:
        with self._lock:
            self.lines.extend(lines)

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self.lines]


class RaisingSink:
    name = "raising"

    def __init__(self) -> None:
        self.calls = 0

    def write(self, lines: list[str]) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


class BlockingSink:
    """Blocks in write until released, as a hung disk or a stalled pipe would."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.entered.set()
        self.release.wait(60)
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def sample(metrics: Metrics, metric: str, **labels: str) -> float:
    """The sum of the samples of ``metric`` whose labels include ``labels`` (labels not named,
    such as ``caller``, are summed over)."""
    total = 0.0
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class Collector:
    """A local audit collector: accepts gzipped JSON arrays; can answer 503 or go away."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.raw_bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: int | None = None  # answer this status instead of accepting
        self.attempts = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self, port: int = 0) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with collector._lock:
                    collector.attempts += 1
                    status = collector.fail_with
                    if status is None:
                        collector.raw_bodies.append(body)
                        collector.headers.append({k.lower(): v for k, v in self.headers.items()})
                        collector.batches.append(json.loads(gzip.decompress(body)))
                self.send_response(status or 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/audit"

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for batch in self.batches for r in batch]


@contextmanager
def collector() -> Iterator[Collector]:
    c = Collector().start()
    try:
        yield c
    finally:
        c.stop()
