"""Typed, frozen policy objects as compiled from a bundle, and the Decision they produce."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from authz.engine.cel import Condition
from authz.paths import PathTemplate
from authz.paths import fold_case as ascii_lower
from authz.spiffe import re2_compile, re2_text

Action = Literal["ALLOW", "DENY", "AUDIT"]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# What RE2 reads as other than itself in text istiod pastes into a pattern.
_RE2_META = frozenset("\\.+*?()|[]{}^$")


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Any-of matcher over Istio's string forms: exact, 'prefix*', '*suffix', '*'."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    present: bool = False  # '*': any non-empty value
    fold_case: bool = False
    # Principals: older istiod writes '*suffix' as the RE2 pattern 'spiffe://.*suffix' with the
    # suffix pasted in unescaped ('.' is any character, '[1]' a class); patched istiod
    # (CVE-2026-39350) escapes it. A suffix both read alike is in `suffixes` (after the
    # scheme, `suffix_floor`); one they read otherwise is in `suffix_readings` with its
    # unescaped pattern, and matches when either reading does (`suffix_widen`: where
    # matching more is stricter) or only when both do.
    suffix_floor: str = ""
    suffix_readings: tuple[tuple[re.Pattern[str], str], ...] = ()
    suffix_widen: bool = True

    @classmethod
    def of(cls, patterns: list[str], fold_case: bool = False, scheme: str = "", widen: bool = True) -> StringMatch:
        """Istio's string forms; with ``scheme``, exact and prefix values get it prepended.
        ``widen``: matching more makes the rule stricter (see suffix_readings)."""
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        present = False
        for p in patterns:
            if fold_case:  # ASCII letters only, as Envoy's ignoreCase: 'K' (Kelvin) is no 'k'
                p = ascii_lower(p)
            if p == "*":
                present = True
            elif p.startswith("*"):
                suffixes.append(p[1:])
            elif p.endswith("*"):
                prefixes.append(scheme + p[:-1])
            else:
                exact.add(scheme + p)
        readings: list[tuple[re.Pattern[str], str]] = []
        if scheme:
            # re.error for a suffix that is no valid pattern: a load error, as istiod's config is
            for s in [s for s in suffixes if not _RE2_META.isdisjoint(s)]:
                readings.append((re2_compile(f"{re.escape(scheme)}.*{re2_text(s, after_repeat=True)}"), s))
                suffixes.remove(s)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), present, fold_case, scheme,
                   tuple(readings), widen)

    def __call__(self, value: str) -> bool:
        if not value:
            return False
        if self.fold_case:
            value = ascii_lower(value)
        return (
            self.present
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.startswith(self.suffix_floor) and self._after_floor(value))
            or (bool(self.suffix_readings) and self._suffix_read(value))
        )

    @property
    def exact_only(self) -> bool:
        """Whether only exact values match: what an index may key by value alone."""
        return not (self.prefixes or self.suffixes or self.suffix_readings or self.present or self.fold_case)

    def _after_floor(self, value: str) -> bool:
        """A suffix ends ``value`` after the scheme (``spiffe://.*<suffix>``): the '/' of
        `spiffe://ns/...` is the scheme's, not a suffix's `/ns/...`."""
        return value[len(self.suffix_floor):].endswith(self.suffixes)

    def _suffix_read(self, value: str) -> bool:
        rest = value[len(self.suffix_floor):]
        for regex, suffix in self.suffix_readings:
            old = regex.fullmatch(value) is not None
            new = value.startswith(self.suffix_floor) and rest.endswith(suffix)
            if (old or new) if self.suffix_widen else (old and new):
                return True
        return False

    def patterns(self) -> list[str]:
        """The values as compared (principals with their scheme), for explanations and lint."""
        out = sorted(self.exact)
        out += [p + "*" for p in self.prefixes]
        out += ["*" + s for s in (*self.suffixes, *(s for _, s in self.suffix_readings))]
        if self.present:
            out.append("*")
        return out


@dataclass(frozen=True, slots=True)
class RegexMatch:
    """Istio's regex-shaped principal matchers (namespaces, service accounts), compiled once.
    Older istiod pastes the values into the pattern unescaped, patched istiod (CVE-2026-39350)
    escapes them: where the two differ, ``escaped`` is the patched reading, and a value
    matches when either does (``widen``: where matching more is stricter) or when both do."""

    sources: tuple[str, ...]  # the values as written
    regex: re.Pattern[str]
    escaped: re.Pattern[str] | None = None
    widen: bool = True

    def __call__(self, value: str) -> bool:
        if not value:
            return False
        old = self.regex.fullmatch(value) is not None
        if self.escaped is None:
            return old
        new = self.escaped.fullmatch(value) is not None
        return (old or new) if self.widen else (old and new)

    def patterns(self) -> list[str]:
        return list(self.sources)


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One request header against Istio string forms; '*' means present, even empty.

    ext_authz sees repeated header lines merged as 'a,b'; Envoy's RBAC filter matches each
    line on its own, and a line may hold commas too. So ``elements`` also tries every run of
    neighbouring comma-separated elements (each element, for a pattern without a comma): the
    reading a DENY rule (and an ALLOW rule's not-values) must take to be never looser than
    Istio. The other reading, the whole value only, is exact for patterns without a comma;
    the bundle refuses a comma where that reading is the one taken (authz.engine.compile).
    ``elements`` also tries the value without its outer blanks: Envoy passes an HTTP/2 value
    as sent (` admin`), an HTTP/1.1 upstream behind it trims it (`admin`). And each pair of a
    `cookie` value: Envoy joins HTTP/2 cookie crumbs with '; ' (RFC 9113 8.2.3), an upstream's
    cookie parser reads each pair (`a=1; session=admin` holds `session=admin`).
    """

    name: str  # lower case
    values: StringMatch

    def __call__(self, headers: Mapping[str, str], elements: bool) -> bool:
        value = headers.get(self.name)
        if value is None:
            return False
        if self.values.present or self.values(value):
            return True
        return elements and self._other_reading(value)

    def _other_reading(self, value: str) -> bool:
        """Whether a line ``value`` may have come in, or the value as an upstream trims it, matches."""
        if "," in value and self._any_run(value):
            return True
        trimmed = value.strip(" \t")  # no copy, and no second match, for a value without blanks
        if trimmed != value and self.values(trimmed):
            return True
        return self.name == "cookie" and ";" in value and self._any_cookie_pair(value)

    def _any_cookie_pair(self, value: str) -> bool:
        """One pass over the pairs, each matched once however often it is repeated."""
        return any(map(self.values, {pair.strip(" \t") for pair in value.split(";")}))

    def _any_run(self, value: str) -> bool:
        """Whether a run of the comma-separated elements of ``value`` (a line it could have
        been sent as), as it is or with its outer blanks trimmed, matches."""
        sm = self.values
        parts = value.split(",")
        for e in sm.exact:
            width = e.count(",") + 1
            for i in range(len(parts) - width + 1):
                run = ",".join(parts[i:i + width])
                if run == e or run.strip(" \t") == e:
                    return True
        if sm.prefixes:
            start = 0
            for part in parts:  # a run starts where an element starts
                trimmed = start + len(part) - len(part.lstrip(" \t"))
                if any(value.startswith(p, start) or value.startswith(p, trimmed) for p in sm.prefixes):
                    return True
                start += len(part) + 1
        if sm.suffixes:
            end = -1
            for part in parts:  # and ends where one ends
                end += len(part) + 1
                trimmed = end - (len(part) - len(part.rstrip(" \t")))
                if any(value.endswith(x, 0, end) or value.endswith(x, 0, trimmed) for x in sm.suffixes):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class PathMatch:
    """String forms plus templates; a template match may yield captures."""

    strings: StringMatch
    templates: tuple[PathTemplate, ...] = ()
    # The patterns with their ASCII letters lower-cased, for the case-folded reading of a
    # path (Operation.path_captures); None when folding leaves them as they are, and for an
    # ALLOW's paths, which are never read that way.
    folded: PathMatch | None = None

    def match(self, path: str, original: str | None = None) -> dict[str, str] | None:
        """``original``: see PathTemplate.match."""
        if self.strings(path):
            return {}
        for t in self.templates:
            captures = t.match(path, original)
            if captures is not None:
                return captures
        return None


@dataclass(frozen=True, slots=True)
class IpMatch:
    networks: tuple[IpNetwork, ...]

    def __call__(self, address: str) -> bool:
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class Source:
    """One entry of a rule's ``from``; every field given must match."""

    principals: StringMatch | None = None
    not_principals: StringMatch | None = None
    trust_domains: StringMatch | None = None  # on the trust-domain part of the principal
    not_trust_domains: StringMatch | None = None
    namespaces: RegexMatch | None = None
    not_namespaces: RegexMatch | None = None
    service_accounts: RegexMatch | None = None
    not_service_accounts: RegexMatch | None = None
    ip_blocks: IpMatch | None = None
    not_ip_blocks: IpMatch | None = None
    remote_ip_blocks: IpMatch | None = None
    not_remote_ip_blocks: IpMatch | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """One entry of a rule's ``to``; every field given must match."""

    methods: StringMatch | None = None
    not_methods: StringMatch | None = None
    paths: PathMatch | None = None
    not_paths: PathMatch | None = None
    hosts: StringMatch | None = None
    not_hosts: StringMatch | None = None
    ports: frozenset[int] | None = None
    not_ports: frozenset[int] | None = None
    headers: tuple[HeaderMatch, ...] = ()  # all must match
    not_headers: tuple[HeaderMatch, ...] = ()  # none may match
    sni: StringMatch | None = None
    not_sni: StringMatch | None = None
    destination_ip_blocks: IpMatch | None = None
    not_destination_ip_blocks: IpMatch | None = None

    def path_captures(self, path: str, every_reading: bool) -> dict[str, str] | None:
        """The captures of ``paths`` (``{}`` without templates) when ``paths`` and ``notPaths``
        let ``path`` through, else None.

        A case-insensitive router (Express's, ASP.NET Core's, IIS) serves /ADMIN as /admin,
        so the path is also read case-folded, against the case-folded patterns. With
        ``every_reading`` (a DENY or AUDIT rule) either reading may match; otherwise (an
        ALLOW rule) ``paths`` are case-sensitive, as in Istio, and ``notPaths`` exclude in
        either reading.
        """
        if not every_reading:
            np = self.not_paths
            if np is not None:
                if np.match(path) is not None:
                    return None
                folded = ascii_lower(path)
                # Unless folding changes the path or the patterns, that is the same test again.
                if (folded != path or np.folded is not None) and (np.folded or np).match(folded) is not None:
                    return None
            return {} if self.paths is None else self.paths.match(path)
        captures = _path_captures(self.paths, self.not_paths, path)
        if captures is not None:
            return captures
        folded = ascii_lower(path)
        if folded == path and not (self.paths is not None and self.paths.folded is not None
                                   or self.not_paths is not None and self.not_paths.folded is not None):
            return None  # the folded reading is the same reading
        # Captures in their own case: a tenant id or a condition reads them as sent.
        return _path_captures(self.paths and (self.paths.folded or self.paths),
                              self.not_paths and (self.not_paths.folded or self.not_paths), folded, path)


def _path_captures(paths: PathMatch | None, not_paths: PathMatch | None, path: str,
                   original: str | None = None) -> dict[str, str] | None:
    if not_paths is not None and not_paths.match(path) is not None:
        return None
    return {} if paths is None else paths.match(path, original)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    sources: tuple[Source, ...]  # empty: any source
    operations: tuple[Operation, ...]  # empty: any operation
    conditions: tuple[Condition, ...]
    location: str  # file:line of the rule, for explanations and coverage


TenantKind = Literal["pathCapture", "header", "principalSegment"]


@dataclass(frozen=True, slots=True)
class TenantSource:
    kind: TenantKind
    key: str  # capture name, lower-cased header name, or SPIFFE path key


@dataclass(frozen=True, slots=True)
class Target:
    principals: StringMatch | None = None
    hosts: StringMatch | None = None
    ports: frozenset[int] | None = None
    context_extensions: tuple[tuple[str, str], ...] = ()
    # An ALLOW policy whose target principals older and patched istiod read otherwise applies
    # where either reading matches (`principals`: its rules then decide), and may grant only
    # where both do: either way of reading it alone would be looser in some case.
    grant_principals: StringMatch | None = None

    @property
    def identifies_without_principal(self) -> bool:
        """Names its destination by something a plaintext request still carries."""
        return self.principals is None and bool(self.hosts or self.ports or self.context_extensions)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    action: Action
    target: Target
    rules: tuple[Rule, ...]
    tenant: TenantSource | None
    dry_run: bool
    location: str
    namespace: str = ""  # Istio's metadata.namespace, when the policy came from one


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    plan: str
    callers: frozenset[str]
    flags: dict[str, object]
    attributes: dict[str, object]
    # The CEL view, built once at load: callers as a map so `in` is a hash lookup.
    cel_callers: dict[str, bool] = field(repr=False, default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    policy: str  # deciding policy, or "default"
    rule: str  # deciding rule, or "default"
    action: str  # ALLOW / DENY / AUDIT / default
    tenant: str | None = None
    audit: tuple[str, ...] = ()  # "policy/rule" of matching AUDIT rules
    dry_run: tuple[str, ...] = ()  # "policy/rule=allow|deny|error" a dry-run policy would have decided
    condition_error: bool = False
    # Policy-shaped responses (authz.engine.shaping): headers the allowing rule sets and
    # removes upstream; the status and message of a deny (0: the default 403).
    upstream_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    deny_status: int = 0
    deny_message: str = ""

    @property
    def http_status(self) -> int:
        return 200 if self.allowed else (self.deny_status or 403)
