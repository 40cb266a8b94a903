"""`authz import-istio`: Istio AuthorizationPolicy resources -> a bundle directory.

Semantics kept from Istio (security.istio.io v1 and v1beta1):

- DENY before ALLOW; a workload with no ALLOW policy allows what no DENY denies, which is
  why the generated manifest says ``defaultAction: ALLOW`` (``--default-deny`` changes it);
  AUDIT policies only mark a decision; the ``istio.io/dry-run`` annotation becomes ``dryRun``.
- A policy with no rules matches nothing (an ALLOW one then denies everything it selects);
  an empty rule ``{}`` matches everything.
- Within a rule ``from``, ``to`` and ``when`` are ANDed; the entries of ``from`` and ``to``
  are ORed; the values of a field are ORed; ``notX`` means "none of"; conditions with both
  ``values`` and ``notValues`` need both.
- Principals are written without ``spiffe://`` in Istio; the bundle compiler adds it.
- Paths with ``{*}`` or ``{**}`` are Envoy URI templates (``{*}`` one segment, ``{**}`` any
  rest, possibly empty); any other path is matched as a string (exact, ``prefix*``,
  ``*suffix``, ``*``), braces included. Hosts are matched case-insensitively against the
  whole authority, port included, as Istio does.

Scope: a policy's namespace and selector decide the workloads it protects. authz knows a
workload by its SPIFFE principal, so each selectable workload is declared with
``--workload LABELS=PRINCIPAL`` (``app=orders,version=v1=spiffe://cluster.local/ns/prod/sa/orders``).
A policy without a selector protects every workload of its namespace (target principals
``spiffe://<trust domain>/ns/<namespace>/sa/*``); one in the root namespace (istio-system
unless ``--root-namespace``) protects every workload of the mesh.

Whatever cannot be translated exactly is an error naming the field and its file:line:column:
CUSTOM actions, ``targetRef(s)``, JWT attributes (``requestPrincipals``, ``request.auth.*``),
``connection.sni``, ``experimental.*``, CIDR ``destination.ip``, unknown fields and keys.
Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz.bundle.schema import Problem
from authz.bundle.yamlpos import Document, Position, YamlError, load_documents
from authz.spiffe import SCHEME, TrustDomains

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

SPEC_FIELDS = {"action", "rules", "selector", "targetRef", "targetRefs", "provider"}
RULE_FIELDS = {"from", "to", "when"}
SOURCE_FIELDS = {
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
    "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
    "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains",
}
OPERATION_FIELDS = {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
CONDITION_FIELDS = {"key", "values", "notValues"}
# Source fields copied as they are: the bundle's fields mean what Istio's mean.
_NATIVE_SOURCE = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks",
                  "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts")

_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_TEMPLATE_OP = re.compile(r"\{\*\*?\}")

YPath = tuple[str | int, ...]


class IstioImportError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("cannot import:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class Workload:
    labels: dict[str, str]
    principal: str  # canonical spiffe:// URI

    @property
    def namespace(self) -> str:
        parts = self.principal[len(SCHEME):].split("/")
        for i in range(1, len(parts) - 1):
            if parts[i] == "ns":
                return parts[i + 1]
        return ""


@dataclass(slots=True)
class Options:
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()
    root_namespace: str = "istio-system"
    default_namespace: str = "default"
    workloads: list[Workload] = field(default_factory=list)
    default_deny: bool = False
    name: str = "istio-import"
    revision: str = "1"

    @property
    def trust(self) -> TrustDomains:
        return TrustDomains(self.trust_domain, frozenset(self.trust_domain_aliases))


def parse_workload(text: str, trust: TrustDomains) -> Workload:
    """``app=orders,version=v1=spiffe://td/ns/prod/sa/orders`` -> Workload; ValueError if malformed."""
    labels_text, sep, principal = text.rpartition("=")
    if not sep or not labels_text or not principal:
        raise ValueError(f"--workload {text!r}: expected LABEL=VALUE[,LABEL=VALUE...]=PRINCIPAL")
    labels: dict[str, str] = {}
    for item in labels_text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--workload {text!r}: {item!r} is not LABEL=VALUE")
        labels[key.strip()] = value.strip()
    w = Workload(labels, trust.canonical(principal.strip()))
    if not w.namespace:
        raise ValueError(f"--workload {text!r}: principal has no /ns/<namespace>/ segment")
    return w


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Resource:
    doc: Document
    base: YPath  # where the resource sits in the document (inside a List: ("items", i))
    value: dict[str, Any]

    def at(self, path: YPath, key: bool = False) -> Position:
        return self.doc.at((*self.base, *path), key=key)


