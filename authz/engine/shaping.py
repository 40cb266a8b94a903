"""Policy-shaped responses: what an ALLOW rule tells the upstream, and how a deny looks.

An ALLOW rule may set upstream headers from CEL expressions over the request and tenant
(``upstreamHeaders: {x-tenant-plan: tenant.plan}``) and remove request headers before they
reach the upstream (``removeHeaders: [cookie]``). A DENY policy, or the bundle for every
other deny, may set the status (401, 403, 404, 429) and a message (``denyResponse``).

Everything is checked when the bundle loads: header names (lower-case tokens, never
``x-authz-*``, ``x-envoy-*``, hop-by-hop headers, ``host`` or ``x-forwarded-client-cert``),
expressions type-checked to strings, counts and sizes bounded. At check time ``shape`` adds
the results to the Decision; an expression that fails, or a value that is too long or holds
a control character, turns the allow into a deny (fail closed).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from authz.bundle.yamlpos import Document
from authz.engine.cel import (
    CelCompileError,
    CelEvalError,
    Condition,
    compile_string,
    evaluate_string,
)
from authz.engine.model import Decision, Policy, Rule, Tenant
from authz.redact import echo_free

DENY_STATUSES = (401, 403, 404, 429)
MAX_SET_HEADERS = 16  # per rule
MAX_REMOVE_HEADERS = 32  # per rule
MAX_VALUE_BYTES = 1024  # one header value, at check time
MAX_TOTAL_BYTES = 8192  # all values a rule sets, at check time
MAX_MESSAGE = 256

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
_RESERVED_PREFIXES = ("x-authz-", "x-envoy-")
_RESERVED = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "x-forwarded-client-cert", "x-request-id",
})
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

log = logging.getLogger("authz.shaping")

YPath = tuple[str | int, ...]
Report = Callable[[YPath, str], None]


@dataclass(frozen=True, slots=True)
class DenyResponse:
    status: int = 403
    message: str = ""


@dataclass(frozen=True, slots=True)
class RuleShape:
    rule: Rule  # for its path captures (request.path_params)
    set_headers: tuple[tuple[str, Condition], ...] = ()
    remove_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Shapes:
    """Per bundle: shaped ALLOW rules by (policy, rule), DENY responses by policy, the default."""

    rules: Mapping[tuple[str, str], RuleShape] = field(default_factory=dict)
    denies: Mapping[str, DenyResponse] = field(default_factory=dict)
    default: DenyResponse | None = None

    def __bool__(self) -> bool:
        return bool(self.rules or self.denies or self.default)


NO_SHAPES = Shapes()


# --- at load --------------------------------------------------------------------------------


def header_name_problem(name: str, removing: bool = False) -> str | None:
    if not _NAME.match(name):
        return f"header name {name!r} must be a lower-case token (a-z, 0-9, '-', '_'), at most 64 characters"
    if name.startswith(_RESERVED_PREFIXES) or name in _RESERVED:
        what = "removed" if removing else "set"
        return f"header {name!r} cannot be {what} by a policy (authz, Envoy and the proxy own it)"
    return None


def compile_deny_response(raw: Any, report: Report, at: YPath) -> DenyResponse | None:
    """``denyResponse: {status, message}`` of a DENY policy or of the manifest."""
    if raw is None:
        return None
    status = raw.get("status", 403)
    message = raw.get("message", "")
    ok = True
    if status not in DENY_STATUSES:
        report((*at, "status"), f"deny status must be one of {', '.join(map(str, DENY_STATUSES))}, not {status!r}")
        ok = False
    if not isinstance(message, str) or len(message) > MAX_MESSAGE or _BAD_VALUE.search(message):
        report((*at, "message"), f"deny message must be text of at most {MAX_MESSAGE} characters without "
                                 "control characters")
        ok = False
    return DenyResponse(int(status), message) if ok else None


def compile_rule_shape(policy: Policy, rule: Rule, raw: Mapping[str, Any], has_tenant: bool, report: Report,
                       at: YPath, data_files: frozenset[str]) -> RuleShape | None:
    """``upstreamHeaders`` and ``removeHeaders`` of one rule, or None when it has neither."""
    headers = raw.get("upstreamHeaders") or {}
    remove = raw.get("removeHeaders") or []
    if not headers and not remove:
        return None
    if policy.action != "ALLOW":
        key = "upstreamHeaders" if headers else "removeHeaders"
        report((*at, key), f"only rules of ALLOW policies shape the upstream request, not {policy.action}")
        return None
    ok = True
    if len(headers) > MAX_SET_HEADERS:
        report((*at, "upstreamHeaders"), f"at most {MAX_SET_HEADERS} upstream headers per rule")
        ok = False
    if len(remove) > MAX_REMOVE_HEADERS:
        report((*at, "removeHeaders"), f"at most {MAX_REMOVE_HEADERS} removed headers per rule")
        ok = False
    compiled: list[tuple[str, Condition]] = []
    for name, expression in headers.items():
        problem = header_name_problem(name)
        if problem is not None:
            report((*at, "upstreamHeaders", name), problem)
            ok = False
            continue
        try:
            program = compile_string(expression)
        except CelCompileError as exc:
            report((*at, "upstreamHeaders", name),
                   f"upstream header {name!r}: {exc.message} (expression column {exc.column})")
            ok = False
            continue
        if program.needs_tenant and not has_tenant:
            report((*at, "upstreamHeaders", name), "the expression reads tenant.*, but the policy names no tenant")
            ok = False
            continue
        missing = [d for d in program.data_names if d not in data_files]
        if missing:
            report((*at, "upstreamHeaders", name), f"upstream header {name!r} reads data.{missing[0]} but the "
                   f"bundle has no data/{missing[0]}.yaml or .json")
            ok = False
            continue
        compiled.append((name, program))
    for i, name in enumerate(remove):
        problem = header_name_problem(name, removing=True)
        if problem is None and name in headers:
            problem = f"header {name!r} is both set and removed"
        if problem is not None:
            report((*at, "removeHeaders", i), problem)
            ok = False
    if not ok:
        return None
    return RuleShape(rule, tuple(compiled), tuple(dict.fromkeys(remove)))


# --- at check time ----------------------------------------------------------------------------


def shape(decision: Decision, shapes: Shapes, tenants: Mapping[str, Tenant],
          variables: Callable[[Rule, Tenant | None], Mapping[str, Any]]) -> Decision:
    """The decision with its upstream headers or its deny status and message.

    ``variables`` gives the CEL activation of the request for a rule (its path captures) and
    a tenant; only called for a shaped rule.
    """
    if decision.allowed:
        rs = shapes.rules.get((decision.policy, decision.rule))
        if rs is None:
            return decision
        try:
            values = _evaluate(rs, decision, tenants, variables)
        except CelEvalError as exc:
            # The reason is a fixed string: it is a metric label and the client reads it.
            # The runtime's message may echo a request value (a map key): redacted.
            log.debug("upstream header of %s/%s failed: %s", decision.policy, decision.rule, echo_free(exc))
            denied = Decision(False, "upstream header error", decision.policy, decision.rule,
                              "DENY", decision.tenant, decision.audit, decision.dry_run, condition_error=True)
            return _deny_shape(denied, shapes)
        return dataclasses.replace(decision, upstream_headers=values, remove_headers=rs.remove_headers)
    return _deny_shape(decision, shapes)


def _deny_shape(decision: Decision, shapes: Shapes) -> Decision:
    response = None
    if decision.action == "DENY" and decision.reason == "denied by policy":
        response = shapes.denies.get(decision.policy)
    response = response or shapes.default
    if response is None:
        return decision
    return dataclasses.replace(decision, deny_status=response.status, deny_message=response.message)


def _evaluate(rs: RuleShape, decision: Decision, tenants: Mapping[str, Tenant],
              variables: Callable[[Rule, Tenant | None], Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    if not rs.set_headers:
        return ()
    tenant = tenants.get(decision.tenant) if decision.tenant else None
    ctx = variables(rs.rule, tenant)
    out: list[tuple[str, str]] = []
    total = 0
    for name, program in rs.set_headers:
        if program.needs_tenant and tenant is None:
            raise CelEvalError(f"{name}: no tenant")
        value = evaluate_string(program, ctx)
        size = len(value.encode())
        total += size
        if size > MAX_VALUE_BYTES or total > MAX_TOTAL_BYTES:
            raise CelEvalError(f"{name}: value longer than {MAX_VALUE_BYTES} bytes")
        if _BAD_VALUE.search(value):
            raise CelEvalError(f"{name}: value holds a control character")
        out.append((name, value))
    return tuple(out)


def compile_shapes(pairs: list[tuple[Document, Policy]], manifest: Document,
                   error: Callable[[Document, YPath, str], None], data_files: frozenset[str]) -> Shapes:
    """The Shapes of a bundle from its policy documents (with their compiled policies) and
    manifest; each problem goes to ``error`` with its document and path."""
    rules: dict[tuple[str, str], RuleShape] = {}
    denies: dict[str, DenyResponse] = {}
    for doc, policy in pairs:
        def report(path: YPath, message: str, doc: Document = doc) -> None:
            error(doc, path, message)

        raw_rules = doc.value.get("rules") or []
        for i, rule in enumerate(policy.rules):
            rs = compile_rule_shape(policy, rule, raw_rules[i], policy.tenant is not None, report, ("rules", i),
                                    data_files)
            if rs is not None:
                rules[(policy.name, rule.name)] = rs
        if "denyResponse" in doc.value:
            if policy.action != "DENY":
                report(("denyResponse",), f"denyResponse is for DENY policies; an {policy.action} policy's "
                                          "denies use the bundle's denyResponse")
                continue
            response = compile_deny_response(doc.value["denyResponse"], report, ("denyResponse",))
            if response is not None:
                denies[policy.name] = response

    def report_manifest(path: YPath, message: str) -> None:
        error(manifest, path, message)

    default = compile_deny_response(manifest.value.get("denyResponse"), report_manifest, ("denyResponse",))
    if not (rules or denies or default):
        return NO_SHAPES
    return Shapes(rules, denies, default)
