"""`authz import-istio`: Istio AuthorizationPolicy resources -> a bundle directory.

Semantics kept from Istio (security.istio.io v1 and v1beta1), field by field as istiod
translates them into Envoy RBAC:

- DENY before ALLOW; a workload with no ALLOW policy allows what no DENY denies, which is
  why the generated manifest says ``defaultAction: ALLOW`` (``--default-deny`` changes it);
  AUDIT policies only mark a decision; the ``istio.io/dry-run`` annotation becomes ``dryRun``.
- A policy with no rules matches nothing (an ALLOW one then denies everything it selects);
  an empty rule ``{}`` matches everything.
- Within a rule ``from``, ``to`` and ``when`` are ANDed; the entries of ``from`` and ``to``
  are ORed; the values of a field are ORed; ``notX`` means "none of".
- Source and operation fields are copied as written: the bundle's fields mean what Istio's
  mean (principals as written, the engine expands trust-domain aliases as istiod does;
  ``serviceAccounts`` without a namespace use the policy's ``namespace:``; methods are
  case-sensitive). ``when`` conditions become the same native fields, ANDed into every
  ``from`` entry (source keys) or every ``to`` entry (operation keys).
- Two readings differ from the bundle's and are kept exact with CEL: Istio compares
  ``hosts`` with the whole authority, port included (the bundle's field also accepts the host
  without its port), and Istio's braces outside ``{*}``/``{**}`` are literal (the bundle's are
  captures). A DENY or AUDIT rule's ``hosts`` are the exception: native, so that they match
  every reading of the authority, stricter than Istio where a port or a trailing dot would
  slip past it.

Scope: a policy's namespace and selector decide the workloads it protects. authz knows a
workload by its SPIFFE principal, or, for plaintext traffic that carries none, by the host or
destination port it is called on, so each selectable workload is declared with
``--workload LABELS=PRINCIPAL``, ``LABELS=host:HOST`` or ``LABELS=port:PORT@NAMESPACE``.
A policy without a selector protects every workload of its namespace; one in the root
namespace (``--root-namespace``, else the mesh config's ``rootNamespace``, else istio-system)
protects every workload of the mesh.

The trust domain comes from ``--trust-domain``, else Istio's mesh config when it is among the
inputs (the ``istio`` ConfigMap), else the ``--workload`` principals, else the policies'
principals; the command says which on stderr, and never picks one silently.

Fields on what authz never sees, a verified JWT (``requestPrincipals``, ``request.auth.*``)
or Envoy filter metadata (``experimental.*``), take the stricter reading: an ALLOW rule's
entry or rule on them never matches, a DENY or AUDIT rule matches without them; each is
named with its file:line:column on stderr. Whatever else cannot be translated exactly is an
error naming the field and its file:line:column: CUSTOM actions, ``targetRef(s)``, values
Istio reads differently from the bundle, unknown fields and keys. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from authz import paths, spiffe
from authz.addresses import istio_network, istio_networks
from authz.bundle.schema import Problem
from authz.bundle.yamlpos import Document, Position, YamlError, load_documents
from authz.spiffe import SCHEME

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# The manifest description of every imported bundle starts with this: `authz lint` reads it
# and then recommends nothing that would make the bundle decide differently from Istio.
IMPORTED_MARK = "Imported from Istio AuthorizationPolicy resources by authz import-istio."
ISTIO_DEFAULT_TRUST_DOMAIN = "cluster.local"
ISTIO_ROOT_NAMESPACE = "istio-system"  # meshConfig.rootNamespace when the mesh config names none

SPEC_FIELDS = {"action", "rules", "selector", "targetRef", "targetRefs", "provider"}
RULE_FIELDS = {"from", "to", "when"}
SOURCE_FIELDS = {
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
    "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
    "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains",
}
OPERATION_FIELDS = {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"}
CONDITION_FIELDS = {"key", "values", "notValues"}
_IP_FIELDS = ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_PRINCIPAL_FIELDS = ("principals", "notPrincipals")

_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_TEMPLATE_OP = re.compile(r"\{\*\*?\}")
# Envoy's URI template literal characters (RFC 3986 pchar without '*'; '=' since Envoy 1.26):
# what {*} and {**} accept, and all a literal segment of a template may hold.
_ENVOY_PCHAR = "a-zA-Z0-9\\-._~%!$&'()+,;:@="
_ENVOY_LITERAL = re.compile(f"^[{_ENVOY_PCHAR}]+$")
_K8S_SERVICE_HOST = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.|:|$)")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")  # as the manifest's trustDomain
_PATH_NORMALIZATION = {"DEFAULT": "BASE", "NONE": "NONE", "BASE": "BASE", "MERGE_SLASHES": "MERGE_SLASHES",
                       "DECODE_AND_MERGE_SLASHES": "DECODE_AND_MERGE_SLASHES"}

YPath = tuple[str | int, ...]
WorkloadKind = Literal["principal", "host", "port"]
_TARGET_FIELD: dict[WorkloadKind, str] = {"principal": "principals", "host": "hosts", "port": "ports"}
_SPLIT_SUFFIX = {"hosts": ".by-host", "ports": ".by-port"}


class UsageError(ValueError):
    """The command line does not say enough (exit 2)."""


class IstioImportError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("cannot import:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload a selector may pick, and how authz tells it apart (target field and value)."""

    labels: dict[str, str]
    kind: WorkloadKind
    value: str  # spiffe:// principal, host (lower case) or port number
    namespace: str


@dataclass(slots=True)
class Options:
    trust_domain: str | None = None  # None: from the input, see resolve_trust_domain
    trust_domain_aliases: tuple[str, ...] = ()
    root_namespace: str | None = None  # None: the mesh config's rootNamespace, else istio-system
    default_namespace: str = "default"
    workloads: list[Workload] = field(default_factory=list)
    default_deny: bool = False
    name: str = "istio-import"
    revision: str = "1"
    xff_trusted_hops: int = 0  # the proxy's xff_num_trusted_hops (Istio numTrustedProxies)


def parse_workload(text: str) -> Workload:
    """``app=orders,version=v1=spiffe://td/ns/prod/sa/orders``, ``app=orders=host:orders.prod.svc``
    or ``app=orders=port:8080@prod`` -> Workload; ValueError if malformed."""
    usage = "expected LABEL=VALUE[,LABEL=VALUE...]=PRINCIPAL, ...=host:HOST[@NAMESPACE] or ...=port:PORT@NAMESPACE"
    labels_text, sep, target = text.rpartition("=")
    if not sep or not labels_text or not target.strip():
        raise ValueError(f"--workload {text!r}: {usage}")
    labels: dict[str, str] = {}
    for item in labels_text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--workload {text!r}: {item!r} is not LABEL=VALUE")
        labels[key.strip()] = value.strip()
    target = target.strip()
    if target.startswith(("host:", "port:")):
        kind: WorkloadKind = "host" if target.startswith("host:") else "port"
        value, at, ns = target[5:].partition("@")
        value = paths.fold_case(value.strip())
        if not value:
            raise ValueError(f"--workload {text!r}: {usage}")
        if kind == "port" and not (value.isascii() and value.isdigit() and 0 < int(value) < 65536):
            raise ValueError(f"--workload {text!r}: port {value!r} must be a number from 1 to 65535")
        if not at:
            service = _K8S_SERVICE_HOST.match(value) if kind == "host" else None
            if service is None:
                raise ValueError(f"--workload {text!r}: name the workload's namespace ({kind}:{value}@NAMESPACE); "
                                 "only a Kubernetes service host (<service>.<namespace>.svc...) names its own")
            ns = service.group(2)
        if not ns.strip():
            raise ValueError(f"--workload {text!r}: empty namespace after '@'")
        return Workload(labels, kind, value, ns.strip())
    principal = target if target.startswith(SCHEME) else SCHEME + target
    ns = _principal_namespace(principal)
    if not ns:
        raise ValueError(f"--workload {text!r}: principal has no /ns/<namespace>/ segment")
    return Workload(labels, "principal", principal, ns)


