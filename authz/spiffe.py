"""SPIFFE IDs: parsing, trust domains and their aliases.

A principal arrives from Envoy as the URI SAN of the client certificate
(``spiffe://<trust-domain>/<path>``). Istio writes principals without the scheme
(``cluster.local/ns/prod/sa/web``); both spellings name the same identity, so every
principal is canonicalised to the full URI with the bundle's own trust domain in place
of any alias before it is compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCHEME = "spiffe://"
# SPIFFE spec: trust domain is lower-case letters, digits, '.', '-', '_'.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # begins with '/', or is empty

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def after(self, key: str) -> str:
        """The segment that follows ``key`` (``ns`` -> namespace), or ''."""
        segs = self.segments
        for i in range(0, len(segs) - 1):
            if segs[i] == key:
                return segs[i + 1]
        return ""

    @property
    def namespace(self) -> str:
        return self.after("ns")

    @property
    def service_account(self) -> str:
        return self.after("sa")


def parse(value: str) -> SpiffeId | None:
    """Parse a SPIFFE ID; None when it is not a valid one."""
    if not value.startswith(SCHEME):
        return None
    rest = value[len(SCHEME):]
    td, sep, path = rest.partition("/")
    if not td or not _TRUST_DOMAIN.match(td):
        return None
    if sep:
        path = "/" + path
        for seg in path.split("/")[1:]:
            if not seg or seg in (".", "..") or not _PATH_SEGMENT.match(seg):
                return None
    return SpiffeId(td, path)


@dataclass(frozen=True, slots=True)
class TrustDomains:
    """The bundle's trust domain and the aliases that name the same domain."""

    primary: str
    aliases: frozenset[str] = frozenset()
    # A mesh has few distinct callers; resolving each once keeps parsing off the hot path.
    _resolved: dict[str, tuple[str, SpiffeId | None]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def known(self, td: str) -> bool:
        return td == self.primary or td in self.aliases

    def canonical(self, principal: str) -> str:
        """Full-URI form of a principal or principal pattern, aliases replaced.

        Patterns keep their wildcard: ``*`` stays ``*`` and ``*suffix`` stays a suffix.
        """
        if principal == "*" or principal.startswith("*"):
            return principal
        body = principal[len(SCHEME):] if principal.startswith(SCHEME) else principal
        td, sep, path = body.partition("/")
        if td in self.aliases:
            td = self.primary
        return f"{SCHEME}{td}{sep}{path}"

    def resolve(self, principal: str) -> tuple[str, SpiffeId | None]:
        """(canonical principal, parsed SPIFFE ID) of a caller; non-SPIFFE values stay verbatim."""
        hit = self._resolved.get(principal)
        if hit is not None:
            return hit
        sid = parse(principal)
        if sid is not None:
            canonical = self.canonical(sid.uri)
            result = (canonical, parse(canonical))
        else:
            result = (principal, None)
        if len(self._resolved) >= 10_000:
            self._resolved.clear()
        self._resolved[principal] = result
        return result