def read_resources(paths: list[Path]) -> list[_Resource]:
    problems: list[Problem] = []
    out: list[_Resource] = []
    for path in paths:
        name = str(path)
        try:
            docs = load_documents(path.read_text(encoding="utf-8"), name)
        except OSError as exc:
            problems.append(Problem(Position(name, 1, 1), f"cannot read file: {exc}"))
            continue
        except YamlError as exc:
            problems.append(Problem(exc.position, exc.message))
            continue
        for doc in docs:
            if not isinstance(doc.value, dict):
                problems.append(Problem(doc.at(()), "expected a Kubernetes resource (a mapping)"))
                continue
            if str(doc.value.get("kind", "")).endswith("List") and isinstance(doc.value.get("items"), list):
                for i, item in enumerate(doc.value["items"]):
                    if isinstance(item, dict):
                        out.append(_Resource(doc, ("items", i), item))
                    else:
                        problems.append(Problem(doc.at(("items", i)), "expected a resource (a mapping)"))
            else:
                out.append(_Resource(doc, (), doc.value))
    if problems:
        raise IstioImportError(problems)
    return out


# --- converting -------------------------------------------------------------------------


class _Converter:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.trust = opts.trust
        self.problems: list[Problem] = []

    def error(self, res: _Resource, path: YPath, message: str, key: bool = False) -> None:
        self.problems.append(Problem(res.at(path, key), f"{_dotted(path)}: {message}"))

    def unknown_fields(self, res: _Resource, path: YPath, value: Any, known: set[str], what: str) -> bool:
        if not isinstance(value, dict):
            self.error(res, path, f"must be a mapping ({what})")
            return False
        ok = True
        for k in value:
            if k not in known:
                self.error(res, (*path, k), f"unknown field in {what} (known: {', '.join(sorted(known))}); "
                           "nothing is dropped silently", key=True)
                ok = False
        return ok

    def strings(self, res: _Resource, path: YPath, value: Any) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(res, path, "must be a list of strings")
            return None
        return list(value)

    # -- one policy -------------------------------------------------------------------------

    def policy(self, res: _Resource) -> dict[str, Any] | None:
        v = res.value
        before = len(self.problems)
        if v.get("apiVersion") not in API_VERSIONS:
            self.error(res, ("apiVersion",), f"{v.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}")
            return None
        if v.get("kind") != "AuthorizationPolicy":
            self.error(res, ("kind",), f"{v.get('kind')!r} is not an AuthorizationPolicy")
            return None
        meta = v.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            self.error(res, ("metadata",), "metadata.name is required")
            return None
        ns = str(meta.get("namespace") or self.opts.default_namespace)
        annotations = meta.get("annotations") or {}
        dry_run = str(annotations.get(DRY_RUN_ANNOTATION, "false")).lower() == "true"
        spec = v.get("spec") or {}
        if not self.unknown_fields(res, ("spec",), spec, SPEC_FIELDS, "an AuthorizationPolicy spec"):
            return None
        action = spec.get("action", "ALLOW")
        if action == "CUSTOM" or "provider" in spec:
            self.error(res, ("spec", "action" if action == "CUSTOM" else "provider"),
                       "CUSTOM actions delegate to an external authorizer; authz cannot decide for it")
        elif action not in ("ALLOW", "DENY", "AUDIT"):
            self.error(res, ("spec", "action"), f"unknown action {action!r}")
        for ref in ("targetRef", "targetRefs"):
            if ref in spec:
                self.error(res, ("spec", ref), "policies attached to a Gateway by reference cannot be "
                           "translated; use a selector and --workload", key=True)
        target = self.target(res, ns, spec.get("selector"))
        rules: list[dict[str, Any]] = []
        raw_rules = spec.get("rules")
        if raw_rules is not None and not isinstance(raw_rules, list):
            self.error(res, ("spec", "rules"), "must be a list")
            raw_rules = []
        for i, rv in enumerate(raw_rules or []):
            rules += self.rule(res, ("spec", "rules", i), rv or {}, i)
        if len(self.problems) != before:
            return None
        loc = res.at(())
        out: dict[str, Any] = {
            "apiVersion": "authz/v1",
            "kind": "Policy",
            "name": f"{ns}.{name}",
            "description": f"Imported from Istio AuthorizationPolicy {ns}/{name} ({loc.file}:{loc.line}).",
            "action": action,
        }
        if dry_run:
            out["dryRun"] = True
        if target is not None:
            out["target"] = {"principals": target}
        out["rules"] = rules
        return out

    def target(self, res: _Resource, ns: str, selector: Any) -> list[str] | None:
        td = self.opts.trust_domain
        labels: dict[str, str] = {}
        if selector is not None:
            if not self.unknown_fields(res, ("spec", "selector"), selector, {"matchLabels"}, "a selector"):
                return []
            labels = {str(k): str(val) for k, val in (selector.get("matchLabels") or {}).items()}
        if not labels:
            return None if ns == self.opts.root_namespace else [f"{SCHEME}{td}/ns/{ns}/sa/*"]
        eligible = [w for w in self.opts.workloads if ns == self.opts.root_namespace or w.namespace == ns]
        chosen = [w for w in eligible if labels.items() <= w.labels.items()]
        shown = ", ".join(f"{k}={val}" for k, val in sorted(labels.items()))
        if not chosen:
            self.error(res, ("spec", "selector", "matchLabels"),
                       f"selects workloads by labels ({shown}) but no --workload with those labels "
                       f"{'exists' if ns == self.opts.root_namespace else 'is in namespace ' + repr(ns)}: "
                       "declare each one as --workload LABELS=PRINCIPAL")
            return []
        principals = sorted({w.principal for w in chosen})
        for w in eligible:
            if w.principal in principals and w not in chosen:
                self.error(res, ("spec", "selector", "matchLabels"),
                           f"selects some workloads with principal {w.principal} but not the one labelled "
                           f"{w.labels}: authz tells workloads apart only by principal")
                return []
        return principals

    # -- rules ------------------------------------------------------------------------------

    def rule(self, res: _Resource, path: YPath, rv: Any, index: int) -> list[dict[str, Any]]:
        if not self.unknown_fields(res, path, rv, RULE_FIELDS, "a rule"):
            return []
        sources: list[dict[str, Any]] = []
        for j, entry in enumerate(rv.get("from") or []):
            p = (*path, "from", j)
            if not self.unknown_fields(res, p, entry or {}, {"source"}, "a from entry"):
                continue
            s = self.source(res, (*p, "source"), (entry or {}).get("source") or {})
            if s is not None:
                sources.append(s)
        operations: list[tuple[dict[str, Any], list[str]]] = []
        for j, entry in enumerate(rv.get("to") or []):
            p = (*path, "to", j)
            if not self.unknown_fields(res, p, entry or {}, {"operation"}, "a to entry"):
                continue
            op = self.operation(res, (*p, "operation"), (entry or {}).get("operation") or {})
            if op is not None:
                operations.append(op)
        conditions: list[str] = []
        for j, cv in enumerate(rv.get("when") or []):
            self.condition(res, (*path, "when", j), cv, sources, conditions)
        name = f"rule-{index + 1}"
        if any(cel for _, cel in operations) and len(operations) > 1:
            # A CEL part of one `to` entry cannot be ORed with the others inside one rule:
            # one bundle rule per entry keeps "any entry" semantics exactly.
            return [self._rule(f"{name}.{k + 1}", sources, [op], conditions + cel)
                    for k, (op, cel) in enumerate(operations)]
        extra = [c for _, cel in operations for c in cel]
        return [self._rule(name, sources, [op for op, _ in operations], conditions + extra)]

    @staticmethod
    def _rule(name: str, sources: list[dict[str, Any]], ops: list[dict[str, Any]], when: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name}
        if sources:
            out["from"] = [{"source": copy.deepcopy(s)} for s in sources]
        if ops:
            out["to"] = [{"operation": op} for op in ops]
        if when:
            out["when"] = when
        return out

    def source(self, res: _Resource, path: YPath, sv: Any) -> dict[str, Any] | None:
        if not self.unknown_fields(res, path, sv, SOURCE_FIELDS, "a source"):
            return None
        out: dict[str, Any] = {}
        for key in ("requestPrincipals", "notRequestPrincipals"):
            if sv.get(key):
                self.error(res, (*path, key), "JWT request principals need RequestAuthentication, and authz "
                           "does not validate JWTs", key=True)
        for key in _NATIVE_SOURCE:
            values = self.strings(res, (*path, key), sv.get(key))
            if not values:  # an empty list is "not set" in Istio (proto3)
                continue
            if key in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
                for k, value in enumerate(values):
                    try:
                        ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        self.error(res, (*path, key, k), f"{value!r} is not an IP address or CIDR block")
            if key in ("serviceAccounts", "notServiceAccounts"):
                for k, value in enumerate(values):
                    if value.count("/") != 1 or "*" in value:
                        self.error(res, (*path, key, k), f"{value!r}: only '<namespace>/<name>' service "
                                   "accounts can be translated exactly")
            out[key] = values
        for key, target in (("trustDomains", "principals"), ("notTrustDomains", "notPrincipals")):
            values = self.strings(res, (*path, key), sv.get(key))
            if not values:
                continue
            if target in out:
                self.error(res, (*path, key), f"cannot be combined with {target} in one source: both would "
                           "have to match the same principal field", key=True)
                continue
            out[target] = ["*" if v == "*" else f"{SCHEME}{v}/*" for v in values]
        return out

    def operation(self, res: _Resource, path: YPath, ov: Any) -> tuple[dict[str, Any], list[str]] | None:
        if not self.unknown_fields(res, path, ov, OPERATION_FIELDS, "an operation"):
            return None
        out: dict[str, Any] = {}
        cel: list[str] = []
        for key in ("methods", "notMethods"):
            values = self.strings(res, (*path, key), ov.get(key))
            if values:
                out[key] = values
        for key in ("ports", "notPorts"):
            values = self.strings(res, (*path, key), ov.get(key))
            if not values:
                continue
            for k, value in enumerate(values):
                if not value.isdigit() or not 0 < int(value) < 65536:
                    self.error(res, (*path, key, k), f"port {value!r} must be a number from 1 to 65535")
            out[key] = values
        for key in ("hosts", "notHosts"):
            values = self.strings(res, (*path, key), ov.get(key))
            if values:
                # Istio compares the whole authority (port included), ignoring case; the bundle's
                # hosts field also accepts the host without its port, so say it in CEL.
                expr = _any_of("request.host", [v.lower() for v in values])
                cel.append(expr if key == "hosts" else f"!({expr})")
        for key in ("paths", "notPaths"):
            values = self.strings(res, (*path, key), ov.get(key))
            if not values:
                continue
            kinds = [self.path_kind(res, (*path, key, k), value) for k, value in enumerate(values)]
            if any(kind is None for kind in kinds):
                continue
            if all(kind == "native" for kind in kinds):
                out[key] = values
                continue
            # One value needs a regex, so the whole field (its values are ORed) becomes CEL.
            strings = [v for v in values if not _TEMPLATE_OP.search(v) and "{" not in v and "}" not in v
                       and v.startswith(("/", "*"))]
            parts = [_any_of("request.path", strings)] if strings else []
            parts += [f"request.path.matches({_cel_str(self.regex(v))})" for v in values if v not in strings]
            expr = " || ".join(parts)
            cel.append(expr if key == "paths" else f"!({expr})")
        return out, cel

    def path_kind(self, res: _Resource, path: YPath, value: str) -> str | None:
        """'native' when the bundle's paths field means the same, 'regex' when only CEL can, None: error."""
        if _TEMPLATE_OP.search(value):
            return self.template(res, path, value)
        if "{" in value or "}" in value:
            return "regex"  # not a template for Istio: its braces are literal
        if not value.startswith(("/", "*")):
            return "regex"  # Istio accepts it (it matches no request path); the bundle's field refuses it
        return "native"

    @staticmethod
    def regex(value: str) -> str:
        """An RE2 regex matching what Istio's path value matches (a valid value, see path_kind)."""
        if _TEMPLATE_OP.search(value):
            # Envoy's URI template: {*} one non-empty segment, {**} anything, '/' included, even nothing.
            return "^" + "".join("/" + {"{*}": "[^/]+", "{**}": ".*"}.get(s, re.escape(s))
                                 for s in value.split("/")[1:]) + "$"
        if value == "*":
            return "^.+$"
        if value.endswith("*"):
            return "^" + re.escape(value[:-1]) + ".*$"
        if value.startswith("*"):
            return "^.*" + re.escape(value[1:]) + "$"
        return "^" + re.escape(value) + "$"

    def template(self, res: _Resource, path: YPath, value: str) -> str | None:
        if not value.startswith("/"):
            self.error(res, path, f"path template {value!r} must start with '/'")
            return None
        segments = value.split("/")[1:]
        ops = [s for s in segments if s in ("{*}", "{**}")]
        for s in segments:
            if s not in ("{*}", "{**}") and ("*" in s or "{" in s or "}" in s):
                self.error(res, path, f"path template {value!r}: segment {s!r} mixes an operator with other "
                           "text, which Istio rejects")
                return None
        if "{**}" in ops and ops.index("{**}") != len(ops) - 1:
            self.error(res, path, f"path template {value!r}: '{{**}}' must be the last operator")
            return None
        # {*} is one segment in both Istio and the bundle; Istio's {**} may also match nothing.
        return "native" if "{**}" not in ops else "regex"

    # -- conditions -------------------------------------------------------------------------

    def condition(self, res: _Resource, path: YPath, cv: Any, sources: list[dict[str, Any]],
                  out: list[str]) -> None:
        if not self.unknown_fields(res, path, cv, CONDITION_FIELDS, "a condition"):
            return
        key = cv.get("key")
        values = self.strings(res, (*path, "values"), cv.get("values")) or []
        not_values = self.strings(res, (*path, "notValues"), cv.get("notValues")) or []
        if not isinstance(key, str) or not key:
            self.error(res, path, "a condition needs a key")
            return
        if not values and not not_values:
            self.error(res, path, f"condition {key!r} needs values or notValues")
            return
        kpath = (*path, "key")
        header = _HEADER_KEY.match(key)
        if header:
            name = header.group(1).strip().lower()
            var = f"request.headers[{_cel_str(name)}]"

            def header_test(vs: list[str]) -> str:
                return f"({_cel_str(name)} in request.headers && ({_any_of(var, vs)}))"

            self._cel(values, not_values, header_test, out)
        elif key == "source.namespace":
            self._cel(values, not_values, lambda vs: f"({_any_of('source.namespace', vs)})", out)
        elif key == "source.principal":
            canon = [[self.trust.canonical(v) for v in vs] for vs in (values, not_values)]
            self._cel(canon[0], canon[1], lambda vs: f"({_any_of('source.principal', vs)})", out)
        elif key in ("source.ip", "remote.ip"):
            field_name = "ipBlocks" if key == "source.ip" else "remoteIpBlocks"
            ok = True
            for name_, vs in (("values", values), ("notValues", not_values)):
                for k, value in enumerate(vs):
                    try:
                        ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        self.error(res, (*path, name_, k), f"{value!r} is not an IP address or CIDR block")
                        ok = False
            if ok:
                _push_ips(sources, field_name, values, not_values)
        elif key == "destination.port":
            ports: list[list[str]] = [values, not_values]
            for name_, vs in (("values", values), ("notValues", not_values)):
                for k, value in enumerate(vs):
                    if not value.isdigit() or int(value) > 65535:
                        self.error(res, (*path, name_, k), f"port {value!r} must be a number from 0 to 65535")
                        return
            self._cel(ports[0], ports[1], lambda vs: "(" + " || ".join(f"destination.port == {int(v)}" for v in vs) + ")",
                      out)
        elif key == "destination.ip":
            addrs: list[list[str]] = []
            for name_, vs in (("values", values), ("notValues", not_values)):
                one: list[str] = []
                for k, value in enumerate(vs):
                    try:
                        net = ipaddress.ip_network(value, strict=False)
                    except ValueError:
                        self.error(res, (*path, name_, k), f"{value!r} is not an IP address or CIDR block")
                        return
                    if net.num_addresses != 1:
                        self.error(res, (*path, name_, k), f"CIDR block {value!r}: authz conditions compare "
                                   "destination.address as a string, so only single addresses translate")
                        return
                    one.append(str(net.network_address))
                addrs.append(one)
            self._cel(addrs[0], addrs[1], lambda vs: "(" + " || ".join(f"destination.address == {_cel_str(v)}" for v in vs) + ")",
                      out)
        elif key.startswith("request.auth."):
            self.error(res, kpath, f"{key!r} reads a JWT, and authz does not validate JWTs")
        elif key == "connection.sni":
            self.error(res, kpath, "'connection.sni' is not part of the request authz decides on")
        elif key.startswith("experimental."):
            self.error(res, kpath, f"{key!r} is an experimental Envoy metadata match authz cannot see")
        else:
            self.error(res, kpath, f"unknown condition key {key!r} (see Istio's authorization policy conditions)")

    @staticmethod
    def _cel(values: list[str], not_values: list[str], test: Callable[[list[str]], str], out: list[str]) -> None:
        if values:
            out.append(test(values))
        if not_values:
            out.append(f"!{test(not_values)}")


