"""`authz lint`: every error the loader and compiler find, plus warnings about bundles that
load but probably do not say what their author meant. Each problem has file:line:column.

Errors (the bundle would be rejected): unknown fields, invalid CEL (with the column inside
the expression), invalid path templates, unknown tenant sources, tenant data or data files
a policy needs but the bundle lacks, and the rest of what ``compile_bundle`` reports.

Errors that load: a pattern whose ``*`` can never match (``*`` at both ends, ``**``, a ``*``
inside a trust domain or host, a path template mixing ``*`` with ``{}``).

Warnings:
- a wildcard principal in an ALLOW rule;
- a rule that an earlier DENY rule makes unreachable (the DENY matches all it matches);
- with ``defaultAction: ALLOW``, a namespace whose workloads have ALLOW policies but no
  namespace-wide ALLOW policy, so its other workloads accept everything (not for a bundle
  ``authz import-istio`` wrote: Istio decides so, and the bundle keeps Istio's decisions);
- a principal whose trust domain is neither the bundle's nor one of its aliases;
- a rule method that is not an upper-case HTTP token (methods match case-sensitively);
- a ``*`` inside a value, where it is a literal character (in a ``*suffix`` principal, a regex
  repetition as istiod writes it) and not a wildcard;
- tenant data no policy reads, and data files no condition reads;
- an upstream header that could carry a secret (authz.lint_headers).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from authz import lint_headers
from authz.bundle.loader import BundleError, BundleFiles, read_bundle
from authz.bundle.schema import Problem
from authz.bundle.archive import reject, safe_name
from authz.bundle.sources import SourceUnavailable, read_directory
from authz.bundle.yamlpos import Document, Position
from authz.engine.compile import compile_bundle
from authz.engine.decide import PolicySet
from authz.engine.model import (
    IpMatch,
    Operation,
    PathMatch,
    Policy,
    RegexMatch,
    Rule,
    Source,
    StringMatch,
)
from authz.example import example_bundle
from authz.istio_import import IMPORTED_MARK
from authz.spiffe import SCHEME

WARNING = "warning"

_DATA_REF = re.compile(r"(?<![\w.])data\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*(?:'([^']*)'|\"([^\"]*)\")\s*\])")
_DATA_DYNAMIC = re.compile(r"(?<![\w.])data\s*\[\s*[^'\"\s]")


def lint_bundle(root: Path) -> list[Problem]:
    """Errors and warnings for the bundle at ``root``, sorted by position."""
    try:
        # First as `authz serve` reads a directory: what it refuses (a FIFO, a link out of the
        # bundle, a name no log may print) must not pass lint.
        for name in read_directory(root).files:
            if safe_name(name) != name:  # what materialize refuses when serve loads it
                raise reject(ascii(name), "unsafe file name in bundle")
        files = read_bundle(root, require_policies=True)
    except BundleError as exc:
        return _sorted(exc.problems)
    except SourceUnavailable as exc:
        return [Problem(Position(str(root), 1, 1), str(exc))]
    problems: list[Problem] = []
    policy_set: PolicySet | None = None
    try:
        policy_set = compile_bundle(files)
    except BundleError as exc:
        problems += exc.problems
    problems += warnings(files, policy_set)
    return _sorted(problems)


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.position.file, p.position.line, p.position.column, p.message))


def warnings(files: BundleFiles, policy_set: PolicySet | None) -> list[Problem]:
    out: list[Problem] = []
    manifest = files.manifest.value
    td = manifest["trustDomain"]
    aliases = set(manifest.get("trustDomainAliases", []))
    # A bundle `authz import-istio` wrote decides as the Istio it came from, on purpose: lint
    # reports what it sees there but asks for no change that would make it decide otherwise.
    imported = str(manifest.get("description", "")).startswith(IMPORTED_MARK)
    out += _wildcard_principals(files)
    out += _foreign_trust_domains(files, td, aliases)
    out += _methods(files)
    out += _unchecked_tenant_segments(files)
    out += _stars(files, imported)
    out += _unused_data(files)
    out += lint_headers.secret_headers(files)
    if policy_set is not None:
        out += _unreachable(policy_set)
        if manifest.get("defaultAction", "DENY") == "ALLOW" and not imported:
            out += _namespaces_without_default_deny(files, policy_set, td)
    return out


def _warn(pos: Position, message: str) -> Problem:
    return Problem(pos, message, WARNING)


def _policy_docs(files: BundleFiles) -> Iterator[tuple[Document, dict[str, Any]]]:
    for doc in files.policies:
        if isinstance(doc.value, dict):
            yield doc, doc.value


def _sources(v: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], int, dict[str, Any]]]:
    for i, rule in enumerate(v.get("rules") or []):
        for j, entry in enumerate(rule.get("from") or []):
            yield i, rule, j, entry.get("source") or {}


def _operations(v: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any], int, dict[str, Any]]]:
    for i, rule in enumerate(v.get("rules") or []):
        for j, entry in enumerate(rule.get("to") or []):
            yield i, rule, j, entry.get("operation") or {}


YPath = tuple[str | int, ...]


def _values(doc: Document, v: dict[str, Any]) -> Iterator[tuple[YPath, str, str]]:
    """(position path, field kind, value) of every string pattern of a policy."""
    kinds = {"principals": "principal", "notPrincipals": "principal", "trustDomains": "trust domain",
             "notTrustDomains": "trust domain", "namespaces": "namespace", "notNamespaces": "namespace",
             "serviceAccounts": "service account", "notServiceAccounts": "service account",
             "methods": "method", "notMethods": "method", "hosts": "host", "notHosts": "host",
             "paths": "path", "notPaths": "path", "sni": "SNI", "notSni": "SNI"}
    target = v.get("target") or {}
    for key in ("principals", "hosts"):
        for k, value in enumerate(target.get(key) or []):
            yield ("target", key, k), kinds[key], value
    for where, entries in (("from", _sources(v)), ("to", _operations(v))):
        part = "source" if where == "from" else "operation"
        for i, _rule, j, body in entries:
            for key, values in body.items():
                base: YPath = ("rules", i, where, j, part, key)
                if key in ("headers", "notHeaders") and isinstance(values, dict):
                    for name, header_values in values.items():
                        for k, value in enumerate(header_values or []):
                            yield (*base, name, k), "header", value
                elif key in kinds and isinstance(values, list):
                    for k, value in enumerate(values):
                        yield (*base, k), kinds[key], value


# --- wildcard principals ------------------------------------------------------------------

# "*", "spiffe://*", a whole trust domain ("cluster.local/*") or every namespace of one ("td/ns/*").
_WILDCARD = re.compile(r"^(?:spiffe://)?(?:[^/]*\*|[^/]+/\*|[^/]+/ns/\*)$")


def _wildcard_principals(files: BundleFiles) -> list[Problem]:
    out = []
    for doc, v in _policy_docs(files):
        if v.get("action") != "ALLOW":
            continue
        for i, rule, j, source in _sources(v):
            for k, value in enumerate(source.get("principals") or []):
                if _WILDCARD.match(value):
                    name = rule.get("name", f"rule-{i + 1}")
                    out.append(_warn(doc.at(("rules", i, "from", j, "source", "principals", k)),
                                     f"ALLOW rule '{v['name']}/{name}' has wildcard principal {value!r}: "
                                     "it admits every workload of the mesh, not one caller"))
    return out


# --- tenants ------------------------------------------------------------------------------

_TENANTS_SEGMENT = re.compile(r"^tenants?$", re.IGNORECASE)


def _unchecked_tenant_segments(files: BundleFiles) -> list[Problem]:
    """A policy whose tenant comes from a header or the identity checks a path's tenant only
    where the path captures it as `{tenant}`: `/v1/tenants/*` with `x-tenant: acme` would
    allow acme's caller onto globex's path, which an upstream routing on the path serves."""
    out = []
    for doc, v in _policy_docs(files):
        source = v.get("tenant")
        if v.get("action") != "ALLOW" or not isinstance(source, dict) or "pathCapture" in source:
            continue
        for i, rule, j, operation in _operations(v):
            for k, path in enumerate(operation.get("paths") or []):
                segments = str(path).split("/")
                for a, b in zip(segments, segments[1:]):
                    if _TENANTS_SEGMENT.match(a) and b != "{tenant}" and (b.startswith("{") or "*" in b):
                        name = rule.get("name", f"rule-{i + 1}")
                        out.append(_warn(doc.at(("rules", i, "to", j, "operation", "paths", k)),
                                         f"ALLOW rule '{v['name']}/{name}': path {path!r} names a tenant "
                                         f"segment ({b!r}) that is not checked against the tenant of its "
                                         f"{'header' if 'header' in source else 'identity'}; capture it as "
                                         "{tenant} so a path naming another tenant is denied (tenant mismatch)"))
                        break
    return out


# --- trust domains ------------------------------------------------------------------------


def _trust_domain(principal: str) -> str | None:
    """The trust domain a principal or principal pattern names, None for a pattern that names none
    and for Istio's 'cluster.local' in a 5-part principal, which means the local trust domain."""
    if principal.startswith("*"):
        return None
    body = principal.removeprefix(SCHEME)
    td, sep, rest = body.partition("/")
    if "*" in td or (not sep and principal.endswith("*")):
        return None
    parts = rest.split("/")
    if td == "cluster.local" and len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
        return None
    return td


