"""PolicySet.decide(Request) -> Decision: the hot path.

Order, as in Istio: any matching DENY rule denies; AUDIT rules only mark the decision;
if ALLOW policies apply to the target, a matching ALLOW rule allows and anything else is
denied; with no ALLOW policy for the target the bundle default decides. Tenant errors
and condition errors deny at once: a check fails closed. A dry-run policy is evaluated
and reported, never enforced, not even when its condition fails.

Where a request can be read more than one way (a method in another case, a path an
upstream may merge, decode or strip; see ``authz.paths``), a DENY or AUDIT rule matches if
it matches any reading, and an ALLOW only stands if every path reading is allowed too:
never looser than Istio, and stricter exactly where an upstream could act on something
else than what was matched.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from authz import paths, spiffe
from authz.redact import condition_text, echo_free
from authz.engine import explain, shaping
from authz.engine.activation import Activation
from authz.engine.cel import CelBudgetError, CelEvalError, Condition, evaluate
from authz.engine.index import PolicyIndex
from authz.engine.model import Decision, HeaderMatch, Operation, Policy, Rule, Source, StringMatch, Tenant
from authz.request import Request
from authz.spiffe import TrustDomains

# Tenant ids: 1-63 characters of [A-Za-z0-9._-], starting with a letter or digit. This
# excludes '.', '..', '/', '\', '%', NUL and anything a path decoder could reinterpret.
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
# A path capture of this name names a tenant, whatever the policy's tenant source.
TENANT_CAPTURE = "tenant"


class Tracer(Protocol):
    """Receives each step of a decision when someone asks for an explanation."""

    def step(self, what: str, ok: bool | None, detail: str = "", policy: str = "", rule: str = "") -> None: ...


class _TenantDenied(Exception):
    def __init__(self, reason: str, tenant: str, policy: str) -> None:
        self.reason = reason
        self.tenant = tenant
        self.policy = policy


class _ConditionFailed(Exception):
    pass


class _RequestTenant:
    """The one tenant a request may name. Policies may each read theirs (a header, a path
    capture); were a DENY to judge the header's tenant and an ALLOW grant the path's, a client
    naming another tenant in the header would step around the DENY while the upstream serves
    the path's. So every enforcing policy that reads a tenant the client chooses, for a rule
    it reaches, must read the same one. The caller's identity is not chosen by the request: a
    DENY judging the caller's own tenant and an ALLOW granting the path's (a cross-tenant
    caller) judge two tenants on purpose."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id: str | None = None

    def agree(self, tenant: str, policy: str) -> None:
        if self.id is None:
            self.id = tenant
        elif tenant != self.id:
            raise _TenantDenied("tenant mismatch", tenant, policy)


