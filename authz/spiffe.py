"""SPIFFE IDs: parsing, trust domains and their aliases, as Istio treats them.

A principal arrives from Envoy as the URI SAN of the client certificate
(``spiffe://<trust-domain>/<path>``) and is compared as received: the caller is never
rewritten. Trust-domain aliases work the way istiod applies them, on the *policy* side: a
policy principal ``td/ns/x/sa/y`` whose trust domain is the bundle's, an alias, or
``cluster.local`` (a pointer to the local trust domain) stands for the same identity in
every trust domain of the bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCHEME = "spiffe://"
LOCAL_POINTER = "cluster.local"


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
    """Split ``spiffe://td/path``; None for anything else.

    Deliberately lenient about the characters of the path (Istio accepts non-strict IDs
    such as ``spiffe://td/ns/a[1]/sa/b:c``): matching never depends on this parse, only the
    attributes derived from it (namespace, tenant segments) do.
    """
    if not value.startswith(SCHEME):
        return None
    td, sep, path = value[len(SCHEME):].partition("/")
    if not td or any(c.isspace() for c in td):
        return None
    return SpiffeId(td, sep + path)


def _prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_match(a: str, b: str) -> bool:
    """istiod's trust-domain stringMatch: equal, or either side a prefix or suffix pattern of the other."""
    return a == b or _prefix_match(a, b) or _prefix_match(b, a) or _suffix_match(a, b) or _suffix_match(b, a)


def trust_domain_of(principal: str) -> str:
    """The trust-domain part of a principal, or '' when it is not a SPIFFE URI."""
    if not principal.startswith(SCHEME):
        return ""
    return principal[len(SCHEME):].partition("/")[0]


def strip_scheme(value: str) -> str:
    return value[len(SCHEME):] if value.startswith(SCHEME) else value


@dataclass(frozen=True, slots=True)
class TrustDomains:
    """The bundle's trust domain and the aliases that name the same domain."""

    primary: str
    aliases: frozenset[str] = frozenset()
    # A mesh has few distinct callers; parsing each once keeps it off the hot path.
    _parsed: dict[str, SpiffeId | None] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def all(self) -> tuple[str, ...]:
        return (self.primary, *sorted(self.aliases))

    def known(self, td: str) -> bool:
        return td == self.primary or td in self.aliases

    def canonical(self, principal: str) -> str:
        """Full-URI form of a principal (pattern), an alias named by the trust domain.

        For tools that reason about bundles (lint, import); matching never rewrites.
        """
        if principal.startswith("*"):
            return principal
        td, sep, path = strip_scheme(principal).partition("/")
        if td in self.aliases:
            td = self.primary
        return f"{SCHEME}{td}{sep}{path}"

    def expand_principal(self, value: str) -> list[str]:
        """istiod's ReplaceTrustDomainAliases for one policy principal (scheme removed).

        Only a 5-part ``td/ns/x/sa/y`` whose trust domain is not ``*`` is expanded, and only
        when that trust domain matches the bundle's or an alias (either side may be a
        ``prefix*`` / ``*suffix`` pattern) or is ``cluster.local``. Each trust domain of the
        bundle then gets the principal with its own name, except one that a ``*suffix``
        trust domain already covers: there the principal stays as written.
        """
        value = strip_scheme(value)
        parts = value.split("/")
        if len(parts) != 5 or parts[0] == "*":
            return [value]
        td = parts[0]
        if not (td == LOCAL_POINTER or any(_td_match(td, d) for d in self.all)):
            return [value]
        out: list[str] = []
        for domain in self.all:
            candidate = value if _suffix_match(domain, td) else "/".join([domain, *parts[1:]])
            if candidate not in out:
                out.append(candidate)
        return out

    def expand_trust_domains(self, values: list[str]) -> list[str]:
        """istiod's ExpandTrustDomainAliases: a known trust domain stands for all of them."""
        out: list[str] = []
        for v in values:
            for d in (self.all if self.known(v) else (v,)):
                if d not in out:
                    out.append(d)
        return out

    def caller_forms(self, principal: str) -> list[str]:
        """A tenant's caller in full-URI form, expanded like a policy principal."""
        return [SCHEME + p for p in self.expand_principal(principal)]

    def resolve(self, principal: str) -> tuple[str, SpiffeId | None]:
        """(principal as received, its SPIFFE parse); non-SPIFFE values stay verbatim."""
        try:
            return principal, self._parsed[principal]
        except KeyError:
            pass
        sid = parse(principal)
        if len(self._parsed) >= 10_000:
            self._parsed.clear()
        self._parsed[principal] = sid
        return principal, sid


def namespace_regex(values: list[str]) -> re.Pattern[str]:
    """Istio's ``.*/ns/<ns>/.*`` over the whole principal; '*' in a value is '.*'."""
    return re.compile("|".join(f".*/ns/{_istio_regex(v, star=True)}/.*" for v in values))


def service_account_regex(values: list[str], namespace: str) -> re.Pattern[str]:
    """Istio's ``spiffe://.+/ns/<ns>/(.+/|)sa/<sa>(/.+)?``; a bare name is in ``namespace``."""
    alts = []
    for v in values:
        ns, sep, sa = v.partition("/")
        if not sep:
            ns, sa = namespace, v
        alts.append(f"spiffe://.+/ns/{_istio_regex(ns)}/(.+/|)sa/{_istio_regex(sa)}(/.+)?")
    return re.compile("|".join(alts))


def _istio_regex(value: str, star: bool = False) -> str:
    # istiod pastes the value into an RE2 pattern unescaped ('.' is any character, '[1]' a
    # class), so the same text is a pattern here too: matching exactly what Istio's does, in
    # ALLOW and DENY alike. A value that is no valid pattern fails to compile: a load error.
    return re2_text(value.replace("*", ".*") if star else value)


# RE2's POSIX classes, as the ranges Python's re reads the same way.
_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": "\\x00-\\x7f", "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f", "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": "\\t\\n\\v\\f\\r ", "upper": "A-Z", "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_POSIX_CLASS = re.compile(r"\[:(\w+):\]")


def re2_text(pattern: str) -> str:
    """``pattern`` as Python's re must be given it to read it as Envoy's RE2 does: RE2 takes
    `[[:digit:]]` for a POSIX class, re for a set followed by a literal `]`. Anything else
    with `[:` is refused (re.error)."""
    if "[:" not in pattern:
        return pattern
    out = _POSIX_CLASS.sub(lambda m: _POSIX_CLASSES.get(m.group(1), m.group(0)), pattern)
    if "[:" in out:
        raise re.error(f"{pattern!r} has a '[:' that is no POSIX class RE2 knows")
    return out
