"""End-to-end: client --mTLS--> Envoy --ext_authz gRPC--> authz serve (example bundle).

Every request carries a unique ``x-test-marker`` header so a test can look up exactly what
the echo upstream received for it, and prove that a denied request never reached it.
"""

from __future__ import annotations

import json
import ssl
import uuid
from http.client import HTTPException

import pytest

from .harness import ORDERS, ORDERS_RAW, PAYMENT, Mesh, Response, SeenRequest, https_request
from support.pki import CLIENTS

CHECKOUT = CLIENTS["checkout-api"]
FULFILLMENT = CLIENTS["fulfillment-worker"]
BILLING = CLIENTS["billing"]
ORDER_SERVICE = CLIENTS["order-service"]
RECONCILIATION = CLIENTS["reconciliation-service"]

AUTHZ_HEADERS = ("x-authz-tenant", "x-authz-principal", "x-authz-decision-id")


def send(
    mesh: Mesh,
    listener: str,
    client: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[Response, list[SeenRequest]]:
    """Make one call; return the response and what the upstream saw of it (0 or 1 items)."""
    marker = uuid.uuid4().hex
    body = b'{"e2e": true}' if method in ("POST", "PUT", "PATCH") else None
    all_headers = {"x-test-marker": marker, **(headers or {})}
    if body is not None:
        all_headers["content-type"] = "application/json"
    resp = mesh.call(listener, client, method, path, headers=all_headers, body=body)
    return resp, mesh.upstream.seen(marker=marker)


def describe(resp: Response) -> str:
    return f"status={resp.status} headers={resp.headers} body={resp.body[:500]!r}"


def assert_allowed(
    resp: Response, seen: list[SeenRequest], principal: str, tenant: str | None = None
) -> SeenRequest:
    assert resp.status == 200, describe(resp)
    assert len(seen) == 1, f"upstream saw {len(seen)} copies of the request"
    req = seen[0]
    # The echo body is what the upstream received; it must agree with the recorded request.
    echo = resp.json()
    assert echo["path"] == req.path and echo["method"] == req.method
    for name in AUTHZ_HEADERS:
        assert len(req.header_values(name)) <= 1, f"{name} repeated: {req.header_values(name)}"
    assert req.header("x-authz-principal") == principal
    assert req.header("x-authz-decision-id"), "missing or empty x-authz-decision-id"
    assert req.header("x-authz-tenant") == tenant
    return req


def assert_denied(resp: Response, seen: list[SeenRequest]) -> dict[str, object]:
    assert resp.status == 403, describe(resp)
    assert seen == [], "a denied request reached the upstream"
    assert resp.headers.get("content-type", "").startswith("application/json"), describe(resp)
    body = json.loads(resp.body)
    assert isinstance(body, dict), body
    assert isinstance(body.get("decision_id"), str) and body["decision_id"], body
    assert isinstance(body.get("reason"), str) and body["reason"], body
    return body


# --- orders-api ------------------------------------------------------------------------


def test_allowed_call_reaches_upstream_with_identity_headers(mesh: Mesh) -> None:
    resp, seen = send(mesh, ORDERS, "checkout-api", "POST", "/v1/orders")
    req = assert_allowed(resp, seen, CHECKOUT, tenant=None)
    assert req.method == "POST" and req.path == "/v1/orders"


def test_decision_ids_are_unique_per_request(mesh: Mesh) -> None:
    ids = []
    for _ in range(3):
        resp, seen = send(mesh, ORDERS, "checkout-api", "POST", "/v1/orders")
        ids.append(assert_allowed(resp, seen, CHECKOUT).header("x-authz-decision-id"))
    denied = [
        assert_denied(*send(mesh, ORDERS, "fulfillment-worker", "POST", "/v1/orders"))[
            "decision_id"
        ]
        for _ in range(2)
    ]
    assert len(set(ids + denied)) == 5, ids + denied


def test_policy_deny_returns_json_403(mesh: Mesh) -> None:
    resp, seen = send(mesh, ORDERS, "fulfillment-worker", "POST", "/v1/orders")
    assert_denied(resp, seen)


@pytest.mark.parametrize(
    ("client", "method", "path", "allowed"),
    [
        ("checkout-api", "POST", "/v1/orders", True),
        ("checkout-api", "POST", "/v1/orders/o-123/cancel", True),
        ("checkout-api", "POST", "/v1/orders/o-123/x/cancel", False),
        ("checkout-api", "GET", "/v1/orders/o-123", False),
        ("checkout-api", "DELETE", "/v1/orders", False),
        ("fulfillment-worker", "GET", "/v1/orders/o-123", True),
        ("fulfillment-worker", "GET", "/v1/orders/o-123/items", False),
        ("fulfillment-worker", "GET", "/v1/orders", False),
        ("fulfillment-worker", "POST", "/v1/orders/o-123/cancel", False),
        ("stranger", "GET", "/v1/orders/o-123", False),
        ("stranger", "POST", "/v1/orders", False),
        # payment-service grants are scoped to that destination.
        ("order-service", "POST", "/v1/charges", False),
        ("reconciliation-service", "GET", "/v1/transactions/tx-1", False),
        ("checkout-api", "GET", "/health", False),
        ("checkout-api", "GET", "/v1/unknown", False),
    ],
)
def test_orders_api_policy(mesh: Mesh, client: str, method: str, path: str, allowed: bool) -> None:
    resp, seen = send(mesh, ORDERS, client, method, path)
    if allowed:
        assert_allowed(resp, seen, CLIENTS[client])
    else:
        assert_denied(resp, seen)


# --- tenants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/tenants/acme/orders", "/v1/tenants/acme/orders/o-1", "/v1/tenants/acme/orders/o-1/items"],
)
def test_tenant_allowed(mesh: Mesh, path: str) -> None:
    resp, seen = send(mesh, ORDERS, "checkout-api", "GET", path)
    req = assert_allowed(resp, seen, CHECKOUT, tenant="acme")
    assert req.path == path