@dataclass(frozen=True, slots=True)
class PolicySet:
    name: str
    revision: str
    trust_domains: TrustDomains
    default_allow: bool
    policies: tuple[Policy, ...]
    tenants: Mapping[str, Tenant]
    data: Mapping[str, Any]
    # Policies indexed by exact destination principal; the rest are checked one by one.
    by_principal: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    general: tuple[int, ...] = ()
    path_normalization: paths.Normalization = paths.Normalization.BASE
    # x-forwarded-for entries right of the client's as authz gets the header, -1: the peer
    # is the client (the manifest's xffTrustedHops and xffSkipAppend; request._remote_address)
    xff_trusted_hops: int = 0
    has_conditions: bool = True  # a rule has a `when`: checks count their evaluations (_Evaluations)
    # Some policy names its destination by principal: a request without one (plaintext,
    # Istio PERMISSIVE) cannot be told apart from a request to that destination.
    targets_principals: bool = False
    # Some policy names its workload by host only (see decide: it cannot allow a request
    # a principal target identifies); without one, nothing is looked at per check.
    host_only_targets: bool = False
    # The first enforcing policy that a request without socket attributes (the caller's or
    # the destination's address, the destination port, the SNI) could get past, and the first
    # one a request without the caller's address could: HTTP ext_authz and the decision API
    # do not carry them, so their checks are denied while such a bundle serves (check.py).
    needs_socket: str = ""
    needs_remote_address: str = ""
    # The first policy a caller's other certificate names could decide otherwise: Envoy's
    # RBAC matches identities on every SAN and the subject, ext_authz reports one URI SAN, so
    # a check naming a principal without the certificate behind it is denied (check.py).
    needs_certificate: str = ""
    # What each enforcing policy reads of the request (header:<name>, header:* for any,
    # principal, request.scheme, request.protocol, context_extensions), by policy name: HTTP
    # ext_authz carries only the headers Envoy forwards and, from a trusted proxy, the
    # principals; neither it nor the decision API carries the scheme and protocol (check.py,
    # ``carries``). No caller's header:* stands for :scheme, which only Envoy's gRPC check has.
    reads: tuple[tuple[str, frozenset[str]], ...] = ()
    # The header names the policies read ('*': any), each with '_' written '-': CGI, WSGI,
    # PHP and Rack upstreams read `x_role` as `x-role` (both HTTP_X_ROLE), so a request
    # header that becomes a read name that way is denied as ambiguous (decide).
    read_headers: frozenset[str] = frozenset()
    header_aliases: frozenset[str] = frozenset()
    # The read names that hold '_', written with '-': `x-role` is HTTP_X_ROLE as `x_role` is.
    underscore_reads: frozenset[str] = frozenset()
    # uncarried()'s answer by caller kind, filled as callers come (check.py): a dict in a
    # frozen set of rules, so that it lives and dies with the bundle.
    uncarried_seen: dict[frozenset[str], str] = field(default_factory=dict, compare=False, hash=False)

    def _aliased(self, req: Request) -> str:
        """A request header an upstream may read as one the policies read, though it is not."""
        for name in req.aliased_headers:
            if name not in self.read_headers and ("*" in self.header_aliases
                                                  or name.replace("_", "-") in self.header_aliases):
                return name
        if self.underscore_reads:
            for name in req.headers:
                if name in self.underscore_reads and name not in self.read_headers:
                    return name
        return ""

    def uncarried(self, carries: frozenset[str]) -> str:
        """The first policy that reads something a caller carrying ``carries`` lacks, or ''."""
        for name, reads in self.reads:
            for token in reads:
                if token not in carries and not (token.startswith("header:") and token != "header::scheme"
                                                 and "header:*" in carries):
                    return f"{name} ({token})"
        return ""
    # Large policies' rules indexed by method, path and caller (authz.engine.index), by name.
    rule_index: Mapping[str, PolicyIndex] = field(default_factory=dict)
    # Upstream headers of ALLOW rules and deny statuses (authz.engine.shaping).
    shapes: shaping.Shapes = shaping.NO_SHAPES

    def shape(self, decision: Decision, req: Request | None) -> Decision:
        """``decision`` with the headers its rule sets or the status and message of its deny."""
        def variables(rule: Rule, tenant: Tenant | None) -> Activation:
            assert req is not None  # an allow always has a request
            return Activation(req, self.data, tenant, _operations_match(rule.operations, req, True) or {})

        return shaping.shape(decision, self.shapes, self.tenants, variables)

    def applicable(self, req: Request) -> list[Policy]:
        chosen = sorted((*self.by_principal.get(req.destination_principal, ()), *self.general))
        return [p for i in chosen if _target_matches(p := self.policies[i], req)]

    def decide(self, req: Request, tracer: Tracer | None = None) -> Decision:
        if ((req.aliased_headers and self.header_aliases) or self.underscore_reads) and (name := self._aliased(req)):
            if tracer is not None:
                tracer.step("headers", False, f"header {name!r} is read by upstreams that fold '_' and '-' "
                            "as one the policies read")
            return Decision(False, "ambiguous header", "default", "default", "DENY")
        policies = self.applicable(req)
        if tracer is not None:
            for p in self.policies:
                if p not in policies:
                    tracer.step("target", False, explain.describe_target(p, req), p.name)
            tracer.step("target", True, f"{len(policies)} policies apply: " + ", ".join(p.name for p in policies))
        if (self.targets_principals and not req.destination_principal
                and not any(p.target.identifies_without_principal for p in policies)):
            reason = "destination not identified"
            if tracer is not None:
                tracer.step("target", False, "the request names no destination principal (plaintext?) and no "
                            "policy targets its destination by host or port")
            return Decision(False, reason, "default", "default", "DENY")
        audit: list[str] = []
        dry_run: list[str] = []
        views = _readings(req)
        seen = _RequestTenant() if self.tenants else None  # no tenant data: no policy reads a tenant
        evals = (_Evaluations(len(views) > 1 or bool(req.path_readings) or bool(req.method_overrides))
                 if self.has_conditions else _NO_CONDITIONS)
        try:
            for policy in policies:
                if policy.action != "DENY":
                    continue
                if policy.dry_run:
                    dry_run.extend(self._dry_run(policy, views, "deny", tracer, evals))
                    continue
                hit = self._first_match_any(policy, views, tracer, evals, seen)
                if hit is not None:
                    return Decision(False, "denied by policy", policy.name, hit[0].name, "DENY",
                                    hit[1], tuple(audit), tuple(dry_run))
            for policy in policies:
                if policy.action == "AUDIT":
                    hit = self._first_match_any(policy, views, tracer, evals, None if policy.dry_run else seen)
                    if hit is not None:
                        audit.append(f"{policy.name}/{hit[0].name}")
            allow_applies = False
            # The client names the Host. Once a policy has identified the destination by its
            # principal, a policy that names its workload only by host may still restrict the
            # request, but not grant it: it is another workload's, reached by a spoofed Host.
            identified = (self.host_only_targets and bool(req.destination_principal)
                          and any(p.target.principals is not None for p in policies))
            for policy in policies:
                if policy.action != "ALLOW":
                    continue
                if policy.dry_run:
                    dry_run.extend(self._dry_run(policy, (req,), "allow", tracer, evals))
                    continue
                allow_applies = True
                if not _may_grant(policy, identified, req):
                    if tracer is not None:
                        tracer.step("target", None, "names its workload by host only, and the request's "
                                    "destination is identified by principal: it cannot allow", policy.name)
                    continue
                hit = self._first_match(policy, req, tracer, evals, allow=True, seen=seen)
                if hit is not None:
                    unmatched = self._unallowed_reading(policies, req, hit[1], tracer, identified, evals)
                    if unmatched is not None:
                        return Decision(False, unmatched, policy.name, hit[0].name, "DENY",
                                        hit[1], tuple(audit), tuple(dry_run))
                    return Decision(True, "allowed by policy", policy.name, hit[0].name, "ALLOW",
                                    hit[1], tuple(audit), tuple(dry_run))
        except _TenantDenied as exc:
            if tracer is not None:
                tracer.step("tenant", False, f"{exc.reason}: {exc.tenant!r}")
            return Decision(False, exc.reason, exc.policy, "tenant", "DENY", None, tuple(audit), tuple(dry_run))
        except _ConditionFailed as exc:
            policy_name, rule_name, reason = exc.args[0], exc.args[1], exc.args[2]
            return Decision(False, reason, policy_name, rule_name, "DENY", None,
                            tuple(audit), tuple(dry_run), condition_error=True)
        if allow_applies:
            reason = "no allow rule matched"
            allowed = False
        else:
            allowed = self.default_allow
            reason = "allowed by default" if allowed else "denied by default"
        if tracer is not None:
            tracer.step("default", allowed, reason)
        return Decision(allowed, reason, "default", "default", "default", None, tuple(audit), tuple(dry_run))

    def _dry_run(self, policy: Policy, views: tuple[Request, ...], verdict: str,
                 tracer: Tracer | None, evals: _Evaluations) -> list[str]:
        """What a dry-run policy would have said; its errors are recorded, never enforced."""
        try:
            if verdict == "deny":
                hit = self._first_match_any(policy, views, tracer, evals)
                return [f"{policy.name}/{hit[0].name}=deny"] if hit is not None else []
            hit = self._first_match(policy, views[0], tracer, evals, allow=True)
        except _ConditionFailed as exc:
            return [f"{policy.name}/{exc.args[1]}=error"]
        except _TenantDenied:
            return [f"{policy.name}/tenant=error"]
        return [f"{policy.name}/{hit[0].name}=allow" if hit else f"{policy.name}=deny"]

    def _first_match_any(self, policy: Policy, views: tuple[Request, ...], tracer: Tracer | None,
                         evals: _Evaluations, seen: _RequestTenant | None = None) -> tuple[Rule, str | None] | None:
        """A DENY or AUDIT rule matches when it matches any reading of the request."""
        for i, view in enumerate(views):
            if i and tracer is not None:
                tracer.step("reading", None, f"also read as {view.method} {view.path}", policy.name)
            hit = self._first_match(policy, view, tracer, evals, allow=False, seen=seen)
            if hit is not None:
                return hit
        return None

    def _unallowed_reading(self, policies: list[Policy], req: Request, tenant: str | None,
                           tracer: Tracer | None, identified: bool, evals: _Evaluations) -> str | None:
        """The deny reason when a path reading, or a method the request asks an upstream to
        run instead (X-HTTP-Method-Override), is not allowed by any ALLOW rule (or is allowed
        for another tenant); None when every one is."""
        views = [(dataclasses.replace(req, path=r, path_readings=()), "ambiguous path", f"the path may also be read as {r!r}")
                 for r in req.path_readings]
        views += [(dataclasses.replace(req, method=m, path=p, path_readings=(), method_overrides=()), "ambiguous method",
                   f"the request asks the upstream to run {m!r} on {p!r}")
                  for m in req.method_overrides if m != req.method for p in (req.path, *req.path_readings)]
        for view, unallowed, said in views:
            if tracer is not None:
                tracer.step("reading", None, said)
            for policy in policies:
                if policy.action == "ALLOW" and not policy.dry_run and _may_grant(policy, identified, view):
                    hit = self._first_match(policy, view, tracer, evals, allow=True)
                    if hit is not None and hit[1] == tenant:
                        break
            else:
                if tracer is not None:
                    tracer.step("reading", False, f"no allow rule matches: {said}")
                return unallowed
        return None

    # --- matching ----------------------------------------------------------------------

    def _first_match(
        self, policy: Policy, req: Request, tracer: Tracer | None, evals: _Evaluations, allow: bool,
        seen: _RequestTenant | None = None,
    ) -> tuple[Rule, str | None] | None:
        """The first rule of ``policy`` that matches ``req``, and the tenant it matched for.
        ``seen``: the request's tenant so far (None for a dry run, which decides nothing)."""
        # A tenant from a header or the identity is judged once a rule's `to` matches: a
        # policy whose rules do not cover the request does not judge it (its tenant either).
        fixed_tenant: Tenant | None = None
        fixed_pending = policy.tenant is not None and policy.tenant.kind != "pathCapture"
        if tracer is not None:
            tracer.step("policy", None, f"{policy.action}{' (dry run)' if policy.dry_run else ''}, "
                        f"{len(policy.rules)} rule{'' if len(policy.rules) == 1 else 's'}"
                        + ("" if policy.rules else ": matches nothing"), policy.name)
        rules: Sequence[Rule] = policy.rules
        narrowed = self.rule_index.get(policy.name) if tracer is None else None
        if narrowed is not None:  # only rules that can match this reading, in their order
            folded = paths.fold_case(req.path) if not allow else req.path
            rules = narrowed.candidates(req.method, (req.path,) if folded == req.path else (req.path, folded),
                                        req.principal)
        for rule in rules:
            captures = _operations_match(rule.operations, req, allow)
            if captures is None:
                if tracer is not None:
                    tracer.step("to", False, explain.describe_operations(rule.operations, req, allow), policy.name,
                                rule.name)
                continue
            if tracer is not None and rule.operations:
                tracer.step("to", True, explain.describe_operations(rule.operations, req, allow), policy.name,
                            rule.name)
            if fixed_pending:
                fixed_tenant = self._tenant(self._fixed_tenant_id(policy, req), policy, tracer)
                fixed_pending = False
            tenant = fixed_tenant
            if policy.tenant is not None and policy.tenant.kind == "pathCapture":
                tenant = self._tenant(captures.get(policy.tenant.key), policy, tracer)
            elif policy.tenant is not None and (named := captures.get(TENANT_CAPTURE)) is not None \
                    and (tenant is None or named != tenant.id):
                # The path names a tenant too, and not this one: the upstream may serve the
                # path's. One tenant never reaches another's data by crafting a path.
                raise _TenantDenied("tenant mismatch", named, policy.name)
            if tenant is not None and seen is not None and policy.tenant is not None \
                    and policy.tenant.kind != "principalSegment":
                seen.agree(tenant.id, policy.name)
            if rule.sources and not any(_source_matches(s, req) for s in rule.sources):
                if tracer is not None:
                    tracer.step("from", False, explain.describe_sources(rule.sources, req), policy.name, rule.name)
                continue
            if tracer is not None and rule.sources:
                tracer.step("from", True, explain.describe_sources(rule.sources, req), policy.name, rule.name)
            if rule.conditions and not self._conditions_hold(policy, rule, req, tenant, captures, tracer, evals):
                continue
            if tracer is not None:
                tracer.step("rule", True, f"matched ({policy.action})", policy.name, rule.name)
            return rule, (tenant.id if tenant is not None else None)
        return None

    def _holds_on_a_line(self, cond: Condition, req: Request, tenant: Tenant | None,
                         captures: dict[str, str], evals: _Evaluations) -> bool:
        """Whether a DENY (or AUDIT) condition holds for some line a header it reads may have
        come in: ext_authz gets repeated lines merged as `a,b`, and Istio's RBAC filter (like
        a DENY's `headers` field here) matches each line, so `request.headers['x-role'] ==
        'admin'` must hold for lines `user` and `admin`. The headers it names are tried
        together (each line of one with each of another: `a == 'x' && b == 'y'`). Headers it
        reaches only through the map (`exists`, a computed key) keep their merged value: a
        browser's request holds a dozen headers with commas, and reading each every way cost
        every check a millisecond. Too many readings to try is an error (a deny)."""
        names = [n for n in cond.headers_read if n != "*" and _read_on_lines(n, req.headers.get(n, ""))]
        if not names:
            return False
        choices = [(req.headers[n], *_line_readings(req.headers[n], n)) for n in names]
        if math.prod(map(len, choices)) > MAX_LINE_COMBINATIONS:
            raise CelEvalError(f"headers {', '.join(names)} hold too many lines together to decide safely")
        for values in itertools.islice(itertools.product(*choices), 1, None):  # the first: all merged
            view = dataclasses.replace(req, headers={**req.headers, **dict(zip(names, values))}, memo=None)
            if evals.evaluate(cond, Activation(view, self.data, tenant, captures)):
                return True
        return False

    def _fixed_tenant_id(self, policy: Policy, req: Request) -> str | None:
        """The tenant id a header or identity tenant source names, or None."""
        assert policy.tenant is not None
        if policy.tenant.kind == "header":
            return req.headers.get(policy.tenant.key)
        if req.source is not None and self.trust_domains.known(req.source.trust_domain):
            return req.source.after(policy.tenant.key) or None  # no such segment: no tenant
        return None  # no SPIFFE ID, or one of a trust domain the bundle does not name: no tenant

    def _tenant(self, raw: str | None, policy: Policy, tracer: Tracer | None) -> Tenant | None:
        if raw is None:
            if tracer is not None:
                src = f"{policy.tenant.kind} {policy.tenant.key!r}" if policy.tenant else ""
                tracer.step("tenant", None, f"no tenant from {src}", policy.name)
            return None
        if not TENANT_ID.match(raw):
            raise _TenantDenied("invalid tenant", raw, policy.name)
        tenant = self.tenants.get(raw)
        if tenant is None:
            raise _TenantDenied("unknown tenant", raw, policy.name)
        if tracer is not None and policy.tenant is not None:
            tracer.step("tenant", True, f"tenant {raw!r} from {policy.tenant.kind} {policy.tenant.key!r}", policy.name)
        return tenant

    def _conditions_hold(
        self,
        policy: Policy,
        rule: Rule,
        req: Request,
        tenant: Tenant | None,
        captures: dict[str, str],
        tracer: Tracer | None,
        evals: _Evaluations,
    ) -> bool:
        ctx = Activation(req, self.data, tenant, captures)
        every_line = policy.action != "ALLOW"
        for cond in rule.conditions:
            # Without a tenant an ALLOW (or AUDIT) condition on one cannot hold. A DENY one is
            # evaluated anyway: a tenant.* it reads is missing, a condition error (a deny)
            # unless the expression holds without it; taken as false, leaving the tenant header
            # out would step around the DENY.
            if cond.needs_tenant and tenant is None and policy.action != "DENY":
                if tracer is not None:
                    tracer.step("when", False, f"{condition_text(cond.source)}: no tenant", policy.name, rule.name)
                return False
            # Readings of the method and path repeat a condition that reads neither: once.
            key = _Evaluations.key(cond, every_line, req, tenant, captures) if evals.readings else None
            try:
                ok = evals.known.get(key) if key is not None else None
                if ok is None:
                    ok = evals.evaluate(cond, ctx)
                    if not ok and every_line and cond.headers_read:
                        ok = self._holds_on_a_line(cond, req, tenant, captures, evals)
                    if key is not None:
                        evals.known[key] = ok
            except CelEvalError as exc:
                if tracer is not None:
                    tracer.step("when", None, f"{condition_text(cond.source)}: error: {echo_free(exc)}", policy.name, rule.name)
                reason = "condition over budget" if isinstance(exc, CelBudgetError) else "condition error"
                raise _ConditionFailed(policy.name, rule.name, reason) from None
            if tracer is not None:
                tracer.step("when", ok, f"{condition_text(cond.source)} = {str(ok).lower()}", policy.name, rule.name)
            if not ok:
                return False
        return True