def _foreign_trust_domains(files: BundleFiles, td: str, aliases: set[str]) -> list[Problem]:
    places: list[tuple[Document, tuple[str | int, ...], str]] = []
    for doc, v in _policy_docs(files):
        for k, value in enumerate((v.get("target") or {}).get("principals") or []):
            places.append((doc, ("target", "principals", k), value))
        for i, _rule, j, source in _sources(v):
            for key in ("principals", "notPrincipals", "trustDomains", "notTrustDomains"):
                for k, value in enumerate(source.get(key) or []):
                    # A trust domain pattern is a principal pattern on its first part.
                    as_principal = value + "/" if key.endswith("rustDomains") and not value.endswith("*") else value
                    places.append((doc, ("rules", i, "from", j, "source", key, k), as_principal))
    for doc in files.tenants:
        for tid, body in (doc.value.get("tenants") or {}).items():
            for k, value in enumerate((body or {}).get("callers") or []):
                places.append((doc, ("tenants", tid, "callers", k), value))
    out = []
    for doc, path, value in places:
        found = _trust_domain(value)
        if found is not None and found != td and found not in aliases:
            known = ", ".join([td, *sorted(aliases)])
            what = f"trust domain {found!r} is" if path[-2] in ("trustDomains", "notTrustDomains") else \
                f"principal {value!r} is in trust domain '{found}', which is"
            out.append(_warn(doc.at(path), f"{what} neither the bundle's nor an alias ({known})"))
    return out


