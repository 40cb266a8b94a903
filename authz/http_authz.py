"""Envoy's HTTP ext_authz protocol (``http_service``), decided by the same Checker.

Envoy sends the original request's method and path (behind the configured ``path_prefix``)
with the headers it is configured to include and no body. We answer 200 to allow: the
headers Envoy's ``allowed_upstream_headers`` admit go upstream, and
``x-envoy-auth-headers-to-remove`` lists request headers Envoy strips. Any other status
denies; Envoy hands our status, headers and body to the client.

    HTTP/1.1 request ─▶ to_check_request (path_prefix, XFCC from a trusted proxy only)
        ─▶ Checker.run(caller="envoy_http") ─▶ CheckResponse ─▶ to_http ─▶ HTTP/1.1 answer

The caller's identity is not on the wire as it is in a gRPC CheckRequest: it comes from
``x-forwarded-client-cert``, which anyone can write. So it is believed only when the
connection comes from a trusted proxy (``--trusted-proxy``: an address or CIDR, or the SPIFFE
ID of the proxy's client certificate when this listener has TLS); from anyone else the
header is dropped and the request has no principal.

The server runs on the event loop of the gRPC server: a decision is tens of microseconds
of CPU, so a thread per request would only add switches. It is bounded in connections,
header bytes, body bytes and idle time; beyond a bound it answers and closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2

from authz import request as request_mod
from authz.check import CALLER_ENVOY_HTTP, Checker
from authz.http1 import ANSWER_TIMEOUT, MAX_HEADER_BYTES, TOKEN, Malformed, linger, parse_head, render
from authz.options import address
from authz.tls_server import CallerPattern

log = logging.getLogger("authz.http_authz")

XFCC = "x-forwarded-client-cert"
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
# Headers about this hop, not the original request.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length"})

MAX_BODY_BYTES = 1024 * 1024
# The request headers Envoy forwards with the configuration docs/http-ext-authz.md shows
# (allowed_headers), and what every HTTP check carries: the host and the request line.
# With them, the headers by which a request names another method, path or host (read as
# in a gRPC check, docs/bundle-format.md "Differences from Istio").
DEFAULT_HEADERS = frozenset({"x-request-id"}) | request_mod.OVERRIDING_HEADERS
_ALWAYS_CARRIED = frozenset({"header:host", "header::authority", "header::method", "header::path"})


def header_names_problem(names: frozenset[str]) -> str | None:
    """Why ``names`` cannot be taken as forwarded by Envoy with their values, or None: what
    authz drops (hop-by-hop and x-envoy-* headers, which describe Envoy's call to authz), the
    identity header, a pattern, a trace context Envoy's client writes its own."""
    for name in sorted(names):
        if (name in _HOP_BY_HOP or name.startswith(("x-envoy-", ":")) or name in (XFCC, "traceparent", "tracestate")
                or not TOKEN.fullmatch(name) or name != name.lower() or "*" in name):
            return (f"--http-authz-headers: {name!r} does not reach authz as the client sent it (hop-by-hop, "
                    "x-envoy-*, the caller identity, a trace context, or not a header name)")
    return None

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Who may vouch for the caller: addresses/CIDRs, and SPIFFE IDs (exact or ``prefix*``)."""

    networks: tuple[IpNetwork, ...] = ()
    ids: tuple[CallerPattern, ...] = ()

    @classmethod
    def parse(cls, patterns: list[str]) -> TrustedProxies:
        """ValueError names a pattern that is neither a SPIFFE ID pattern nor an address/CIDR."""
        networks: list[IpNetwork] = []
        ids: list[CallerPattern] = []
        for p in patterns:
            p = p.strip()
            if p.startswith("spiffe://"):
                # A '*' stays within its path segment: a string prefix `.../ns/prod*` would
                # trust `.../ns/production-evil`, who could then write the caller's identity.
                ids.append(CallerPattern(p, "--trusted-proxy"))
                continue
            try:
                networks.append(ipaddress.ip_network(p, strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {p!r} is neither spiffe://... nor an address or CIDR") from None
        return cls(tuple(networks), tuple(ids))

    def trusts(self, address: str, spiffe_id: str) -> bool:
        if spiffe_id and any(p.matches(spiffe_id) for p in self.ids):
            return True
        if address and self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return any(ip in n for n in self.networks)
        return False


class XfccError(ValueError):
    pass


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC quotes values holding , ; or =)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quoted:
        raise XfccError("unbalanced quotes")
    out.append("".join(cur))
    return out



@dataclass(frozen=True, slots=True)
class Xfcc:
    """What the trusted proxy's XFCC element says of the connection it took."""

    uri: str = ""  # the caller's URI SAN
    by: str = ""  # the proxy's own (the destination workload's) URI SAN
    cert: str = ""  # the caller's certificate, URL-encoded PEM (`cert: true`), as a gRPC check's
    presented: bool = False  # the caller presented a certificate (Hash=, URI=, ... in the element)


MAX_XFCC_ELEMENTS = 16  # proxies a request may have passed, each appending one element
MAX_CERT_CHARS = 16 * 1024  # a URL-encoded PEM leaf: parsed (and kept in a cache) per request
_XFCC_DELIMITERS = frozenset(',;"')


def parse_xfcc(value: str) -> Xfcc:
    """The LAST element: the one the nearest proxy (the trusted one) appended; elements to
    its left were written by whoever sent the request. More than one URI SAN in that element
    is ambiguous and refused (an X509-SVID has exactly one).

    Envoy writes URI SANs unquoted, so a certificate whose URI SAN holds `,URI=<other>` would
    end the proxy's element early and name another caller in a piece of its own (with a
    `Cert=` anyone can copy). The certificates the header carries show it: one with such a
    URI SAN is refused wherever it sits. Without `Cert=` (Istio's sidecars write subject, URI
    and DNS only) that cannot be seen: a mesh CA signs no such SAN, and bundles whose
    decision another name on the certificate could change deny (check.py)."""
    elements = _split(value, ",")
    if len(elements) > MAX_XFCC_ELEMENTS:
        raise XfccError("more elements than proxies a request passes")
    parsed = [_fields(element) for element in elements]
    certs = [cert for fields in parsed for cert in fields.get("cert", ())]
    for cert in dict.fromkeys(certs):
        if len(cert) > MAX_CERT_CHARS:
            raise XfccError("a certificate over 16 KiB")  # an X509-SVID is 1 to 2 KB
        if any(not _XFCC_DELIMITERS.isdisjoint(san) for san in request_mod.certificate_names(cert)):
            raise XfccError("a client certificate's SAN holds XFCC delimiters")
    last = parsed[-1]
    uris, own_certs, bys = last.get("uri", []), last.get("cert", []), last.get("by", [])
    if len(set(uris)) > 1:
        raise XfccError("more than one URI SAN in the client certificate")
    if len(set(own_certs)) > 1:
        raise XfccError("more than one client certificate")
    if len(set(bys)) > 1:
        raise XfccError("more than one By")
    if certs and not own_certs:  # the proxy writes Cert=: an element without one is no proxy's
        raise XfccError("an element without the certificate the others carry")
    # As Request refuses for a forwarded certificate: names Envoy's RBAC reads as identities.
    if (any(d.lower().startswith("spiffe:") or "/ns/" in d for d in last.get("dns", ()))
            or any("/ns/" in subject for subject in last.get("subject", ()))):
        raise XfccError("the client certificate names more than one identity")
    # The URI is then checked against the certificate's (Request), as in a gRPC check: any
    # URI SAN Istio's RBAC reads (`spiffe://CLUSTER.LOCAL/...` too) is read the same here.
    presented = not _NO_CERTIFICATE.isdisjoint(last)
    return Xfcc(uris[0] if uris else "", bys[0] if bys else "", own_certs[0] if own_certs else "", presented)


# Keys Envoy writes only for a connection with a client certificate (Hash= always).
_NO_CERTIFICATE = frozenset({"hash", "uri", "dns", "subject", "cert", "chain"})


def _fields(element: str) -> dict[str, list[str]]:
    """An XFCC element's values by lower-case key."""
    out: dict[str, list[str]] = {}
    for pair in _split(element.strip(), ";"):
        key, sep, val = pair.strip().partition("=")
        if not sep:
            # Not quoted back: the reason goes to the audit record, a metric label and the
            # client, and what sits there may be a credential.
            raise XfccError("an element without '='")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"')
        out.setdefault(key.strip().lower(), []).append(val)
    return out


def strip_prefix(target: str, prefix: str) -> str | None:
    """The original path behind Envoy's ``path_prefix``; None when the target lacks it."""
    if not prefix:
        return target
    if not target.startswith(prefix):
        return None
    rest = target[len(prefix):]
    if prefix.endswith("/") and rest.startswith("/"):
        return rest  # Envoy sends path_prefix + path: "/check/" + "/a" is "/check//a"
    if not rest.startswith(("/", "?")) and not prefix.endswith("/"):
        return None  # "/authzfoo" is not under "/authz"
    if prefix.endswith("/"):
        rest = "/" + rest
    return rest if rest.startswith("/") else "/" + rest


_said_no_certificate: list[bool] = []


def _say_once_no_certificate() -> None:
    if not _said_no_certificate:
        _said_no_certificate.append(True)
        log.warning("x-forwarded-client-cert from a trusted proxy names the caller without its certificate: "
                    "names on it besides the URI SAN cannot be checked, and checks under bundles whose "
                    "decision they could change are denied (set_current_client_cert_details cert: true; "
                    "docs/http-ext-authz.md)")


def to_check_request(method: str, path: str, headers: dict[str, str], trusted: bool
                     ) -> tuple[external_auth_pb2.CheckRequest, bool]:
    """The CheckRequest an Envoy gRPC check would have carried, and whether the caller
    presented a certificate the proxy did not forward (XFCC without Cert=). Raises XfccError."""
    unseen = False
    cr = external_auth_pb2.CheckRequest()
    attrs = cr.attributes
    http = attrs.request.http
    http.method = method
    http.path = path
    http.host = headers.get("host", "")
    # The client's protocol and scheme are not on this request (Envoy asks over HTTP/1.1
    # whatever the client spoke): left empty, and bundles reading them deny (carries).
    xfcc = headers.pop(XFCC, None)
    if trusted and xfcc is not None:
        try:
            forwarded = parse_xfcc(xfcc)
        except XfccError:
            raise
        except Exception as exc:  # noqa: BLE001 - a deny with a reason, never a request left unanswered
            log.exception("x-forwarded-client-cert could not be read")
            raise XfccError("unreadable") from exc
        attrs.source.principal = forwarded.uri
        attrs.destination.principal = forwarded.by
        # As Envoy's include_peer_certificate: Request checks the URI against its SANs.
        attrs.source.certificate = forwarded.cert
        if forwarded.presented and not forwarded.cert:
            _say_once_no_certificate()
            unseen = True
        headers[XFCC] = xfcc
    # Framing headers, and the x-envoy-* ones Envoy's own client adds (x-envoy-internal: true
    # on every call), describe this request to authz, not the original request.
    http.headers.update({k: v for k, v in headers.items() if k not in _HOP_BY_HOP and not k.startswith("x-envoy-")})
    # As in a gRPC check, the pseudo-headers are headers too.
    http.headers.update({":method": method, ":path": path, ":authority": http.host})
    return cr, unseen


def to_http(resp: external_auth_pb2.CheckResponse) -> tuple[int, list[tuple[str, str]], bytes]:
    """A CheckResponse as an HTTP ext_authz answer: status, headers, body."""
    if resp.HasField("ok_response"):
        ok = resp.ok_response
        headers = [(h.header.key, h.header.value) for h in ok.headers]
        if ok.headers_to_remove:
            headers.append((HEADERS_TO_REMOVE, ", ".join(ok.headers_to_remove)))
        return 200, headers, b""
    denied = resp.denied_response
    status = int(denied.status.code) or 403
    if status == 200:  # never an allow by accident
        status = 403
    return status, [(h.header.key, h.header.value) for h in denied.headers], denied.body.encode()


class HttpAuthzServer:
    """The HTTP ext_authz listener. ``start``/``stop`` on a running event loop."""

    def __init__(
        self, checker: Checker, addr: str, trusted: TrustedProxies, *, path_prefix: str = "",
        ssl_context: ssl.SSLContext | None = None, max_connections: int = 1024,
        idle_timeout: float = 60.0, reuse_port: bool = False, headers: frozenset[str] = DEFAULT_HEADERS,
    ) -> None:
        """``headers``: the request headers Envoy forwards (its ``allowed_headers``); a bundle
        reading any other denies every check. The callers' principals are carried only on
        connections from a trusted proxy."""
        self.checker = checker
        problem = header_names_problem(headers)
        if problem is not None:
            raise ValueError(problem)
        self.carries = frozenset({*(f"header:{h}" for h in headers), *_ALWAYS_CARRIED, "certificate"})
        self.carries_trusted = self.carries | {"principal"}
        # A certificate Envoy's RBAC would read every name of, which authz did not get.
        self.carries_unseen = self.carries_trusted - {"certificate"}
        self.addr = addr
        self.trusted = trusted
        self.path_prefix = path_prefix
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.reuse_port = reuse_port
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, _, port = self.addr.rpartition(":")
        try:
            self._server = await asyncio.start_server(
                self._connection, host.strip("[]") or "0.0.0.0", int(port), ssl=self.ssl_context,
                limit=MAX_HEADER_BYTES, reuse_port=self.reuse_port or None, backlog=1024)
        except OSError as exc:  # one line naming the address (authz serve exits 2)
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"cannot listen on HTTP ext_authz address {self.addr}: {reason}") from None

    async def stop(self) -> None:
        """Stop listening and close every connection (idle keep-alive ones would otherwise hold
        wait_closed for the idle timeout on newer Pythons)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            except TimeoutError:
                log.warning("HTTP ext_authz connections still open after 5 s at shutdown")

    # --- one connection --------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.connections > self.max_connections:
                writer.write(render(503, [], b"", close=True))
                await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)
                await linger(reader, writer, max_bytes=2 * MAX_BODY_BYTES)
                return
            peer = writer.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) and peer else ""
            trusted = self.trusted.trusts(address, _peer_spiffe_id(writer))
            while await self._one(reader, writer, trusted):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        except Exception:  # noqa: BLE001 - a connection's failure never reaches the loop
            log.exception("HTTP ext_authz connection failed")
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trusted: bool) -> bool:
        """Answer one request; False when the connection should close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._deny(reader, writer, "incomplete request head", 400)
            return False
        except asyncio.LimitOverrunError:
            await self._deny(reader, writer, "request head too large", 431)
            return False
        try:
            method, target, headers, close = parse_head(head)
            length = headers.get("content-length")
            if "transfer-encoding" in headers:
                raise Malformed("chunked request bodies are not accepted", 400)
            if length:
                if not (length.isascii() and length.isdigit()) or len(length) > 12 or int(length) > MAX_BODY_BYTES:
                    raise Malformed("request body too large or bad content-length", 413)
                # the body is not decided on; a client that stalls in it holds no connection long
                await asyncio.wait_for(reader.readexactly(int(length)), self.idle_timeout)
            path = strip_prefix(target, self.path_prefix)
            if path is None:
                raise Malformed(f"path does not start with the configured prefix {self.path_prefix!r}", 403)
            check_request, unseen = to_check_request(method, path, headers, trusted)
        except Malformed as exc:
            await self._deny(reader, writer, exc.reason, exc.status)
            return False
        except XfccError as exc:
            outcome = self.checker.run(None, caller=CALLER_ENVOY_HTTP,
                                       malformed=f"bad x-forwarded-client-cert: {exc}")
            await self._answer(writer, *to_http(outcome.response), close, method == "HEAD")
            return not close
        carries = self.carries if not trusted else self.carries_unseen if unseen else self.carries_trusted
        outcome = self.checker.run(check_request, caller=CALLER_ENVOY_HTTP, socket=False, carries=carries)
        await self._answer(writer, *to_http(outcome.response), close, method == "HEAD")
        return not close

    async def _deny(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str,
                    status: int) -> None:
        # Audited and counted like any malformed check; the status says what was wrong.
        outcome = self.checker.run(None, caller=CALLER_ENVOY_HTTP, malformed=reason)
        _, headers, body = to_http(outcome.response)
        await self._answer(writer, status, headers, body, True)
        await linger(reader, writer, max_bytes=2 * MAX_BODY_BYTES)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]],
                      body: bytes, close: bool, head: bool = False) -> None:
        writer.write(render(status, headers, body, close, head))
        # A client that never reads its answers must not hold the connection for ever.
        await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT)