class _Evaluations:
    """The conditions one check has evaluated: each result by what its condition reads, and
    a bound on them all. A condition's own bounds (cel.py) hold per evaluation, and a check
    evaluates one for every method and path reading and every line of a merged header: a
    412-byte request ran one 20,000 times (85 s of CPU)."""

    __slots__ = ("readings", "known", "count", "started")

    def __init__(self, readings: bool) -> None:
        self.readings = readings  # the request has other readings: results are worth keeping
        self.known: dict[tuple[object, ...], bool] = {} if readings else _NOTHING_KNOWN
        self.count = 0
        self.started = 0.0

    @staticmethod
    def key(cond: Condition, every_line: bool, req: Request, tenant: Tenant | None,
            captures: Mapping[str, str]) -> tuple[object, ...]:
        # Views of one request differ only in method and path (the headers are one dict).
        v = cond.variables
        return (id(cond), every_line, tenant.id if tenant is not None else None,
                req.method if "request.method" in v else None, req.path if "request.path" in v else None,
                tuple(captures.items()) if "request.path_params" in v else None)

    def evaluate(self, cond: Condition, ctx: Activation) -> bool:
        count = self.count = self.count + 1
        if count == 1:
            return evaluate(cond, ctx)  # most checks evaluate one condition: no clock for it
        if count == 2:
            self.started = time.perf_counter()
        elif count > MAX_EVALUATIONS or time.perf_counter() - self.started > CHECK_BUDGET_SECONDS:
            raise CelBudgetError("the request needs more condition evaluations than a check may spend")
        return evaluate(cond, ctx)


