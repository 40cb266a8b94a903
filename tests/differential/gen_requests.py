#!/usr/bin/env python3
"""Derive a request set from Istio AuthorizationPolicies (an `-in.yaml`, several documents
allowed) that exercises each rule's positive and negative cases, for oracle.py.

    gen_requests.py --pair allow-full-rule --output reqs.jsonl --coverage cov.json
    gen_requests.py --in my-policy.yaml --trust-domain td1 --alias cluster.local

For every rule and every (from[i], to[j]) combination it builds a *base* request that meets
every constraint it can drive, then varies one dimension at a time over values derived from
the rule (each listed value, matching/missing instances of prefix `x*`, suffix `*x` and
presence `*`, case variants, normalisation variants of paths, X-Forwarded-For for remote IPs,
...), plus a few requests outside every rule. At most --max requests (default 200), taken
round-robin over rules and dimensions so each keeps some coverage.

A rule whose positive case needs something this harness cannot produce is marked
"undrivable" in the coverage file with the reasons, and no positive request is claimed for
it (its near-misses are still sent):
  * request principals / request.auth.* (need JWT filter metadata),
  * experimental.envoy.filters.* (filter metadata),
  * ipBlocks / source.ip / destination.ip other than 127.0.0.1 (loopback only),
  * methods that are not HTTP tokens and paths not starting with "/" (Envoy's codecs reject them),
  * principals/namespaces/service accounts that contradict each other.
Ports are assumed bindable here; oracle.py skips requests whose port it cannot bind.

The model of Istio's matching in this file only chooses inputs and labels intents; the
decision is always Envoy's (oracle.py).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import pathlib
import re
import sys
from dataclasses import dataclass, field, replace

import yaml

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "pairs"
WORKLOAD_LABELS = {"app": "httpbin", "version": "v1"}
WORKLOAD_NS = "foo"
ROOT_NS = "istio-system"
DEFAULT_HOST = "httpbin.foo.svc.cluster.local"
LOOPBACK = ipaddress.ip_address("127.0.0.1")
# Methods Envoy 1.40's HTTP/1 codec was seen to accept (it answers 400 http1.codec_error to
# others, e.g. FOO, get, M-SEARCH); every other token method goes over HTTP/2 (see README).
HTTP1_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "COPY", "LOCK",
                 "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "REPORT", "PURGE",
                 "NOTIFY", "SUBSCRIBE", "LINK", "MKCALENDAR"}
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
MAX_UNSENDABLE = 6   # requests per pair that Envoy's codecs reject (non-token method, ...)


# ---------------------------------------------------------------- Istio string matching
def wkind(v: str) -> tuple[str, str]:
    if v == "*":
        return "any", ""
    if v.endswith("*"):
        return "prefix", v[:-1]
    if v.startswith("*"):
        return "suffix", v[1:]
    return "exact", v


def wmatch(v: str, s: str | None, ci: bool = False) -> bool:
    if s is None:
        return False
    k, x = wkind(v)
    if ci:
        s, x = s.lower(), x.lower()
    return {"any": s != "", "prefix": s.startswith(x), "suffix": s.endswith(x), "exact": s == x}[k]


def wre(v: str) -> str:
    k, x = wkind(v)
    return {"any": ".*", "prefix": re.escape(x) + ".*", "suffix": ".*" + re.escape(x), "exact": re.escape(x)}[k]


def winstances(v: str, fill: str = "x") -> list[str]:
    """Strings that match (first ones) and narrowly miss the Istio wildcard value v."""
    k, x = wkind(v)
    if k == "any":
        return [fill]
    if k == "prefix":
        return [x + fill, x] + ([x[:-1]] if x else [])
    if k == "suffix":
        return [fill + x, x] + ([x[1:]] if x else [])
    return [x, x + "-" + fill]


# ---------------------------------------------------------------- request model
@dataclass(frozen=True)
class Req:
    principal: str = ""
    method: str = "GET"
    path: str = "/"
    host: str = DEFAULT_HOST
    port: int | None = None
    headers: tuple = ()          # ((name, value), ...) — "header" dimension (from when-conditions)
    xff: str | None = None        # X-Forwarded-For value
    sni: str | None = None
    protocol: str | None = None   # forced protocol; None = choose from the method

    def proto(self) -> str:
        return self.protocol or ("http1" if self.method in HTTP1_METHODS else "h2")

    def to_json(self) -> dict:
        hdrs: dict = {}
        for k, v in self.headers:
            if k in hdrs:
                hdrs[k] = (hdrs[k] if isinstance(hdrs[k], list) else [hdrs[k]]) + [v]
            else:
                hdrs[k] = v
        if self.xff is not None:
            hdrs["x-forwarded-for"] = self.xff
        d = {"principal": self.principal, "method": self.method, "path": self.path, "host": self.host,
             "headers": hdrs}
        if self.port is not None:
            d["port"] = self.port
        if self.sni:
            d["sni"] = self.sni
        d["protocol"] = self.proto()
        return d


def header_values(req: Req, name: str) -> list[str]:
    # A repeated header matches when any one of its values does (Envoy 1.40 RBAC, measured:
    # "X: nope" + "X: abc1" matches exact abc1, a single "X: nope,abc1" does not).
    return [v.strip() for k, v in req.headers if k.lower() == name.lower()]


def remote_ip(req: Req):
    """Sidecar inbound: use_remote_address=false, 0 trusted hops -> last X-Forwarded-For entry."""
    if req.xff:
        try:
            return ipaddress.ip_address(req.xff.split(",")[-1].strip())
        except ValueError:
            return LOOPBACK
    return LOOPBACK


def in_blocks(ip, blocks) -> bool:
    for b in blocks:
        try:
            if ip in ipaddress.ip_network(b, strict=False):
                return True
        except ValueError:
            continue
    return False


UNRESERVED_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def norm_path(p: str) -> str:
    """Rough model of Envoy normalize_path (RFC 3986: percent-encoded unreserved characters
    decoded, dot segments removed) + urlPath (query stripped)."""
    p = p.split("?", 1)[0].split("#", 1)[0]
    p = UNRESERVED_PCT.sub(lambda m: chr(int(m.group(1), 16))
                           if re.match(r"[A-Za-z0-9._~-]", chr(int(m.group(1), 16))) else m.group(0), p)
    out = []
    for seg in p.split("/")[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out) if p.startswith("/") else p


def path_match(v: str, p: str) -> bool:
    p = norm_path(p)
    if "{" in v:
        rx = "".join("[^/]+" if t == "{*}" else ".*" if t == "{**}" else re.escape(t)
                     for t in re.split(r"(\{\*\*\}|\{\*\})", v))
        return re.fullmatch(rx, p) is not None
    return wmatch(v, p)


# ---------------------------------------------------------------- constraints
@dataclass
class Check:
    """One Istio field (values OR-ed, optionally negated) over one request dimension."""
    dim: str          # a DIMS entry, or "fixed" (depends on nothing we can vary)
    field: str
    values: list
    negate: bool
    pred: callable    # (value, req) -> bool
    undrivable: str | None = None   # why a *positive* match cannot be produced

    def ok(self, req: Req) -> bool:
        hit = any(self.pred(v, req) for v in self.values)
        return not hit if self.negate else hit


@dataclass
class Ctx:
    tds: list          # trust domain first, then aliases
    ns: str            # policy namespace


def td_variants(v: str, tds: list) -> list[str]:
    head, sep, rest = v.partition("/")
    if sep and head in tds:
        return [t + "/" + rest for t in tds]
    return [v]


def principal_pred(ctx):
    def f(v, req):
        p = req.principal
        if not p:
            return False
        if v == "*":
            return True
        return p.startswith("spiffe://") and any(wmatch(c, p[9:]) for c in td_variants(v, ctx.tds))
    return f


def ns_pred(v, req):
    return bool(req.principal) and re.fullmatch(".*/ns/" + wre(v) + "/.*", req.principal) is not None


def sa_pred(ctx):
    def f(v, req):
        ns, _, sa = v.rpartition("/")
        ns = ns or ctx.ns
        rx = f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?"
        return bool(req.principal) and re.fullmatch(rx, req.principal) is not None
    return f


def td_pred(v, req):
    m = re.match(r"spiffe://([^/]*)/", req.principal or "")
    return m is not None and wmatch(v, m.group(1))


def never(v, req):
    return False


JWT = "needs a JWT (request principal / request.auth.* come from jwt_authn metadata)"
SOURCE_FIELDS = {
    "principals": "principal", "notPrincipals": "principal", "namespaces": "ns", "notNamespaces": "ns",
    "serviceAccounts": "sa", "notServiceAccounts": "sa", "trustDomains": "td", "notTrustDomains": "td",
    "requestPrincipals": "jwt", "notRequestPrincipals": "jwt", "ipBlocks": "direct", "notIpBlocks": "direct",
    "remoteIpBlocks": "remote", "notRemoteIpBlocks": "remote",
}
OP_FIELDS = {"methods": "method", "notMethods": "method", "paths": "path", "notPaths": "path",
             "hosts": "host", "notHosts": "host", "ports": "port", "notPorts": "port"}


def make_check(kind: str, fname: str, values: list, negate: bool, ctx: Ctx) -> Check:
    values = [str(v) for v in values]
    if kind == "principal":
        return Check("principal", fname, values, negate, principal_pred(ctx))
    if kind == "ns":
        return Check("principal", fname, values, negate, ns_pred)
    if kind == "sa":
        return Check("principal", fname, values, negate, sa_pred(ctx))
    if kind == "td":
        return Check("principal", fname, values, negate, td_pred)
    if kind == "jwt":
        return Check("fixed", fname, values, negate, never, JWT)
    if kind == "meta":
        return Check("fixed", fname, values, negate, never, "needs filter metadata set by another filter")
    if kind == "direct":
        c = Check("fixed", fname, values, negate, lambda v, r: in_blocks(LOOPBACK, [v]))
        c.undrivable = "the direct peer is always 127.0.0.1"
        return c
    if kind == "dstip":
        c = Check("fixed", fname, values, negate, lambda v, r: in_blocks(LOOPBACK, [v]))
        c.undrivable = "the destination address is always 127.0.0.1"
        return c
    if kind == "remote":
        return Check("xff", fname, values, negate, lambda v, r: in_blocks(remote_ip(r), [v]))
    if kind == "method":
        return Check("method", fname, values, negate, lambda v, r: wmatch(v, r.method))
    if kind == "path":
        return Check("path", fname, values, negate, lambda v, r: path_match(v, r.path))
    if kind == "host":
        return Check("host", fname, values, negate, lambda v, r: wmatch(v, r.host, ci=True))
    if kind == "port":
        return Check("port", fname, values, negate, lambda v, r: v.isdigit() and r.port == int(v))
    if kind == "sni":
        return Check("sni", fname, values, negate, lambda v, r: bool(r.principal) and wmatch(v, r.sni or ""))
    if kind.startswith("header:"):
        name = kind.split(":", 1)[1]
        c = Check("header", fname, values, negate, lambda v, r: any(wmatch(v, x) for x in header_values(r, name)))
        c.header = name
        return c
    return Check("fixed", fname, values, negate, never, f"unsupported condition {fname}")


def condition_kind(key: str) -> str:
    m = re.fullmatch(r"request\.headers\[(.+)\]", key)
    if m:
        return "header:" + m.group(1)
    return {"source.principal": "principal", "source.namespace": "ns", "source.ip": "direct",
            "remote.ip": "remote", "destination.ip": "dstip", "destination.port": "port",
            "connection.sni": "sni", "source.serviceAccount": "sa"}.get(
        key, "jwt" if key.startswith("request.auth.") else "meta" if key.startswith("experimental.") else "?")


def rule_checks(rule: dict, ctx: Ctx):
    """-> (list of source check-lists, list of operation check-lists, condition checks)."""
    froms = []
    for f in rule.get("from") or []:
        src = f.get("source") or {}
        froms.append([make_check(SOURCE_FIELDS[k], k, v, k.startswith("not"), ctx)
                      for k, v in src.items() if k in SOURCE_FIELDS and v])
        unknown = [k for k in src if k not in SOURCE_FIELDS]
        for k in unknown:
            froms[-1].append(Check("fixed", k, [], False, never, f"unsupported source field {k}"))
    tos = []
    for t in rule.get("to") or []:
        op = t.get("operation") or {}
        tos.append([make_check(OP_FIELDS[k], k, v, k.startswith("not"), ctx)
                    for k, v in op.items() if k in OP_FIELDS and v])
    conds = []
    for c in rule.get("when") or []:
        kind = condition_kind(c["key"])
        if c.get("values"):
            conds.append(make_check(kind, f"when {c['key']}", c["values"], False, ctx))
        if c.get("notValues"):
            conds.append(make_check(kind, f"when {c['key']} notValues", c["notValues"], True, ctx))
    return froms or [[]], tos or [[]], conds


# ---------------------------------------------------------------- candidate values
def principal_candidates(checks: list[Check], ctx: Ctx) -> list[str]:
    td = ctx.tds[0]
    ns_vals = [v for c in checks if c.field in ("namespaces", "notNamespaces", "when source.namespace",
                                              "when source.namespace notValues") for v in c.values]
    ns_inst = [i for v in ns_vals for i in winstances(v)][:6] or ["foo"]
    out = []
    for c in checks:
        if c.dim != "principal":
            continue
        for v in c.values:
            if c.pred.__name__ == "ns_pred" or c.field.endswith("amespaces") or "namespace" in c.field:
                out += [f"spiffe://{td}/ns/{i}/sa/sleep" for i in winstances(v)]
            elif "erviceAccount" in c.field:
                ns, _, sa = v.rpartition("/")
                ns = ns or ctx.ns
                out += [f"spiffe://{td}/ns/{ns}/sa/{sa}", f"spiffe://{td}/ns/{ns}/sa/{sa}-x",
                        f"spiffe://{td}/ns/{ns}-x/sa/{sa}", f"spiffe://{td}/ns/{ns}/x/sa/{sa}/y"]
            elif "rustDomain" in c.field:
                out += [f"spiffe://{i}/ns/foo/sa/sleep" for i in winstances(v)]
            else:  # principals / source.principal
                for tv in td_variants(v, ctx.tds):
                    k, x = wkind(tv)
                    out += ["spiffe://" + i for i in winstances(tv)]
                    if k != "exact":  # wildcard principal: also forms that carry each namespace
                        for n in ns_inst:
                            out.append({"any": f"spiffe://{td}/ns/{n}/sa/x", "prefix": f"spiffe://{x}x/ns/{n}/sa/x",
                                        "suffix": f"spiffe://{td}/ns/{n}/sa/x{x}"}[k])
                if v != "*":   # case matters for principals
                    out.append("spiffe://" + winstances(td_variants(v, ctx.tds)[0])[0].upper())
    return dedupe(out + [""])


def path_candidates(values: list[str]) -> list[str]:
    out = []
    for v in values:
        k, x = wkind(v)
        if "{" in v:
            one = re.sub(r"\{\*\*\}", "a/b", re.sub(r"\{\*\}", "a", v))
            out += [one, re.sub(r"\{\*\*\}", "a", re.sub(r"\{\*\}", "a/b", v)),
                    re.sub(r"/?\{\*\*?\}", "", v) or "/", one + "?q={x}"]
        elif not v.startswith("/") and k == "exact":
            out += [v, "/" + v]               # not an origin-form target: Envoy answers 400
        elif k == "exact":
            out += [v, v + "?q=1", v + "/", v.upper(), "/x/.." + v, "/" + v, v + "%2F", v[:-1] + "%" + format(ord(v[-1]), "02X")]
        elif k == "prefix":
            out += [x + "x", x, x + "x/y?z=1", x.rstrip("/") or "/-", x.upper() + "x", x + "../x", x + "%2e%2e/x"]
        elif k == "suffix":
            out += ["/a" + x, x if x.startswith("/") else "/" + x, "/a" + x + "?q=1", "/a" + x + "/", "/a" + x.upper()]
        else:
            out += ["/any/path"]
    return dedupe(out)


def host_candidates(values: list[str]) -> list[str]:
    out = []
    for v in values:
        k, x = wkind(v)
        if k == "exact":
            out += [x, x.upper(), x + ":80", "x" + x, x + "x"]
        elif k == "suffix":
            out += ["a" + x, ("a" + x).upper(), x, x[1:], "a" + x + ":8080"]
        elif k == "prefix":
            out += [x + "x", (x + "x").upper(), x[:-1], x + "x:80"]
        else:
            out += ["anything.example"]
    return dedupe(out)


def method_candidates(values: list[str]) -> list[str]:
    out = []
    for v in values:
        k, x = wkind(v)
        if k == "exact" and not TOKEN.match(x):
            out += [x]            # cannot be sent anyway; no case variant
        elif k == "exact":
            out += [x] + ([x.lower()] if x.lower() != x else [x.upper()] if x.upper() != x else [])
        else:
            out += winstances(v, "X")
    return dedupe(out)


def ip_candidates(values: list[str]) -> list[str]:
    out = []
    for v in values:
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            continue
        inside = net.network_address + (1 if net.num_addresses > 2 else 0)
        out += [str(inside), str(net.broadcast_address + 1)]
    if out:
        out += [f"203.0.113.9, {out[0]}", f"{out[0]}, 203.0.113.9"]  # only the last entry counts
    return dedupe(out)


def dedupe(xs):
    seen, out = set(), []
    for x in xs:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def candidates(dim: str, checks: list[Check], ctx: Ctx, header: str | None = None) -> list:
    vals = [v for c in checks if c.dim == dim and (header is None or getattr(c, "header", None) == header)
            for v in c.values]
    if dim == "principal":
        return principal_candidates([c for c in checks if c.dim == "principal"], ctx)
    if dim == "method":
        return method_candidates(vals)
    if dim == "path":
        return path_candidates(vals)
    if dim == "host":
        return host_candidates(vals)
    if dim == "port":
        return dedupe([int(v) for v in vals if v.isdigit()] + [None])
    if dim == "xff":
        return ip_candidates(vals) + [None]
    if dim == "sni":
        return dedupe([i for v in vals for i in winstances(v)] + [None])
    if dim == "header":
        out = []
        for v in vals:
            out += [((header, i),) for i in winstances(v)]
        if vals:
            k, x = wkind(vals[0])
            out += [((header.lower(), winstances(vals[0])[0]),), ((header, ""),),
                    ((header, "nope"), (header, winstances(vals[0])[0]))]
        return dedupe(out + [()])
    return []


def apply(req: Req, dim: str, value) -> Req:
    if dim == "header":
        names = {k.lower() for k, _ in value} if value else set()
        keep = tuple((k, v) for k, v in req.headers if k.lower() not in names)
        return replace(req, headers=keep + tuple(value))
    return replace(req, **{dim: value})


def describe(dim: str, v) -> str:
    if dim == "header":
        return json.dumps([list(x) for x in v]) if v else "(absent)"
    if v in (None, ""):
        return {"principal": "(no client cert)", "xff": "(no XFF)", "port": "(default)",
                "sni": "(no SNI)"}.get(dim, repr(v))
    return str(v)


def sendable(req: Req) -> str | None:
    if not TOKEN.match(req.method):
        return f"method {req.method!r} is not an HTTP token (Envoy's codecs reject it)"
    if not req.path.startswith("/"):
        return f"path {req.path!r} does not start with '/' (Envoy answers 400)"
    if req.sni and not req.principal:
        return "SNI needs TLS, i.e. a principal"
    return None


def client_can_send(req: Req) -> bool:
    """Python's TLS client refuses SNI values with empty labels (e.g. '.suffix.com')."""
    return not req.sni or re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", req.sni) is not None