def _principal_namespace(principal: str) -> str:
    parts = principal[len(SCHEME):].split("/") if principal.startswith(SCHEME) else principal.split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "ns":
            return parts[i + 1]
    return ""


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Resource:
    doc: Document
    base: YPath  # where the resource sits in the document (inside a List: ("items", i))
    value: dict[str, Any]

    def at(self, path: YPath, key: bool = False) -> Position:
        return self.doc.at((*self.base, *path), key=key)


def _read_text(path: Path) -> str:
    return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")


def read_resources(paths: list[Path]) -> list[_Resource]:
    """Every resource of every file ('-': standard input); empty documents are skipped."""
    problems: list[Problem] = []
    out: list[_Resource] = []
    for path in paths:
        name = "<stdin>" if str(path) == "-" else str(path)
        try:
            docs = load_documents(_read_text(path), name, yaml11=True)  # as kubectl reads them
        except OSError as exc:
            problems.append(Problem(Position(name, 1, 1), f"cannot read file: {exc}"))
            continue
        except YamlError as exc:
            problems.append(Problem(exc.position, exc.message))
            continue
        for doc in docs:
            if doc.value is None:  # an empty document: a trailing '---', a comment alone
                continue
            if not isinstance(doc.value, dict):
                problems.append(Problem(doc.at(()), "expected a Kubernetes resource (a mapping)"))
                continue
            if str(doc.value.get("kind", "")).endswith("List") and isinstance(doc.value.get("items"), list):
                for i, item in enumerate(doc.value["items"]):
                    if item is None:
                        continue
                    if isinstance(item, dict):
                        out.append(_Resource(doc, ("items", i), item))
                    else:
                        problems.append(Problem(doc.at(("items", i)), "expected a resource (a mapping)"))
            else:
                out.append(_Resource(doc, (), doc.value))
    if problems:
        raise IstioImportError(problems)
    return out


# --- the mesh: trust domain, aliases, path normalisation ----------------------------------


@dataclass(frozen=True, slots=True)
class Mesh:
    trust_domain: str
    aliases: tuple[str, ...]
    path_normalization: str | None  # None: not known from the input (the bundle's default, BASE, is Istio's)
    note: str  # where the trust domain came from, for stderr
    root_namespace: str = ISTIO_ROOT_NAMESPACE  # its policies without a selector apply mesh-wide


def _is_mesh_config(res: _Resource) -> bool:
    v = res.value
    return v.get("kind") == "ConfigMap" and isinstance((v.get("data") or {}).get("mesh"), str)


