"""Typed, frozen policy objects as compiled from a bundle, and the Decision they produce."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from authz.engine.cel import Condition
from authz.paths import PathTemplate

Action = Literal["ALLOW", "DENY", "AUDIT"]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Any-of matcher over Istio's string forms: exact, 'prefix*', '*suffix', '*'."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    present: bool = False  # '*': any non-empty value
    fold_case: bool = False

    @classmethod
    def of(cls, patterns: list[str], fold_case: bool = False) -> StringMatch:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        present = False
        for p in patterns:
            if fold_case:
                p = p.lower()
            if p == "*":
                present = True
            elif p.endswith("*"):
                prefixes.append(p[:-1])
            elif p.startswith("*"):
                suffixes.append(p[1:])
            else:
                exact.add(p)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), present, fold_case)

    def __call__(self, value: str) -> bool:
        if not value:
            return False
        if self.fold_case:
            value = value.lower()
        return (
            self.present
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


@dataclass(frozen=True, slots=True)
class PathMatch:
    """String forms plus templates; a template match may yield captures."""

    strings: StringMatch
    templates: tuple[PathTemplate, ...] = ()

    def match(self, path: str) -> dict[str, str] | None:
        if self.strings(path):
            return {}
        for t in self.templates:
            captures = t.match(path)
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
    namespaces: StringMatch | None = None
    not_namespaces: StringMatch | None = None
    service_accounts: StringMatch | None = None
    not_service_accounts: StringMatch | None = None
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
    context_extensions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    action: Action
    target: Target
    rules: tuple[Rule, ...]
    tenant: TenantSource | None
    dry_run: bool
    location: str


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
    dry_run: tuple[str, ...] = ()  # "policy/rule=allow|deny" a dry-run policy would have decided
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
