"""TLS on our own listeners: mTLS on gRPC with a caller allow-list, TLS on HTTP, live rotation.

- gRPC (``--grpc-tls-cert``, ``--grpc-tls-key``; ``--grpc-client-ca`` requires client
  certificates signed by that CA). The credentials are grpcio's dynamic ones: at every new
  handshake grpc asks ``_fetch`` for a newer configuration, so a rotated certificate serves
  from the next connection on while established connections (and their in-flight checks)
  carry on untouched.
- ``--allow-caller PATTERN`` (repeatable) names the SPIFFE IDs that may call at all. The
  ``CallerGate`` interceptor reads the peer's URI SAN from the TLS auth context and answers
  PERMISSION_DENIED before any decision is made; each refusal is counted in
  ``authz_callers_refused_total{reason}`` and logged (at most once a second per caller).
- HTTP (``--http-tls-cert``, ``--http-tls-key``): the probe server (authz.probe_server) serves
  with a context whose SNI callback switches every new handshake to the latest certificate.

Patterns: a full SPIFFE ID, where ``*`` inside a path segment matches any characters of
that one segment (``spiffe://cluster.local/ns/*/sa/envoy``). The trust domain is literal.
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from authz.certs import CertFiles, CredentialError, Material, RotatingCertificate, load_into
from authz.metrics import Metrics

log = logging.getLogger("authz.tls")

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._*-]+$")


class CallerPattern:
    """A SPIFFE ID whose `*` stays within one path segment: `.../ns/prod*` does not take
    `.../ns/production-evil`, nor a trust domain pattern another trust domain."""

    def __init__(self, text: str, flag: str = "--allow-caller") -> None:
        if not text.startswith("spiffe://"):
            raise ValueError(f"{flag} {text!r}: not a SPIFFE ID (spiffe://<trust domain>/...)")
        td, _, path = text[len("spiffe://"):].partition("/")
        if not _TRUST_DOMAIN.match(td):
            raise ValueError(f"{flag} {text!r}: the trust domain must be written out "
                             "(lower-case letters, digits, '.', '-', '_'; no '*')")
        segments = path.split("/") if path else []
        if not segments or not all(_SEGMENT.match(s) for s in segments):
            raise ValueError(f"{flag} {text!r}: the path must be non-empty segments of "
                             "letters, digits, '.', '-', '_' or '*'")
        self.text = text
        body = "/".join("[^/]*".join(re.escape(p) for p in s.split("*")) for s in segments)
        self._regex = re.compile(re.escape(f"spiffe://{td}/") + body + r"\Z")

    def matches(self, spiffe_id: str) -> bool:
        return self._regex.match(spiffe_id) is not None


class CallerPolicy:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(CallerPattern(p) for p in patterns)
        self._exact = frozenset(p.text for p in self.patterns if "*" not in p.text)

    def allows(self, spiffe_id: str) -> bool:
        return spiffe_id in self._exact or any(p.matches(spiffe_id) for p in self.patterns)


def peer_spiffe_id(context: grpc.ServicerContext) -> tuple[str | None, str]:
    """(the caller's SPIFFE ID, '') or (None, why there is none)."""
    auth = context.auth_context()
    uris = [u.decode(errors="replace") for u in auth.get("peer_uri", [])]
    if not uris:
        if not auth.get("x509_pem_cert"):
            return None, "no_client_certificate"
        return None, "no_spiffe_id"
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        # An X509-SVID carries exactly one URI SAN, the SPIFFE ID.
        return None, "no_spiffe_id"
    return uris[0], ""


class _RefusalLog:
    """One log line per caller per second at most: refusals can come by the thousand."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def refused(self, who: str, reason: str, method: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(who)
            if last is not None and now - last < self.every:
                self._suppressed[who] = self._suppressed.get(who, 0) + 1
                return
            if len(self._last) > 10_000:
                self._last.clear()
            self._last[who] = now
            more = self._suppressed.pop(who, 0)
        log.warning("refused gRPC call %s from %s: %s (PERMISSION_DENIED, no decision made)%s",
                    method, who, reason, f"; {more} more refused since the last line" if more else "")


class CallerGate(grpc.ServerInterceptor):  # type: ignore[misc]
    """PERMISSION_DENIED for every call whose peer is not an allowed SPIFFE ID."""

    def __init__(self, policy: CallerPolicy, metrics: Metrics) -> None:
        self.policy = policy
        self.metrics = metrics
        self._log = _RefusalLog()
        for reason in ("not_allowed", "no_spiffe_id", "no_client_certificate"):
            metrics.callers_refused.labels(reason)
        # Wrapped handlers by method: grpc hands out the same handler for a method each time.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def refusal(self, context: grpc.ServicerContext, method: str) -> str | None:
        spiffe_id, reason = peer_spiffe_id(context)
        if spiffe_id is not None and self.policy.allows(spiffe_id):
            return None
        if spiffe_id is not None:
            reason = "not_allowed"
        self.metrics.callers_refused.labels(reason).inc()
        who = spiffe_id or "a caller without a SPIFFE ID"
        self._log.refused(who, reason.replace("_", " "), method)
        return f"caller {who} is not allowed to call authz ({reason.replace('_', ' ')})"

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < 64:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        """The same handler, its behaviour preceded by the caller check (run on the serving
        thread, before the request is used). A behaviour's own thread pool is kept."""
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        kind = next(k for k in kinds if getattr(handler, k) is not None)
        inner = getattr(handler, kind)

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            message = self.refusal(context, method)
            if message is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
            return inner(request, context)

        pool = getattr(inner, "experimental_thread_pool", None)
        if pool is not None:
            behaviour.experimental_thread_pool = pool  # type: ignore[attr-defined]
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


# --- credentials ---------------------------------------------------------------------------


def grpc_credentials(cert: RotatingCertificate, require_client_auth: bool) -> grpc.ServerCredentials:
    def config(material: Material) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem)

    served = [cert.generation]

    def fetch() -> Any:
        # Called by grpc at every new handshake: cheap unless the material changed.
        generation = cert.generation
        if generation == served[0]:
            return None
        served[0] = generation
        return config(cert.current)

    return grpc.dynamic_ssl_server_credentials(
        config(cert.current), fetch, require_client_authentication=require_client_auth)