_NOTHING_KNOWN: dict[tuple[object, ...], bool] = {}  # never written: keys are kept only with readings
_NO_CONDITIONS = _Evaluations(False)  # for bundles without conditions: never evaluates
# Condition evaluations one check may spend (all readings and lines together), and their time.
MAX_EVALUATIONS = 2_048
CHECK_BUDGET_SECONDS = 0.1


MAX_RUN_ELEMENTS = 8  # up to this many elements, every run of neighbours is a reading (36)
MAX_LINE_ELEMENTS = 64  # beyond the runs' bound, each element alone; beyond this, an error
# Readings of the headers a condition reads, tried together (each ~10 µs, and all within the
# check's own bound, MAX_EVALUATIONS): a browser's accept with a few dozen cookies fits;
# beyond, an error, since trying fewer would let a client pad two lines past a DENY on both.
MAX_LINE_COMBINATIONS = 2_048


def _line_readings(value: str, name: str = "") -> tuple[str, ...]:
    """What lines (or list elements) a merged header value may have come in, the whole
    excepted: every run of neighbouring comma-separated elements (a line may hold commas)
    for up to MAX_RUN_ELEMENTS elements, else each element; each also trimmed; for the
    `cookie` header, each cookie pair (Envoy joins HTTP/2 crumbs with '; '). Bounded
    before anything is built: a 60 KB header of commas costs a split, no more. Not cached:
    256 values of 96 KiB with their readings would hold hundreds of MB."""
    n = value.count(",") + 1
    if n > MAX_LINE_ELEMENTS:
        raise CelEvalError(f"a header holds more than {MAX_LINE_ELEMENTS} comma-separated elements to decide safely")
    # A page may well set more cookies than a client sends lines: up to the combinations tried.
    if name == "cookie" and value.count(";") >= MAX_LINE_COMBINATIONS:
        raise CelEvalError(f"a cookie header holds more than {MAX_LINE_COMBINATIONS} pairs to decide safely")
    parts = value.split(",")
    if n <= MAX_RUN_ELEMENTS:
        out = dict.fromkeys(",".join(parts[i:j]) for i in range(n) for j in range(i + 1, n + 1))
    else:
        out = dict.fromkeys(parts)
    out.update(dict.fromkeys(p.strip() for p in parts))
    if name == "cookie" and ";" in value:
        out.update(dict.fromkeys(pair.strip(" \t") for pair in value.split(";")))
    out.pop(value, None)
    return tuple(out)


