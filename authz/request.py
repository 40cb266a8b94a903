"""Envoy CheckRequest -> Request: the normalised, immutable view the engine decides on."""

from __future__ import annotations

import codecs
import ipaddress
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from authz import paths, spiffe

T = TypeVar("T")

CheckRequest = external_auth_pb2.CheckRequest


def _split_port(host: str) -> tuple[str, str]:
    """(name, port) of an authority; port '' when it has none."""
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        if end == -1:
            return host, ""
        rest = host[end + 1:]
        return host[: end + 1], rest[1:] if rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit() else ""
    name, sep, port = host.rpartition(":")
    return (name, port) if sep and port.isascii() and port.isdigit() else (host, "")


class MalformedRequest(ValueError):
    """The request cannot be judged; the message is the reason given to the client."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str  # as received: Istio compares methods case-sensitively
    path: str  # as the proxy forwards it (see authz.paths), without query
    query: str
    host: str  # lower-cased authority, port kept
    scheme: str = ""
    protocol: str = ""
    request_id: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    principal: str = ""  # the caller's principal as received (URI SAN), or ''
    source: spiffe.SpiffeId | None = None
    source_address: str = ""
    source_port: int = 0
    remote_address: str = ""  # original client: right-most x-forwarded-for entry, else the peer
    destination_principal: str = ""
    destination_address: str = ""
    destination_port: int = 0
    context_extensions: dict[str, str] = field(default_factory=dict)
    raw_path: str = ""
    sni: str = ""
    # Other forms of ``path`` an upstream may act on (merged slashes, decoded %2F, ...):
    # DENY rules match if any does, ALLOW rules only if all do. Empty for ordinary paths.
    path_readings: tuple[str, ...] = ()
    # Methods the request asks an upstream to run instead of its own (X-HTTP-Method-Override
    # and kin, a `_method` query parameter), upper-cased; empty for ordinary requests.
    method_overrides: tuple[str, ...] = ()
    # Hosts the request names in X-Forwarded-Host, Forwarded and kin, ASCII lower-cased:
    # frameworks that trust them serve that host. Empty for ordinary requests.
    forwarded_hosts: tuple[str, ...] = ()
    # Header names holding '_' (see PolicySet.header_aliases); empty for ordinary requests.
    aliased_headers: tuple[str, ...] = ()
    # What matching found for the parts every reading of the request shares (headers, host),
    # shared by the views of a request with readings (dataclasses.replace keeps it): a DENY
    # read a 50 KB cookie again for each of 350 readings. None for a request without them.
    memo: dict[object, tuple[object, object]] | None = field(default=None, compare=False, repr=False)

    @property
    def method_readings(self) -> tuple[str, ...]:
        """The method and what a lenient upstream may run for it: its upper case, GET for
        HEAD (Go's ServeMux, Express, Flask, Spring and Django run the GET handler), and
        any method the request asks to override it with."""
        upper = self.method.upper()
        if upper == self.method and upper != "HEAD" and not self.method_overrides:
            return (self.method,)
        out = [self.method]
        for m in (upper, "GET" if upper == "HEAD" else upper, *self.method_overrides):
            if m not in out:
                out.append(m)
        return tuple(out)

    def recall(self, key: object, basis: object, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)``, found once per request with readings: its views share ``memo``, and
        a result counts for a view whose ``basis`` (what it was found from) is the same object."""
        memo = self.memo
        if memo is None:
            return work(*args)
        hit = memo.get(key)
        if hit is not None and hit[0] is basis:
            return hit[1]  # type: ignore[return-value]
        found = work(*args)
        memo[key] = (basis, found)
        return found

    @property
    def host_without_port(self) -> str:
        return _split_port(self.host)[0]

    def host_names(self, every_reading: bool = False, forwarded: bool = True) -> tuple[str, ...]:
        """What a ``hosts`` field is compared with: the authority with and without its port.
        ``every_reading`` (DENY and AUDIT rules, an ALLOW's notHosts, policy targets) adds what
        an upstream may take the same authority for: after a userinfo ``@``, percent-decoded,
        folded as a WHATWG URL parser folds a host (_uts46_like), without the trailing dot of a
        fully qualified name (each with and without the port), without a port that is no
        number (_portless), and the hosts the request names in forwarding headers (Django's
        USE_X_FORWARDED_HOST, Express's trust proxy, Spring's ForwardedHeaderFilter) unless
        not ``forwarded``."""
        h = self.host
        hosts = self.forwarded_hosts if forwarded else ()
        name = _split_port(h)[0]
        # The hot path: a name of ASCII, maybe a numeric port. A ':' left in the name is a
        # port that is no number (or an IPv6 literal): read below, as are '%', '@' and '['.
        if not every_reading or not (hosts or name.endswith(".") or ":" in name
                                     or "%" in h or "@" in h or "[" in h or not h.isascii()):
            return h, name
        return self.recall(("hosts", forwarded), h, _host_readings, h, name, hosts)


def _host_readings(h: str, name: str, hosts: tuple[str, ...]) -> tuple[str, ...]:
    """Request.host_names' every reading of the authority ``h`` and the forwarded ``hosts``."""
    names = [h, name]
    spellings = [h, *hosts]
    if any("%" in s for s in spellings):
        spellings += [urllib.parse.unquote(s) for s in spellings if "%" in s]
    spellings += [_uts46_like(s) for s in spellings if not s.isascii()]
    spellings += [s.rpartition("@")[2] for s in spellings if "@" in s]
    for spelling in spellings:
        name, port = _split_port(spelling)
        bare = name.rstrip(".") or name
        names += [spelling, name, bare] + ([f"{bare}:{port}"] if port else [])
        if ":" in name or name.startswith("["):
            names += _portless(spelling)
    return tuple(dict.fromkeys(names))


def _portless(authority: str) -> list[str]:
    """What upstreams that do not check the port take ``authority`` for when its port is no
    number (`admin:`, `admin:abc`, `admin:80:80`, `[admin]:80`): nginx the host up to the
    first ':' outside brackets, Go's net.SplitHostPort (ServeMux) the text before a lone ':'
    and the inside of brackets a ':' follows. Each also without trailing dots (`admin.:`)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end == -1 or not authority.startswith(":", end + 1):
            return []
        out = [authority[: end + 1], authority[1:end]]
    else:
        out = [authority.partition(":")[0]]
    return [n for name in out for n in (name, name.rstrip(".") or name)]


# Full stops a WHATWG URL parser (UTS-46) reads as '.': ideographic, fullwidth, halfwidth.
_UTS46_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def _uts46_like(host: str) -> str:
    """``host`` as Node's `new URL(path, 'http://' + host)` names it after percent-decoding:
    NFKC, ASCII letters lower-cased, the Unicode full stops as '.' (`admin。example.com` and
    `ａdmin.example.com` are admin.example.com). A host that folding makes over twice as long
    is refused, as such a path is (authz.paths): U+FDFA alone is 18 characters."""
    folded = paths.fold_case(unicodedata.normalize("NFKC", host).translate(_UTS46_DOTS))
    if len(folded) > paths.MAX_FOLD_GROWTH * len(host):
        raise MalformedRequest("host grows too much when normalised to decide safely")
    return folded


def from_check_request(
    check: external_auth_pb2.CheckRequest,
    trust_domains: spiffe.TrustDomains,
    path_mode: paths.Normalization = paths.Normalization.BASE,
    xff_trusted_hops: int = 0,
) -> Request:
    """Build a Request; raises MalformedRequest with a reason when it cannot be judged.

    ``path_mode`` is what the proxy in front does to paths (the bundle's pathNormalization),
    ``xff_trusted_hops`` its xff_num_trusted_hops (the bundle's xffTrustedHops).
    """
    attrs = check.attributes
    if not attrs.HasField("request") or not attrs.request.HasField("http"):
        raise MalformedRequest("check request carries no HTTP attributes")
    http = attrs.request.http
    if not http.method:
        raise MalformedRequest("request has no method")
    header_map = http.headers
    # A comprehension walks protobuf's map in C; dict() goes through collections.abc (+50%).
    if header_map:
        if http.header_map.headers:  # Envoy sends one or the other; which would be the request?
            raise MalformedRequest("check request carries both headers and header_map")
        headers = {name: header_map[name] for name in header_map}
    else:
        headers = _header_map(http)
    names = "\0".join(headers)  # one lower() for all names: the hot path sees ~15 headers
    if names != names.lower():  # Envoy sends lower case; hand-written requests may not
        headers = _lower_keys(headers)
    # Envoy's header map answers `host` with :authority (and its RBAC filter matches a
    # `host` header rule on it): both names hold the authority here, whichever was sent.
    authority = http.host or headers.get(":authority", headers.get("host"))
    if authority is not None:  # an empty Host header is still one
        if headers.get("host") != authority:
            headers["host"] = authority
        if headers.get(":authority") != authority:
            headers[":authority"] = authority
    if http.fragment:
        raise MalformedRequest("path contains a fragment")
    try:
        normalized = paths.normalize(http.path, path_mode)
    except paths.PathError as exc:
        raise MalformedRequest(str(exc)) from None
    path_readings = normalized.readings
    # One look for the headers that name another method, path or host (rare): not three.
    overriding = not OVERRIDING_HEADERS.isdisjoint(headers) or (
        "_" in names and any(n.replace("_", "-") in OVERRIDING_HEADERS for n in headers))
    if overriding and _overriding(headers, PATH_OVERRIDE_HEADERS):
        path_readings = _with_path_overrides(normalized, headers, path_mode)
    query = normalized.query or http.query

    principal, source = trust_domains.resolve(attrs.source.principal)
    if principal and _CONTROL.search(principal):
        # istiod's '*' is the RE2 pattern '.+', whose '.' takes no line feed: such a principal
        # would be no principal to Envoy's RBAC and one to a string test here.
        raise MalformedRequest("caller principal contains a control character")
    if attrs.source.certificate:
        sans = _uri_sans(attrs.source.certificate)
        if not principal or principal not in sans:
            # Envoy reports a certificate's DNS SAN or subject when it has no URI SAN; only a
            # URI SAN is a SPIFFE identity, and a permissive CA may sign 'spiffe://...' as DNS.
            raise MalformedRequest("caller principal is not the client certificate's URI SAN")
        if len(sans) > 1 or _SPIFFE_DNS in sans:
            # Envoy's RBAC tries every SAN of the certificate, ext_authz reports the first: a
            # DENY on the second would not fire here. An X509-SVID has exactly one URI SAN.
            raise MalformedRequest("client certificate names more than one identity")
    dest_principal = attrs.destination.principal
    method = http.method
    if not _NOT_TOKEN.isdisjoint(method):
        raise MalformedRequest("method is not an HTTP token")

    src_sock = attrs.source.address.socket_address
    dst_sock = attrs.destination.address.socket_address
    overrides = _method_overrides(headers, query) if overriding or "%" in query or "ethod" in query.lower() else ()
    return Request(
        method=method,
        path=normalized.path,
        query=query,
        host=paths.fold_case(http.host or headers.get(":authority", "")),  # ASCII only, as Envoy
        scheme=http.scheme,
        protocol=http.protocol,
        request_id=headers.get("x-request-id") or http.id,
        headers=headers,
        principal=principal,
        source=source,
        source_address=src_sock.address,
        source_port=src_sock.port_value,
        remote_address=_remote_address(headers, src_sock.address, xff_trusted_hops),
        destination_principal=dest_principal,
        destination_address=dst_sock.address,
        destination_port=dst_sock.port_value,
        context_extensions=dict(attrs.context_extensions) if attrs.context_extensions else {},
        raw_path=http.path,
        # ASCII only, as Envoy (absl::AsciiStrToLower): str.lower() would make U+212A 'k'
        sni=paths.fold_case(attrs.tls_session.sni),
        path_readings=path_readings,
        method_overrides=overrides,
        forwarded_hosts=_forwarded_hosts(headers) if overriding else (),
        aliased_headers=tuple(n for n in headers if "_" in n) if "_" in names else (),
        memo={} if path_readings or overrides or method == "HEAD" or not method.isupper() else None,
    )


# Not X-Forwarded-Server: Apache's mod_proxy sets it to its own ServerName, not the client's.
HOST_OVERRIDE_HEADERS = frozenset({"x-forwarded-host", "x-host", "x-original-host", "forwarded"})
# Unanchored, as Spring 6.1's ForwardedHeaderUtils, Reactor Netty and Vert.x find
# `(?i:host)="?([^;,"]+)"?` anywhere in the value: `xhost=admin` and `for="_host=admin"` name
# admin to them. Every match is taken, not the first only: another parser may take another.
_FORWARDED_HOST = re.compile(r'host\s*=\s*("[^"]*"?|[^;,\s]*)', re.IGNORECASE)


def _forwarded_hosts(headers: dict[str, str]) -> tuple[str, ...]:
    named: list[str] = []
    for name, value in _overriding(headers, HOST_OVERRIDE_HEADERS):
        if name.replace("_", "-") != "forwarded":
            named += value.split(",")
            continue
        # RFC 7239 (`for=...;host="..."`), and as lenient parsers read it: Spring's
        # `host="?([^;,"]+)` takes `admin` from `host="admin,x"` and from an unclosed quote.
        for m in _FORWARDED_HOST.finditer(value):
            token = m.group(1)
            if len(token) > 1 and token[0] == token[-1] == '"':
                named.append(token[1:-1])
            named.append(token.lstrip('"').split(",")[0].split(";")[0].split('"')[0])
    out = dict.fromkeys(h for value in named if value and (h := paths.fold_case(value.strip())))
    if len(out) > MAX_OVERRIDES:
        raise MalformedRequest("request names too many hosts to decide safely")
    return tuple(out)


# Headers by which a request names another path to serve (IIS URL Rewrite, Symfony and Zend
# before their fixes, some Java filters route on them): `GET /` + `X-Original-URL: /admin`.
PATH_OVERRIDE_HEADERS = frozenset({"x-original-url", "x-rewrite-url"})


def _with_path_overrides(normalized: paths.NormalizedPath, headers: dict[str, str],
                         mode: paths.Normalization) -> tuple[str, ...]:
    """The path's readings and each override's path with its readings: DENY rules match if
    any does, ALLOW rules only if all do. An override no reading settles is malformed."""
    out = dict.fromkeys(normalized.readings)
    for name, value in _overriding(headers, PATH_OVERRIDE_HEADERS):
        value = value.strip()
        if _ABSOLUTE_URL.match(value):  # ingress-nginx's auth sub-requests send one
            value = "/" + value.partition("://")[2].partition("/")[2]
        try:  # the whole value: a path may hold commas (`/maps/@40.7,-74.0`)
            other = paths.normalize(value, mode)
        except paths.PathError as exc:
            raise MalformedRequest(f"{name}: {exc}") from None
        out.update(dict.fromkeys(p for p in (other.path, *other.readings) if p != normalized.path))
        if len(out) > paths.MAX_READINGS:
            raise MalformedRequest("path has too many readings to decide safely")
    return tuple(out)


MAX_OVERRIDES = 8  # methods or hosts a request may name beside its own: each is read every way
_ABSOLUTE_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _overriding(headers: dict[str, str], names: frozenset[str]) -> list[tuple[str, str]]:
    """(name, value) of the request headers in ``names``, also spelt with '_' for '-'
    (CGI, WSGI, PHP and Rack read `X_HTTP_Method_Override` as the same header)."""
    return sorted((n, v) for n, v in headers.items() if n in names or n.replace("_", "-") in names)


# Headers and a query parameter by which frameworks let a request name the method to run
# (ASP.NET Web API, Express's method-override, Rack, Laravel, Spring's HiddenHttpMethodFilter:
# `POST /x?_method=DELETE` runs DELETE).
METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
OVERRIDING_HEADERS = PATH_OVERRIDE_HEADERS | METHOD_OVERRIDE_HEADERS | HOST_OVERRIDE_HEADERS


def _method_overrides(headers: dict[str, str], query: str) -> tuple[str, ...]:
    named: list[str] = []
    for _, value in _overriding(headers, METHOD_OVERRIDE_HEADERS):
        named += value.split(",")
    if query:
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=None):
            # PHP keeps names as C strings, so `_method%00x` is `_method` to Symfony and Laravel;
            # and it reads '.', ' ' and '[' in a name as '_' (`.method`, `%5Fmethod`)
            key = key.split("\0", 1)[0]
            if "_method" in (key.lower().translate(_PHP_NAME), key.strip().lower().translate(_PHP_NAME)):
                named.append(value)
    out = dict.fromkeys(m for value in named if (m := value.strip().upper()))
    if len(out) > MAX_OVERRIDES:
        raise MalformedRequest("request names too many methods to decide safely")
    return tuple(out)


_PHP_NAME = str.maketrans({".": "_", " ": "_", "[": "_"})


# RFC 9110 token characters are visible ASCII except delimiters.
_NOT_TOKEN = frozenset('"(),/:;<=>?@[\\]{} \t') | frozenset(chr(i) for i in range(0x20)) | {"\x7f"}


_SPIFFE_DNS = "\0spiffe-like"  # stands for a DNS SAN or subject that reads as an identity


@dataclass(frozen=True, slots=True)
class _CertificateNames:
    uris: frozenset[str]  # the URI SANs
    dns: frozenset[str]  # the DNS SANs
    subject: str  # RFC 4514, as Envoy's RBAC reads a subject


_NO_NAMES = _CertificateNames(frozenset(), frozenset(), "")
_CERT_CACHE: dict[str, _CertificateNames] = {}


def _names(certificate: str) -> _CertificateNames:
    """The names of a URL-encoded PEM certificate (none when it does not parse), cached."""
    names = _CERT_CACHE.get(certificate)
    if names is None:
        try:
            cert = x509.load_pem_x509_certificate(urllib.parse.unquote(certificate).encode())
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = _CertificateNames(frozenset(ext.get_values_for_type(x509.UniformResourceIdentifier)),
                                      frozenset(ext.get_values_for_type(x509.DNSName)),
                                      cert.subject.rfc4514_string())
        except Exception:  # noqa: BLE001 - ValueError, DuplicateExtension, UnsupportedGeneralNameType...: unreadable
            names = _NO_NAMES
        if len(_CERT_CACHE) >= 1_000:  # the oldest out: a stream of new ones cannot empty it
            del _CERT_CACHE[next(iter(_CERT_CACHE))]
        _CERT_CACHE[certificate] = names
    return names


def certificate_names(certificate: str) -> frozenset[str]:
    """The URI and DNS SANs of a URL-encoded PEM certificate (none when it does not parse)."""
    names = _names(certificate)
    return names.uris | names.dns


def _uri_sans(certificate: str) -> frozenset[str]:
    """The URI SANs of the forwarded (URL-encoded PEM) peer certificate, and _SPIFFE_DNS when
    a DNS SAN reads `spiffe://...` or a DNS SAN or the subject holds `/ns/`: Envoy's RBAC
    matches principals and namespaces (`.*/ns/<ns>/.*`) on those too."""
    names = _names(certificate)
    spiffe_like = (any(d.lower().startswith("spiffe:") or "/ns/" in d for d in names.dns)
                   or "/ns/" in names.subject)
    return names.uris | {_SPIFFE_DNS} if spiffe_like else names.uris


def _bang(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    return "!" * (exc.end - exc.start), exc.end


# Envoy's own substitution for what is not UTF-8 (each byte a '!', as in `headers`): a
# policy pattern cannot hold '!' where it would allow (authz.engine.compile), so raw bytes
# read this way cannot meet an ALLOW that Envoy's RBAC, comparing bytes, would not.
codecs.register_error("authz-envoy-bang", _bang)


def _header_map(http: attribute_context_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    # Envoy fills header_map instead of headers when encode_raw_headers is set.
    out: dict[str, str] = {}
    for hv in http.header_map.headers:
        value = hv.raw_value.decode("utf-8", "authz-envoy-bang") if hv.raw_value else hv.value
        key = hv.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _lower_keys(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.items():
        key = key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_SPACE = " \t\f\v\n\r"


def _remote_address(headers: dict[str, str], peer: str, trusted_hops: int = 0) -> str:
    # The original client as Envoy's HCM reads it (Utility::getLastAddressFromXFF): the
    # x-forwarded-for entry `trusted_hops` left of the right-most one (each hop appends the
    # address it received from; with use_remote_address Envoy appended its peer before
    # ext_authz sees the header). Entries further left were written by whoever sent the
    # request and prove nothing; with too few entries, or none, it is the peer itself. An entry
    # that is no plain IP address (`garbage`, `192.0.2.1:8080`, `[::1]`, a zone `%eth0`,
    # `127.1`; Envoy parses with inet_pton) leaves the peer too: taken as is, it matched no
    # block, and a DENY on the peer's address did not fire.
    xff = headers.get("x-forwarded-for")
    if xff and trusted_hops >= 0:  # -1: Envoy took its peer (use_remote_address, not appended)
        entries = xff.rsplit(",", trusted_hops + 1)
        if len(entries) <= trusted_hops:
            return peer
        entry = entries[-1 - trusted_hops].strip(_ASCII_SPACE)  # str.strip() would take U+00A0 too
        if "%" in entry and ":" in entry:
            # Envoy reads an IPv6 address with a zone through getaddrinfo: a numeric zone is
            # the address, a named one is the address only if Envoy's host has that interface.
            entry, _, zone = entry.partition("%")
            if not (zone.isascii() and zone.isdigit()) and _is_ipv6(entry):
                raise MalformedRequest("x-forwarded-for names an IPv6 address with an interface zone")
        if entry and "%" not in entry:
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                return peer
            return entry
    return peer


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False