# ---------------------------------------------------------------- per rule
@dataclass
class RuleGen:
    rule_id: str
    action: str
    dry_run: bool
    base: list = field(default_factory=list)       # [(Req, intent)]
    variants: dict = field(default_factory=dict)   # dim -> [(Req, intent)]
    positive: bool = False
    reasons: list = field(default_factory=list)
    matches: callable = None                       # model: does the whole rule match a Req?
    froms: list = field(default_factory=list)
    tos: list = field(default_factory=list)
    conds: list = field(default_factory=list)


def header_names(checks):
    return dedupe([c.header for c in checks if c.dim == "header"])


def pick(dim, checks, ctx, base: Req, header=None):
    """First candidate value for `dim` that satisfies every check on that dimension."""
    mine = [c for c in checks if c.dim == dim and (header is None or getattr(c, "header", None) == header)]
    cands = candidates(dim, checks, ctx, header)
    if not mine:
        return None, True, cands
    current = getattr(base, dim) if dim != "header" else None
    blocked = None
    for v in ([current] if current not in (None, "") else []) + cands:  # keep the plain default if it fits
        r = apply(base, dim, v)
        if all(c.ok(r) for c in mine):
            if sendable(r) is None and client_can_send(r):
                return v, True, cands
            blocked = blocked or sendable(r) or f"SNI {r.sni!r} cannot be sent by the TLS client"
    return blocked, False, cands