def _read_on_lines(name: str, value: str) -> bool:
    """Whether a header has other readings than ``value`` (_line_readings): lines merged with
    ',', outer blanks (Envoy keeps them in an HTTP/2 value, an HTTP/1.1 upstream trims them),
    or cookie pairs joined with ';'."""
    return "," in value or value != value.strip(" \t") or (name == "cookie" and ";" in value)


def _readings(req: Request) -> tuple[Request, ...]:
    """The request and every other (method, path) reading of it, for DENY and AUDIT rules
    (which also read each path case-folded: Operation.path_captures)."""
    methods = req.method_readings
    if len(methods) == 1 and not req.path_readings:
        return (req,)
    views = [req]
    for method in methods:
        for path in (req.path, *req.path_readings):
            if method != req.method or path != req.path:
                views.append(dataclasses.replace(req, method=method, path=path, path_readings=()))
    return tuple(views)


def _may_grant(policy: Policy, identified: bool, req: Request) -> bool:
    """Whether an ALLOW ``policy`` may allow: not one that names its workload by host only
    when the destination is ``identified`` by principal (see decide), nor one whose target
    matches the destination in only one of the readings older and patched istiod give it,
    nor one whose target hosts only a forwarding header names (it applies, to deny, but
    `X-Forwarded-Host: <another workload>` must not make that workload's policy grant)."""
    t = policy.target
    if t.grant_principals is not None and not t.grant_principals(req.destination_principal):
        return False
    if identified and t.principals is None and t.hosts is not None:
        return False
    return (t.hosts is None or t.hosts.present or not req.forwarded_hosts
            or any(map(t.hosts, req.host_names(True, forwarded=False))))