# --- methods ----------------------------------------------------------------------------

# RFC 9110 token characters, without lower-case letters.
_UPPER_TOKEN = re.compile(r"^[A-Z0-9!#$%&'*+.^_`|~-]+$")


def _methods(files: BundleFiles) -> list[Problem]:
    out = []
    for doc, v in _policy_docs(files):
        for path, kind, value in _values(doc, v):
            if kind == "method" and isinstance(value, str) and not _UPPER_TOKEN.match(value):
                token = re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value) is not None
                why = ("methods match case-sensitively, as in Istio, so it matches only a request whose method "
                       f"is exactly {value!r}" if token else "no request method can hold those characters")
                out.append(_warn(doc.at(path), f"method {value!r} is not an upper-case HTTP token: {why}"))
    return out


# --- patterns whose '*' does not do what it seems to ----------------------------------------

# Characters a trust domain, a host and an SNI may hold: a '*' inside them never matches.
_NO_STAR_INSIDE = ("trust domain", "host", "SNI")


def _star_problem(kind: str, value: str) -> tuple[str, str] | None:
    """(severity, message) for a value whose '*' is no wildcard, None when it is fine."""
    if "*" not in value or value == "*" or kind == "namespace":  # namespaces: '*' is '.*' anywhere
        return None
    if kind == "service account":
        return "error", f"service account {value!r} has a '*': service accounts take no wildcards"
    if kind == "path" and ("{" in value or "}" in value):
        if value.replace("{**}", "").replace("{*}", "").count("*"):
            return "error", (f"path {value!r} mixes a '*' wildcard with a '{{}}' template: a template takes "
                             "'*' only as {*} or {**}, so this never matches as written")
        return None
    if len(value) > 1 and value.startswith("*") and value.endswith("*"):
        return "error", (f"{kind} {value!r} has '*' at both ends: that is no 'contains' match (authz reads "
                         f"a prefix match on {value[:-1]!r}, Istio a suffix match on {value[1:]!r}), so it "
                         "never matches what it seems to")
    inner = value[1:] if value.startswith("*") else value.removesuffix("*")
    if "*" not in inner:
        return None
    if kind == "principal":
        body = inner.removeprefix(SCHEME)
        td = body.partition("/")[0] if not value.startswith("*") else ""
        if "*" in td:
            return "error", (f"principal {value!r} has a '*' inside its trust domain, which only letters, "
                             "digits, '.', '-' and '_' make up: it can never match (write 'prefix*' or "
                             "'*suffix', or use trustDomains)")
    if kind == "principal" and value.startswith("*"):
        return "warning", (f"principal {value!r}: after a leading '*' the rest is a regular expression, as "
                           "istiod writes it, so this inner '*' repeats the character before it; it is no "
                           "wildcard")
    if kind in _NO_STAR_INSIDE:
        return "error", (f"{kind} {value!r} has a '*' inside: only a leading or trailing '*' is a wildcard, "
                         f"and no {kind} holds a '*', so it can never match")
    return "warning", (f"{kind} {value!r} has a '*' inside: only a leading or trailing '*' is a wildcard, "
                       "this one is a literal character")


