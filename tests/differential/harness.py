"""The two deciders of the differential test and the comparison of their answers.

Oracle: ``oracle.py`` runs a real Envoy with the RBAC filter(s) istiod emits for a pair's
``-in`` policy (``-out*`` files), configured like an Istio sidecar's inbound HTTP chain.

authz: the same ``-in`` policy through ``authz import-istio`` into a bundle, served by a real
``authz serve``, asked by a real Envoy whose listeners are the oracle's (same HCM path
settings, same TLS/plaintext filter chains, client certificates from the same kind of CA with
the principal as URI SAN) with an ext_authz filter in place of the RBAC filters: the one of the
shipped deploy/envoy/envoy.yaml (peer certificate forwarded, ...), so what the shipped config does
not send authz shows up here. Both Envoys answer 200 from a direct response when the request passes.

Every request is sent to both; the answers are compared request by request (``compare``).
Only 127.0.0.1 is used; every process is stopped when its run ends, also on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import io
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from e2e.harness import AuthzProcess, free_port

from authz.bundle.loader import BundleError
from authz.cli import main as authz_cli
from authz.engine.compile import load_policy_set

from . import gen_requests, oracle

HERE = Path(__file__).resolve().parent
PAIRS_DIR = HERE / "pairs"
REPO_ROOT = HERE.parents[1]
DOCS = REPO_ROOT / "docs" / "bundle-format.md"
SHIPPED_ENVOY = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
SHIPPED_ENVOY_HTTP = REPO_ROOT / "deploy" / "envoy" / "envoy-http.yaml"

WORKLOAD_NS = "foo"
WORKLOAD_LABELS = "app=httpbin,version=v1"
# Requests derived per pair by gen_requests.py (its own cap is 200); hand-written ones come on top.
MAX_GENERATED = 90
EXT_AUTHZ_TIMEOUT = "10s"  # generous: the machine is shared and loaded


# --- pairs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    trust_domain: str = "cluster.local"
    aliases: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    shipped: bool = False
    source: str = "own"
    extra: tuple[dict[str, Any], ...] = ()
    unsure: str = ""
    # authz rules (policy/rule) from which import-istio left a condition out (documented,
    # "Conditions ANDed into a field"): their denials are a documented stricter kind.
    left_out: tuple[str, ...] = ()
    port: int | None = None  # every request goes to this destination port
    workloads: tuple[str, ...] = ()  # more `--workload` targets of the workload: host:..., port:...
    # More HCM fields for both Envoys (e.g. http_protocol_options: {accept_http_10: true}, as
    # istiod sets with PILOT_HTTP10 / ISTIO_META_HTTP10), on top of Istio's BASE path options.
    hcm: tuple[tuple[str, Any], ...] = ()
    # "http": authz is asked over Envoy's HTTP ext_authz protocol (http_service of the shipped
    # deploy/envoy/envoy-http.yaml, path_prefix /check, authz trusting 127.0.0.1's XFCC) instead
    # of gRPC; http_headers: authz's --http-authz-headers (added to Envoy's allowed_headers).
    ext_authz: str = "grpc"
    http_headers: tuple[str, ...] = ()

    @property
    def hcm_options(self) -> dict[str, Any] | None:
        return {**oracle.ISTIO_BASE_PATH_OPTIONS, **dict(self.hcm)} if self.hcm else None

    @property
    def in_file(self) -> Path:
        return PAIRS_DIR / f"{self.name}-in.yaml"

    @property
    def out_files(self) -> list[Path]:
        return oracle.out_files_for_pair(PAIRS_DIR, self.name)

    @property
    def server_principal(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{WORKLOAD_NS}/sa/httpbin"

    @property
    def default_principal(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{WORKLOAD_NS}/sa/sleep"


def load_pairs() -> list[Pair]:
    meta = yaml.safe_load((PAIRS_DIR / "pairs.yaml").read_text())["pairs"]
    names = sorted(p.name[: -len("-in.yaml")] for p in PAIRS_DIR.glob("*-in.yaml"))
    missing = sorted(set(names) ^ set(meta))
    if missing:
        raise AssertionError(f"pairs.yaml and the -in.yaml files disagree on: {missing}")
    out = []
    for name in names:
        m = meta[name] or {}
        out.append(Pair(
            name=name,
            trust_domain=m.get("trustDomain", "cluster.local"),
            aliases=tuple(m.get("aliases", ())),
            classes=tuple(m.get("classes", ())),
            shipped=bool(m.get("shipped", False)),
            source=m.get("source", "own"),
            extra=tuple(m.get("requests", ())),
            unsure=m.get("unsure", ""),
            port=m.get("port"),
            workloads=tuple(m.get("workloads", ())),
            left_out=tuple(m.get("leftOut", ())),
            hcm=tuple((m.get("hcm") or {}).items()),
            ext_authz=m.get("extAuthz", "grpc"),
            http_headers=tuple(m.get("httpHeaders", ())),
        ))
    return out


def requests_for(pair: Pair) -> list[dict[str, Any]]:
    """gen_requests.py's set for the pair's policy, then the pair's hand-written requests."""
    generated, _ = gen_requests.generate(
        gen_requests.load_policies(pair.in_file), [pair.trust_domain, *pair.aliases], MAX_GENERATED
    )
    reqs = [dict(r, id=f"g{r['id']}") for r in generated]
    for n, extra in enumerate(pair.extra):
        r: dict[str, Any] = {
            "principal": pair.default_principal,
            "method": "GET",
            "path": "/",
            "host": gen_requests.DEFAULT_HOST,
            "headers": {},
            "protocol": "http1",
        }
        r.update(extra)
        r["id"] = f"h{n}"
        r["intent"] = ["hand-written"]
        reqs.append(r)
    if pair.port is not None:
        reqs = [dict(r, port=r.get("port") or pair.port) for r in reqs]
    return reqs