def _mesh_config(res: _Resource) -> tuple[dict[str, Any], list[Problem]]:
    try:
        mesh = yaml.safe_load(res.value["data"]["mesh"]) or {}
    except yaml.YAMLError as exc:
        return {}, [Problem(res.at(("data", "mesh")), f"data.mesh: invalid YAML: {exc}")]
    if not isinstance(mesh, dict):
        return {}, [Problem(res.at(("data", "mesh")), "data.mesh: expected Istio's MeshConfig (a mapping)")]
    return mesh, []


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _fields(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _policy_principals(resources: list[_Resource]) -> Iterator[str]:
    """Source principals written in the policies (fields and source.principal conditions);
    malformed parts are skipped here and reported by the conversion."""
    for res in resources:
        if res.value.get("kind") != "AuthorizationPolicy":
            continue
        for rule in _items(_fields(res.value.get("spec")).get("rules")):
            for entry in _items(_fields(rule).get("from")):
                source = _fields(_fields(entry).get("source"))
                for key in _PRINCIPAL_FIELDS:
                    yield from (v for v in _items(source.get(key)) if isinstance(v, str))
            for cond in _items(_fields(rule).get("when")):
                if _fields(cond).get("key") == "source.principal":
                    for key in ("values", "notValues"):
                        yield from (v for v in _items(cond.get(key)) if isinstance(v, str))


def _named_trust_domain(principal: str) -> str | None:
    """The trust domain a principal names: None for a pattern on it, or Istio's 'cluster.local',
    which istiod reads as "this mesh" whatever its trust domain."""
    td, sep, _ = principal.removeprefix(SCHEME).partition("/")
    if not sep or not _TRUST_DOMAIN.match(td) or td == ISTIO_DEFAULT_TRUST_DOMAIN:
        return None
    return td


def resolve_mesh(resources: list[_Resource], opts: Options) -> Mesh:
    """The bundle's trust domain, aliases and path normalisation, and where they came from."""
    problems: list[Problem] = []
    mesh: dict[str, Any] = {}
    mesh_at: Position | None = None
    for res in resources:
        if not _is_mesh_config(res):
            continue
        found, errs = _mesh_config(res)
        problems += errs
        if found and mesh and found != mesh:
            problems.append(Problem(res.at(()), "a second, different Istio mesh config; give one"))
        elif found:
            mesh, mesh_at = found, res.at(())
    normalization = None
    mesh_aliases: list[str] = []
    if mesh_at is not None:
        raw = str(_fields(mesh.get("pathNormalization")).get("normalization", "DEFAULT")).upper()
        normalization = _PATH_NORMALIZATION.get(raw) if "pathNormalization" in mesh else None
        if "pathNormalization" in mesh and normalization is None:
            problems.append(Problem(mesh_at, f"data.mesh: pathNormalization {raw!r} is not one of "
                                    f"{', '.join(_PATH_NORMALIZATION)}"))
        mesh_aliases = [str(a) for a in _items(mesh.get("trustDomainAliases"))]
        for td in [str(mesh.get("trustDomain") or ISTIO_DEFAULT_TRUST_DOMAIN), *mesh_aliases]:
            if not _TRUST_DOMAIN.match(td):
                problems.append(Problem(mesh_at, f"data.mesh: {td!r} is not a trust domain"))
        if opts.trust_domain_aliases and mesh_aliases and set(opts.trust_domain_aliases) != set(mesh_aliases):
            # Fewer aliases than the mesh has would make a DENY on principals miss callers
            # istiod's expansion covers; more would make an ALLOW grant what it does not.
            problems.append(Problem(mesh_at, f"data.mesh: trustDomainAliases {mesh_aliases} are not the "
                                    f"--trust-domain-alias values {list(opts.trust_domain_aliases)}; give one"))
        declared = mesh.get("trustDomain")
        if declared and opts.trust_domain and str(declared) != opts.trust_domain:
            # Either choice is wrong for some principal: the trust domain decides which
            # principals istiod's alias expansion rewrites.
            problems.append(Problem(mesh_at, f"data.mesh: trustDomain {str(declared)!r} is not --trust-domain "
                                    f"{opts.trust_domain!r}; give one"))
        configured = mesh.get("rootNamespace")
        if configured is not None and opts.root_namespace is not None and str(configured) != opts.root_namespace:
            problems.append(Problem(mesh_at, f"data.mesh: rootNamespace {configured!r} is not --root-namespace "
                                    f"{opts.root_namespace!r}; give one"))
    if problems:
        raise IstioImportError(problems)
    root = opts.root_namespace or str(mesh.get("rootNamespace") or ISTIO_ROOT_NAMESPACE)

    def made(td: str, note: str) -> Mesh:
        return Mesh(td, aliases, normalization, note, root)

    for td in (opts.trust_domain or ISTIO_DEFAULT_TRUST_DOMAIN, *opts.trust_domain_aliases):
        if not _TRUST_DOMAIN.match(td):
            raise UsageError(f"{td!r} is not a trust domain (lower-case letters, digits, '.', '-', '_')")
    aliases = tuple(opts.trust_domain_aliases) or tuple(mesh_aliases)
    if opts.trust_domain:
        return made(opts.trust_domain, f"trust domain {opts.trust_domain} (--trust-domain)")
    if mesh.get("trustDomain"):
        td = str(mesh["trustDomain"])
        return made(td, f"trust domain {td} from the Istio mesh config at {mesh_at}")
    if mesh_at is not None:  # the mesh config names none: Istio's default is the mesh's
        return made(ISTIO_DEFAULT_TRUST_DOMAIN, f"trust domain {ISTIO_DEFAULT_TRUST_DOMAIN}: the Istio mesh "
                    f"config at {mesh_at} names none, so it is Istio's default")
    workload_tds = sorted({td for w in opts.workloads if w.kind == "principal"
                           and _TRUST_DOMAIN.match(td := w.value[len(SCHEME):].partition("/")[0])})
    if len(workload_tds) == 1:
        return made(workload_tds[0],
                    f"trust domain {workload_tds[0]} from the --workload principals")
    if len(workload_tds) > 1:
        raise UsageError(f"the --workload principals are in several trust domains ({', '.join(workload_tds)}): "
                         "pass --trust-domain, and --trust-domain-alias for the others")
    # A guess from the policies' principals would be wrong whenever they name another mesh's
    # callers: the trust domain decides which principals istiod's alias expansion rewrites.
    named = sorted({name for p in _policy_principals(resources) if (name := _named_trust_domain(p))})
    if named:
        raise UsageError(f"the policies' principals name trust domain{'s' if len(named) > 1 else ''} "
                         f"{', '.join(named)} and nothing says which is this mesh's: pass --trust-domain (and "
                         "--trust-domain-alias), or the istio ConfigMap (kubectl -n istio-system get configmap "
                         "istio -o yaml)")
    return made(ISTIO_DEFAULT_TRUST_DOMAIN,
                f"trust domain {ISTIO_DEFAULT_TRUST_DOMAIN}: Istio's default, as nothing in the input names "
                "another; pass --trust-domain (or the istio ConfigMap) if the mesh uses its own")


# --- converting -------------------------------------------------------------------------


class _Never(Exception):
    """ANDing two value lists leaves nothing: that source or operation matches no request."""


class _Inexact(Exception):
    """ANDing two value lists has no exact form in one bundle field."""


@dataclass(frozen=True, slots=True)
class _EqualOnly:
    """A ``same`` whose values only an equal set ANDs exactly: each is a regex over the whole
    principal, and two different ones can meet one principal (`.*/ns/foo/.*` and
    `.*/ns/bar/.*` both meet `.../ns/foo/sa/x/ns/bar/y`)."""

    key: Callable[[str], Hashable]

    def __call__(self, value: str) -> Hashable:
        return self.key(value)


def _and_strings(old: list[str], new: list[str], same: Callable[[str], Hashable] | None) -> list[str]:
    """``same`` says which values name one thing (the principal in every trust domain of the
    bundle, a service account with or without its namespace); None when values cannot be
    compared as strings at all (two lines of one header can hold both). Only a provably
    empty AND is _Never: dropping a DENY rule that Istio enforces would be looser."""
    if set(old) == set(new):
        return old
    if same is None or any("*" in v for v in (*old, *new)):
        raise _Inexact
    if isinstance(same, _EqualOnly):
        if {same(v) for v in old} == {same(v) for v in new}:
            return old
        raise _Inexact
    wanted = {same(v) for v in new}
    both = [v for v in old if same(v) in wanted]
    if not both:
        raise _Never
    return both


def _and_ips(old: list[str], new: list[str]) -> list[str]:
    """CIDR blocks in both lists. A block older and current istiod read otherwise has no one
    intersection: _Inexact (a DENY then leaves the condition out; an ALLOW refuses it)."""
    if any(len(istio_networks(v)) > 1 for v in (*old, *new)):
        raise _Inexact
    out: list[str] = []
    for x in old:
        nx = istio_network(x)
        for y in new:
            ny = istio_network(y)
            if nx.version != ny.version:
                continue
            if nx.subnet_of(ny):  # type: ignore[arg-type]
                out.append(x)
            elif ny.subnet_of(nx):  # type: ignore[arg-type]
                out.append(y)
    if not out:
        raise _Never
    return list(dict.fromkeys(out))


def _and_ports(old: list[str], new: list[str]) -> list[str]:
    both = [p for p in old if int(p) in {int(q) for q in new}]
    if not both:
        raise _Never
    return both


def _and(field_name: str, old: list[str], new: list[str], same: Callable[[str], Hashable] | None) -> list[str]:
    if field_name.lower().endswith("ipblocks"):
        return _and_ips(old, new)
    if field_name == "ports":
        return _and_ports(old, new)
    return _and_strings(old, new, same)


def _negative(field_name: str) -> str:
    return "not" + field_name[0].upper() + field_name[1:]


@dataclass(slots=True)
class _Condition:
    """One `when` entry as the native field it becomes, in sources or in operations."""

    where: Literal["source", "operation"]
    field_name: str
    values: list[str]
    not_values: list[str]
    header: str | None = None  # request.headers[name]: the field is a map by header name


# What a rule reads that authz never sees: a verified JWT (RequestAuthentication) and Envoy
# filter metadata. Istio decides on them; authz takes the stricter reading (see unverifiable).
_UNVERIFIABLE_KEYS = ("request.auth.", "experimental.", "request.experimental.")
_JWT_KEYS = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter")


def _known_unverifiable(key: str) -> bool:
    """A JWT or metadata key Istio's validation accepts (security.ValidateAttribute)."""
    if key.startswith("request.auth."):
        return key in _JWT_KEYS or (key.startswith("request.auth.claims[") and key.endswith("]")
                                    and len(key) > len("request.auth.claims[]"))
    if key.startswith("experimental."):
        return key.startswith("experimental.envoy.filters.")
    return True  # request.experimental.*: read as unverifiable, as before


# Request headers Envoy's RBAC filter sees but ext_authz never receives (Envoy drops a
# client's copy: CheckRequestUtils::setHttpRequest).
_NOT_SENT_TO_EXT_AUTHZ = frozenset({"x-envoy-auth-partial-body"})


class _Unverifiable:
    """A `from` entry or `when` condition on something authz cannot see."""


UNVERIFIABLE = _Unverifiable()


class _Constant:
    """A `when` condition whose value is known whatever the request."""


NEVER_HOLDS, ALWAYS_HOLDS = _Constant(), _Constant()
# Go's strconv.ParseBool, with which istiod reads istio.io/dry-run.
_PARSE_BOOL = {**dict.fromkeys(("1", "t", "T", "true", "True", "TRUE"), True),
               **dict.fromkeys(("0", "f", "F", "false", "False", "FALSE"), False)}


class _Converter:
    def __init__(self, opts: Options, mesh: Mesh) -> None:
        self.opts = opts
        self.mesh = mesh
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def unverifiable(self, res: _Resource, path: YPath, what: str, deny: bool, entry: bool = False) -> None:
        """Say how a field on a JWT or on filter metadata was translated: it is never
        known to authz, so a DENY or AUDIT rule matches as if it held (the field is left out)
        and an ALLOW rule as if it did not (the entry or rule never matches)."""
        effect = ("left out of this DENY/AUDIT rule, which so matches whatever its other fields match"
                  if deny else f"this ALLOW {'`from` entry' if entry else 'rule'} never matches")
        self.notes.append(f"{res.at(path, True)}: {_dotted(path)}: {what}, which authz never sees: {effect} "
                          "(stricter than Istio; docs/bundle-format.md, \"JWT and filter metadata\")")

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

    def listed(self, res: _Resource, path: YPath, value: Any) -> list[Any]:
        """A list field's items; not set is empty, anything else an error."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(res, path, "must be a list")
            return []
        return value

    def mapping(self, res: _Resource, path: YPath, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(res, path, "must be a mapping")
            return {}
        return value

    def strings(self, res: _Resource, path: YPath, value: Any) -> list[str] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.error(res, path, "must be a list of non-empty strings")
            return None
        return list(value)

    # -- checks shared by fields and conditions ----------------------------------------------

    def check_patterns(self, res: _Resource, path: YPath, values: list[str]) -> bool:
        """Istio reads '*x*' (and '**') as a suffix match on 'x*'; the bundle as a prefix match."""
        ok = True
        for k, value in enumerate(values):
            if len(value) > 1 and value.startswith("*") and value.endswith("*"):
                self.error(res, (*path, k), f"{value!r}: Istio reads a value with '*' at both ends as a suffix "
                           f"match on {value[1:]!r} (it is not 'contains'), which no bundle field says; write "
                           "the value you mean")
                ok = False
        return ok

    def check_principals(self, res: _Resource, path: YPath, values: list[str]) -> bool:
        ok = True
        for k, value in enumerate(values):
            if value.startswith(SCHEME):
                self.error(res, (*path, k), f"{value!r}: Istio adds 'spiffe://' to principals itself, so this "
                           "one never matches there; write it without the scheme")
                ok = False
            elif value.startswith("*") and not value.endswith("*"):  # both ends: reported below
                try:  # istiod (and the engine) read the suffix as a regex, unescaped
                    spiffe.re2_compile(spiffe.re2_text(value[1:], after_repeat=True))
                except re.error as exc:
                    self.error(res, (*path, k), f"{value!r}: istiod pastes a '*suffix' principal into a regex "
                               f"unescaped, and this one cannot be read here as Envoy's RE2 reads it ({exc})")
                    ok = False
        return self.check_patterns(res, path, values) and ok

    def check_ips(self, res: _Resource, path: YPath, values: list[str], widen: bool) -> bool:
        """``widen``: matching more makes the rule stricter (a DENY's blocks, an ALLOW's
        not-blocks); elsewhere a value istiod versions read two ways is refused."""
        ok = True
        for k, value in enumerate(values):
            try:
                readings = istio_networks(value)
            except ValueError as exc:
                self.error(res, (*path, k), f"{value!r} is not an IP address or CIDR block as istiod reads "
                           f"them ({exc})")
                ok = False
                continue
            if len(readings) > 1 and not widen:
                self.error(res, (*path, k), f"{value!r} is {readings[0]} to older istiod (Go's net) and "
                           f"{readings[1]} to current istiod (net/netip): which one the mesh runs decides what "
                           "this allows; write the one meant")
                ok = False
        return ok

    def check_ports(self, res: _Resource, path: YPath, values: list[str]) -> bool:
        ok = True
        for k, value in enumerate(values):
            if not (value.isascii() and value.isdigit()) or int(value) > 65535:
                self.error(res, (*path, k), f"port {value!r} must be a number from 0 to 65535")
                ok = False
            elif int(value) == 0:
                self.error(res, (*path, k), "port 0 matches no request in Istio, and the bundle refuses it: "
                           "remove it")
                ok = False
        return ok

    def check_regex_values(self, res: _Resource, path: YPath, values: list[str], what: str) -> bool:
        """istiod pastes namespaces and service accounts into a regex unescaped, and so does the
        engine; one that is no regex would be refused by Envoy."""
        ok = True
        for k, value in enumerate(values):
            try:
                spiffe.re2_compile(spiffe.re2_text(value.replace("*", ".*") if what == "namespace" else value))
            except re.error as exc:
                self.error(res, (*path, k), f"{value!r}: istiod pastes a {what} into a regex unescaped, and this "
                           f"one cannot be read here as Envoy's RE2 reads it ({exc})")
                ok = False
        return ok

    def check_service_accounts(self, res: _Resource, path: YPath, values: list[str]) -> bool:
        ok = self.check_regex_values(res, path, values, "service account")
        for k, value in enumerate(values):
            ns, slash, name = value.rpartition("/")
            if "*" in value or value.count("/") > 1 or not name or (slash and not ns):
                self.error(res, (*path, k), f"{value!r}: a service account is '<name>' or '<namespace>/<name>' "
                           "without wildcards (Istio rejects anything else)")
                ok = False
        return ok

    # -- one policy -------------------------------------------------------------------------

    def policies(self, res: _Resource) -> list[dict[str, Any]]:
        v = res.value
        before = len(self.problems)
        if v.get("apiVersion") not in API_VERSIONS:
            self.error(res, ("apiVersion",), f"{v.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}")
            return []
        if v.get("kind") != "AuthorizationPolicy":
            self.error(res, ("kind",), f"{v.get('kind')!r} is not an AuthorizationPolicy")
            return []
        meta = self.mapping(res, ("metadata",), v.get("metadata"))
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            self.error(res, ("metadata",), "metadata.name is required")
            return []
        ns = str(meta.get("namespace") or self.opts.default_namespace)
        annotations = self.mapping(res, ("metadata", "annotations"), meta.get("annotations"))
        dry_run = self.dry_run(res, annotations)
        spec: Any = {} if v.get("spec") is None else v["spec"]
        if not self.unknown_fields(res, ("spec",), spec, SPEC_FIELDS, "an AuthorizationPolicy spec"):
            return []
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
        targets = self.targets(res, ns, spec.get("selector"))
        rules: list[dict[str, Any]] = []
        for i, rv in enumerate(self.listed(res, ("spec", "rules"), spec.get("rules"))):
            if rv is None:
                # Istio's validation refuses the policy (`rule` must not be nil), so a cluster
                # never holds it; read as `{}` it matched every request, and skipped (as
                # istiod's builder would) it left the policy's other rules granting.
                self.error(res, ("spec", "rules", i), "a null rule: Istio rejects the policy (`rule` must not be nil)")
                continue
            rules += self.rule(res, ("spec", "rules", i), rv, i, deny=action != "ALLOW")
        if len(self.problems) != before:
            return []
        loc = res.at(())
        out = []
        for k, target in enumerate(targets):
            suffix = "" if k == 0 or target is None else _SPLIT_SUFFIX[next(iter(target))]
            policy: dict[str, Any] = {
                "apiVersion": "authz/v1",
                "kind": "Policy",
                "name": f"{ns}.{name}{suffix}",
                "namespace": ns,
                "description": f"Imported from Istio AuthorizationPolicy {ns}/{name} ({loc.file}:{loc.line}).",
                "action": action,
            }
            if dry_run:
                policy["dryRun"] = True
            if target is not None:
                policy["target"] = target
            policy["rules"] = copy.deepcopy(rules)
            out.append(policy)
        return out

    def targets(self, res: _Resource, ns: str, selector: Any) -> list[dict[str, list[str]] | None]:
        """One target per way the selected workloads are known: a target ANDs its fields, and
        policies are ORed, so principals, hosts and ports each get their own policy."""
        labels: dict[str, str] = {}
        if selector is not None:
            if not self.unknown_fields(res, ("spec", "selector"), selector, {"matchLabels"}, "a selector"):
                return []
            match = self.mapping(res, ("spec", "selector", "matchLabels"), selector.get("matchLabels"))
            labels = {str(k): str(val) for k, val in match.items()}
        root = ns == self.mesh.root_namespace
        eligible = [w for w in self.opts.workloads if root or w.namespace == ns]
        found: dict[WorkloadKind, list[str]] = {}
        if not labels:
            if root:
                return [None]
            # Every workload of the namespace, whatever trust domain its certificate names: the
            # mesh's and its aliases', and any other a declared workload of it names.
            found["principal"] = [f"{SCHEME}{td}/ns/{ns}/sa/*" for td in (self.mesh.trust_domain, *self.mesh.aliases)]
            covered = tuple(p.removesuffix("*") for p in found["principal"])
            chosen = [w for w in eligible if w.kind != "principal" or not w.value.startswith(covered)]
        else:
            chosen = [w for w in eligible if labels.items() <= w.labels.items()]
            if not chosen:
                shown = ", ".join(f"{k}={val}" for k, val in sorted(labels.items()))
                self.error(res, ("spec", "selector", "matchLabels"),
                           f"selects workloads by labels ({shown}) but no --workload with those labels "
                           f"{'exists' if root else 'is in namespace ' + repr(ns)}: declare each one as "
                           "--workload LABELS=PRINCIPAL (or LABELS=host:HOST, LABELS=port:PORT@NAMESPACE)")
                return []
            for w in eligible:
                if w not in chosen and any(c.kind == w.kind and c.value == w.value for c in chosen):
                    self.error(res, ("spec", "selector", "matchLabels"),
                               f"selects some workloads with {w.kind} {w.value} but not the one labelled "
                               f"{w.labels}: authz tells workloads apart only by principal, host or port")
                    return []
        for w in sorted(chosen, key=lambda w: w.value):
            values = found.setdefault(w.kind, [])
            if w.value not in values:
                values.append(w.value)
        return [{_TARGET_FIELD[kind]: found[kind]} for kind in _TARGET_FIELD if kind in found]

    # -- rules ------------------------------------------------------------------------------

    def rule(self, res: _Resource, path: YPath, rv: Any, index: int, deny: bool = False) -> list[dict[str, Any]]:
        """``deny``: the rule of a DENY or AUDIT policy (see ``operation``)."""
        if not self.unknown_fields(res, path, rv, RULE_FIELDS, "a rule"):
            return []
        sources: list[dict[str, Any]] = []
        unverifiable = False
        # What Istio's validation refuses (ValidateAuthorizationPolicy) is refused here: the
        # policy never reaches a cluster whose webhook validates, and imported in part it
        # would let its other rules grant. (An empty `from: []` is not among it: YAML reaches
        # istiod through JSON, where an empty list leaves the field unset.)
        for p, body in self.entries(res, path, rv, "from", "source"):
            s = self.source(res, p, body, deny)
            if isinstance(s, _Unverifiable):
                unverifiable = True  # an entry that never matches: the others still may
            elif s is not None:
                sources.append(s)
        operations: list[tuple[dict[str, Any], list[str]]] = []
        for p, body in self.entries(res, path, rv, "to", "operation"):
            op = self.operation(res, p, body, deny)
            if op is not None:
                operations.append(op)
        never = unverifiable and not sources
        for j, cv in enumerate(self.listed(res, (*path, "when"), rv.get("when"))):
            cond = self.condition(res, (*path, "when", j), cv, deny)
            if isinstance(cond, _Unverifiable):
                never = never or not deny  # a DENY rule leaves it out; an ALLOW rule never matches
                continue
            if isinstance(cond, _Constant):
                never = never or cond is NEVER_HOLDS  # in Istio too, whatever the action
                continue
            if cond is None:
                continue
            if cond.where == "source":
                sources = sources or [{}]
                kept = self.push(res, (*path, "when", j), cond, sources, deny)
                sources = [e for e, keep in zip(sources, kept, strict=True) if keep]
            else:
                operations = operations or [({}, [])]
                kept = self.push(res, (*path, "when", j), cond, [op for op, _ in operations], deny)
                operations = [e for e, keep in zip(operations, kept, strict=True) if keep]
            if not (sources if cond.where == "source" else operations):
                return []  # every entry ANDed with the condition matches nothing: so does the rule
        if never:
            return []  # after every entry was checked, so that all problems are reported
        name = f"rule-{index + 1}"
        if any(cel for _, cel in operations) and len(operations) > 1:
            # A CEL part of one `to` entry cannot be ORed with the others inside one rule:
            # one bundle rule per entry keeps "any entry" semantics exactly.
            return [self._rule(f"{name}.{k + 1}", sources, [op], cel) for k, (op, cel) in enumerate(operations)]
        return [self._rule(name, sources, [op for op, _ in operations], [c for _, cel in operations for c in cel])]

    def entries(self, res: _Resource, path: YPath, rv: dict[str, Any], part: str, field: str
                ) -> list[tuple[YPath, dict[str, Any]]]:
        """(path, body) of the `source` or `operation` of each `from` or `to` entry of a rule
        that Istio's validation accepts; the others are errors."""
        out = []
        for j, entry in enumerate(self.listed(res, (*path, part), rv.get(part))):
            p = (*path, part, j)
            if entry is None:  # istiod dereferences it: no reading to copy, so none is made up
                self.error(res, p, f"a null {part} entry")
                continue
            if not self.unknown_fields(res, p, entry, {field}, f"a {part} entry"):
                continue
            body = entry.get(field) or {}
            if isinstance(body, dict) and not any(body.values()):  # not a mapping: reported below
                article = "an" if field[0] in "aeiou" else "a"
                self.error(res, p, f"a {part} entry without {article} {field} field: Istio rejects the policy")
                continue
            out.append(((*p, field), body))
        return out

    def push(self, res: _Resource, path: YPath, cond: _Condition, entries: list[dict[str, Any]],
             deny: bool = False) -> list[bool]:
        """AND a condition into every entry; False for an entry that then matches nothing.
        ``deny``: the rule of a DENY or AUDIT policy, where an AND with no exact form keeps
        the entry's own values (the rule then matches more: stricter) instead of failing."""
        keep = []
        label = f"{cond.field_name}[{cond.header}]" if cond.header is not None else cond.field_name
        for entry in entries:
            for field_name, values, negative in ((cond.field_name, cond.values, False),
                                                 (_negative(cond.field_name), cond.not_values, True)):
                if not values:
                    continue
                holder = entry.setdefault(field_name, {}) if cond.header is not None else entry
                key = cond.header if cond.header is not None else field_name
                if key not in holder:
                    holder[key] = list(values)
                elif negative:  # "none of A" and "none of B" is "none of A or B"
                    holder[key] = list(dict.fromkeys([*holder[key], *values]))
                else:
                    try:
                        holder[key] = _and(cond.field_name, holder[key], values,
                                           self._same(res, cond, [*holder[key], *values], deny))
                    except _Never:
                        break
                    except _Inexact:
                        if deny:
                            self.notes.append(
                                f"{res.at(path, False)}: {_dotted(path)}: {label}: the AND of the condition and the "
                                f"{cond.where}'s own values has no exact form in one field; the condition is left "
                                "out of this DENY/AUDIT rule, which so matches more (stricter than Istio)")
                        else:
                            self.error(res, path, f"{label}: the AND of the condition and the {cond.where}'s own "
                                       "values has no exact form in one field (patterns, regexes or a header "
                                       f"that may come in several lines); write the values the rule needs in "
                                       f"the {cond.where}")
                    except ValueError:
                        pass  # an invalid address or port of the entry, already reported
            else:
                keep.append(True)
                continue
            keep.append(False)
        return keep

    def dry_run(self, res: _Resource, annotations: dict[str, Any]) -> bool:
        """istio.io/dry-run as istiod reads it (strconv.ParseBool): '1', 't', 'true', 'True',
        'TRUE' and their false forms. istiod enforces a policy with any other value (Istio's
        validation refuses it): so does authz, and says so."""
        if DRY_RUN_ANNOTATION not in annotations:
            return False
        value = str(annotations[DRY_RUN_ANNOTATION])
        if value in _PARSE_BOOL:
            return _PARSE_BOOL[value]
        where = ("metadata", "annotations", DRY_RUN_ANNOTATION)
        self.notes.append(f"{res.at(where)}: {_dotted(where)}: {value!r} is no boolean to istiod "
                          f"({', '.join(_PARSE_BOOL)}): the policy is enforced, as istiod enforces it")
        return False

    def _same(self, res: _Resource, cond: _Condition, values: list[str], deny: bool
              ) -> Callable[[str], Hashable] | None:
        """What makes two values of ``cond``'s field name the same thing, as istiod reads them.
        None in a DENY or AUDIT rule where strings cannot tell: two lines of one header may
        hold both values, and istiod makes namespaces and service accounts regexes over the
        whole principal, two of which one principal can meet. (In an ALLOW rule the string
        AND is at most stricter than Istio's.)"""
        if deny and cond.header is not None:
            return None
        if cond.field_name == "principals":
            trust = spiffe.TrustDomains(self.mesh.trust_domain, frozenset(self.mesh.aliases))
            return lambda v: frozenset(trust.expand_principal(v))
        if cond.field_name in ("namespaces", "serviceAccounts"):
            key: Callable[[str], Hashable] = lambda v: v  # noqa: E731
            if cond.field_name == "serviceAccounts":
                namespace = str((res.value.get("metadata") or {}).get("namespace") or "")
                key = lambda v: v if "/" in v else f"{namespace}/{v}"  # noqa: E731
            return _EqualOnly(key) if deny else key
        return lambda v: v

    @staticmethod
    def _rule(name: str, sources: list[dict[str, Any]], ops: list[dict[str, Any]], when: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name}
        if sources:
            out["from"] = [{"source": copy.deepcopy(s)} for s in sources]
        if ops:
            out["to"] = [{"operation": copy.deepcopy(op)} for op in ops]
        if when:
            out["when"] = list(when)
        return out

    def source(self, res: _Resource, path: YPath, sv: Any, deny: bool = False
               ) -> dict[str, Any] | _Unverifiable | None:
        """The bundle source; UNVERIFIABLE for an ALLOW rule's entry on JWT principals."""
        if not self.unknown_fields(res, path, sv, SOURCE_FIELDS, "a source"):
            return None
        out: dict[str, Any] = {}
        jwt = [key for key in ("requestPrincipals", "notRequestPrincipals")
               if self.strings(res, (*path, key), sv.get(key))]
        for key in jwt:
            self.unverifiable(res, (*path, key), "JWT request principals", deny, entry=True)
        for key in sorted(SOURCE_FIELDS - {"requestPrincipals", "notRequestPrincipals"}, key=_source_order):
            values = self.strings(res, (*path, key), sv.get(key))
            if not values:  # an empty list is "not set" in Istio (proto3)
                continue
            if key in _IP_FIELDS:
                self.check_ips(res, (*path, key), values, widen=deny != key.startswith("not"))
            elif key in ("serviceAccounts", "notServiceAccounts"):
                self.check_service_accounts(res, (*path, key), values)
            elif key in _PRINCIPAL_FIELDS:
                self.check_principals(res, (*path, key), values)
            elif key in ("namespaces", "notNamespaces"):
                self.check_regex_values(res, (*path, key), values, "namespace")
            else:
                self.check_patterns(res, (*path, key), values)
            out[key] = values
        accounts = [k for k in ("serviceAccounts", "notServiceAccounts") if k in out]
        others = [k for k in ("principals", "notPrincipals", "namespaces", "notNamespaces") if k in out]
        if accounts and others:
            self.error(res, (*path, accounts[0]), f"Istio rejects {accounts[0]} next to {others[0]} in one "
                       "source, so this policy never applied there", key=True)
        return UNVERIFIABLE if jwt and not deny else out

    def operation(self, res: _Resource, path: YPath, ov: Any, deny: bool = False,
                  ) -> tuple[dict[str, Any], list[str]] | None:
        if not self.unknown_fields(res, path, ov, OPERATION_FIELDS, "an operation"):
            return None
        out: dict[str, Any] = {}
        cel: list[str] = []
        for key in ("methods", "notMethods"):
            values = self.strings(res, (*path, key), ov.get(key))
            if values:
                self.check_patterns(res, (*path, key), values)
                out[key] = values  # exactly as written: Istio compares methods case-sensitively
        for key in ("ports", "notPorts"):
            values = self.strings(res, (*path, key), ov.get(key))
            if values:
                self.check_ports(res, (*path, key), values)
                out[key] = values
        for key in ("hosts", "notHosts"):
            values = self.strings(res, (*path, key), ov.get(key))
            if not values or not self.check_patterns(res, (*path, key), values):
                continue
            if all(v == "*" or not v.startswith("*") and v.endswith("*") for v in values):
                # A prefix of the authority is a prefix of the host too: the field means the same.
                out[key] = values
            elif key == "hosts" and deny:
                # The engine matches a DENY's (or AUDIT's) hosts against every reading of the
                # authority: without its port, its trailing dot, a userinfo. Stricter than
                # Istio, which a port or a dot slips past (docs/bundle-format.md, "Hosts").
                # notHosts stay exact: read more ways, they would exempt more from the DENY.
                out[key] = values
            else:
                # Istio compares the whole authority, port included, ignoring case; the bundle's
                # hosts field also accepts the host without its port, so say it in CEL.
                # '*' is istiod's presentMatch on :authority: true for every request, an
                # empty Host header included (request.host != "" would not be).
                # ASCII case only, as Envoy's ignoreCase (str.lower() makes 'K', Kelvin, a 'k')
                expr = "true" if "*" in values else _any_of("request.host", [paths.fold_case(v) for v in values])
                cel.append(expr if key == "hosts" else f"!({expr})")
        for key in ("paths", "notPaths"):
            values = self.strings(res, (*path, key), ov.get(key))
            if not values or not self.check_patterns(res, (*path, key), values):
                continue
            kinds = [self.path_kind(res, (*path, key, k), value) for k, value in enumerate(values)]
            if any(kind is None for kind in kinds):
                continue
            if all(kind == "native" for kind in kinds):
                out[key] = values
                continue
            # One value needs CEL, so the whole field (its values are ORed) becomes CEL.
            expr = " || ".join(f"request.path.matches({_cel_str(_template_regex(v))})" if _TEMPLATE_OP.search(v)
                               else _any_of("request.path", [v]) for v in values)
            cel.append(expr if key == "paths" else f"!({expr})")
        return out, cel

    def path_kind(self, res: _Resource, path: YPath, value: str) -> str | None:
        """'native' when the bundle's paths field means the same, 'cel' when only CEL says it, None: an error."""
        if _TEMPLATE_OP.search(value):
            return self.template(res, path, value)
        if "{" in value or "}" in value:
            return "cel"  # not a template for Istio: its braces are literal
        if not value.startswith(("/", "*")):
            return "cel"  # Istio accepts it (it matches no request path); the bundle's field refuses it
        return "native"

    def template(self, res: _Resource, path: YPath, value: str) -> str | None:
        """Istio's checks on a {*}/{**} template, then Envoy's (Istio hands it to Envoy's URI template matcher)."""
        if not value.startswith("/"):
            self.error(res, path, f"path template {value!r} must start with '/'")
            return None
        seen_any = False
        inner = value[1:].removesuffix("/")
        if "" in inner.split("/") and inner:
            # istiod trims the slashes before its checks, and then hands Envoy a template with
            # an empty segment, which Envoy 1.40 does not survive: no meaning to copy here.
            self.error(res, path, f"path template {value!r} has an empty segment ('//'), which Envoy's URI "
                       "template matcher cannot take")
            return None
        for s in value.strip("/").split("/"):
            if s in ("{*}", "{**}"):
                if seen_any:
                    self.error(res, path, f"path template {value!r}: '{{**}}' must be the last operator")
                    return None
                seen_any = s == "{**}"
            elif "{" in s or "}" in s or "*" in s:
                self.error(res, path, f"path template {value!r}: segment {s!r} mixes an operator with other "
                           "text, which Istio rejects")
                return None
            elif not _ENVOY_LITERAL.match(s):
                self.error(res, path, f"path template {value!r}: segment {s!r} holds characters Envoy's URI "
                           "template matcher rejects (only RFC 3986 path characters without '*')")
                return None
        # The bundle's templates are Envoy's: literal segments may follow {**}.
        return "native"

    # -- conditions -------------------------------------------------------------------------

    def condition(self, res: _Resource, path: YPath, cv: Any, deny: bool = False
                  ) -> _Condition | _Unverifiable | _Constant | None:
        if not self.unknown_fields(res, path, cv, CONDITION_FIELDS, "a condition"):
            return None
        key = cv.get("key")
        values = self.strings(res, (*path, "values"), cv.get("values")) or []
        not_values = self.strings(res, (*path, "notValues"), cv.get("notValues")) or []
        if not isinstance(key, str) or not key:
            self.error(res, path, "a condition needs a key")
            return None
        if not values and not not_values:
            self.error(res, path, f"condition {key!r} needs values or notValues")
            return None
        kpath = (*path, "key")
        listed = [((*path, "values"), values), ((*path, "notValues"), not_values)]
        header = _HEADER_KEY.match(key)
        ok = True
        if header:
            for p, vs in listed:
                ok = self.check_patterns(res, p, vs) and ok
            name = paths.fold_case(header.group(1).strip())  # ASCII, as Envoy lower-cases names
            if name != paths.fold_case(header.group(1)):
                # istiod keeps the name verbatim, spaces included: a header no request has.
                # Its values never hold; its notValues always do.
                return NEVER_HOLDS if values else ALWAYS_HOLDS
            if name in _NOT_SENT_TO_EXT_AUTHZ:
                self.unverifiable(res, kpath, f"{key!r} reads a header Envoy does not send to ext_authz", deny)
                return UNVERIFIABLE
            # Where a match makes the rule allow (an ALLOW's values, a DENY's notValues), a value
            # with ',' or '!' could match what Istio's RBAC filter does not (repeated lines reach
            # ext_authz joined with ',', bytes that are not UTF-8 as '!'): such a value is read
            # as matching nothing. So an ALLOW's values may never hold; a DENY's notValues hold.
            narrow_path, narrow = ((*path, "notValues"), not_values) if deny else ((*path, "values"), values)
            unclear = [v for v in narrow if "," in v or "!" in v]
            if unclear and ok:
                kept = [v for v in narrow if v not in unclear]
                effect = ("this DENY/AUDIT condition holds for them" if deny
                          else "this ALLOW condition never holds for them")
                self.notes.append(
                    f"{res.at(narrow_path, True)}: {_dotted(narrow_path)}: {unclear!r}: Envoy sends ext_authz "
                    "repeated header lines joined with ',' and bytes that are not UTF-8 as '!', so these "
                    f"match nothing here: {effect} (stricter than Istio; docs/bundle-format.md, \"Headers\")")
                if deny:
                    not_values = kept
                    if not values and not not_values:
                        return ALWAYS_HOLDS
                else:
                    values = kept
                    if not values:
                        return NEVER_HOLDS
            return _Condition("operation", "headers", values, not_values, header=name) if ok else None
        simple: dict[str, tuple[Literal["source", "operation"], str]] = {
            "connection.sni": ("operation", "sni"),
            "destination.ip": ("operation", "destinationIpBlocks"),
            "destination.port": ("operation", "ports"),
            "source.ip": ("source", "ipBlocks"),
            "remote.ip": ("source", "remoteIpBlocks"),
            "source.namespace": ("source", "namespaces"),
            "source.principal": ("source", "principals"),
            "source.serviceAccount": ("source", "serviceAccounts"),
        }
        if key in simple:
            where, field_name = simple[key]
            for p, vs in listed:
                if key in ("destination.ip", "source.ip", "remote.ip"):
                    ok = self.check_ips(res, p, vs, widen=deny != (p[-1] == "notValues")) and ok
                elif key == "destination.port":
                    ok = self.check_ports(res, p, vs) and ok
                elif key == "source.serviceAccount":
                    ok = self.check_service_accounts(res, p, vs) and ok
                elif key == "source.principal":
                    ok = self.check_principals(res, p, vs) and ok
                elif key == "source.namespace":
                    ok = self.check_regex_values(res, p, vs, "namespace") and ok
                else:
                    ok = self.check_patterns(res, p, vs) and ok
            return _Condition(where, field_name, values, not_values) if ok else None
        if key.startswith(_UNVERIFIABLE_KEYS) and not _known_unverifiable(key):
            self.error(res, kpath, f"unknown condition key {key!r}: Istio rejects the policy")
            return None
        if key.startswith(_UNVERIFIABLE_KEYS):
            what = "a JWT claim" if key.startswith("request.auth.") else "experimental Envoy filter metadata"
            self.unverifiable(res, kpath, f"{key!r} reads {what}", deny)
            return UNVERIFIABLE
        if key.startswith("destination.labels") or key == "destination.namespace":
            self.error(res, kpath, f"{key!r} is replaced by the selector and metadata.namespace in Istio, "
                       "which rejects it")
        else:
            self.error(res, kpath, f"unknown condition key {key!r} (see Istio's authorization policy conditions)")
        return None


_SOURCE_ORDER = ("principals", "notPrincipals", "trustDomains", "notTrustDomains", "namespaces", "notNamespaces",
                 "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks", "remoteIpBlocks",
                 "notRemoteIpBlocks")


def _source_order(key: str) -> int:
    return _SOURCE_ORDER.index(key)


def _template_regex(value: str) -> str:
    """RE2 for an Istio {*}/{**} template as Envoy's URI template matcher builds it."""
    one, rest = f"[{paths.SEGMENT_CHARS}]+", f"[{paths.SEGMENT_CHARS}/]*"
    return "^" + "/".join({"{*}": one, "{**}": rest}.get(s, re.escape(s)) for s in value.split("/")) + "$"


def _cel_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _any_of(var: str, patterns: list[str]) -> str:
    """CEL for Istio's string forms: exact, 'prefix*', '*suffix', '*' (non-empty)."""
    parts = []
    for p in patterns:
        if p == "*":
            parts.append(f'{var} != ""')
        elif p.startswith("*"):
            parts.append(f"{var}.endsWith({_cel_str(p[1:])})")
        elif p.endswith("*"):
            parts.append(f"{var}.startsWith({_cel_str(p[:-1])})")
        else:
            parts.append(f"{var} == {_cel_str(p)}")
    return " || ".join(parts)


def _dotted(path: YPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "document"


# --- the whole import -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Imported:
    manifest: dict[str, Any]
    policies: list[dict[str, Any]]
    notes: list[str]  # what the command chose on its own, for stderr


def convert(resources: list[_Resource], opts: Options) -> Imported:
    """The bundle for ``resources``; raises IstioImportError listing every problem."""
    mesh = resolve_mesh(resources, opts)
    conv = _Converter(opts, mesh)
    policies: list[dict[str, Any]] = []
    seen: set[str] = set()
    for res in resources:
        if _is_mesh_config(res):
            continue
        for policy in conv.policies(res):
            if policy["name"] in seen:
                conv.error(res, ("metadata", "name"), f"policy {policy['name']} is defined twice")
                continue
            seen.add(policy["name"])
            policies.append(policy)
    if not conv.problems and not policies:
        conv.problems.append(Problem(resources[0].at(()) if resources else Position("input", 1, 1),
                                     "no AuthorizationPolicy in the input: a bundle without policies "
                                     "would deny everything"))
    if conv.problems:
        raise IstioImportError(conv.problems)
    manifest: dict[str, Any] = {
        "apiVersion": "authz/v1",
        "kind": "Bundle",
        "name": opts.name,
        "revision": opts.revision,
        "description": (
            IMPORTED_MARK + " "
            + ("defaultAction DENY was asked for (--default-deny): a workload no ALLOW policy selects "
               "is denied, unlike in Istio." if opts.default_deny else
               "defaultAction ALLOW keeps Istio's rule: a workload that no ALLOW policy selects "
               "accepts every request no DENY policy denies.")
        ),
        "trustDomain": mesh.trust_domain,
    }
    if mesh.aliases:
        manifest["trustDomainAliases"] = list(mesh.aliases)
    manifest["defaultAction"] = "DENY" if opts.default_deny else "ALLOW"
    if mesh.path_normalization is not None:
        manifest["pathNormalization"] = mesh.path_normalization
    if opts.xff_trusted_hops:
        manifest["xffTrustedHops"] = opts.xff_trusted_hops
    return Imported(manifest, policies, [mesh.note, *conv.notes])


def import_files(paths: list[Path], out_dir: Path, opts: Options, force: bool = False) -> tuple[list[Path], list[str]]:
    """Convert ``paths`` and write the bundle into ``out_dir``; (files written, notes for the user)."""
    result = convert(read_resources(paths), opts)
    if (out_dir / "bundle.yaml").exists() and not force:
        raise IstioImportError([Problem(Position(str(out_dir / "bundle.yaml"), 1, 1),
                                        "a bundle is already there (use --force to replace it)")])
    (out_dir / "policies").mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bundle.yaml"]
    written[0].write_text(_dump(result.manifest), encoding="utf-8")
    for policy in result.policies:
        path = out_dir / "policies" / f"{policy['name']}.yaml"
        path.write_text(_dump(policy), encoding="utf-8")
        written.append(path)
    return written, result.notes


def _dump(value: dict[str, Any]) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100)


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="YAML files with AuthorizationPolicy resources (lists and multi-document files too; "
                             "'-' reads standard input); Istio's 'istio' ConfigMap among them gives the trust "
                             "domain, its aliases and the path normalisation")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="bundle directory to write")
    parser.add_argument("--workload", action="append", default=[], metavar="LABELS=TARGET",
                        help="a workload selectors may pick, known by its principal "
                             "('app=orders,version=v1=spiffe://cluster.local/ns/prod/sa/orders'), or, for plaintext "
                             "traffic, by host ('app=orders=host:orders.prod.svc.cluster.local', "
                             "'...=host:HOST@NAMESPACE') or destination port ('app=orders=port:8080@prod'); repeatable")
    parser.add_argument("--trust-domain", default=None,
                        help="the mesh's trust domain (default: from the input, see the docs; said on stderr)")
    parser.add_argument("--trust-domain-alias", action="append", default=[], metavar="TD")
    parser.add_argument("--root-namespace", default=None,
                        help="Istio's root namespace: its policies apply mesh-wide (default: the mesh config's "
                             "rootNamespace, else istio-system)")
    parser.add_argument("--default-namespace", default="default",
                        help="namespace of resources that name none (default 'default', as kubectl)")
    parser.add_argument("--default-deny", action="store_true",
                        help="write defaultAction: DENY instead of Istio's ALLOW for workloads no ALLOW policy selects")
    parser.add_argument("--name", default="istio-import", help="bundle name")
    parser.add_argument("--revision", default="1", help="bundle revision")
    parser.add_argument("--force", action="store_true", help="replace a bundle already in DIR")
    parser.add_argument("--xff-trusted-hops", type=_hops, default=0, metavar="N",
                        help="the gateway's numTrustedProxies (Envoy xff_num_trusted_hops): which "
                             "x-forwarded-for entry remoteIpBlocks read (default 0)")


