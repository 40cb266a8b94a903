"""Explanations: a Tracer that records each step of a decision, and the slow-path
descriptions of why a target, source or operation matched or not.

Nothing here runs on the serving path: ``PolicySet.decide`` calls a tracer only when one
is passed, and calls the ``describe_*`` functions only from inside ``if tracer is not None``
branches. They re-check each field one by one to say which one failed, work the hot path
never does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from authz import spiffe
from authz.engine.model import Decision, HeaderMatch, IpMatch, Operation, PathMatch, Policy, RegexMatch, Source, StringMatch
from authz.redact import NEVER_LOGGED, credential_pattern, header_value
from authz.request import Request


@dataclass(frozen=True, slots=True)
class Step:
    what: str  # target, policy, to, from, tenant, when, rule, default
    ok: bool | None  # None: neither (information, or a condition error)
    detail: str
    policy: str = ""
    rule: str = ""

    @property
    def scope(self) -> str:
        if self.policy and self.rule:
            return f"{self.policy}/{self.rule}"
        return self.policy

    def to_json(self) -> dict[str, Any]:
        return {"step": self.what, "ok": self.ok, "policy": self.policy, "rule": self.rule,
                "detail": self.detail}


class Explainer:
    """A Tracer (see ``authz.engine.decide.Tracer``) that keeps every step in order."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def step(self, what: str, ok: bool | None, detail: str = "", policy: str = "", rule: str = "") -> None:
        self.steps.append(Step(what, ok, detail, policy, rule))

    def matched_rules(self) -> set[str]:
        """``policy/rule`` of every rule that matched the request (any action, dry runs too)."""
        return {f"{s.policy}/{s.rule}" for s in self.steps if s.what == "rule" and s.ok}

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.steps]

    def lines(self) -> list[str]:
        out = []
        for s in self.steps:
            mark = {True: "+", False: "-", None: "!" if "error" in s.detail else "."}[s.ok]
            scope = f"{s.scope}: " if s.scope else ""
            out.append(f"{mark} {s.what:<7} {scope}{s.detail}")
        return out

    def render(self, decision: Decision | None = None) -> str:
        head = [summary(decision)] if decision is not None else []
        return "\n".join(head + ["  " + line for line in self.lines()])


def summary(d: Decision) -> str:
    verdict = "ALLOW" if d.allowed else "DENY"
    by = "default" if d.policy == "default" else f"{d.policy}/{d.rule}"
    extra = f", tenant {d.tenant}" if d.tenant else ""
    return f"{verdict} (HTTP {d.http_status}) by {by}: {d.reason}{extra}"


# --- slow-path descriptions -------------------------------------------------------------


def patterns(sm: StringMatch | RegexMatch) -> list[str]:
    return sm.patterns()


def _path_patterns(pm: PathMatch) -> list[str]:
    return patterns(pm.strings) + [t.source for t in pm.templates]


