"""authz.addresses: IP values read as istiod (matcher.CidrRange, Go's net) and Envoy read them.

Read by Python's ipaddress, `::ffff:127.0.0.1` was one IPv6 address where istiod writes the
IPv4 range 127.0.0.1/32, and `2001:db8::1.2.3.4` one address where istiod writes
2001:db8::/32: DENY rules on them never fired for what Istio denies (pair ip-go-parse)."""

from __future__ import annotations

import ipaddress

import pytest

from authz.addresses import istio_network, istio_networks


@pytest.mark.parametrize(("value", "network"), [
    ("10.1.2.3", "10.1.2.3/32"),
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits set: Envoy masks them
    ("2001:db8::1", "2001:db8::1/128"),
    ("::ffff:127.0.0.1", "127.0.0.1/32"),  # Go prints an IPv4-mapped address as IPv4
    ("::ffff:7f00:1", "127.0.0.1/32"),  # no '.': prefix 128, clamped by Envoy to 32
    ("::ffff:1.2.3.0/120", "1.2.3.0/32"),
    ("::ffff:1.2.3.0/24", "1.2.3.0/24"),
    ("2001:db8::1.2.3.4", "2001:db8::/32"),  # a '.' in the text: prefix 32
    ("::1.2.3.4", "::/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_read_as_istiod_and_envoy_read_it(value: str, network: str) -> None:
    assert istio_network(value) == ipaddress.ip_network(network)


@pytest.mark.parametrize("value", [
    "fe80::1%eth0", "1.2.3.0/255.255.255.0", "1.2.3.0/0.0.0.255", "1.2.3.0/024", "1.2.3.0/33",
    "2001:db8::/129", "1.2.3.04", "1.2.3", "", "1.2.3.4/", "1.2.3.4/\uff12\uff14", " 1.2.3.4",
])
def test_refused_where_go_or_envoy_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        istio_network(value)


@pytest.mark.parametrize(("value", "readings"), [
    ("10.1.2.3", ("10.1.2.3/32",)),
    ("2001:db8::/32", ("2001:db8::/32",)),
    # current istiod (net/netip) keeps these as the IPv6 address each spells (pair r15-ip-netip)
    ("::ffff:127.0.0.1", ("127.0.0.1/32", "::ffff:127.0.0.1/128")),
    ("::ffff:1.2.3.0/120", ("1.2.3.0/32", "::ffff:1.2.3.0/120")),
    ("2001:db8::1.2.3.4", ("2001:db8::/32", "2001:db8::102:304/128")),
    ("2001:db8::1.2.3.4/128", ("2001:db8::102:304/128",)),
])
def test_older_and_current_istiod_readings(value: str, readings: tuple[str, ...]) -> None:
    assert istio_networks(value) == tuple(ipaddress.ip_network(r) for r in readings)


def test_a_value_read_two_ways_is_matched_both_ways_in_a_deny_and_refused_in_an_allow(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Which istiod the mesh runs would decide what an ALLOW on `::ffff:127.0.0.1` allows."""
    from bundle_factory import check_request, policy_set, write_bundle

    from authz.bundle.loader import BundleError
    from authz.engine.compile import load_policy_set
    from authz.request import from_check_request

    deny = {"name": "d", "action": "DENY", "rules": [{"name": "r", "from": [{"source": {"remoteIpBlocks": ["::ffff:192.0.2.1"]}}]}]}
    ps = policy_set(tmp_path, [deny, {"name": "a", "action": "ALLOW", "rules": [{"name": "all"}]}])
    for xff in ("192.0.2.1", "::ffff:192.0.2.1"):
        req = from_check_request(check_request(headers={"x-forwarded-for": xff}), ps.trust_domains)
        assert ps.decide(req).policy == "d", xff
    allow = {"name": "a", "action": "ALLOW", "rules": [{"name": "r", "from": [{"source": {"ipBlocks": ["::ffff:127.0.0.1"]}}]}]}
    with pytest.raises(BundleError, match="older istiod and as"):
        load_policy_set(write_bundle(tmp_path / "allow", [allow]))
    not_allow = {"name": "a", "action": "ALLOW", "rules": [{"name": "r", "from": [{"source": {"notIpBlocks": ["::ffff:127.0.0.1"]}}]}]}
    load_policy_set(write_bundle(tmp_path / "not", [not_allow]))