def _stars(files: BundleFiles, imported: bool) -> list[Problem]:
    out = []
    for doc, v in _policy_docs(files):
        for path, kind, value in _values(doc, v):
            if isinstance(value, str) and (found := _star_problem(kind, value)):
                severity, message = found
                if imported:  # dead in Istio too: said, not to be "fixed" into matching
                    severity, message = WARNING, message.split(" (write ")[0] + ", as in the Istio policy it came from"
                out.append(Problem(doc.at(path), message, severity))
    for doc in files.tenants:
        for tid, body in (doc.value.get("tenants") or {}).items():
            for k, value in enumerate((body or {}).get("callers") or []):
                if isinstance(value, str) and (found := _star_problem("principal", value)):
                    out.append(Problem(doc.at(("tenants", tid, "callers", k)), found[1], found[0]))
    return out


# --- unused data --------------------------------------------------------------------------


def _unused_data(files: BundleFiles) -> list[Problem]:
    out = []
    reads_tenant = any("tenant" in v for _, v in _policy_docs(files))
    if files.tenants and not reads_tenant:
        for doc in files.tenants:
            out.append(_warn(doc.at(("tenants",), key=True),
                             "tenant data that no policy reads: no policy declares a tenant source (tenant:)"))
    if files.data:
        names: set[str] = set()
        dynamic = False
        for _, v in _policy_docs(files):
            for rule in v.get("rules") or []:
                for expr in rule.get("when") or []:
                    dynamic = dynamic or bool(_DATA_DYNAMIC.search(expr))
                    names.update(next(g for g in m.groups() if g is not None) for m in _DATA_REF.finditer(expr))
        if not dynamic:
            for name, doc in sorted(files.data.items()):
                if name not in names:
                    out.append(_warn(doc.at(()), f"data file '{doc.file}' is read by no condition (data.{name})"))
    return out


# --- namespaces without default deny ------------------------------------------------------


def _namespace(principal: str) -> str | None:
    body = principal.removeprefix(SCHEME)
    parts = body.split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "ns" and "*" not in parts[i + 1] and parts[i + 1]:
            return parts[i + 1]
    return None


