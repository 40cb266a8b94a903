"""Small bundles and CheckRequests for unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from envoy.service.auth.v3 import external_auth_pb2

from authz.engine.compile import load_policy_set
from authz.engine.decide import PolicySet

TD = "cluster.local"


def spiffe(ns: str, sa: str, td: str = TD) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


def write_bundle(
    root: Path,
    policies: list[dict[str, Any]],
    tenants: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    **manifest: Any,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    m = {"apiVersion": "authz/v1", "kind": "Bundle", "name": "t", "revision": "r1", "trustDomain": TD}
    m.update(manifest)
    (root / "bundle.yaml").write_text(yaml.safe_dump(m))
    (root / "policies").mkdir(exist_ok=True)
    docs = [{"apiVersion": "authz/v1", "kind": "Policy", **p} for p in policies]
    (root / "policies" / "p.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    if tenants is not None:
        (root / "tenants").mkdir(exist_ok=True)
        (root / "tenants" / "t.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    for name, value in (data or {}).items():
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{name}.yaml").write_text(yaml.safe_dump(value))
    return root


def policy_set(tmp_path: Path, policies: list[dict[str, Any]], **kw: Any) -> PolicySet:
    return load_policy_set(write_bundle(tmp_path / "bundle", policies, **kw))


def check_request(
    principal: str = "",
    method: str = "GET",
    path: str = "/",
    host: str = "svc.example",
    headers: dict[str, str] | None = None,
    destination: str = "",
    source_ip: str = "10.0.0.1",
    port: int = 8080,
    context_extensions: dict[str, str] | None = None,
    sni: str = "",
    certificate: str = "",
    destination_ip: str = "",
) -> external_auth_pb2.CheckRequest:
    cr = external_auth_pb2.CheckRequest()
    a = cr.attributes
    a.source.principal = principal
    a.source.address.socket_address.address = source_ip
    a.destination.principal = destination
    a.destination.address.socket_address.port_value = port
    a.destination.address.socket_address.address = destination_ip
    a.tls_session.sni = sni
    a.source.certificate = certificate
    http = a.request.http
    http.method = method
    http.path = path
    http.host = host
    for k, v in (headers or {}).items():
        http.headers[k] = v
    for k, v in (context_extensions or {}).items():
        a.context_extensions[k] = v
    return cr