# --- the shipped Envoy settings -------------------------------------------------------

PATH_OPTION_KEYS = ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action")


def shipped_path_options() -> dict[str, Any]:
    """The HCM path options of deploy/envoy/envoy.yaml, as shipped."""
    config = yaml.safe_load(SHIPPED_ENVOY.read_text())
    found = []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    tc = f["typed_config"]
                    found.append({k: tc[k] for k in PATH_OPTION_KEYS if k in tc})
    if len(found) != 1:
        raise AssertionError(f"expected one HTTP connection manager in {SHIPPED_ENVOY}, found {len(found)}")
    return found[0]


def path_normalization_for(options: dict[str, Any]) -> str:
    """Istio's meshConfig pathNormalization name for an Envoy HCM path configuration."""
    if not options.get("normalize_path"):
        return "NONE"
    if not options.get("merge_slashes"):
        return "BASE"
    if str(options.get("path_with_escaped_slashes_action", "")).startswith("UNESCAPE"):
        return "DECODE_AND_MERGE_SLASHES"
    return "MERGE_SLASHES"  # REJECT_REQUEST: escaped slashes never reach authz at all


# --- authz side -----------------------------------------------------------------------


def import_bundle(pair: Pair, out_dir: Path, path_normalization: str | None = None) -> str | None:
    """`authz import-istio` of the pair's -in file; None when it worked, else its message."""
    args = [
        "import-istio", str(pair.in_file), "-o", str(out_dir), "--force",
        "--name", pair.name,
        "--workload", f"{WORKLOAD_LABELS}={pair.server_principal}",
        "--trust-domain", pair.trust_domain,
    ]  # fmt: skip
    for target in pair.workloads:
        args += ["--workload", f"{WORKLOAD_LABELS}={target}"]
    for alias in pair.aliases:
        args += ["--trust-domain-alias", alias]
    hops = dict(pair.hcm).get("xff_num_trusted_hops")
    if hops:  # the Envoy in front reads x-forwarded-for so: the bundle says so
        args += ["--xff-trusted-hops", str(hops)]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = authz_cli(args)
    if rc != 0:
        return f"authz import-istio exit {rc}:\n{err.getvalue().strip()}"
    hcm = dict(pair.hcm)
    if path_normalization is not None or (hcm.get("use_remote_address") and hcm.get("skip_xff_append")):
        manifest = out_dir / "bundle.yaml"
        data = yaml.safe_load(manifest.read_text())
        if path_normalization is not None:
            data["pathNormalization"] = path_normalization
        if hcm.get("use_remote_address") and hcm.get("skip_xff_append"):
            data["xffSkipAppend"] = True  # no import flag: Istio never sets skip_xff_append
        manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    try:  # say why here, rather than wait for a server that never becomes ready
        load_policy_set(out_dir)
    except BundleError as exc:
        return f"the imported bundle does not load:\n{exc}"
    return None


