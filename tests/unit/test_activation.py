"""The CEL activation (authz/engine/activation.py): every documented variable, each with the
request's or the tenant's value, looked up only when read."""

from __future__ import annotations

import pytest
from bundle_factory import check_request

from authz.engine.activation import Activation
from authz.engine.cel import VARIABLES, compile_condition, evaluate
from authz.engine.model import Tenant
from authz.request import from_check_request
from authz.spiffe import TrustDomains

TENANT = Tenant("acme", "gold", frozenset({"spiffe://cluster.local/ns/prod/sa/a"}), {"beta": True},
                {"region": "eu"}, {"spiffe://cluster.local/ns/prod/sa/a": True})
TENANT_VARIABLES = {name for name in VARIABLES if name.startswith("tenant.")}


def request():  # noqa: ANN201
    cr = check_request(principal="spiffe://cluster.local/ns/prod/sa/a", method="POST",
                       path="/v1/tenants/acme/orders?x=1", host="Orders.Example:8443",
                       headers={"x-a": "1"}, destination="spiffe://cluster.local/ns/prod/sa/orders",
                       source_ip="10.1.2.3", port=8443, context_extensions={"k": "v"}, sni="orders.example",
                       destination_ip="10.9.9.9")
    cr.attributes.source.address.socket_address.port_value = 5555
    cr.attributes.request.http.scheme = "https"
    cr.attributes.request.http.protocol = "HTTP/2"
    cr.attributes.request.http.id = "rid-1"
    return from_check_request(cr, TrustDomains("cluster.local"))


def test_every_documented_variable_with_its_value() -> None:
    req = request()
    data = {"limits": {"a": 1}}
    ctx = Activation(req, data, TENANT, {"tenant": "acme"})
    assert set(ctx) == set(VARIABLES) | {"tenant.callers_set"} and len(ctx) == len(VARIABLES) + 1
    assert dict(ctx) == {
        "request.method": "POST",
        "request.path": "/v1/tenants/acme/orders",
        "request.query": "x=1",
        "request.host": "orders.example:8443",
        "request.scheme": "https",
        "request.protocol": "HTTP/2",
        "request.id": "rid-1",
        # host and :authority both hold the authority, as in Envoy's header map
        "request.headers": {"x-a": "1", "host": "Orders.Example:8443", ":authority": "Orders.Example:8443"},
        "request.path_params": {"tenant": "acme"},
        "request.context_extensions": {"k": "v"},
        "connection.sni": "orders.example",
        "source.principal": "spiffe://cluster.local/ns/prod/sa/a",
        "source.trust_domain": "cluster.local",
        "source.namespace": "prod",
        "source.service_account": "a",
        "source.address": "10.1.2.3",
        "source.port": 5555,
        "destination.principal": "spiffe://cluster.local/ns/prod/sa/orders",
        "destination.address": "10.9.9.9",
        "destination.port": 8443,
        "data": data,
        "tenant.id": "acme",
        "tenant.plan": "gold",
        "tenant.flags": {"beta": True},
        "tenant.callers": {"spiffe://cluster.local/ns/prod/sa/a": True},
        "tenant.callers_set": frozenset({"spiffe://cluster.local/ns/prod/sa/a"}),
        "tenant.attributes": {"region": "eu"},
    }


def test_without_a_tenant_its_variables_are_missing_and_captures_are_empty() -> None:
    ctx = Activation(request(), {})
    assert set(ctx) == set(VARIABLES) - TENANT_VARIABLES
    assert ctx["request.path_params"] == {}
    for name in (*TENANT_VARIABLES, "tenant.callers_set", "nonsense"):
        with pytest.raises(KeyError):
            ctx[name]


def test_a_caller_without_a_spiffe_identity_has_empty_source_parts() -> None:
    cr = check_request(principal="", path="/")
    ctx = Activation(from_check_request(cr, TrustDomains("cluster.local")), {})
    assert (ctx["source.principal"], ctx["source.namespace"], ctx["source.trust_domain"],
            ctx["source.service_account"]) == ("", "", "", "")


def test_a_spiffe_id_without_a_path_is_in_no_trust_domain_for_conditions_too() -> None:
    """As the native trustDomains field (istiod matches `spiffe://<td>/`): a condition on
    source.trust_domain said cluster.local where trustDomains said none."""
    for principal, td in (("spiffe://cluster.local", ""), ("spiffe://cluster.local/", "cluster.local"),
                          ("spiffe://cluster.local/ns/a/sa/b", "cluster.local")):
        cr = check_request(principal=principal, path="/")
        assert Activation(from_check_request(cr, TrustDomains("cluster.local")), {})["source.trust_domain"] == td


@pytest.mark.parametrize(("expression", "expected"), [
    ("source.principal in tenant.callers", True),  # answered natively from the frozenset
    ("'spiffe://cluster.local/ns/prod/sa/a' in tenant.callers && tenant.plan == 'gold'", True),
    ("request.path_params.tenant == tenant.id && request.headers['x-a'] == '1'", True),
    ("source.namespace == 'prod' && destination.port == 8443 && data.limits.a == 1", True),
    ("tenant.flags.beta && tenant.attributes.region == 'us'", False),
])
def test_conditions_read_it(expression: str, expected: bool) -> None:
    ctx = Activation(request(), {"limits": {"a": 1}}, TENANT, {"tenant": "acme"})
    assert evaluate(compile_condition(expression), ctx) is expected