def prepare_rule(rule_id: str, action: str, dry_run: bool, rule: dict, ctx: Ctx) -> RuleGen:
    g = RuleGen(rule_id, action, dry_run)
    g.froms, g.tos, g.conds = froms, tos, conds = rule_checks(rule, ctx)
    g.matches = lambda r: (any(all(c.ok(r) for c in f) for f in froms) and
                           any(all(c.ok(r) for c in t) for t in tos) and all(c.ok(r) for c in conds))
    return g


NEUTRAL_DIMS = ("principal", "method", "path", "host", "port", "xff")


def neutral_values(td: str) -> dict:
    return {"principal": [f"spiffe://{td}/ns/{WORKLOAD_NS}/sa/sleep", f"spiffe://{td}/ns/neutral/sa/neutral", ""],
            "method": ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"],
            "path": ["/", "/neutral", "/neutral/path"],
            "host": [DEFAULT_HOST, "neutral.example"],
            "port": [None], "xff": [None]}


def isolate(req: Req, checks: list, g: RuleGen, others: list, td: str, positive: bool) -> tuple[Req, bool]:
    """Move the dimensions this rule (branch) does not constrain to neutral values while that
    lowers the number of *other* rules the request matches, so that Envoy's matched-policy
    report names this rule and its near-misses are not masked by a broader rule."""
    constrained = {c.dim for c in checks}
    score = sum(o(req) for o in others)
    moved = False
    for dim, alts in neutral_values(td).items():
        if dim in constrained:
            continue
        for alt in alts:
            if score == 0:
                return req, moved
            r2 = apply(req, dim, alt)
            if r2 == req or sendable(r2) or (positive and not g.matches(r2)):
                continue
            sc2 = sum(o(r2) for o in others)
            if sc2 < score:
                req, score, moved = r2, sc2, True
    return req, moved