def _shipped_ext_authz(config_file: Path) -> dict[str, Any]:
    """A copy of the typed_config of the one ext_authz filter in a shipped Envoy config."""
    config = yaml.safe_load(config_file.read_text())
    found = [f for listener in config["static_resources"]["listeners"]
             for chain in listener.get("filter_chains", [])
             for net in chain.get("filters", [])
             for f in net.get("typed_config", {}).get("http_filters", [])
             if f.get("name") == "envoy.filters.http.ext_authz"]
    if len(found) != 1:
        raise AssertionError(f"expected one ext_authz filter in {config_file}, found {len(found)}")
    return dict(json.loads(json.dumps(found[0]["typed_config"])))


def ext_authz_filter() -> dict[str, Any]:
    """The ext_authz filter of the shipped deploy/envoy/envoy.yaml (what it sends authz: peer
    certificate, TLS session, ...), pointed at the test's authz server with a generous timeout."""
    typed = _shipped_ext_authz(SHIPPED_ENVOY)
    typed["grpc_service"] = {"envoy_grpc": {"cluster_name": "authz"}, "timeout": EXT_AUTHZ_TIMEOUT}
    return {"name": "envoy.filters.http.ext_authz", "typed_config": typed}


def authz_cluster(grpc_port: int) -> dict[str, Any]:
    return {
        "name": "authz",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "authz",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": grpc_port}}}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def http_ext_authz_filter(port: int, headers: tuple[str, ...]) -> dict[str, Any]:
    """The ext_authz filter of the shipped deploy/envoy/envoy-http.yaml (http_service), pointed
    at the test's authz HTTP ext_authz listener over plain HTTP/1.1."""
    typed = _shipped_ext_authz(SHIPPED_ENVOY_HTTP)
    typed["http_service"]["server_uri"] = {"uri": f"http://127.0.0.1:{port}", "cluster": "authz",
                                           "timeout": EXT_AUTHZ_TIMEOUT}
    typed["allowed_headers"]["patterns"] += [{"exact": h} for h in headers]
    return {"name": "envoy.filters.http.ext_authz", "typed_config": typed}


def http_authz_cluster(port: int) -> dict[str, Any]:
    cluster = authz_cluster(port)
    cluster.pop("typed_extension_protocol_options")
    return cluster


@contextlib.contextmanager
def authz_server(bundle: Path, workdir: Path, extra: list[str] | None = None) -> Iterator[AuthzProcess]:
    proc = AuthzProcess(bundle, workdir, extra_args=["--watch-interval", "60", *(extra or [])], ready_timeout=60.0)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


def decide_with_authz(pair: Pair, requests: list[dict[str, Any]], bundle: Path, workdir: Path,
                      path_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if pair.ext_authz == "http" or os.environ.get("DIFF_FORCE_HTTP"):
        from authz.http_authz import DEFAULT_HEADERS, header_names_problem
        named = {h.lower() for r in requests for h in (r.get("headers") or {})}
        named |= set(pair.http_headers)
        # the shipped envoy-http.yaml forwards authz's default headers already
        named = {h for h in named if header_names_problem(frozenset({h})) is None} - DEFAULT_HEADERS - {"host"}
        pair = dataclasses.replace(pair, http_headers=tuple(sorted(named)))
        port = free_port()
        extra = ["--http-authz-addr", f"127.0.0.1:{port}", "--http-authz-path-prefix", "/check",
                 "--trusted-proxy", "127.0.0.1",
                 "--http-authz-headers", ",".join((*sorted(DEFAULT_HEADERS), *pair.http_headers))]
        with authz_server(bundle, workdir / "authz", extra):
            return oracle.run(
                None, requests, workdir / "envoy-authz",
                filters=[http_ext_authz_filter(port, pair.http_headers)], clusters=[http_authz_cluster(port)],
                server_spiffe=pair.server_principal, path_options=path_options,
            )
    with authz_server(bundle, workdir / "authz") as server:
        return oracle.run(
            None, requests, workdir / "envoy-authz",
            filters=[ext_authz_filter()], clusters=[authz_cluster(server.grpc_port)],
            server_spiffe=pair.server_principal, path_options=path_options,
        )


def decide_with_oracle(pair: Pair, requests: list[dict[str, Any]], workdir: Path,
                       path_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return oracle.run(pair.out_files, requests, workdir / "envoy-rbac",
                      server_spiffe=pair.server_principal, path_options=path_options)


# --- comparison -----------------------------------------------------------------------

# Each kind of "authz stricter than Istio" that is intended, with the names of its entries
# under "Differences from Istio" in docs/bundle-format.md (a sub-heading or the first cell of a
# table row there) and the test that recognises it.
# A stricter answer of any other kind, or of a kind the docs do not list, fails the test.
DOCUMENTED_SECTION = "Differences from Istio"

def _decoded(path: str) -> str:
    return urllib.parse.unquote(path.split("?", 1)[0], errors="replace")


def path_is_ambiguous(path: str) -> bool:
    """A path an upstream could read as another one: repeated slashes, an encoded or literal
    backslash or slash, path parameters (';', also encoded), double encoding, an encoded
    control character (a tab or NUL an upstream may cut the path at; C1 controls and U+2028
    too), a malformed
    escape (IIS reads '%u002e' as '.'), bytes that are no UTF-8 (overlong '%c0%ae' is '.' to
    lax decoders), characters that NFKC-normalise to anything else (fullwidth look-alikes of
    '.', '/', '\\', '%' or letters: Windows' best-fit conversion folds them too) or that
    best-fit makes separators, or a segment with trailing dots or spaces or an NTFS stream
    suffix (Windows drops them)."""
    p = path.split("?", 1)[0]
    if "//" in p or "\\" in p or ";" in p or re.search(r"%(2[fF]|5[cC]|3[bB]|3[fF]|23|25|[01][0-9A-Fa-f]|7[fF])|%(?![0-9A-Fa-f]{2})", p):
        return True
    if re.search(r"[^/.](?:\.|%2[eE]| |%20)+(?:/|$)|[^/]::\$", p):
        return True
    try:
        urllib.parse.unquote_to_bytes(p).decode("utf-8")
    except UnicodeDecodeError:
        return True
    d = _decoded(p)
    if re.search("[\x80-\x9f\u2028\u2029]", d):  # C1 controls and Unicode line separators
        return True
    return any(ch in "\u2215\u2216\u2044\u29f5\u29f8\u29f9" or unicodedata.normalize("NFKC", ch) != ch
               for ch in d)


def _names_method(query: str) -> bool:
    """Whether a query parameter is `_method` to PHP, which cuts a name at NUL (C strings) and
    reads '.', ' ' and '[' in it as '_' (`_method%00=`, `%5Fmethod=`, `.method=`)."""
    for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True):
        name = key.split("\0", 1)[0].strip().lower()
        if name.translate(str.maketrans(". [", "___")) == "_method":
            return True
    return "_method=" in query.lower()


def _header_values(req: dict[str, Any]) -> list[tuple[str, list[str]]]:
    out = []
    for k, v in (req.get("headers") or {}).items():
        values = [str(x) for x in v] if isinstance(v, list) else [str(v)]
        if k.lower() == "host" and req.get("host"):  # a second Host line: one merged authority
            values = [str(req["host"]), *values]
        out.append((k.lower(), values))
    return out


@dataclass(frozen=True)
class StrictnessKind:
    name: str
    doc_entries: tuple[str, ...]  # entries under "Differences from Istio", any one describes it
    why: str

    def applies(self, req: dict[str, Any], authz: dict[str, Any], left_out: tuple[str, ...] = ()) -> bool:
        reason = _reason(authz).lower()
        saw_path = (authz.get("envoy_saw") or {}).get("path") or req.get("path") or ""  # CONNECT: no path
        if self.name == "unidentified-destination":
            return not req.get("principal") and "destination" in reason
        if self.name == "ambiguous-path":
            return path_is_ambiguous(saw_path) or path_is_ambiguous(req.get("path") or "")
        if self.name == "method-case":
            m = str(req.get("method", "GET"))
            return m != m.upper()
        if self.name == "ip-versions":
            xff = " ".join(str(v) for k, v in (req.get("headers") or {}).items() if str(k).lower() == "x-forwarded-for")
            return ":" in xff
        if self.name == "regex-versions":
            # pairs whose values older and patched istiod read otherwise say so (leftOut)
            return "regex-versions" in left_out and (reason == "no allow rule matched" or "denied by policy" in reason)
        if self.name == "underscore-header":
            return any("_" in str(k) for k in (req.get("headers") or {})) and reason == "ambiguous header"
        if self.name == "path-override":
            return bool({str(k).lower() for k in (req.get("headers") or {})} & {"x-original-url", "x-rewrite-url"})
        if self.name == "method-override":
            names = {str(k).lower() for k in (req.get("headers") or {})}
            query = str(req.get("path") or "").partition("?")[2]
            return (str(req.get("method", "GET")).upper() == "HEAD" or _names_method(query)
                    or bool(names & {"x-http-method-override", "x-http-method", "x-method-override"}))
        if self.name == "path-case":
            # a letter, or a percent escape's hex letter (DENY patterns hold `%3F` as `%3f` too)
            return any("A" <= c <= "Z" for c in saw_path) or re.search(r"%[0-9A-Fa-f]?[a-fA-F]", saw_path) is not None
        if self.name == "ambiguous-host":
            # the authority Envoy went by (an absolute-form target's, not the Host line's), and a
            # deny that is about it, not a request refused as malformed for something else
            host = str((authz.get("envoy_saw") or {}).get("authority") or req.get("host", ""))
            # a port (numeric or not: Go's SplitHostPort and nginx drop any), brackets, a trailing
            # dot, a userinfo, escapes or non-ASCII text a URL parser folds
            odd = host.endswith(".") or any(c in host for c in "@%:[") or not host.isascii()
            names = {str(k).lower() for k in (req.get("headers") or {})}
            odd = odd or bool(names & {"x-forwarded-host", "x-host", "x-original-host", "x-forwarded-server", "forwarded"})
            return odd and not reason.startswith("malformed request")
        if self.name == "no-path":
            return "empty path" in reason
        if self.name == "caller-certificate":
            odd = (req.get("cert_san") or "uri") != "uri" or req.get("extra_sans") or req.get("subject_cn")
            # a proxy that does not forward the certificate (XFCC without Cert=): bundles whose
            # decision another name on it could change deny every such check
            return (bool(odd) and "certificate" in reason) or "certificate was not forwarded" in reason
        if self.name == "condition-left-out":
            # leftOut names the DENY rules import-istio widened (a condition, a JWT field, an IP
            # value read two ways) and, as `<policy>/*`, ALLOW policies whose JWT entries never match
            meta = (authz.get("envoy_saw") or {}).get("ext_authz") or {}  # the deny's dynamic metadata
            if reason == "no allow rule matched":
                return any(x.endswith("/*") for x in left_out)
            return "denied by policy" in reason and f"{meta.get('policy', '')}/{meta.get('rule', '')}" in left_out
        if self.name == "header-elements":
            # lines merged with ',', a value with outer blanks (Envoy keeps them over HTTP/2, an
            # HTTP/1.1 upstream trims them), or cookie pairs (Envoy joins HTTP/2 crumbs with '; ')
            return any(len(vs) > 1 or any("," in v or v != v.strip(" \t") or (k == "cookie" and ";" in v) for v in vs)
                       for k, vs in _header_values(req) if k != "x-forwarded-for")
        raise AssertionError(self.name)


STRICTNESS_KINDS = (
    StrictnessKind("unidentified-destination", ("unidentified destination",),
                   "plaintext request, no destination principal: authz denies when policies target principals"),
    StrictnessKind("ambiguous-path", ("paths", "path readings", "refused paths"),
                   "DENY rules also match other readings of the path; look-alike and encoded separators refused"),
    StrictnessKind("path-case", ("paths", "path case"),
                   "a path matching a DENY rule only case-insensitively is denied as ambiguous"),
    StrictnessKind("method-case", ("methods", "method case"),
                   "a method matching a DENY rule only case-insensitively is denied as ambiguous"),
    StrictnessKind("ip-versions", ("ip values",),
                   "an IPv4-mapped or dotted IPv6 value matches as older and as current istiod read it"),
    StrictnessKind("regex-versions", ("regular expressions in values",),
                   "a namespace, service account or *suffix value older and patched istiod read otherwise"),
    StrictnessKind("underscore-header", ("headers",),
                   "a header whose name with '_' as '-' is one the policies read is ambiguous"),
    StrictnessKind("path-override", ("paths", "path normalisation"),
                   "a path named in X-Original-URL / X-Rewrite-URL is a reading of the path"),
    StrictnessKind("method-override", ("methods",),
                   "HEAD meets a DENY on GET, and a method override (header or _method) a DENY on that method"),
    StrictnessKind("header-elements", ("headers", "repeated headers"),
                   "DENY header values also match each comma-separated element, the value trimmed and each cookie pair"),
    StrictnessKind("ambiguous-host", ("hosts",),
                   "DENY hosts also match the authority without its port (any port text), trailing dot or userinfo, "
                   "percent-decoded and URL-folded, and the hosts forwarding headers name"),
    StrictnessKind("caller-certificate", ("caller certificate",),
                   "a client certificate without a URI SAN, or with more than one identity, is refused, and one "
                   "not forwarded is denied where another name on it could decide"),
    StrictnessKind("no-path", ("requests without a path",),
                   "a request without a path (CONNECT) is refused as malformed"),
    StrictnessKind("condition-left-out", ("conditions anded into a field", "jwt and filter metadata", "ip values"),
                   "a DENY rule whose condition import-istio could not AND exactly matches without it"),
)


def documented_entries(docs: Path = DOCS) -> list[str]:
    """The entries of the 'Differences from Istio' section of the docs: its sub-headings and
    the first cell of each row of its tables (header rows left out)."""
    try:
        lines = docs.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []

    def separator(line: str) -> bool:
        return bool(cells(line)) and all(c and set(c) <= set("-: ") for c in cells(line))

    out: list[str] = []
    level = None
    for n, line in enumerate(lines):
        m = re.match(r"^(#+)\s+(.*?)\s*#*\s*$", line)
        if level is None:
            if m and m.group(2).strip().lower() == DOCUMENTED_SECTION.lower():
                level = len(m.group(1))
            continue
        if m:
            if len(m.group(1)) <= level:
                break
            out.append(m.group(2).strip())
            continue
        row = cells(line)
        header = n + 1 < len(lines) and separator(lines[n + 1])
        if row and row[0] and not separator(line) and not header:
            out.append(row[0])
    return out


def kind_documented(kind: StrictnessKind, entries: list[str]) -> bool:
    return any(e.lower() in (x.lower() for x in entries) for e in kind.doc_entries)


def _reason(res: dict[str, Any]) -> str:
    """authz's reason from its 403 body, which Envoy's reply format keeps as "local_body"."""
    try:
        inner = json.loads(res.get("body") or "").get("local_body") or ""
        return str(json.loads(inner).get("reason", ""))
    except (ValueError, AttributeError, TypeError):
        return ""


def decision(res: dict[str, Any]) -> str:
    if res.get("skipped"):
        return "skipped"
    return "allow" if res.get("status") == 200 else "deny"


@dataclass
class Row:
    pair: str
    requests: int = 0
    agree: int = 0
    stricter_documented: int = 0
    looser: int = 0
    stricter_undocumented: int = 0
    skipped: int = 0
    note: str = ""
    looser_examples: list[str] = field(default_factory=list)
    undocumented_examples: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.looser or self.stricter_undocumented or self.note)


def describe(req: dict[str, Any], o: dict[str, Any], a: dict[str, Any]) -> str:
    shown = {k: req[k] for k in ("principal", "method", "path", "host", "headers", "port", "sni", "protocol",
                                 "version", "scheme", "pseudo", "keep_case", "body", "trailers")
             if req.get(k) not in (None, "", {})}
    if not req.get("principal"):
        shown["principal"] = "(plaintext)"
    saw = (o.get("envoy_saw") or {}).get("path")
    return (f"{json.dumps(shown, ensure_ascii=False)} envoy path={saw!r}: "
            f"oracle {o.get('status')} {o.get('details') or o.get('error') or ''} | "
            f"authz {a.get('status')} {_reason(a) or a.get('details') or a.get('error') or ''}"
            f" {json.dumps((a.get('envoy_saw') or {}).get('ext_authz') or {}, sort_keys=True)}")


def compare(name: str, requests: list[dict[str, Any]], oracle_res: list[dict[str, Any]],
            authz_res: list[dict[str, Any]], headings: list[str], left_out: tuple[str, ...] = ()) -> Row:
    assert len(oracle_res) == len(requests) == len(authz_res)
    row = Row(name, requests=len(requests))
    documented = {k.name for k in STRICTNESS_KINDS if kind_documented(k, headings)}
    for req, o, a in zip(requests, oracle_res, authz_res):
        do, da = decision(o), decision(a)
        if "skipped" in (do, da):
            row.skipped += 1
        elif do == da:
            row.agree += 1
        elif da == "allow":
            row.looser += 1
            row.looser_examples.append(describe(req, o, a))
        else:
            kinds = [k for k in STRICTNESS_KINDS if k.applies(req, a, left_out)]
            ok = [k for k in kinds if k.name in documented]
            if ok:
                row.stricter_documented += 1
                row.kinds[ok[0].name] = row.kinds.get(ok[0].name, 0) + 1
            else:
                row.stricter_undocumented += 1
                label = ",".join(k.name for k in kinds) + " (not in the docs)" if kinds else "no documented kind"
                row.undocumented_examples.append(f"[{label}] " + describe(req, o, a))
    return row


COLUMNS = ("pair", "requests", "agree", "stricter-documented", "looser", "stricter-undocumented", "skipped")


def format_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [
        (r.pair, str(r.requests), str(r.agree), str(r.stricter_documented), str(r.looser),
         str(r.stricter_undocumented), str(r.skipped)) for r in rows
    ]
    total = ("TOTAL",) + tuple(str(sum(int(c[i]) for c in cells[1:])) for i in range(1, len(COLUMNS)))
    cells.append(total)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
        if n == 0 or n == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.pair}: " + " / ".join(x.strip() for x in r.note.splitlines() if x.strip())[:240]
             for r in rows if r.note]
    kinds = [f"  {r.pair}: " + ", ".join(f"{k}={v}" for k, v in sorted(r.kinds.items())) for r in rows if r.kinds]
    if kinds:
        lines += ["stricter-documented by kind:", *kinds]
    if notes:
        lines += ["not compared:", *notes]
    return "\n".join(lines)
