r"""Tenant isolation against public path-attack corpora (review 10).

acme's caller (spiffe://cluster.local/ns/prod/sa/checkout) sends every corpus spelling of a path
that climbs from acme's data into globex's; authz decides it with the native tenant bundle
(ALLOW /v1/tenants/{tenant}/{**}, tenant from the path capture, `source.principal in
tenant.callers`) under the mesh default (BASE) and the shipped Envoy's normalisation
(MERGE_SLASHES). For every path authz allows, independent models of what an upstream makes of
the path the proxy forwards (Envoy with the shipped options, nginx, Tomcat/Spring; not
authz.paths, so the check is not circular) must still name tenant acme.

Corpus sources (spellings re-typed, no file copied): PayloadsAllTheThings "Directory Traversal"
(MIT), OWASP path traversal / WSTG-ATHZ-01 (CC BY-SA 4.0), Envoy CVE-2019-9901 and
CVE-2021-29492, Istio CVE-2021-31920, Spring/Tomcat/Shiro ';' (CVE-2020-1957, CVE-2016-9879),
IIS %u and trailing dots, Windows best-fit (DEVCORE "WorstFit", 2025). See path_attack_corpus.py.
The corpus itself is in path_attack_corpus.py, next to this file.
"""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import pytest
from bundle_factory import check_request, policy_set, spiffe
from path_attack_corpus import PREFIXES, segment_tricks, traversals

from authz.request import MalformedRequest, from_check_request

ACME = spiffe("prod", "checkout")
GLOBEX = spiffe("ops", "admin")
POLICY = {"name": "orders", "action": "ALLOW", "tenant": {"pathCapture": "tenant"},
          "rules": [{"name": "callers", "to": [{"operation": {"paths": ["/v1/tenants/{tenant}/{**}"]}}],
                     "when": ["source.principal in tenant.callers"]}]}
TENANTS = {"acme": {"callers": [ACME]}, "globex": {"callers": [GLOBEX]}}


def corpus() -> list[str]:
    out: list[str] = []
    for t in traversals():
        out += [f"/v1/tenants/acme/orders/{t}{t}globex/orders", f"/v1/tenants/acme/{t}globex/orders",
                f"/v1/tenants/acme/orders/x/{t}{t}{t}globex/orders"]
    for s in segment_tricks("globex"):
        out += [f"/v1/tenants/{s}/orders", f"/v1/tenants/acme/../{s}/orders", f"/v1/tenants/acme/{s}/orders"]
    for p in PREFIXES:
        out += [f"/v1/tenants/acme{p}globex/orders", f"/v1/tenants/acme/orders{p}..{p}globex/x"]
    out += ["/v1/tenants/acme%2f..%2fglobex/orders", "/v1/tenants/acme;/../globex/orders",
            "/v1/tenants/globex;acme/orders", "/v1/tenants/acme;globex/orders", "/v1/tenants/acme/..;/globex/orders",
            "/v1/tenants/acme/orders?/../../globex", "/v1/tenants/acme/orders#/../../globex",
            "/v1/tenants/acme/orders/..\u2215..\u2215globex/x", "/v1/tenants/acme/orders/\uff0e\uff0e/\uff0e\uff0e/globex/x",
            "/v1/tenants/\uff47lobex/orders", "/v1/tenants/GLOBEX/orders", "/v1/tenants/acme/orders/..%2F..%2F..%2Ftenants%2Fglobex",
            "/v1/tenants/acme/%2e%2e%2f%2e%2e%2fglobex/x", "/v1/tenants/acme/orders/%252e%252e/%252e%252e/globex/x",
            "/v1/tenants/acme/orders/%c0%ae%c0%ae/%c0%ae%c0%ae/globex/x", "/v1/tenants/acme/orders/..%c0%af..%c0%afglobex/x",
            "/v1/tenants/acme/orders/%u002e%u002e/%u002e%u002e/globex/x", "/v1/tenants/acme/orders/..%00/..%00/globex/x",
            "/v1/tenants/acme/orders/..%0d%0a/..%09/globex/x", "/v1/tenants/acme/x/..%3b/..%3b/globex/x",
            "/v1/tenants/acme/orders/%3b/../../globex/x", "/v1/tenants/acme/orders;%2f..%2f..%2fglobex/x"]
    return list(dict.fromkeys(out))