def test_wrong_tenant_denied_and_registered_caller_allowed(mesh: Mesh) -> None:
    assert_denied(*send(mesh, ORDERS, "checkout-api", "GET", "/v1/tenants/globex/orders"))
    resp, seen = send(mesh, ORDERS, "billing", "GET", "/v1/tenants/globex/orders")
    assert_allowed(resp, seen, BILLING, tenant="globex")
    assert_denied(*send(mesh, ORDERS, "billing", "GET", "/v1/tenants/acme/orders"))


@pytest.mark.parametrize("client", ["checkout-api", "billing", "stranger"])
def test_unknown_tenant_denied(mesh: Mesh, client: str) -> None:
    assert_denied(*send(mesh, ORDERS, client, "GET", "/v1/tenants/initech/orders"))


PATH_TRICKS = [
    "/v1/tenants/acme/../globex/orders",
    "/v1/tenants/acme/orders/../../globex/orders",
    "/v1/tenants/acme/./../globex/orders",
    "/v1/tenants/acme/orders/%2e%2e/%2e%2e/globex/orders",
    "/v1/tenants/acme/orders/%2E%2E/%2E%2E/globex/orders",
    "/v1/tenants/acme/orders/..%2F..%2Fglobex/orders",
    "/v1/tenants/acme/orders/%2e%2e%2f%2e%2e%2fglobex/orders",
    "/v1/tenants/acme/orders/%252e%252e/%252e%252e/globex/orders",
    "/v1/tenants/acme/orders/..;/..;/globex/orders",
    "/v1/tenants/acme/orders/..%3B/..%3B/globex/orders",
    "/v1/tenants/acme/orders/..%5C..%5Cglobex/orders",
    "/v1/tenants/acme%2F..%2Fglobex/orders",
]


@pytest.mark.parametrize("listener", [ORDERS, ORDERS_RAW])
@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_tricks_do_not_reach_another_tenant(mesh: Mesh, listener: str, path: str) -> None:
    """checkout-api is registered for acme only; no spelling of a globex path may pass.

    ORDERS normalises paths in Envoy first; ORDERS_RAW hands them to authz untouched.
    Either Envoy rejects (400) or authz denies (403); the upstream must not see it.
    """
    resp, seen = send(mesh, listener, "checkout-api", "GET", path)
    assert resp.status in (400, 403), describe(resp)
    assert seen == [], f"upstream saw {[(r.path, r.headers) for r in seen]}"
    if resp.status == 403:
        assert_denied(resp, seen)


def test_raw_listener_still_allows_plain_paths(mesh: Mesh) -> None:
    """The un-normalised listener is the same destination: ordinary calls still pass."""
    resp, seen = send(mesh, ORDERS_RAW, "checkout-api", "GET", "/v1/tenants/acme/orders")
    assert_allowed(resp, seen, CHECKOUT, tenant="acme")


# --- x-authz-* headers belong to authz -------------------------------------------------

FORGED = {
    "x-authz-tenant": "globex",
    "x-authz-principal": "spiffe://evil",
    "x-authz-decision-id": "forged",
}


def test_client_sent_authz_headers_are_overwritten(mesh: Mesh) -> None:
    resp, seen = send(
        mesh, ORDERS, "checkout-api", "GET", "/v1/tenants/acme/orders", headers=FORGED
    )
    req = assert_allowed(resp, seen, CHECKOUT, tenant="acme")
    assert req.header_values("x-authz-tenant") == ["acme"]
    assert req.header_values("x-authz-principal") == [CHECKOUT]
    assert req.header_values("x-authz-decision-id") != ["forged"]


def test_client_sent_tenant_header_removed_when_decision_has_no_tenant(mesh: Mesh) -> None:
    resp, seen = send(mesh, ORDERS, "checkout-api", "POST", "/v1/orders", headers=FORGED)
    req = assert_allowed(resp, seen, CHECKOUT, tenant=None)
    assert req.header_values("x-authz-tenant") == []
    assert req.header_values("x-authz-principal") == [CHECKOUT]
    assert req.header_values("x-authz-decision-id") != ["forged"]


