"""Traces end to end: client --mTLS--> Envoy --ext_authz--> `authz serve --otlp-endpoint` -->
an OTLP/gRPC receiver started here.

The client's W3C traceparent travels through Envoy in the CheckRequest; authz's span for the
check must be its child and carry the decision (the same decision id Envoy's client sees),
and no header value. The bundle load at start has its span too, and /metrics counts what
was exported.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.otlp import OtlpReceiver, attributes
from support.pki import PKI

from .conftest import EXAMPLE_BUNDLE
from .harness import ORDERS, AuthzProcess, EnvoyProcess, Mesh, listener_specs
from .test_fleet import wait_for

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


@pytest.fixture
def traced_mesh(tmp_path: Path, pki: PKI, upstream) -> Iterator[tuple[Mesh, OtlpReceiver]]:  # type: ignore[no-untyped-def]
    receiver = OtlpReceiver()
    authz = AuthzProcess(EXAMPLE_BUNDLE, tmp_path / "authz",
                         extra_args=["--otlp-endpoint", receiver.endpoint])
    envoy: EnvoyProcess | None = None
    try:
        authz.start()
        envoy = EnvoyProcess(tmp_path / "envoy", pki, listener_specs(pki),
                             authz_grpc_port=authz.grpc_port, upstream_port=upstream.port)
        envoy.start()
        yield Mesh(pki, upstream, authz, envoy), receiver
    finally:
        if envoy is not None:
            envoy.stop()
        authz.stop()
        receiver.close()


def test_check_spans_follow_the_callers_trace_through_envoy(
    traced_mesh: tuple[Mesh, OtlpReceiver],
) -> None:
    mesh, receiver = traced_mesh
    secret = "Bearer not-for-traces-31337"
    allowed = mesh.call(ORDERS, "checkout-api", "POST", "/v1/orders", body=b"{}", headers={
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "authorization": secret,
        "content-type": "application/json"})
    assert allowed.status == 200
    decision_id = allowed.json()["headers"]["x-authz-decision-id"]
    denied = mesh.call(ORDERS, "fulfillment-worker", "POST", "/v1/orders", body=b"{}", headers={
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "content-type": "application/json"})
    assert denied.status == 403
    denied_id = json.loads(denied.body)["decision_id"]
    # A caller whose trace is not sampled gets no span.
    assert mesh.call(ORDERS, "checkout-api", "POST", "/v1/orders", body=b"{}", headers={
        "traceparent": f"00-{'1' * 32}-{PARENT_ID}-00",
        "content-type": "application/json"}).status == 200

    def check_spans() -> list[object]:
        return [s for s in receiver.spans() if s.name.endswith("/Check")]

    everything = receiver.wait_for_spans(3, 15)  # the load span and the two checks
    spans = check_spans()
    assert len(spans) == 2, everything
    by_id = {attributes(s)["authz.decision_id"]: s for s in spans}
    assert set(by_id) == {decision_id, denied_id}
    for span in spans:
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    allow_attrs = attributes(by_id[decision_id])
    assert allow_attrs["authz.decision"] == "allow"
    assert allow_attrs["authz.bundle.revision"] == mesh_revision(mesh)
    assert attributes(by_id[denied_id])["authz.decision"] == "deny"
    assert "not-for-traces" not in str(receiver.requests)

    loads = [attributes(s) for s in receiver.spans() if s.name == "authz.bundle.load"]
    assert [a["authz.bundle.result"] for a in loads] == ["loaded"]

    def metrics() -> str:
        with urllib.request.urlopen(f"http://{mesh.authz.http_addr}/metrics", timeout=5) as r:
            return str(r.read().decode())

    # The receiver holds the spans a moment before authz hears that the export succeeded.
    assert wait_for(lambda: "authz_trace_spans_exported_total 3.0" in metrics(), 5), metrics()
    assert 'authz_trace_spans_dropped_total{reason="queue_full"} 0.0' in metrics()


def mesh_revision(mesh: Mesh) -> str:
    with urllib.request.urlopen(f"http://{mesh.authz.http_addr}/v1/status", timeout=5) as r:
        return str(json.loads(r.read())["revision"])