def fill_rule(g: RuleGen, ctx: Ctx, others: list) -> None:
    """Bases (positive or near-miss) per (from[i], to[j]) branch, isolated from the other
    rules, then one-dimension-at-a-time variants around each base."""
    rule_id, froms, tos, conds = g.rule_id, g.froms, g.tos, g.conds
    combos = [(i, 0) for i in range(len(froms))] + [(0, j) for j in range(1, len(tos))]
    for fi, tj in combos:
        checks = froms[fi] + tos[tj] + conds
        tag = f"{rule_id} from[{fi}] to[{tj}]"
        base, why = Req(principal=f"spiffe://{ctx.tds[0]}/ns/{WORKLOAD_NS}/sa/sleep"), []
        for c in checks:
            if c.dim == "fixed" and not c.ok(base):
                why.append(f"{c.field}: {c.undrivable or 'cannot be met'}")
        def unmet(fields, blocked):
            return f"{'/'.join(sorted(fields))}: " + (f"only unsendable values match ({blocked})" if blocked
                                                      else "contradictory, no value meets them all")

        for dim in ("principal", "method", "path", "host", "port", "xff"):
            v, ok, _ = pick(dim, checks, ctx, base)
            if not ok:
                why.append(unmet({c.field for c in checks if c.dim == dim}, v))
            elif v is not None:
                base = apply(base, dim, v)
        for h in header_names(checks):
            v, ok, _ = pick("header", checks, ctx, base, h)
            if ok and v is not None:
                base = apply(base, "header", v)
            elif not ok:
                why.append(unmet({f"request.headers[{h}]"}, None))
        if any(c.dim == "sni" for c in checks):
            if not base.principal:
                alt = [p for p in candidates("principal", checks, ctx) if p
                       and all(c.ok(replace(base, principal=p)) for c in checks if c.dim == "principal")]
                base = replace(base, principal=alt[0] if alt else "spiffe://cluster.local/ns/foo/sa/sleep")
            v, ok, _ = pick("sni", checks, ctx, base)
            if ok and v is not None:
                base = apply(base, "sni", v)
            elif not ok:
                why.append(unmet({"when connection.sni"}, v))
        if not why and not all(c.ok(base) for c in checks):
            why.append("constraints on the same dimension contradict each other")
        base, moved = isolate(base, checks, g, others, ctx.tds[0], positive=not why)
        iso = ", isolated from other rules" if moved else ""
        if not why:
            g.positive = True
            g.base.append((base, f"{tag}: positive{iso} (model: every constraint met)"))
            if base.proto() == "http1":
                g.base.append((replace(base, protocol="h2"), f"{tag}: positive{iso}, over HTTP/2"))
        else:
            g.reasons += [w for w in why if w not in g.reasons]
            g.base.append((base, f"{tag}: near-miss{iso} (positive undrivable)"))
        # one dimension at a time, over values taken from this rule
        dims = [("principal", None), ("method", None), ("path", None), ("host", None), ("port", None),
                ("xff", None), ("sni", None)] + [("header", h) for h in header_names(checks)]
        for dim, h in dims:
            mine = [c for c in checks if c.dim == dim and (h is None or getattr(c, "header", None) == h)]
            if not mine:
                continue
            for v in candidates(dim, checks, ctx, h):
                r = apply(base, dim, v)
                if dim == "sni" and v and not r.principal or not client_can_send(r):
                    continue
                hit = g.matches(r)
                bad = sendable(r)
                label = describe(dim, v)
                intent = f"{tag}: {dim}={label} (model: {'rule matches' if hit else 'rule misses'})"
                if bad:
                    intent += f" [unsendable: {bad}]"
                g.variants.setdefault((fi, tj, dim, h), []).append((r, intent))