def _peer_spiffe_id(writer: asyncio.StreamWriter) -> str:
    """The URI SAN of a verified TLS client certificate, or ''."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert()
    if not cert:
        return ""
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return uris[0] if len(uris) == 1 else ""


# --- `authz serve` flags ------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HTTP ext_authz (Envoy http_service; docs/http-ext-authz.md)")
    g.add_argument("--http-authz-addr", type=address, metavar="H:P",
                   help="also answer Envoy's HTTP ext_authz protocol on this address (off by default)")
    g.add_argument("--trusted-proxy", action="append", default=[], metavar="PATTERN",
                   help="a proxy whose x-forwarded-client-cert is believed: an address or CIDR, or a "
                        "SPIFFE ID of its TLS client certificate (a * matches within one path segment); repeatable. "
                        "From anyone else the header is ignored and the caller has no principal")
    g.add_argument("--http-authz-path-prefix", default="", metavar="PREFIX",
                   help="Envoy's http_service path_prefix, removed from every path (default none)")
    g.add_argument("--http-authz-tls-cert", type=Path, metavar="PEM",
                   help="serve HTTP ext_authz over TLS with this certificate chain")
    g.add_argument("--http-authz-tls-key", type=Path, metavar="PEM", help="its private key")
    g.add_argument("--http-authz-client-ca", type=Path, metavar="PEM",
                   help="require client certificates from this CA (mTLS): needed to trust a proxy "
                        "by SPIFFE ID")
    g.add_argument("--http-authz-headers", action="append", default=[], metavar="NAMES",
                   help="the request headers Envoy's allowed_headers forwards (comma-separated, repeatable; "
                        "default: x-request-id and the method, path and host override headers, as "
                        "docs/http-ext-authz.md configures it). While the bundle reads any other header, "
                        "every HTTP check is denied")
    g.add_argument("--http-authz-max-connections", type=int, default=1024, metavar="N",
                   help="open connections accepted before new ones are answered 503 (default 1024)")


def server_from_args(args: argparse.Namespace, checker: Checker) -> HttpAuthzServer | None:
    """The server the flags ask for, or None; ValueError names a bad flag."""
    if not args.http_authz_addr:
        if args.trusted_proxy:
            raise ValueError("--trusted-proxy needs --http-authz-addr")
        return None
    trusted = TrustedProxies.parse(args.trusted_proxy)
    prefix = args.http_authz_path_prefix
    if prefix and not prefix.startswith("/"):
        raise ValueError(f"--http-authz-path-prefix must start with '/', not {prefix!r}")
    context = None
    if args.http_authz_tls_cert or args.http_authz_tls_key:
        if not (args.http_authz_tls_cert and args.http_authz_tls_key):
            raise ValueError("--http-authz-tls-cert and --http-authz-tls-key go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(args.http_authz_tls_cert, args.http_authz_tls_key)
            if args.http_authz_client_ca:
                context.load_verify_locations(cafile=str(args.http_authz_client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use the HTTP ext_authz TLS files: {exc}") from None
    elif args.http_authz_client_ca:
        raise ValueError("--http-authz-client-ca needs --http-authz-tls-cert and --http-authz-tls-key")
    if trusted.ids and not (context and args.http_authz_client_ca):
        raise ValueError("a SPIFFE ID in --trusted-proxy needs mTLS on the HTTP ext_authz listener "
                         "(--http-authz-tls-cert, --http-authz-tls-key, --http-authz-client-ca)")
    if args.http_authz_max_connections < 1:
        raise ValueError("--http-authz-max-connections must be at least 1")
    named = [h.strip().lower() for value in args.http_authz_headers for h in value.split(",") if h.strip()]
    return HttpAuthzServer(checker, args.http_authz_addr, trusted, path_prefix=prefix,
                           ssl_context=context, max_connections=args.http_authz_max_connections,
                           reuse_port=args.worker_index is not None,
                           headers=frozenset(named) if named else DEFAULT_HEADERS)