def _push_ips(sources: list[dict[str, Any]], field_name: str, values: list[str], not_values: list[str]) -> None:
    """A rule-wide source.ip / remote.ip condition, moved into every `from` entry (AND)."""
    if not sources:
        sources.append({})
    neg = "not" + field_name[0].upper() + field_name[1:]
    for s in sources:
        if values:
            s[field_name] = _intersect(s[field_name], values) if field_name in s else list(values)
        if not_values:
            s[neg] = list(dict.fromkeys([*s.get(neg, []), *not_values]))


def _intersect(a: list[str], b: list[str]) -> list[str]:
    """CIDR blocks in both lists; [] (matching nothing) when they do not overlap."""
    out: list[str] = []
    for x in a:
        nx = ipaddress.ip_network(x, strict=False)
        for y in b:
            ny = ipaddress.ip_network(y, strict=False)
            if nx.version != ny.version:
                continue
            if nx.subnet_of(ny):  # type: ignore[arg-type]
                out.append(str(nx))
            elif ny.subnet_of(nx):  # type: ignore[arg-type]
                out.append(str(ny))
    return list(dict.fromkeys(out))


def _cel_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _any_of(var: str, patterns: list[str]) -> str:
    """CEL for Istio's string forms: exact, 'prefix*', '*suffix', '*' (non-empty)."""
    parts = []
    for p in patterns:
        if p == "*":
            parts.append(f'{var} != ""')
        elif p.endswith("*"):
            parts.append(f"{var}.startsWith({_cel_str(p[:-1])})")
        elif p.startswith("*"):
            parts.append(f"{var}.endsWith({_cel_str(p[1:])})")
        else:
            parts.append(f"{var} == {_cel_str(p)}")
    return " || ".join(parts)