def _target_matches(policy: Policy, req: Request) -> bool:
    t = policy.target
    if t.principals is not None and not t.principals(req.destination_principal):
        return False
    # A policy applies to every reading of the host: an ALLOW policy that a trailing dot or a
    # port could step around would leave the request to the others, or to the default.
    if t.hosts is not None and not (t.hosts.present or any(map(t.hosts, req.host_names(True)))):
        return False
    if t.ports is not None and req.destination_port not in t.ports:
        return False
    for key, value in t.context_extensions:
        if req.context_extensions.get(key) != value:
            return False
    return True


def _operations_match(ops: tuple[Operation, ...], req: Request, allow: bool) -> dict[str, str] | None:
    if not ops:
        return {}
    for op in ops:
        captures = _operation_match(op, req, allow)
        if captures is not None:
            return captures
    return None


def _operation_match(op: Operation, req: Request, allow: bool) -> dict[str, str] | None:
    """One ``to`` entry. ``allow``: the rule allows, so every field takes its strict reading.

    An ALLOW's not-forms exclude a method in any case, a header when any element of a
    merged value matches and a host in any reading; a DENY's header values match any
    element ('a,b' is how two header lines reach ext_authz) and its hosts any reading
    (Request.host_names). Methods and paths of a DENY are read every way by the caller
    (``_readings``).
    """
    if op.methods is not None and not op.methods(req.method):
        return None
    if op.not_methods is not None and (
        op.not_methods(req.method) or (allow and op.not_methods(req.method.upper()))
    ):
        return None
    for h in op.headers:
        if not _header_matches(h, req, not allow):
            return None
    for h in op.not_headers:
        if _header_matches(h, req, allow):
            return None
    if op.sni is not None and not op.sni(req.sni):
        return None
    if op.not_sni is not None and op.not_sni(req.sni):
        return None
    if op.destination_ip_blocks is not None and not op.destination_ip_blocks(req.destination_address):
        return None
    if op.not_destination_ip_blocks is not None and op.not_destination_ip_blocks(req.destination_address):
        return None
    # '*' is istiod's presentMatch on :authority, which every request Envoy passes has (an
    # empty Host header included): true, where the string match needs a non-empty value.
    if op.hosts is not None and not (op.hosts.present or _host_matches(op.hosts, req, not allow)):
        return None
    if op.not_hosts is not None and (op.not_hosts.present or _host_matches(op.not_hosts, req, allow)):
        return None
    if op.ports is not None and req.destination_port not in op.ports:
        return None
    if op.not_ports is not None and req.destination_port in op.not_ports:
        return None
    return op.path_captures(req.path, every_reading=not allow)


