"""authz.addresses: IP values read as istiod (matcher.CidrRange, Go's net) and Envoy read them.

Read by Python's ipaddress, `::ffff:127.0.0.1` was one IPv6 address where istiod writes the
IPv4 range 127.0.0.1/32, and `2001:db8::1.2.3.4` one address where istiod writes
2001:db8::/32: DENY rules on them never fired for what Istio denies (pair ip-go-parse)."""

from __future__ import annotations

import ipaddress

import pytest

from authz.addresses import istio_network


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