def _dotted(path: YPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "document"


# --- the whole import -------------------------------------------------------------------


def convert(resources: list[_Resource], opts: Options) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, policies); raises IstioImportError listing every problem."""
    conv = _Converter(opts)
    policies: list[dict[str, Any]] = []
    seen: set[str] = set()
    for res in resources:
        policy = conv.policy(res)
        if policy is None:
            continue
        if policy["name"] in seen:
            conv.error(res, ("metadata", "name"), f"policy {policy['name']} is defined twice")
            continue
        seen.add(policy["name"])
        policies.append(policy)
    if conv.problems:
        raise IstioImportError(conv.problems)
    manifest: dict[str, Any] = {
        "apiVersion": "authz/v1",
        "kind": "Bundle",
        "name": opts.name,
        "revision": opts.revision,
        "description": (
            "Imported from Istio AuthorizationPolicy resources by authz import-istio. "
            + ("defaultAction DENY was asked for (--default-deny): a workload no ALLOW policy selects "
               "is denied, unlike in Istio." if opts.default_deny else
               "defaultAction ALLOW keeps Istio's rule: a workload that no ALLOW policy selects "
               "accepts every request no DENY policy denies.")
        ),
        "trustDomain": opts.trust_domain,
    }
    if opts.trust_domain_aliases:
        manifest["trustDomainAliases"] = list(opts.trust_domain_aliases)
    manifest["defaultAction"] = "DENY" if opts.default_deny else "ALLOW"
    return manifest, policies


def import_files(paths: list[Path], out_dir: Path, opts: Options, force: bool = False) -> list[Path]:
    """Convert ``paths`` and write the bundle into ``out_dir``; returns the files written."""
    manifest, policies = convert(read_resources(paths), opts)
    if (out_dir / "bundle.yaml").exists() and not force:
        raise IstioImportError([Problem(Position(str(out_dir / "bundle.yaml"), 1, 1),
                                        "a bundle is already there (use --force to replace it)")])
    (out_dir / "policies").mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bundle.yaml"]
    written[0].write_text(_dump(manifest), encoding="utf-8")
    for policy in policies:
        path = out_dir / "policies" / f"{policy['name']}.yaml"
        path.write_text(_dump(policy), encoding="utf-8")
        written.append(path)
    return written


def _dump(value: dict[str, Any]) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100)


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="YAML files with AuthorizationPolicy resources (lists and multi-document files too)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    parser.add_argument("--workload", action="append", default=[], metavar="LABELS=PRINCIPAL",
                        help="a workload selectors may pick: 'app=orders,version=v1=spiffe://cluster.local/ns/prod/sa/orders'; "
                             "repeatable")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--trust-domain-alias", action="append", default=[], metavar="TD")
    parser.add_argument("--root-namespace", default="istio-system",
                        help="Istio's root namespace: its policies apply mesh-wide (default istio-system)")
    parser.add_argument("--default-namespace", default="default",
                        help="namespace of resources that name none (default 'default', as kubectl)")
    parser.add_argument("--default-deny", action="store_true",
                        help="write defaultAction: DENY instead of Istio's ALLOW for workloads no ALLOW policy selects")
    parser.add_argument("--name", default="istio-import", help="bundle name")
    parser.add_argument("--revision", default="1", help="bundle revision")
    parser.add_argument("--force", action="store_true", help="replace a bundle already in DIR")


def cli(args: argparse.Namespace) -> int:
    """Exit 0 with the bundle written, 1 when something cannot be translated, 2 on usage errors."""
    from authz.bundle.loader import BundleError
    from authz.engine.compile import load_policy_set

    opts = Options(trust_domain=args.trust_domain, trust_domain_aliases=tuple(args.trust_domain_alias),
                   root_namespace=args.root_namespace, default_namespace=args.default_namespace,
                   default_deny=args.default_deny, name=args.name, revision=args.revision)
    try:
        opts.workloads = [parse_workload(w, opts.trust) for w in args.workload]
    except ValueError as exc:
        print(f"authz import-istio: {exc}", file=sys.stderr)
        return 2
    try:
        written = import_files(args.files, args.output, opts, force=args.force)
    except IstioImportError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"authz import-istio: {len(exc.problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    try:
        ps = load_policy_set(args.output)
    except BundleError as exc:  # a bug here, not in the input: say so loudly
        print(f"authz import-istio: the written bundle does not load:\n{exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files to {args.output}: bundle {ps.name} with {len(ps.policies)} policies, "
          f"defaultAction {'ALLOW' if ps.default_allow else 'DENY'}")
    return 0