def _header_matches(h: HeaderMatch, req: Request, every: bool) -> bool:
    # h lives in the bundle, beyond the check: its id keys it
    return req.recall((id(h), every), req.headers, h, req.headers, every)


def _host_matches(hosts: StringMatch, req: Request, every: bool) -> bool:
    """Whether ``hosts`` matches a reading of the request's host (every reading, or the
    authority's)."""
    return req.recall((id(hosts), every), req.host, _any_host, hosts, req, every)


def _any_host(hosts: StringMatch, req: Request, every: bool) -> bool:
    return any(map(hosts, req.host_names(every)))


def _source_matches(s: Source, req: Request) -> bool:
    p = req.principal
    if s.principals is not None and not s.principals(p):
        return False
    if s.not_principals is not None and s.not_principals(p):
        return False
    if s.trust_domains is not None and not s.trust_domains(spiffe.trust_domain_of(p)):
        return False
    if s.not_trust_domains is not None and s.not_trust_domains(spiffe.trust_domain_of(p)):
        return False
    if s.namespaces is not None and not s.namespaces(p):
        return False
    if s.not_namespaces is not None and s.not_namespaces(p):
        return False
    if s.service_accounts is not None and not s.service_accounts(p):
        return False
    if s.not_service_accounts is not None and s.not_service_accounts(p):
        return False
    if s.ip_blocks is not None and not s.ip_blocks(req.source_address):
        return False
    if s.not_ip_blocks is not None and s.not_ip_blocks(req.source_address):
        return False
    if s.remote_ip_blocks is not None and not s.remote_ip_blocks(req.remote_address):
        return False
    if s.not_remote_ip_blocks is not None and s.not_remote_ip_blocks(req.remote_address):
        return False
    return True