def _list(values: Iterable[object]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _show(value: str, header: str = "") -> str:
    """A request value as explain prints it; a header's only as much as redact lets through."""
    if not value:
        return "(none)"
    shown = header_value(header, value)
    # A redacted credential is printed bare: quoted, the marker would read as the value.
    return shown if header in NEVER_LOGGED else repr(shown)


def _field(name: str, value: str, shown: list[str], hit: bool, negative: bool, header: str = ""
           ) -> tuple[bool, str]:
    """(field passes, description) for one positive or negative field; ``header``: the
    request header ``value`` comes from, if any."""
    v = _show(value, header)
    if negative:
        text = f"{name}: {v} {'matches' if hit else 'matches none of'} {_list(shown)}"
        return not hit, text + (" (excluded)" if hit else "")
    return hit, f"{name}: {v} {'matches' if hit else 'does not match'} {_list(shown)}"


def _strings(name: str, sm: StringMatch | RegexMatch | None, values: tuple[str, ...], negative: bool = False,
             header: str = "") -> tuple[bool, str] | None:
    if sm is None:
        return None
    hit = any(sm(v) for v in values if v)
    return _field(name, values[0], patterns(sm), hit, negative, header)


def _ips(name: str, ip: IpMatch | None, value: str, negative: bool = False) -> tuple[bool, str] | None:
    if ip is None:
        return None
    return _field(name, value, [str(n) for n in ip.networks], ip(value), negative)


def _join(checks: list[tuple[bool, str] | None]) -> tuple[bool, str]:
    present = [c for c in checks if c is not None]
    ok = all(c[0] for c in present)
    return ok, "; ".join(("" if c[0] else "FAILED ") + c[1] for c in present) or "any"


def _headers(name: str, hs: tuple[HeaderMatch, ...], req: Request, elements: bool, negative: bool
             ) -> list[tuple[bool, str] | None]:
    return [_field(f"{name}[{h.name}]", req.headers.get(h.name, ""), _header_patterns(h),
                   h(req.headers, elements), negative, h.name) for h in hs]


def _header_patterns(h: HeaderMatch) -> list[str]:
    shown = h.values.patterns()
    return [credential_pattern(p) for p in shown] if h.name in NEVER_LOGGED else shown


def describe_operation(op: Operation, req: Request, allow: bool = True) -> tuple[bool, str]:
    not_methods = (req.method, req.method.upper()) if allow else (req.method,)
    checks: list[tuple[bool, str] | None] = [
        _strings("methods", op.methods, (req.method,)),
        _strings("notMethods", op.not_methods, not_methods, True),
        _strings("hosts", op.hosts, req.host_names(not allow), header=":authority"),
        _strings("notHosts", op.not_hosts, req.host_names(allow), True, ":authority"),
        *_headers("headers", op.headers, req, not allow, False),
        *_headers("notHeaders", op.not_headers, req, allow, True),
        _strings("sni", op.sni, (req.sni,)),
        _strings("notSni", op.not_sni, (req.sni,), True),
        _ips("destinationIpBlocks", op.destination_ip_blocks, req.destination_address),
        _ips("notDestinationIpBlocks", op.not_destination_ip_blocks, req.destination_address, True),
    ]
    if op.ports is not None:
        checks.append(_field("ports", str(req.destination_port or ""), sorted(map(str, op.ports)),
                             req.destination_port in op.ports, False))
    if op.not_ports is not None:
        checks.append(_field("notPorts", str(req.destination_port or ""), sorted(map(str, op.not_ports)),
                             req.destination_port in op.not_ports, True))
    if op.paths is not None:
        # The whole path test (notPaths too), as decide runs it, with both readings of a DENY.
        path_test = Operation(paths=op.paths, not_paths=op.not_paths)
        captures = path_test.path_captures(req.path, not allow)
        ok, text = _field("paths", req.path, _path_patterns(op.paths), captures is not None, False)
        if ok and not allow and path_test.path_captures(req.path, False) is None:
            text += " (read case-insensitively)"
        if captures:
            text += " " + ", ".join(f"{{{k}}}={v!r}" for k, v in captures.items())
        checks.append((ok, text))
    if op.not_paths is not None:
        exempt = Operation(not_paths=op.not_paths).path_captures(req.path, not allow) is None
        checks.append(_field("notPaths", req.path, _path_patterns(op.not_paths), exempt, True))
    return _join(checks)


def describe_source(s: Source, req: Request) -> tuple[bool, str]:
    p = (req.principal,)
    td = (spiffe.trust_domain_of(req.principal),)
    return _join([
        _strings("principals", s.principals, p),
        _strings("notPrincipals", s.not_principals, p, True),
        _strings("trustDomains", s.trust_domains, td),
        _strings("notTrustDomains", s.not_trust_domains, td, True),
        _strings("namespaces", s.namespaces, p),
        _strings("notNamespaces", s.not_namespaces, p, True),
        _strings("serviceAccounts", s.service_accounts, p),
        _strings("notServiceAccounts", s.not_service_accounts, p, True),
        _ips("ipBlocks", s.ip_blocks, req.source_address),
        _ips("notIpBlocks", s.not_ip_blocks, req.source_address, True),
        _ips("remoteIpBlocks", s.remote_ip_blocks, req.remote_address),
        _ips("notRemoteIpBlocks", s.not_remote_ip_blocks, req.remote_address, True),
    ])


def describe_operations(ops: tuple[Operation, ...], req: Request, allow: bool = True) -> str:
    return " | ".join(f"to[{i}] {describe_operation(op, req, allow)[1]}" for i, op in enumerate(ops))


def describe_sources(sources: tuple[Source, ...], req: Request) -> str:
    return " | ".join(f"from[{i}] {describe_source(s, req)[1]}" for i, s in enumerate(sources))


def describe_target(policy: Policy, req: Request) -> str:
    t = policy.target
    ok, text = _join([
        _strings("principals", t.principals, (req.destination_principal,)),
        _strings("hosts", t.hosts, req.host_names(True), header=":authority"),
        None if t.ports is None else _field("ports", str(req.destination_port or ""), sorted(map(str, t.ports)),
                                            req.destination_port in t.ports, False),
        *[_field(f"contextExtensions[{k}]", req.context_extensions.get(k, ""), [v],
                 req.context_extensions.get(k) == v, False) for k, v in t.context_extensions],
    ])
    return f"target {'applies' if ok else 'does not apply'}: {text}"