def _namespaces_without_default_deny(files: BundleFiles, ps: PolicySet, td: str) -> list[Problem]:
    allows = [p for p in ps.policies if p.action == "ALLOW" and not p.dry_run]

    def covered(ns: str) -> bool:
        whole = f"{SCHEME}{td}/ns/{ns}/sa/"
        for p in allows:
            t = p.target
            if t.principals is None and t.hosts is None and t.ports is None and not t.context_extensions:
                return True
            if t.principals is not None and (t.principals.present or any(whole.startswith(pre) for pre in t.principals.prefixes)):
                return True
        return False

    first: dict[str, Position] = {}
    docs = {v.get("name"): doc for doc, v in _policy_docs(files)}
    for p in allows:
        doc = docs.get(p.name)
        values = ((doc.value.get("target") or {}).get("principals") or []) if doc else []
        for k, value in enumerate(values):
            ns = _namespace(ps.trust_domains.canonical(value))
            if ns is not None and ns not in first and doc is not None:
                first[ns] = doc.at(("target", "principals", k))
    return [
        _warn(pos, f"namespace '{ns}' has ALLOW policies but no default deny: with defaultAction ALLOW, "
                   f"its workloads no ALLOW policy targets accept every request (add an ALLOW policy "
                   f"targeting {SCHEME}{td}/ns/{ns}/sa/* or set defaultAction: DENY)")
        for ns, pos in first.items() if not covered(ns)
    ]


# --- rules an earlier DENY makes unreachable ----------------------------------------------


def _unreachable(ps: PolicySet) -> list[Problem]:
    denies: list[tuple[int, int, Policy, Rule]] = [
        (pi, ri, p, r) for pi, p in enumerate(ps.policies) if p.action == "DENY" and not p.dry_run
        for ri, r in enumerate(p.rules)
    ]
    out = []
    for pi, p in enumerate(ps.policies):
        for ri, rule in enumerate(p.rules):
            for dpi, dri, dp, drule in denies:
                if p.action == "DENY" and (dpi, dri) >= (pi, ri):
                    break
                if (dpi, dri) == (pi, ri):
                    continue
                if _target_covers(dp, p) and _rule_covers(drule, rule):
                    out.append(_warn(_position(rule.location),
                                     f"rule '{p.name}/{rule.name}' is unreachable: DENY rule "
                                     f"'{dp.name}/{drule.name}' ({drule.location}) matches every request it matches"))
                    break
    return out


def _position(location: str) -> Position:
    file, line, column = location.rsplit(":", 2)
    return Position(file, int(line), int(column))


def _strings_cover(d: StringMatch | None, r: StringMatch | None) -> bool:
    """Every value ``r`` accepts, ``d`` accepts (None: any value)."""
    if d is None:
        return True
    if r is None:
        return False
    if d.present:
        return True
    if r.present or r.suffix_readings:  # a suffix read as a pattern: no sure cover
        return False
    return (all(d(v) for v in r.exact)
            and all(any(p.startswith(dp) for dp in d.prefixes) for p in r.prefixes)
            and all(any(s.endswith(ds) for ds in d.suffixes) for s in r.suffixes))


def _not_covers(d_not: StringMatch | None, r_not: StringMatch | None) -> bool:
    """D's exclusions exclude nothing R accepts: R excludes at least what D excludes."""
    return d_not is None or (r_not is not None and _strings_cover(r_not, d_not))


def _paths_cover(d: PathMatch | None, r: PathMatch | None) -> bool:
    if d is None:
        return True
    if r is None:
        return False
    if d.strings.present:
        return True
    if r.strings.present:
        return False
    sources = {t.source for t in d.templates}
    for v in r.strings.exact:
        if d.match(v) is None:
            return False
    if not _strings_cover(StringMatch(frozenset(), d.strings.prefixes, d.strings.suffixes),
                          StringMatch(frozenset(), r.strings.prefixes, r.strings.suffixes)):
        return False
    for t in r.templates:
        literal = t.source.split("{", 1)[0]
        if t.source not in sources and not any(literal.startswith(dp) for dp in d.strings.prefixes):
            return False
    return True


def _ips_cover(d: IpMatch | None, r: IpMatch | None) -> bool:
    if d is None:
        return True
    if r is None:
        return False
    return all(any(_subnet(rn, dn) for dn in d.networks) for rn in r.networks)


def _not_ips_cover(d_not: IpMatch | None, r_not: IpMatch | None) -> bool:
    return d_not is None or (r_not is not None and _ips_cover(r_not, d_not))


