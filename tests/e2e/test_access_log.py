"""Envoy's access log and the audit log name the same decision.

A real Envoy logs each request with the access-log format documented in docs/audit.md (dynamic
metadata of ext_authz: decision id, policy, rule, revision); `authz serve --audit-log FILE` writes
the audit record. For an allowed and a denied request, the decision id in the Envoy line equals the
one in the audit record and the one the upstream (or the client, for a deny) received.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import EXAMPLE_BUNDLE
from .harness import (
    ORDERS,
    AuthzProcess,
    EchoUpstream,
    EnvoyProcess,
    ListenerSpec,
    Mesh,
    listener_specs,
)
from support.pki import PKI

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+)" (?P<code>\d+) '
    r"decision=(?P<decision>\S+) policy=(?P<policy>[^/\s]+)/(?P<rule>\S+) "
    r"revision=(?P<revision>\S+) request_id=(?P<request_id>\S+)$"
)


def documented_format() -> str:
    """The access-log format string from docs/audit.md, exactly as operators copy it."""
    text = (REPO / "docs" / "audit.md").read_text()
    section = text.split("## Envoy's access log", 1)[1]
    fmt = section.split("```", 2)[1].strip()
    assert "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%" in fmt
    return fmt + "\n"


class DocumentedLogEnvoy(EnvoyProcess):
    """The harness's Envoy plus a second access log in the documented format."""

    @property
    def documented_log(self) -> Path:
        return self.workdir / "envoy-access-documented.log"

    def _listener(self, spec: ListenerSpec) -> dict[str, Any]:
        listener = super()._listener(spec)
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"].append({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(self.documented_log),
                "log_format": {"text_format_source": {"inline_string": documented_format()}},
            },
        })
        return listener


@pytest.fixture
def audited_mesh(tmp_path: Path, pki: PKI, upstream: EchoUpstream) -> Iterator[tuple[Mesh, Path]]:
    audit_log = tmp_path / "audit.log"
    authz = AuthzProcess(EXAMPLE_BUNDLE, tmp_path / "authz", extra_args=["--audit-log", str(audit_log)])
    envoy: DocumentedLogEnvoy | None = None
    try:
        authz.start()
        envoy = DocumentedLogEnvoy(tmp_path / "envoy", pki, listener_specs(pki),
                                   authz_grpc_port=authz.grpc_port, upstream_port=upstream.port)
        envoy.start()
        yield Mesh(pki, upstream, authz, envoy), audit_log
    finally:
        if envoy is not None:
            envoy.stop()
        authz.stop()


def wait(what: str, produce: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = produce()
        if value or time.monotonic() >= deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.05)


def access_lines(path: Path, marker_path: str) -> list[dict[str, str]]:
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        assert m, f"access-log line does not have the documented shape: {line!r}"
        if m["path"] == marker_path:
            found.append(m.groupdict())
    return found


def audit_record(path: Path, decision_id: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["decision_id"] == decision_id:
            return dict(rec)
    return None


def test_access_log_line_and_audit_record_share_the_decision(
    audited_mesh: tuple[Mesh, Path],
) -> None:
    mesh, audit_log = audited_mesh
    envoy = mesh.envoy
    assert isinstance(envoy, DocumentedLogEnvoy)
    secret = {"authorization": "Bearer secret", "cookie": "session=secret"}

    # Allowed: checkout-api creates an order.
    marker = uuid.uuid4().hex
    allowed_path = f"/v1/orders?m={marker}"
    resp = mesh.call(ORDERS, "checkout-api", "POST", allowed_path,
                     headers={"x-test-marker": marker, "content-type": "application/json", **secret},
                     body=b"{}")
    assert resp.status == 200, resp
    (seen,) = mesh.upstream.seen(marker=marker)
    upstream_id = seen.header("x-authz-decision-id")
    assert upstream_id

    (line,) = wait("allowed access-log line", lambda: access_lines(envoy.documented_log, allowed_path))
    rec = wait("allowed audit record", lambda: audit_record(audit_log, line["decision"]))
    assert line["decision"] == rec["decision_id"] == upstream_id
    assert (line["policy"], line["rule"]) == (rec["policy"], rec["rule"]) == \
        ("orders-api", "checkout-creates-orders")
    assert line["revision"] == rec["revision"] and rec["revision"]
    assert line["code"] == "200" and rec["allowed"] is True
    assert line["request_id"] == rec["request_id"] == seen.header("x-request-id")
    assert rec["path"] == "/v1/orders"  # the query is not in the audit record
    # The harness's own access log carries the same id.
    assert envoy.wait_access_log(lambda e: e["decision_id"] == upstream_id)

    # Denied: a stranger reads an order.
    marker = uuid.uuid4().hex
    denied_path = f"/v1/orders/42?m={marker}"
    resp = mesh.call(ORDERS, "stranger", "GET", denied_path, headers={"x-test-marker": marker, **secret})
    assert resp.status == 403
    assert mesh.upstream.seen(marker=marker) == []
    body_id = resp.json()["decision_id"]
    (line,) = wait("denied access-log line", lambda: access_lines(envoy.documented_log, denied_path))
    rec = wait("denied audit record", lambda: audit_record(audit_log, line["decision"]))
    assert line["decision"] == rec["decision_id"] == body_id
    assert (line["policy"], line["rule"]) == (rec["policy"], rec["rule"])
    assert line["code"] == "403" and rec["allowed"] is False and rec["http_status"] == 403
    assert rec["source_principal"] == mesh.pki.clients["stranger"].spiffe_id

    # Credentials reached neither log.
    assert "secret" not in audit_log.read_text()
    assert "secret" not in envoy.documented_log.read_text()