# ---------------------------------------------------------------- policies
def applies(pol: dict) -> str | None:
    md, spec = pol.get("metadata") or {}, pol.get("spec") or {}
    if pol.get("kind") != "AuthorizationPolicy":
        return f"kind {pol.get('kind')} ignored"
    ns = md.get("namespace", "default")
    if ns not in (WORKLOAD_NS, ROOT_NS):
        return f"namespace {ns} does not hold the workload"
    if spec.get("targetRef") or spec.get("targetRefs"):
        return "targetRef policies do not bind to a sidecar"
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if any(WORKLOAD_LABELS.get(k) != v for k, v in labels.items()):
        return f"selector {labels} does not select app=httpbin,version=v1"
    if spec.get("action", "ALLOW") not in ("ALLOW", "DENY"):
        return f"action {spec.get('action')} is not enforced by the RBAC filter"
    return None


def generate(policies: list[dict], tds: list[str], max_requests: int = 200):
    coverage, gens = [], []
    has_allow_policy = False
    for pol in policies:
        md, spec = pol.get("metadata") or {}, pol.get("spec") or {}
        name, ns = md.get("name"), md.get("namespace", "default")
        dry = str((md.get("annotations") or {}).get("istio.io/dry-run", "false")).lower() == "true"
        skip = applies(pol)
        rules = spec.get("rules")
        entry = {"policy": f"{ns}/{name}", "action": spec.get("action", "ALLOW"), "dry_run": dry, "rules": []}
        if skip:
            entry["not_applicable"] = skip
        elif not rules:
            entry["note"] = ("ALLOW with no rules matches nothing (denies all)" if entry["action"] == "ALLOW"
                             else "no rules: matches nothing")
        coverage.append(entry)
        if skip:
            continue
        has_allow_policy |= entry["action"] == "ALLOW" and not dry
        ctx = Ctx(tds, ns)
        for i, rule in enumerate(rules or []):
            rid = f"ns[{ns}]-policy[{name}]-rule[{i}]"
            g = prepare_rule(rid, entry["action"], dry, rule or {}, ctx)
            g.ctx = ctx
            gens.append(g)
            entry["rules"].append(g)
    for g in gens:
        fill_rule(g, g.ctx, [h.matches for h in gens if h is not g])
    for e in coverage:
        e["rules"] = [{"rule": g.rule_id, "positive": "generated" if g.positive else "undrivable",
                       "reasons": g.reasons} for g in e["rules"]]
    # requests outside every rule
    td = tds[0]
    outside = [(Req(), "outside: no client cert"),
               (Req(principal=f"spiffe://{td}/ns/foo/sa/sleep"), "outside: plain GET /"),
               (Req(principal=f"spiffe://{td}/ns/unrelated/sa/other", method="POST", path="/unrelated",
                    host="unrelated.example"), "outside: unrelated POST"),
               (Req(principal="spiffe://other-td/ns/foo/sa/sleep", method="PUT", path="/x?y=z"),
                "outside: foreign trust domain"),
               (Req(principal=f"spiffe://{td}/ns/foo/sa/sleep", method="DELETE", path="/a/../b",
                    protocol="h2"), "outside: h2 DELETE")]
    # Fair selection under the cap: every rule's bases first, then rules take turns, each turn
    # one request from the rule's next (combo, dimension) queue. A request produced twice keeps
    # every intent.
    picked: dict[str, list] = {}
    unsendable = [0]

    def take(req, intent) -> bool:
        key = json.dumps(req.to_json(), sort_keys=True)
        if key in picked:
            picked[key][1].append(intent)
            return True
        if len(picked) >= max_requests:
            return False
        if sendable(req):
            # Envoy refuses these before RBAC (an HTTP/2 one costs ~1 s: Envoy closes the
            # connection only after its delayed-close timeout); a few document that per pair.
            if unsendable[0] >= MAX_UNSENDABLE:
                return False
            unsendable[0] += 1
        picked[key] = [req, [intent]]
        return True

    for g in gens:
        for r, i in g.base:
            take(r, i)
    per_rule = [[list(q) for q in g.variants.values()] for g in gens]
    turn = [0] * len(per_rule)
    while len(picked) < max_requests and any(any(qs) for qs in per_rule):
        for n, qs in enumerate(per_rule):
            live = [q for q in qs if q]
            if live:
                take(*live[turn[n] % len(live)].pop(0))
                turn[n] += 1
    for r, i in outside:
        take(r, i)
    dropped = sum(len(q) for qs in per_rule for q in qs)
    out = []
    for n, (r, intents) in enumerate(picked.values()):
        d = r.to_json()
        d["id"] = n
        d["intent"] = intents
        d["model"] = model_decision(r, gens, has_allow_policy)
        out.append(d)
    for e in coverage:
        for rr in e["rules"]:
            rr["requests"] = sum(1 for d in out if any(i.startswith(rr["rule"] + " ") for i in d["intent"]))
    return out, {"trust_domains": tds, "requests": len(out), "variants_dropped_by_cap": dropped,
                 "policies": coverage}