def http_ssl_context(cert: RotatingCertificate) -> ssl.SSLContext:
    """A server context that hands each new handshake the newest certificate."""

    def build(material: Material) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_into(ctx, material)
        return ctx

    latest = [cert.generation, build(cert.current)]

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
             base: ssl.SSLContext) -> None:
        if latest[0] != cert.generation:
            generation = cert.generation
            try:
                latest[1] = build(cert.current)
                latest[0] = generation
            except (ssl.SSLError, OSError):
                log.exception("cannot build the HTTP TLS context from the rotated certificate")
        ctx = latest[1]
        assert isinstance(ctx, ssl.SSLContext)
        sock.context = ctx

    base = build(cert.current)
    base.sni_callback = pick
    return base


# --- flags ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS on the listeners (docs/security.md)")
    g.add_argument("--grpc-tls-cert", type=Path, metavar="PEM",
                   help="serve gRPC over TLS with this certificate chain (re-read when it changes)")
    g.add_argument("--grpc-tls-key", type=Path, metavar="PEM", help="the private key of --grpc-tls-cert")
    g.add_argument("--grpc-client-ca", type=Path, metavar="PEM",
                   help="require gRPC client certificates signed by these CAs (mTLS)")
    g.add_argument("--allow-caller", action="append", default=[], metavar="SPIFFE_ID",
                   help="SPIFFE ID pattern that may ask for decisions ('*' matches within one "
                        "path segment); repeatable; others get PERMISSION_DENIED")
    g.add_argument("--http-tls-cert", type=Path, metavar="PEM",
                   help="serve the HTTP endpoints over TLS with this certificate chain")
    g.add_argument("--http-tls-key", type=Path, metavar="PEM", help="the private key of --http-tls-cert")
    g.add_argument("--tls-watch-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often certificate files are checked for changes (default 1)")


@dataclass
class ServerTls:
    """What `authz serve` needs to secure its listeners; None parts are plaintext."""

    grpc: RotatingCertificate | None = None
    require_client_cert: bool = False
    callers: CallerPolicy | None = None
    http: RotatingCertificate | None = None
    watch_interval: float = 1.0

    def interceptors(self, metrics: Metrics) -> list[Any]:
        return [CallerGate(self.callers, metrics)] if self.callers is not None else []

    def certificates(self) -> dict[str, RotatingCertificate]:
        return {k: v for k, v in (("grpc", self.grpc), ("http", self.http)) if v is not None}

    def start(self) -> None:
        for cert in self.certificates().values():
            cert.start(self.watch_interval)

    def stop(self) -> None:
        for cert in self.certificates().values():
            cert.stop()

    def expired(self) -> list[str]:
        """The listeners whose serving certificate has expired."""
        return [use for use, cert in self.certificates().items() if cert.expired()]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for use, cert in self.certificates().items():
            doc = cert.status()
            if use == "grpc":
                doc["client_certificates"] = "required" if self.require_client_cert else "not requested"
                doc["allowed_callers"] = ([p.text for p in self.callers.patterns]
                                          if self.callers is not None else None)
            out[use] = doc
        return out


def from_args(args: argparse.Namespace, metrics: Metrics) -> ServerTls:
    """The listeners' TLS from the flags; ValueError with a readable reason on bad ones."""
    tls = ServerTls(watch_interval=max(0.05, args.tls_watch_interval))
    if (args.grpc_tls_cert is None) != (args.grpc_tls_key is None):
        raise ValueError("--grpc-tls-cert and --grpc-tls-key go together")
    if (args.http_tls_cert is None) != (args.http_tls_key is None):
        raise ValueError("--http-tls-cert and --http-tls-key go together")
    if args.grpc_client_ca is not None and args.grpc_tls_cert is None:
        raise ValueError("--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key")
    if args.allow_caller and args.grpc_client_ca is None:
        raise ValueError("--allow-caller needs --grpc-client-ca: callers are known by their "
                         "client certificates")
    if args.grpc_tls_cert is not None:
        files = CertFiles(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_client_ca)
        try:
            tls.grpc = RotatingCertificate("grpc", files, metrics)
        except CredentialError as exc:
            raise ValueError(f"gRPC TLS: {exc}") from None
        tls.require_client_cert = args.grpc_client_ca is not None
        if args.allow_caller:
            tls.callers = CallerPolicy(args.allow_caller)
        elif tls.require_client_cert:
            log.warning("--grpc-client-ca without --allow-caller: every certificate the CA "
                        "signed may ask for decisions")
    else:
        log.warning("gRPC listener is plaintext without authentication: anyone who reaches it "
                    "may ask for decisions (--grpc-tls-cert, --grpc-client-ca; docs/security.md)")
    if args.http_tls_cert is not None:
        try:
            tls.http = RotatingCertificate("http", CertFiles(args.http_tls_cert, args.http_tls_key),
                                           metrics)
        except CredentialError as exc:
            raise ValueError(f"HTTP TLS: {exc}") from None
    return tls