def _hops(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 16:
        raise argparse.ArgumentTypeError(f"not a number of hops from 0 to 16: {text!r}")
    return int(text)


def cli(args: argparse.Namespace) -> int:
    """Exit 0 with the bundle written, 1 when something cannot be translated, 2 on usage errors."""
    from authz.bundle.loader import BundleError
    from authz.engine.compile import load_policy_set

    opts = Options(trust_domain=args.trust_domain, trust_domain_aliases=tuple(args.trust_domain_alias),
                   root_namespace=args.root_namespace, default_namespace=args.default_namespace,
                   default_deny=args.default_deny, name=args.name, revision=args.revision,
                   xff_trusted_hops=args.xff_trusted_hops)
    try:
        opts.workloads = [parse_workload(w) for w in args.workload]
    except ValueError as exc:
        print(f"authz import-istio: {exc}", file=sys.stderr)
        return 2
    try:
        written, notes = import_files(args.files, args.output, opts, force=args.force)
    except UsageError as exc:
        print(f"authz import-istio: {exc}", file=sys.stderr)
        return 2
    except IstioImportError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        print(f"authz import-istio: {len(exc.problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    for note in notes:
        print(f"authz import-istio: {note}", file=sys.stderr)
    try:
        ps = load_policy_set(args.output)
    except BundleError as exc:  # a bug here, not in the input: say so loudly
        print(f"authz import-istio: the written bundle does not load:\n{exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files to {args.output}: bundle {ps.name} with {len(ps.policies)} policies, "
          f"defaultAction {'ALLOW' if ps.default_allow else 'DENY'}")
    return 0