def test_client_sent_authz_headers_do_not_grant_access(mesh: Mesh) -> None:
    forged = {"x-authz-principal": CHECKOUT, "x-authz-tenant": "acme"}
    assert_denied(
        *send(mesh, ORDERS, "fulfillment-worker", "POST", "/v1/orders", headers=forged)
    )
    assert_denied(
        *send(mesh, ORDERS, "stranger", "GET", "/v1/tenants/acme/orders", headers=forged)
    )


# --- payment-service -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/ready"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_payment_health_open_to_any_client(mesh: Mesh, client: str, path: str) -> None:
    resp, seen = send(mesh, PAYMENT, client, "GET", path)
    assert_allowed(resp, seen, CLIENTS[client])


def test_payment_health_is_get_only(mesh: Mesh) -> None:
    assert_denied(*send(mesh, PAYMENT, "order-service", "POST", "/health"))
    assert_denied(*send(mesh, PAYMENT, "stranger", "DELETE", "/ready"))


@pytest.mark.parametrize("path", ["/v1/charges", "/v1/refunds"])
def test_payment_charges_and_refunds_only_for_order_service(mesh: Mesh, path: str) -> None:
    resp, seen = send(mesh, PAYMENT, "order-service", "POST", path)
    assert_allowed(resp, seen, ORDER_SERVICE)
    for other in ("checkout-api", "reconciliation-service", "billing", "stranger"):
        assert_denied(*send(mesh, PAYMENT, other, "POST", path))
    assert_denied(*send(mesh, PAYMENT, "order-service", "GET", path))


@pytest.mark.parametrize(
    ("client", "path", "allowed"),
    [
        ("reconciliation-service", "/v1/transactions/tx-1", True),
        ("reconciliation-service", "/v1/transactions", False),
        ("reconciliation-service", "/v1/transactions/tx-1/lines", False),
        ("order-service", "/v1/transactions/tx-1", False),
        ("checkout-api", "/v1/transactions/tx-1", False),
    ],
)
def test_payment_transactions(mesh: Mesh, client: str, path: str, allowed: bool) -> None:
    resp, seen = send(mesh, PAYMENT, client, "GET", path)
    if allowed:
        assert_allowed(resp, seen, CLIENTS[client])
    else:
        assert_denied(resp, seen)


def test_orders_grants_do_not_apply_to_payment_service(mesh: Mesh) -> None:
    assert_denied(*send(mesh, PAYMENT, "checkout-api", "POST", "/v1/orders"))
    assert_denied(*send(mesh, PAYMENT, "checkout-api", "GET", "/v1/tenants/acme/orders"))


def test_access_log_records_each_request(mesh: Mesh) -> None:
    order = uuid.uuid4().hex
    path = f"/v1/orders/{order}"
    assert_allowed(*send(mesh, ORDERS, "fulfillment-worker", "GET", path), FULFILLMENT)
    assert_denied(*send(mesh, ORDERS, "stranger", "GET", path))
    mesh.envoy.wait_access_log(
        lambda e: e.get("path") == path and e.get("response_code") == "403"
    )
    entries = [e for e in mesh.envoy.access_log_entries() if e.get("path") == path]
    got = [(e["listener"], e["method"], e["response_code"], e["peer_uri_san"]) for e in entries]
    assert got == [
        (ORDERS, "GET", "200", FULFILLMENT),
        (ORDERS, "GET", "403", CLIENTS["stranger"]),
    ], entries


# --- mTLS ------------------------------------------------------------------------------

TLS_FAILURES = (ssl.SSLError, ConnectionError, HTTPException, OSError)


def test_client_without_certificate_is_rejected(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    with pytest.raises(TLS_FAILURES):
        https_request(
            mesh.envoy.port(PAYMENT),
            "GET",
            "/health",
            ca_cert=mesh.pki.ca_cert,
            client=None,
            headers={"x-test-marker": marker},
        )
    assert mesh.upstream.seen(marker=marker) == []


def test_client_certificate_from_untrusted_ca_is_rejected(mesh: Mesh) -> None:
    rogue = mesh.pki.rogue_client
    assert rogue is not None and rogue.spiffe_id == CHECKOUT
    marker = uuid.uuid4().hex
    with pytest.raises(TLS_FAILURES):
        https_request(
            mesh.envoy.port(ORDERS),
            "POST",
            "/v1/orders",
            ca_cert=mesh.pki.ca_cert,
            client=rogue,
            headers={"x-test-marker": marker},
            body=b"{}",
        )
    assert mesh.upstream.seen(marker=marker) == []


# --- authz unavailable -----------------------------------------------------------------


def test_authz_down_fails_closed(private_mesh: Mesh) -> None:
    resp, seen = send(private_mesh, ORDERS, "checkout-api", "POST", "/v1/orders")
    assert_allowed(resp, seen, CHECKOUT)

    private_mesh.authz.stop()
    assert not private_mesh.authz.running

    for listener, client, method, path in [
        (ORDERS, "checkout-api", "POST", "/v1/orders"),
        (PAYMENT, "stranger", "GET", "/health"),
    ]:
        resp, seen = send(private_mesh, listener, client, method, path)
        assert resp.status == 403, describe(resp)
        assert seen == [], "request reached the upstream while authz was down"
