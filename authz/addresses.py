"""IP values of policies (ipBlocks, remoteIpBlocks, destinationIpBlocks and their `when`
keys) read as Istio reads them, then as Envoy's CidrRange matches them.

istiod versions read some text two ways. Older ones (matcher.CidrRange, Go's net package)
write `::ffff:127.0.0.1` as the IPv4 range 127.0.0.1/32 (Go prints an IPv4-mapped address as
IPv4) and give a single address with a dotted quad in IPv6 (`2001:db8::1.2.3.4`) prefix
length 32 (the text has a '.'): all of 2001:db8::/32. Current ones (AddrStrToCidrRange, Go's
net/netip) keep both as the one IPv6 address. Python's ipaddress agrees with neither on the
first. Such a value has two readings (istio_networks): where matching more is stricter (a
DENY's blocks, an ALLOW's not-blocks) both are matched; elsewhere it is refused. Envoy
clamps a prefix longer than the address to the address's length.
"""

from __future__ import annotations

import ipaddress

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def istio_networks(value: str) -> tuple[IpNetwork, ...]:
    """The networks Envoy matches for ``value`` as older and as current istiod write it: one,
    or two when they differ; ValueError for text Go or Envoy refuses."""
    old = istio_network(value)
    text, slash, bits = value.partition("/")
    address = ipaddress.ip_address(text)
    current = ipaddress.ip_network((address, int(bits) if slash else address.max_prefixlen), strict=False)
    return (old,) if current == old else (old, current)


def istio_network(value: str) -> IpNetwork:
    """The network Envoy matches for ``value`` as older istiod writes it (see the module's
    doc: istio_networks has both readings); ValueError for text Go or Envoy refuses
    (zones, netmask forms, leading zeros)."""
    text, slash, bits = value.partition("/")
    if "%" in text:
        raise ValueError(f"{value!r}: a zone is not an IP address to Istio")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    if slash:
        # Go reads the prefix as a decimal length, no netmask; a leading zero may be refused
        # by one Go version and not another, so it is refused here.
        if not (bits.isascii() and bits.isdigit()) or (len(bits) > 1 and bits[0] == "0"):
            raise ValueError(f"{value!r}: the prefix length must be a number of bits")
        prefix = int(bits)
        if prefix > address.max_prefixlen:
            raise ValueError(f"{value!r}: a prefix longer than the address")
    else:
        prefix = 32 if "." in text else 128  # istiod's rule: from the text, not the address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return ipaddress.ip_network((address, min(prefix, address.max_prefixlen)), strict=False)