def model_decision(r: Req, gens: list, has_allow_policy: bool) -> str:
    """The generator's own (naive) expectation, for spotting surprises; Envoy decides."""
    if sendable(r):
        return "rejected"
    live = [g for g in gens if not g.dry_run]
    if any(g.action == "DENY" and g.matches(r) for g in live):
        return "deny"
    if not has_allow_policy:
        return "allow"
    return "allow" if any(g.action == "ALLOW" and g.matches(r) for g in live) else "deny"


def load_policies(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pair", help="test data pair name (reads NAME-in.yaml)")
    src.add_argument("--in", dest="inp", help="AuthorizationPolicy yaml (several documents allowed)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--trust-domain", default="cluster.local")
    ap.add_argument("--alias", action="append", default=[], help="trust domain alias (repeatable)")
    ap.add_argument("--max", type=int, default=200, help="cap on requests (default 200)")
    ap.add_argument("--output", default="-", help="requests JSON lines (default stdout)")
    ap.add_argument("--coverage", help="write rule coverage (driven/undrivable + reasons) JSON here")
    a = ap.parse_args(argv)
    path = a.inp or pathlib.Path(a.data_dir) / f"{a.pair}-in.yaml"
    reqs, cov = generate(load_policies(path), [a.trust_domain] + a.alias, a.max)
    f = sys.stdout if a.output == "-" else open(a.output, "w")
    for r in reqs:
        f.write(json.dumps(r) + "\n")
    if f is not sys.stdout:
        f.close()
    if a.coverage:
        pathlib.Path(a.coverage).write_text(json.dumps(cov, indent=2) + "\n")


if __name__ == "__main__":
    main()
