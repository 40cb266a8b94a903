"""IP values of policies (ipBlocks, remoteIpBlocks, destinationIpBlocks and their `when`
keys) read as Istio reads them: istiod's matcher.CidrRange with Go's net package, then
Envoy's CidrRange.

Python's ipaddress reads some of that text otherwise. `::ffff:127.0.0.1` is one IPv6
address to it; istiod writes it as the IPv4 range 127.0.0.1/32 (Go prints an IPv4-mapped
address as IPv4), so a DENY on it never fired for 127.0.0.1. A single address with a dotted
quad in IPv6 (`2001:db8::1.2.3.4`) gets prefix length 32 from istiod (the text has a '.'):
all of 2001:db8::/32, where ipaddress read one address. Envoy clamps a prefix longer than
the address to the address's length.
"""

from __future__ import annotations

import ipaddress

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def istio_network(value: str) -> IpNetwork:
    """The network Envoy matches for ``value``; ValueError for text Go or Envoy refuses
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