def _subnet(a: ipaddress.IPv4Network | ipaddress.IPv6Network, b: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return a.version == b.version and a.subnet_of(b)  # type: ignore[arg-type]


def _regex_covers(d: RegexMatch | None, r: RegexMatch | None) -> bool:
    return d is None or (r is not None and set(r.sources) <= set(d.sources))


def _not_regex_covers(d_not: RegexMatch | None, r_not: RegexMatch | None) -> bool:
    return d_not is None or (r_not is not None and set(d_not.sources) <= set(r_not.sources))


def _same_or_unset(d: object, r: object, unset: object = None) -> bool:
    """For fields without a containment test: D constrains nothing, or exactly what R does."""
    return d == unset or d == r


def _source_covers(d: Source, r: Source) -> bool:
    return (_strings_cover(d.principals, r.principals) and _not_covers(d.not_principals, r.not_principals)
            and _same_or_unset(d.trust_domains, r.trust_domains)
            and _same_or_unset(d.not_trust_domains, r.not_trust_domains)
            and _regex_covers(d.namespaces, r.namespaces) and _not_regex_covers(d.not_namespaces, r.not_namespaces)
            and _regex_covers(d.service_accounts, r.service_accounts)
            and _not_regex_covers(d.not_service_accounts, r.not_service_accounts)
            and _ips_cover(d.ip_blocks, r.ip_blocks) and _not_ips_cover(d.not_ip_blocks, r.not_ip_blocks)
            and _ips_cover(d.remote_ip_blocks, r.remote_ip_blocks)
            and _not_ips_cover(d.not_remote_ip_blocks, r.not_remote_ip_blocks))


def _operation_covers(d: Operation, r: Operation) -> bool:
    ports_ok = d.ports is None or (r.ports is not None and r.ports <= d.ports)
    not_ports_ok = d.not_ports is None or (r.not_ports is not None and d.not_ports <= r.not_ports)
    not_paths_ok = d.not_paths is None or (r.not_paths is not None and _paths_cover(r.not_paths, d.not_paths))
    return (_strings_cover(d.methods, r.methods) and _not_covers(d.not_methods, r.not_methods)
            and _strings_cover(d.hosts, r.hosts) and _not_covers(d.not_hosts, r.not_hosts)
            and ports_ok and not_ports_ok and _paths_cover(d.paths, r.paths) and not_paths_ok
            and _same_or_unset(d.headers, r.headers, ()) and _same_or_unset(d.not_headers, r.not_headers, ())
            and _same_or_unset(d.sni, r.sni) and _same_or_unset(d.not_sni, r.not_sni)
            and _same_or_unset(d.destination_ip_blocks, r.destination_ip_blocks)
            and _same_or_unset(d.not_destination_ip_blocks, r.not_destination_ip_blocks))


def _rule_covers(d: Rule, r: Rule) -> bool:
    if d.conditions:
        return False
    r_sources = r.sources or (Source(),)
    d_sources = d.sources or (Source(),)
    r_ops = r.operations or (Operation(),)
    d_ops = d.operations or (Operation(),)
    return (all(any(_source_covers(ds, rs) for ds in d_sources) for rs in r_sources)
            and all(any(_operation_covers(do, ro) for do in d_ops) for ro in r_ops))


def _target_covers(d: Policy, r: Policy) -> bool:
    return (_strings_cover(d.target.principals, r.target.principals)
            and _strings_cover(d.target.hosts, r.target.hosts)
            and (d.target.ports is None or (r.target.ports is not None and r.target.ports <= d.target.ports))
            and set(d.target.context_extensions) <= set(r.target.context_extensions))


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (default: the example bundle)")
    parser.add_argument("--format", choices=["text", "json"], default="text")


def cli(args: argparse.Namespace) -> int:
    """`authz lint`: exit 1 when there is an error, 0 otherwise (warnings alone do not fail)."""
    root = args.bundle or example_bundle()
    problems = lint_bundle(root)
    errors = sum(1 for p in problems if p.severity != WARNING)
    warns = len(problems) - errors
    if args.format == "json":
        print(json.dumps({
            "bundle": str(root),
            "errors": errors,
            "warnings": warns,
            "problems": [{"file": p.position.file, "line": p.position.line, "column": p.position.column,
                          "severity": p.severity, "message": p.message} for p in problems],
        }, indent=2))
    else:
        for p in problems:
            print(p)
        print(f"{errors} error{'s' if errors != 1 else ''}, {warns} warning{'s' if warns != 1 else ''}")
    return 1 if errors else 0
