"""Bundle documents -> PolicySet: everything a check needs, built once per bundle.

Matchers become sets and tuples, path templates regexes, conditions CEL programs and
tenant data frozensets. Every problem found is reported with file:line:column, and a
bundle with any problem is rejected as a whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from authz import paths, spiffe
from authz.addresses import IpNetwork, istio_networks
from authz.bundle.loader import BundleError, BundleFiles, read_bundle
from authz.bundle.schema import Problem
from authz.bundle.yamlpos import Document, Position
from authz.engine import shaping
from authz.engine.cel import CelCompileError, Condition, cel_code_blanked, compile_condition, data_comprehensions
from authz.engine import index as rule_index
from authz.engine.decide import TENANT_ID, PolicySet
from authz.engine.model import (
    HeaderMatch,
    IpMatch,
    Operation,
    PathMatch,
    Policy,
    RegexMatch,
    Rule,
    Source,
    StringMatch,
    Target,
    Tenant,
    TenantSource,
)
from authz.request import HOST_OVERRIDE_HEADERS, METHOD_OVERRIDE_HEADERS, PATH_OVERRIDE_HEADERS

YPath = tuple[str | int, ...]


def load_policy_set(root: Path) -> PolicySet:
    """Read, validate and compile a bundle directory; raises BundleError."""
    files = read_bundle(root)
    policy_set = compile_bundle(files)
    del files
    policy_set, table = detach_tenants(policy_set)
    return attach_tenants(policy_set, table)


# Below this many tenants repacking is not worth its time.
COMPACT_TENANTS = 10_000
# Tenants pickled per call: each call holds the GIL, so checks wait at most for one chunk
# (a few ms), not for the whole table (0.3 s and more for 100k tenants).
PACK_CHUNK = 2_000


def detach_tenants(policy_set: PolicySet) -> tuple[PolicySet, list[bytes] | None]:
    """A large tenant table, serialized, and the PolicySet without it; see attach_tenants.

    Compiled tenants are allocated while the parsed documents still exist, in between them;
    once the documents are freed the tenants alone keep those pages resident (measured: 100k
    tenants kept ~80 MB for ~17 MB of data). So, with the documents already dropped: take
    the table out, let its pages go back to the OS, and rebuild it in fresh, packed memory
    with attach_tenants. The table is emptied in place, a chunk at a time, from the end
    (attach_tenants puts the order back): dropped whole, 100k tenants pause checks 20 ms.
    ``policy_set`` is left without tenants; callers rebind it to the returned one.
    """
    if len(policy_set.tenants) < COMPACT_TENANTS:
        return policy_set, None
    tenants = policy_set.tenants if isinstance(policy_set.tenants, dict) else dict(policy_set.tenants)
    table = []
    while tenants:
        chunk = [tenants.popitem() for _ in range(min(PACK_CHUNK, len(tenants)))]
        table.append(pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL))
        del chunk
    return dataclasses.replace(policy_set, tenants={}), table


def attach_tenants(policy_set: PolicySet, table: list[bytes] | None) -> PolicySet:
    if table is None:
        return policy_set
    tenants: dict[str, Any] = {}
    for chunk in reversed(table):
        tenants.update(reversed(pickle.loads(chunk)))
    return dataclasses.replace(policy_set, tenants=tenants)


def compile_bundle(files: BundleFiles) -> PolicySet:
    return _Compiler(files).run()


_TEMPLATE_PARTS = re.compile(r"(\{[^}]*\})")


class _Compiler:
    def __init__(self, files: BundleFiles) -> None:
        self.files = files
        self.problems: list[Problem] = []
        self.namespace = ""  # of the policy being compiled
        self.action = "ALLOW"  # of the policy being compiled
        m = files.manifest.value
        self.trust = spiffe.TrustDomains(m["trustDomain"], frozenset(m.get("trustDomainAliases", [])))

    def error(self, doc: Document, path: YPath, message: str, *, key: bool = False) -> None:
        self.problems.append(Problem(doc.at(path, key=key), message))

    def run(self) -> PolicySet:
        m = self.files.manifest.value
        data: dict[str, Any] = {}
        for name, doc in self.files.data.items():
            try:
                data[name] = _json_safe(doc.value)
            except ValueError as exc:
                self.error(doc, (), str(exc))
        policies: list[Policy] = []
        policy_docs: list[Document] = []
        seen: dict[str, Position] = {}
        for doc in self.files.policies:
            policy = self.policy(doc, bool(self.files.tenants))
            if policy is None:
                continue
            if policy.name in seen:
                self.error(doc, ("name",), f"policy '{policy.name}' is already defined at {seen[policy.name]}")
                continue
            seen[policy.name] = doc.at(("name",))
            policies.append(policy)
            policy_docs.append(doc)
        shapes = shaping.compile_shapes(list(zip(policy_docs, policies)), self.files.manifest, self.error,
                                        frozenset(self.files.data))
        # Tenant callers as a CEL map only when some condition or upstream header reads them
        # through CEL; the common `source.principal in tenant.callers` is answered from the
        # frozenset.
        cel_callers = any(
            c.native is None and "tenant.callers" in c.variables
            for p in policies for r in p.rules for c in r.conditions
        ) or any("tenant.callers" in c.variables for rs in shapes.rules.values() for _, c in rs.set_headers)
        tenants = self.tenants(cel_callers)
        if self.problems:
            raise BundleError(self.problems, self.files.revision)
        by_principal: dict[str, list[int]] = defaultdict(list)
        general: list[int] = []
        for i, p in enumerate(policies):
            sm = p.target.principals
            if sm is not None and sm.exact and sm.exact_only:
                for principal in sm.exact:
                    by_principal[principal].append(i)
            else:
                general.append(i)
        return PolicySet(
            name=m["name"],
            revision=str(m["revision"]),
            trust_domains=self.trust,
            default_allow=m.get("defaultAction", "DENY") == "ALLOW",
            path_normalization=paths.Normalization(m.get("pathNormalization", "BASE")),
            # Entries right of the client's in the header authz gets: with skip_xff_append
            # Envoy did not add its peer, so one fewer; none at all: the peer (-1).
            xff_trusted_hops=int(m.get("xffTrustedHops", 0)) - (1 if m.get("xffSkipAppend") else 0),
            targets_principals=any(p.target.principals is not None for p in policies),
            host_only_targets=any(p.target.principals is None and p.target.hosts is not None for p in policies),
            needs_socket=next((p.name for p in policies if _needs(p, remote=False)), ""),
            needs_remote_address=next((p.name for p in policies if _needs(p, remote=True)), ""),
            needs_certificate=next((p.name for p in policies if _needs_certificate(p)), ""),
            has_conditions=any(r.conditions for p in policies for r in p.rules),
            reads=(reads := tuple((p.name, r) for p in policies if (r := _reads(p, shapes)))),
            read_headers=(read_headers := frozenset(t[7:] for _, r in reads for t in r if t.startswith("header:"))),
            header_aliases=frozenset(n.replace("_", "-") for n in read_headers),
            underscore_reads=frozenset(n.replace("_", "-") for n in read_headers if "_" in n),
            policies=tuple(policies),
            tenants=tenants,
            data=data,
            by_principal={k: tuple(v) for k, v in by_principal.items()},
            general=tuple(general),
            rule_index=rule_index.build(policies),
            shapes=shapes,
        )

    # --- tenants -----------------------------------------------------------------------

    def tenants(self, cel_callers: bool) -> dict[str, Tenant]:
        out: dict[str, Tenant] = {}
        # By the id lower-cased: upstreams that compare names case-insensitively (SQL
        # collations, case-insensitive routers) would take `ACME` for `acme`. Most ids are
        # lower case already and key themselves: no second string per tenant at 100k.
        where: dict[str, Position] = {}
        spelled: dict[str, str] = {}  # the id as written, where it is not its own key
        # Many tenants share callers, plans and caller sets: keep one copy of each.
        strings: dict[str, str] = {}
        caller_sets: dict[frozenset[str], frozenset[str]] = {}
        shared: dict[str, dict[str, object]] = {}
        empty: dict[str, object] = {}

        def one_copy(value: object) -> dict[str, object]:
            if not value:
                return empty
            key = json.dumps(value, sort_keys=True, default=str)
            if key not in shared:
                shared[key] = _json_safe(value)  # ValueError: reported by the caller
            return shared[key]

        for doc in self.files.tenants:
            for tid, body in doc.value["tenants"].items():
                path: YPath = ("tenants", tid)
                if not TENANT_ID.match(tid):
                    self.error(doc, path, f"tenant id {tid!r} is invalid: 1-63 of [A-Za-z0-9._-], "
                               "starting with a letter or digit", key=True)
                    continue
                # Digits by their number too: `042` is tenant 42 to an upstream that parses ids.
                key = str(int(tid)) if tid.isdigit() else tid.lower()
                if key == tid:
                    key = tid
                if (seen := where.get(key)) is not None:
                    first = spelled.get(key, key)
                    same = ("" if first == tid else
                            f" as '{first}' (tenant ids must differ in more than case or leading zeros)")
                    self.error(doc, path, f"tenant '{tid}' is already defined at {seen}{same}", key=True)
                    continue
                where[key] = doc.at(path, key=True)
                if key is not tid:
                    spelled[key] = tid
                body = body or {}
                callers = frozenset(
                    strings.setdefault(c, c) for v in body.get("callers", []) for c in self.trust.caller_forms(v)
                )
                callers = caller_sets.setdefault(callers, callers)
                plan = str(body.get("plan", ""))
                try:
                    flags, attributes = one_copy(body.get("flags")), one_copy(body.get("attributes"))
                except ValueError as exc:
                    self.error(doc, path, str(exc), key=True)
                    continue
                out[tid] = Tenant(
                    id=tid,
                    plan=strings.setdefault(plan, plan),
                    callers=callers,
                    flags=flags,
                    attributes=attributes,
                    cel_callers=dict.fromkeys(callers, True) if cel_callers else empty,  # type: ignore[arg-type]
                )
        return out

    # --- policies ----------------------------------------------------------------------

    def policy(self, doc: Document, have_tenants: bool) -> Policy | None:
        v = doc.value
        before = len(self.problems)
        name = v["name"]
        self.action = v["action"]  # first: the target's matchers read it too
        target_v = v.get("target", {})
        principals = self.principals(target_v.get("principals"), doc, ("target", "principals"), widen=True)
        target = Target(
            principals=principals,
            grant_principals=(self.principals(target_v.get("principals"), widen=False)
                              if v["action"] == "ALLOW" and principals is not None and principals.suffix_readings
                              else None),
            hosts=_strings(target_v.get("hosts"), fold_case=True),
            ports=self.ports(doc, ("target", "ports"), target_v.get("ports")),
            context_extensions=tuple(sorted((target_v.get("contextExtensions") or {}).items())),
        )
        tenant: TenantSource | None = None
        if "tenant" in v:
            kind, key = next(iter(v["tenant"].items()))
            tenant = TenantSource(kind, key.lower() if kind == "header" else key)
            if not have_tenants:
                self.error(doc, ("tenant",), "policy reads a tenant but the bundle has no tenant data (tenants/)",
                           key=True)
        rules: list[Rule] = []
        rule_names: set[str] = set()
        captures_seen: set[str] = set()
        self.namespace = v.get("namespace", "")
        for i, rv in enumerate(v.get("rules", [])):
            rule = self.rule(doc, ("rules", i), rv, i, tenant, captures_seen)
            if rule.name in rule_names:
                self.error(doc, ("rules", i, "name"), f"rule name '{rule.name}' is used twice in policy '{name}'")
            rule_names.add(rule.name)
            rules.append(rule)
        if tenant is not None and tenant.kind == "pathCapture" and tenant.key not in captures_seen:
            self.error(doc, ("tenant", "pathCapture"),
                       f"tenant capture '{{{tenant.key}}}' appears in no path of this policy")
        if len(self.problems) != before:
            return None
        return Policy(
            name=name,
            action=v["action"],
            target=target,
            rules=tuple(rules),
            tenant=tenant,
            dry_run=bool(v.get("dryRun", False)),
            location=str(doc.at(())),
            namespace=self.namespace,
        )

    def rule(
        self, doc: Document, path: YPath, rv: dict[str, Any], index: int,
        tenant: TenantSource | None, captures_seen: set[str],
    ) -> Rule:
        sources = []
        for j, entry in enumerate(rv.get("from", [])):
            sources.append(self.source(doc, (*path, "from", j, "source"), entry["source"]))
        operations = []
        for j, entry in enumerate(rv.get("to", [])):
            operations.append(self.operation(doc, (*path, "to", j, "operation"), entry["operation"], captures_seen))
        conditions: list[Condition] = []
        for j, expr in enumerate(rv.get("when", [])):
            cond = self.condition(doc, (*path, "when", j), expr)
            if cond is None:
                continue
            if cond.needs_tenant and tenant is None:
                self.error(doc, (*path, "when", j),
                           "condition uses tenant.* but the policy declares no tenant source (tenant:)")
            for name in cond.data_names:
                if name not in self.files.data:
                    self.error(doc, (*path, "when", j),
                               f"condition reads data.{name} but the bundle has no data/{name}.yaml or .json")
            self.data_cost(doc, (*path, "when", j), cond)
            conditions.append(cond)
        return Rule(
            name=rv.get("name", f"rule-{index + 1}"),
            sources=tuple(sources),
            operations=tuple(operations),
            conditions=tuple(conditions),
            location=str(doc.at(path)),
        )

    def condition(self, doc: Document, path: YPath, expr: str) -> Condition | None:
        try:
            cond = compile_condition(expr)
        except CelCompileError as exc:
            pos = doc.at(path)
            where = f"column {exc.column}"
            if exc.line == 1 and "\n" not in expr:
                offset = 1 if path in doc.quoted else 0
                pos = Position(pos.file, pos.line, pos.column + offset + exc.column - 1)
            elif "\n" in expr:
                where = f"line {exc.line}, column {exc.column}"
                if path in doc.literal_blocks:  # `|`: the text's lines are the file's, after the mark
                    pos = Position(pos.file, pos.line + exc.line, pos.column)
            self.problems.append(Problem(
                pos, f"invalid CEL at {where} of the expression: {exc.message}"))
            return None
        if "request.headers" not in cond.variables:
            return cond
        names, other = _condition_header_uses(cond.source)
        return dataclasses.replace(cond, headers_read=(*sorted(names), *(("*",) if other else ())))

    def data_cost(self, doc: Document, path: YPath, cond: Condition) -> None:
        """A comprehension over a data collection runs at every check, with the interpreter
        held: its size is known now, so a cost no check could afford is a load error rather
        than a check that stalls the others before it is denied over budget."""
        for segments, macro, column, copies in data_comprehensions(cond.source):
            value: Any = self.files.data[segments[0]].value if segments[0] in self.files.data else None
            for key in segments[1:]:
                value = value.get(key) if isinstance(value, dict) else None
            if not isinstance(value, (list, dict)):
                continue
            building = macro in ("map", "filter")  # builds a list: its cost grows with the square
            limit = MAX_DATA_BUILT if building or copies else MAX_DATA_SCANNED
            if len(value) > limit:
                where = "data." + ".".join(segments)
                why = (" for map/filter, whose cost grows with the square of it; use exists/all, or key "
                       "the data by what is looked up" if building else
                       " when it copies a request input at every iteration (`request.path + ...`), "
                       "held until the evaluation ends; compare without concatenating" if copies else
                       "; key the data by what is looked up")
                self.error(doc, path, f"condition runs {macro} over {where} ({len(value)} items) at every check, "
                           f"at most {limit}{why} (expression column {column})")

    def principals(self, values: list[str] | None, doc: Document | None = None, path: YPath = (),
                   negative: bool = False, widen: bool | None = None) -> StringMatch | None:
        """``widen``: how a suffix older and patched istiod read otherwise matches (either
        reading, or both); by default, as the action and ``negative`` make stricter."""
        if values is None:
            return None
        expanded = [p for v in values for p in self.trust.expand_principal(v)]
        if widen is None:
            widen = (self.action != "ALLOW") != negative
        try:
            return StringMatch.of(expanded, scheme=spiffe.SCHEME, widen=widen)
        except re.error as exc:
            if doc is not None:
                self.error(doc, path, f"a '*suffix' principal is a regular expression in Istio, and this one "
                           f"is invalid: {exc}")
            return StringMatch()

    def trust_domains(self, values: list[str] | None) -> StringMatch | None:
        return None if values is None else StringMatch.of(self.trust.expand_trust_domains(values))

    def service_accounts(self, doc: Document, path: YPath, values: list[str] | None,
                         negative: bool = False) -> RegexMatch | None:
        if values is None:
            return None
        widen = (self.action != "ALLOW") != negative
        for i, value in enumerate(values):
            if "/" not in value and not self.namespace:
                self.error(doc, (*path, i), f"service account {value!r} names no namespace and the policy "
                           "has no 'namespace:'; write '<namespace>/<name>'")
        try:
            return _both_readings(values, spiffe.service_account_regex(values, self.namespace),
                                  spiffe.service_account_regex(values, self.namespace, escaped=True), widen)
        except re.error as exc:
            self.error(doc, path, f"service accounts are regular expressions in Istio, and these are invalid: {exc}")
            return None

    def namespaces(self, doc: Document, path: YPath, values: list[str] | None,
                   negative: bool = False) -> RegexMatch | None:
        if values is None:
            return None
        widen = (self.action != "ALLOW") != negative
        try:
            return _both_readings(values, spiffe.namespace_regex(values), spiffe.namespace_regex(values, escaped=True),
                                  widen)
        except re.error as exc:
            self.error(doc, path, f"namespaces are regular expressions in Istio, and these are invalid: {exc}")
            return None

    def source(self, doc: Document, path: YPath, sv: dict[str, Any]) -> Source:
        return Source(
            principals=self.principals(sv.get("principals"), doc, (*path, "principals")),
            not_principals=self.principals(sv.get("notPrincipals"), doc, (*path, "notPrincipals"), negative=True),
            trust_domains=self.trust_domains(sv.get("trustDomains")),
            not_trust_domains=self.trust_domains(sv.get("notTrustDomains")),
            namespaces=self.namespaces(doc, (*path, "namespaces"), sv.get("namespaces")),
            not_namespaces=self.namespaces(doc, (*path, "notNamespaces"), sv.get("notNamespaces"), negative=True),
            service_accounts=self.service_accounts(doc, (*path, "serviceAccounts"), sv.get("serviceAccounts")),
            not_service_accounts=self.service_accounts(doc, (*path, "notServiceAccounts"),
                                                       sv.get("notServiceAccounts"), negative=True),
            ip_blocks=self.ips(doc, (*path, "ipBlocks"), sv.get("ipBlocks")),
            not_ip_blocks=self.ips(doc, (*path, "notIpBlocks"), sv.get("notIpBlocks"), negative=True),
            remote_ip_blocks=self.ips(doc, (*path, "remoteIpBlocks"), sv.get("remoteIpBlocks")),
            not_remote_ip_blocks=self.ips(doc, (*path, "notRemoteIpBlocks"), sv.get("notRemoteIpBlocks"),
                                          negative=True),
        )

    def operation(self, doc: Document, path: YPath, ov: dict[str, Any], captures_seen: set[str]) -> Operation:
        # Where a match makes the rule allow (an ALLOW's values, a DENY's notHeaders), a pattern
        # must not match what Istio's RBAC filter would not. Envoy hands ext_authz each header
        # byte that is not UTF-8 as '!' (the filter sees the byte), and repeated header lines
        # joined with ',' (the filter matches each line on its own): neither can be told apart.
        narrow = {"ALLOW": "headers", "DENY": "notHeaders"}.get(self.action, "")
        for name, values in (ov.get(narrow) or {}).items() if narrow else ():
            if any("!" in v for v in values):
                self.error(doc, (*path, narrow, name), f"{narrow} value with '!': Envoy sends ext_authz each byte "
                           "of a header value that is not UTF-8 as '!', so it could not be told apart")
            if any("," in v for v in values):
                self.error(doc, (*path, narrow, name), f"{narrow} value with ',': Envoy sends ext_authz repeated "
                           "header lines joined with ',', so 'a,b' could be two lines that Istio matches "
                           "one by one")
        return Operation(
            methods=_strings(ov.get("methods")),
            not_methods=_strings(ov.get("notMethods")),
            paths=self.paths(doc, (*path, "paths"), ov.get("paths"), captures_seen, widen=self.action != "ALLOW",
                             fold=self.action != "ALLOW"),
            not_paths=self.paths(doc, (*path, "notPaths"), ov.get("notPaths"), set(), widen=self.action == "ALLOW",
                                 fold=True),
            hosts=_strings(ov.get("hosts"), fold_case=True),
            not_hosts=_strings(ov.get("notHosts"), fold_case=True),
            ports=self.ports(doc, (*path, "ports"), ov.get("ports")),
            not_ports=self.ports(doc, (*path, "notPorts"), ov.get("notPorts")),
            headers=_headers(ov.get("headers")),
            not_headers=_headers(ov.get("notHeaders")),
            sni=_strings(ov.get("sni")),
            not_sni=_strings(ov.get("notSni")),
            destination_ip_blocks=self.ips(doc, (*path, "destinationIpBlocks"), ov.get("destinationIpBlocks")),
            not_destination_ip_blocks=self.ips(doc, (*path, "notDestinationIpBlocks"),
                                               ov.get("notDestinationIpBlocks"), negative=True),
        )

    def paths(self, doc: Document, path: YPath, values: list[str] | None, captures_seen: set[str],
              widen: bool, fold: bool) -> PathMatch | None:
        """``widen``: matching more only makes the rule stricter (a DENY's paths, an ALLOW's
        notPaths), so an encoded unreserved character may stand for itself. Elsewhere it
        keeps Istio's meaning: the proxy decodes it in every request, so it matches nothing.

        ``fold``: the case-folded reading of a path is compared with these patterns (all but
        an ALLOW's paths; Operation.path_captures), which takes them case-folded too."""
        if values is None:
            return None
        match = self._path_match(doc, path, values, captures_seen, widen, report=True)
        # Variables keep their names: a capture feeds tenant lookups and conditions by name.
        folded_values = ["".join(part if part.startswith("{") else paths.fold_case(part)
                                 for part in _TEMPLATE_PARTS.split(v)) for v in values]
        if not fold or folded_values == values:
            return match
        folded = self._path_match(doc, path, folded_values, set(), widen, report=False)
        return dataclasses.replace(match, folded=folded)

    def _path_match(self, doc: Document, path: YPath, values: list[str], captures_seen: set[str],
                    widen: bool, report: bool) -> PathMatch:
        plain: list[str] = []
        templates: list[paths.PathTemplate] = []
        for i, value in enumerate(values):
            if paths.is_template(value):
                try:
                    t = paths.compile_template(value, decode=widen)
                except paths.TemplateError as exc:
                    if report:
                        self.error(doc, (*path, i), f"invalid path template {value!r}: {exc}")
                    continue
                templates.append(t)
                captures_seen.update(t.captures)
            else:
                if report and not (value.startswith("/") or value.startswith("*")):
                    self.error(doc, (*path, i), f"path {value!r} must start with '/' (or '*' for a suffix)")
                plain.append(paths.canonical_pattern(value) if widen else value)
        return PathMatch(StringMatch.of(plain), tuple(templates))

    def ips(self, doc: Document, path: YPath, values: list[str] | None, negative: bool = False) -> IpMatch | None:
        """``negative``: a not-field. A value istiod versions read two ways (addresses) is
        matched both ways where matching more is stricter (a DENY's blocks, an ALLOW's
        not-blocks) and refused elsewhere."""
        if values is None:
            return None
        widen = (self.action != "ALLOW") != negative
        nets: list[IpNetwork] = []
        for i, value in enumerate(values):
            try:
                readings = istio_networks(value)
            except ValueError as exc:
                self.error(doc, (*path, i), f"{value!r} is not an IP address or CIDR block as Istio reads "
                           f"them ({exc})")
                continue
            if len(readings) > 1 and not widen:
                self.error(doc, (*path, i), f"{value!r} is read as {readings[0]} by older istiod and as "
                           f"{readings[1]} by current istiod: write the one meant")
                continue
            nets += readings
        return IpMatch(tuple(nets))

    def ports(self, doc: Document, path: YPath, values: list[str] | None) -> frozenset[int] | None:
        if values is None:
            return None
        out = set()
        for i, value in enumerate(values):
            if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
                self.error(doc, (*path, i), f"port {value!r} must be a number from 1 to 65535")
                continue
            out.add(int(value))
        return frozenset(out)


# CEL variables that come from the connection rather than the HTTP request.
_SOCKET_VARIABLES = frozenset({"source.address", "source.port", "destination.address", "destination.port",
                               "connection.sni"})


def _needs(policy: Policy, remote: bool) -> bool:
    """Whether a request that lacks the socket attributes (``remote``: the caller's address)
    could get past ``policy``, i.e. be allowed where the attributes would deny it.

    A value that is absent matches no positive matcher and every negative one. So a DENY or
    CUSTOM rule that reads the attribute at all could fail to fire, an ALLOW rule with a
    ``not`` form could match, a condition might go either way, and a policy targeted by port
    would not apply at all.
    """
    if policy.dry_run or policy.action == "AUDIT":
        return False
    deny = policy.action != "ALLOW"
    if not remote and policy.target.ports is not None:
        return True
    for rule in policy.rules:
        for s in rule.sources:
            positive, negative = ((s.remote_ip_blocks, s.not_remote_ip_blocks) if remote
                                  else (s.ip_blocks, s.not_ip_blocks))
            if negative is not None or (deny and positive is not None):
                return True
        if remote:
            continue
        for o in rule.operations:
            if o.not_ports is not None or o.not_sni is not None or o.not_destination_ip_blocks is not None:
                return True
            if deny and (o.ports is not None or o.sni is not None or o.destination_ip_blocks is not None):
                return True
        if any(_SOCKET_VARIABLES.intersection(c.variables) for c in rule.conditions):
            return True
    return False


def _needs_certificate(policy: Policy) -> bool:
    """Whether a name on the caller's certificate besides the URI SAN ext_authz reports
    could get a request past ``policy``: Envoy's RBAC matches principals, trust domains,
    namespaces and service accounts on every SAN and the subject. More names only make a
    DENY's identity field and an ALLOW's not-field match more; an ALLOW's identity field
    matching less is stricter."""
    if policy.dry_run or policy.action == "AUDIT":
        return False
    deny = policy.action != "ALLOW"
    for rule in policy.rules:
        for s in rule.sources:
            positive = (s.principals, s.trust_domains, s.namespaces, s.service_accounts)
            negative = (s.not_principals, s.not_trust_domains, s.not_namespaces, s.not_service_accounts)
            if any(m is not None for m in (positive if deny else negative)):
                return True
    # Not conditions: CEL's source.* is the one SPIFFE ID of the URI SAN, as in Envoy's CEL
    # attributes; import-istio ANDs Istio's `when` keys on identities into these fields.
    return False


# Request attributes not every caller carries (PolicySet.reads).
_REQUEST_READS = ("request.scheme", "request.protocol")
_PRINCIPAL_READS = frozenset({"source.principal", "source.trust_domain", "source.namespace",
                              "source.service_account", "destination.principal"})
_HEADERS_USE = re.compile(r"(?<![\w.])request\.headers(?![\w])")
_INDEX = re.compile(r"""\s*\[\s*(['"])([^'"\\]*)\1\s*\]""")
_IN_BEFORE = re.compile(r"""(['"])([^'"\\]*)\1\s+in\s+$""")
# `request.headers.origin`: a field, not a macro or method (`.exists(`, `.size(`).
_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()")
# What may stand before a `'name' in request.headers` for the literal to be the whole left
# operand (`'a' + 'b' in request.headers` tests 'b' to a reader, 'ab' to CEL).
_OPERAND_START = ("", "(", "!", "&&", "||", "?", ":", ",", "[")


def _reads(policy: Policy, shapes: shaping.Shapes) -> frozenset[str]:
    """What ``policy`` reads of the request, for callers that do not carry all of it
    (PolicySet.reads): every header its matchers, conditions, tenant source or upstream
    headers name, the caller's or the destination's principal, the scheme, the protocol, the
    context extensions. Whatever the action and polarity but dry runs, which never decide: a
    value read as absent may let a request past a DENY, match an ALLOW's `not` form, reach
    another rule first, or spare it a condition's or a tenant's error."""
    if policy.dry_run:
        return frozenset()
    out: set[str] = {"certificate"} if _needs_certificate(policy) else set()
    t = policy.target
    if t.context_extensions:
        out.add("context_extensions")
    if t.principals is not None:
        out.add("principal")
    if policy.tenant is not None:
        if policy.tenant.kind == "header":
            out.add(f"header:{policy.tenant.key}")
        elif policy.tenant.kind == "principalSegment":
            out.add("principal")
    # The headers by which a request names another method, path or host are read wherever
    # those are (authz.request): a caller that does not carry them would skip the readings.
    overrides: set[frozenset[str]] = set()
    if t.hosts is not None:
        overrides.add(HOST_OVERRIDE_HEADERS)
    if policy.tenant is not None and policy.tenant.kind == "pathCapture":
        overrides.add(PATH_OVERRIDE_HEADERS)
    conditions: list[Condition] = []
    for rule in policy.rules:
        if rule.sources:
            out.add("principal")
        for o in rule.operations:
            out.update(f"header:{h.name}" for h in (*o.headers, *o.not_headers))
            if o.methods is not None or o.not_methods is not None:
                overrides.add(METHOD_OVERRIDE_HEADERS)
            if o.paths is not None or o.not_paths is not None:
                overrides.add(PATH_OVERRIDE_HEADERS)
            if policy.action != "ALLOW" and (o.hosts is not None or o.not_hosts is not None):
                overrides.add(HOST_OVERRIDE_HEADERS)  # an ALLOW's hosts read the authority only
        conditions += rule.conditions
        shape = shapes.rules.get((policy.name, rule.name))
        if shape is not None:
            conditions += [c for _, c in shape.set_headers]
    for c in conditions:
        out.update(v for v in _REQUEST_READS if v in c.variables)
        if "request.context_extensions" in c.variables:
            out.add("context_extensions")
        if "request.id" in c.variables:
            out.add("header:x-request-id")
        if _PRINCIPAL_READS.intersection(c.variables):
            out.add("principal")
        if "request.headers" in c.variables:
            out.update(_condition_headers(c.source))
        if "request.method" in c.variables:
            overrides.add(METHOD_OVERRIDE_HEADERS)
        if "request.path" in c.variables or "request.path_params" in c.variables:
            overrides.add(PATH_OVERRIDE_HEADERS)
    out.update(f"header:{name}" for names in overrides for name in names)
    return frozenset(out)


def _condition_headers(source: str) -> set[str]:
    """header:<name> for each header a condition reads by a literal name, header:* when it
    reads request.headers any other way (a macro over it, size(), a computed key)."""
    names, other = _condition_header_uses(source)
    return {"header:*"} if other else {f"header:{n}" for n in names}


def _condition_header_uses(source: str) -> tuple[set[str], bool]:
    """The header names a condition reads literally (`['x-role']`, `'x-role' in`, the field
    `.origin`), and whether it reads request.headers any other way too."""
    code = cel_code_blanked(source)
    names: set[str] = set()
    other = False
    for use in _HEADERS_USE.finditer(code):
        index = _INDEX.match(source, use.end())
        if index is not None and code[index.start():index.end()].count("[") == 1:
            names.add(index.group(2))
            continue
        field = _FIELD.match(code, use.end())
        if field is not None:
            names.add(field.group(1))
            continue
        before = _IN_BEFORE.search(source, 0, use.start())
        if before is not None and code[before.start()] in "'\"":
            lead = code[:before.start()].rstrip()
            if any(lead.endswith(tok) for tok in _OPERAND_START if tok) or not lead:
                names.add(before.group(2))
                continue
        other = True
    return names, other


def _both_readings(values: list[str], unescaped: re.Pattern[str], escaped: re.Pattern[str], widen: bool) -> RegexMatch:
    """Older istiod's reading and patched istiod's, where they differ (RegexMatch)."""
    if unescaped.pattern == escaped.pattern:
        return RegexMatch(tuple(values), unescaped)
    return RegexMatch(tuple(values), unescaped, escaped, widen)


def _strings(values: list[str] | None, fold_case: bool = False) -> StringMatch | None:
    return None if values is None else StringMatch.of(values, fold_case)


def _headers(values: dict[str, list[str]] | None) -> tuple[HeaderMatch, ...]:
    return tuple(HeaderMatch(paths.fold_case(name), StringMatch.of(v)) for name, v in (values or {}).items())


_CEL_INT = range(-(2**63), 2**63)
MAX_DATA_BUILT = 256  # items a map/filter over bundle data may build per check (measured: 500 -> 6 ms)
MAX_DATA_SCANNED = 10_000  # items exists/all may visit: the runtime's own iteration bound


def _json_safe(value: Any) -> Any:
    """YAML may hold dates; CEL values must be JSON-like. An integer CEL cannot hold raises
    ValueError: it would make every condition reading the file fail, at check time."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, int) and not isinstance(value, bool) and value not in _CEL_INT:
        raise ValueError(f"integer {str(value)[:40]} is outside the 64-bit range conditions can read")
    return value