# --- independent upstream models -----------------------------------------------------

def _pct_non_ascii(p: str) -> str:
    return "".join(c if c.isascii() else urllib.parse.quote(c, safe="") for c in p)


def _dots(p: str) -> str:
    out: list[str] = []
    segs = p.split("/")[1:]
    for i, s in enumerate(segs):
        if s in (".", ".."):
            if s == ".." and out:
                out.pop()
            if i == len(segs) - 1:
                out.append("")
            continue
        out.append(s)
    return "/" + "/".join(out)


def _merge(p: str) -> str:
    return re.sub("/{2,}", "/", p)


_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def envoy(raw: str, shipped: bool) -> str | None:
    """The path Envoy forwards: normalize_path (mesh default BASE); shipped deploy/envoy/envoy.yaml
    also merges slashes and rejects escaped slashes. Query and fragment dropped (no upstream
    model routes on them)."""
    if "#" in raw:
        return None  # Envoy refuses a fragment in the request target
    p = _pct_non_ascii(raw.split("?", 1)[0])
    if shipped and re.search(r"%(2f|5c)", p, re.I):
        return None
    p = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)) if chr(int(m[1], 16)) in _UNRESERVED else m[0],
               p.replace("\\", "/"))
    p = _dots(p)
    return _merge(p) if shipped else p


def nginx(p: str) -> str | None:
    """ngx_http_parse_complex_uri: every %XX decoded (%2F too), // merged, dot segments resolved."""
    try:
        d = urllib.parse.unquote(p, errors="strict")
    except UnicodeDecodeError:
        d = urllib.parse.unquote_to_bytes(p).decode("latin-1")
    if "\x00" in d:
        return None
    return _dots(_merge(d))


def tomcat_spring(p: str) -> list[str]:
    """Tomcat: ';params' removed, then decoded (its %2F/%5C rejection not modelled: stricter),
    normalised; Spring with alwaysUseFullPath=false may decode first: both orders."""
    strip = lambda s: re.sub(r";[^/]*", "", s)  # noqa: E731
    dec = lambda s: urllib.parse.unquote(s, errors="replace")  # noqa: E731
    return [_dots(_merge(dec(strip(p)))), _dots(_merge(strip(dec(p))))]


def tenant_of(p: str | None) -> str | None:
    if p is None:
        return None
    m = re.match(r"/v1/tenants/([^/]*)(/|$)", p)
    return m.group(1) if m else None


@pytest.fixture(scope="module", params=["BASE", "MERGE_SLASHES"])
def ps(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return policy_set(tmp_path_factory.mktemp(request.param), [POLICY], tenants=TENANTS,
                      pathNormalization=request.param)


def _decide(ps, path: str, principal: str):
    try:
        req = from_check_request(check_request(path=path, principal=principal), ps.trust_domains, ps.path_normalization)
    except MalformedRequest:
        return None
    return ps.decide(req)


def test_corpus_never_reaches_globex(ps) -> None:
    leaks, allowed = [], 0
    for raw in corpus():
        # authz behind the proxy gets what Envoy forwards; decide both that and the raw path
        shipped = ps.path_normalization == "MERGE_SLASHES"
        fwd = envoy(raw, shipped)  # what the proxy in front hands authz and the upstream
        if fwd is None:
            continue  # the proxy refuses it: nothing reaches authz or the upstream
        for sent in {raw, fwd}:  # raw: authz normalises it itself (engine level)
            d = _decide(ps, sent, ACME)
            if d is None or not d.allowed:
                continue
            allowed += 1
            assert d.policy == "orders"
            seen = [fwd, nginx(fwd), *tomcat_spring(fwd)]
            for up in seen:
                t = tenant_of(up)
                if t is not None and t != "acme":
                    leaks.append((raw, sent, up))
    assert not leaks, "\n".join(map(repr, leaks))
    assert allowed > 20  # the ordinary spellings of acme's own paths are still allowed


def test_globex_caller_is_not_helped_by_acme_spellings(ps) -> None:
    """Sanity: the policy works at all (globex's caller reaches globex, not acme)."""
    assert _decide(ps, "/v1/tenants/globex/orders", GLOBEX).allowed
    assert not _decide(ps, "/v1/tenants/globex/orders", ACME).allowed
    assert not _decide(ps, "/v1/tenants/acme/orders", GLOBEX).allowed
