"""Bundles in OCI registries: ``authz build --push oci://...``, ``authz serve --bundle oci://...``.

A bundle travels as an OCI artifact (image-spec 1.1): one layer holding the archive that
``authz build`` writes, MANIFEST.json and MANIFEST.sig inside it as for every other source.

    manifest   application/vnd.oci.image.manifest.v1+json, artifactType ARTIFACT_TYPE
    config     the empty descriptor (application/vnd.oci.empty.v1+json, ``{}``)
    layer      application/vnd.authz.bundle.v1.tar+gzip

``OciSource`` resolves the tag with a HEAD on the manifest and downloads the manifest and
the layer only when the manifest digest differs from the last one it judged. Every byte it
hands on is verified: the manifest against its digest, the layer against the size and digest
the manifest gives; the gate then verifies the bundle's own manifest and signature. A
reference pinned by digest (``@sha256:...``) is fetched once, and again only on SIGHUP.

The distribution API is spoken directly with urllib, so the poll, timeout, size and backoff
rules are exactly those of HttpSource: one deadline covers a whole fetch (token, manifest,
layer), and no body is read past the size limit.

Registry auth: anonymous first; on a 401 the registry's challenge decides. ``Bearer`` runs
the Docker token flow (GET the realm with service and scope, with basic credentials when the
credentials file has some for this registry); ``Basic`` sends the credentials file's user
and password. The credentials file is a Docker ``config.json`` (``auths.HOST.auth`` or
``username``/``password``), read when a challenge needs it, so a rotated file is picked up.
No credential or token ever appears in an error, a log line or the command line.

Transport: https, verified with the ``--ca-file`` context. A registry on a loopback address,
or one named by ``--insecure-registry`` (Docker's "insecure registries"), may be plain http:
https is tried first and plain http used only when the registry does not speak TLS (never
after a certificate error). Credentials go over plain http only to such a registry itself or
to a loopback token realm. Every request is bounded by the fetch's deadline as a whole, not
only per read: the watchdog of HttpSource shuts the socket down at the deadline, so a registry
dripping its headers or body a byte at a time fails the fetch at ``--poll-timeout``.

Redirects (registries send blob downloads to storage, often a CDN on another host) are
followed at most three times, to https only (plain http only within an insecure or loopback
registry itself, never from https), and not to a loopback, link-local or private address unless
the registry is on one of the same kind (``redirect_refusal``). The Authorization header never
goes to another host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any

from authz.bundle.archive import DEFAULT_LIMITS, Limits, Snapshot, reject, unpack
from authz.bundle.sources import (
    BodyCut,
    BodyTooLarge,
    BodyTooSlow,
    PollPolicy,
    RedirectRefused,
    SourceUnavailable,
    Watchdog,
    WatchedHTTPHandler,
    WatchedHTTPSHandler,
    poll_delay,
    read_body,
)
from authz.redact import redact_url
from authz.tls import ClientTls, client_context

log = logging.getLogger("authz.bundle")

SCHEME = "oci://"
ARTIFACT_TYPE = "application/vnd.authz.bundle.v1"
LAYER_MEDIA_TYPE = "application/vnd.authz.bundle.v1.tar+gzip"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what distribution itself accepts
MAX_REDIRECTS = 3  # registry -> storage is one; a chain longer than a few is not a registry's
USER_AGENT = "authz-bundle-oci"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"  # the distribution spec's path component
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"|(\w+)=([^\s,]+)')


class RegistryError(SourceUnavailable):
    """The registry could not be used (unreachable, refused, no such tag, bad credentials)."""


class _TimedOut(RegistryError):
    """The deadline passed before a request finished."""


# --- references ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    """``oci://REGISTRY/REPOSITORY:TAG`` or ``...@sha256:HEX`` (a digest wins over a tag)."""

    registry: str  # host[:port], as in the credentials file
    repository: str
    tag: str | None
    digest: str | None

    @property
    def host(self) -> str:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.endswith("]") else self.registry
        return host.strip("[]")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def plain_http_allowed(self, insecure: Collection[str] = ()) -> bool:
        """Loopback registries, and those the operator named as insecure (host[:port])."""
        return self.loopback or self.registry.lower() in {r.lower() for r in insecure}

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{SCHEME}{self.registry}/{self.repository}{at}"

    def pinned(self, digest: str) -> str:
        return f"{SCHEME}{self.registry}/{self.repository}@{digest}"


def parse_reference(text: str) -> Reference:
    """Raises ValueError with the reason when ``text`` is not a usable OCI reference (quoting
    it without user info: `oci://user:password@registry/...` must not reach stderr)."""
    shown = repr(redact_url(text))
    if not text.startswith(SCHEME):
        raise ValueError(f"not an OCI reference (oci://REGISTRY/REPOSITORY:TAG): {shown}")
    rest = text[len(SCHEME):]
    registry, _, path = rest.partition("/")
    if not registry or not path or any(c in registry for c in "@?#"):
        raise ValueError(f"OCI reference needs a registry and a repository: {shown}")
    digest = tag = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"OCI reference digest must be sha256:<64 hex digits>: {shown}")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise ValueError(f"OCI reference has an invalid tag {tag!r}: {shown}")
    if not _REPOSITORY.fullmatch(path):
        raise ValueError(
            f"OCI repository {path!r} is invalid (lower-case letters, digits, '.', '_', '-', '/'): "
            f"{shown}"
        )
    if tag is None and digest is None:
        raise ValueError(f"OCI reference needs :TAG or @sha256:DIGEST: {shown}")
    return Reference(registry, path, tag, digest)


# --- credentials ---------------------------------------------------------------------------


def _registry_key(key: str) -> str:
    """``https://host:5000/v1/`` or ``host:5000`` -> ``host:5000`` (Docker writes both forms)."""
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def load_credentials(path: Path, registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from a Docker config.json, or None when it has none.

    Raises RegistryError naming the file (never its content) when it cannot be used.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
        raise RegistryError(f"cannot read registry credentials {path}: {reason}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise RegistryError(f"registry credentials {path} have no 'auths' object")
    want = registry.lower()
    for key, entry in auths.items():
        if _registry_key(str(key)) != want or not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if isinstance(user, str) and isinstance(password, str):
            return user, password
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                name, sep, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if sep:
                return name, secret
            raise RegistryError(
                f"registry credentials {path}: the 'auth' of {registry} is not base64 user:password"
            )
        raise RegistryError(
            f"registry credentials {path}: {registry} has neither 'auth' nor username and "
            "password (credential helpers and identity tokens are not supported)"
        )
    return None


# --- the registry client -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: Mapping[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        if m.group(1):
            params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", m.group(2))
        else:
            params[m.group(3).lower()] = m.group(4)
    return Challenge(scheme.lower(), params)


def redirect_refusal(registry: str, plain_http: bool, old: str, new: str) -> str | None:
    """Why a redirect from ``old`` to ``new`` is not followed for ``registry``; None when it is.

    A registry's redirects are only ever followed as far as a registry itself could be: a
    redirect must not make authz probe the network it runs in (cloud metadata at 169.254.169.254,
    admin ports on loopback), even blind, since the digest check would tell how much came back.
    """
    was, to = urllib.parse.urlsplit(old), urllib.parse.urlsplit(new)
    if to.scheme == "http":
        if plain_http and was.scheme == "http" and to.netloc.lower() == registry.lower():
            return None
        return "plain http is followed only within an insecure registry itself, never from https"
    if to.scheme != "https":
        return f"only https (or http within an insecure registry) is followed, not {to.scheme}:"
    if to.netloc.lower() == registry.lower():
        return None
    target = _address_kinds(to.hostname or "")
    if not target:
        if urllib.request.getproxies().get("https"):
            return None  # behind a proxy only the proxy may know the storage host's address
        return f"{to.hostname} does not resolve"
    registry_host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    own = target - {"public"} - _address_kinds(registry_host)
    if own:
        return f"it is a {' and '.join(sorted(own))} address and the registry is not on one"
    return None


def realm_refusal(registry: str, plain_http: bool, realm: str) -> str | None:
    """Why the token realm a registry names is not sent the credentials; None when it may be.
    A realm goes as far as a redirect may (redirect_refusal): a registry naming a realm on
    loopback or a metadata address would otherwise have the password sent there, in clear
    over plain http. Plain http only to a registry that is itself loopback or insecure, on
    its own host."""
    to = urllib.parse.urlsplit(realm)
    registry_host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    if to.scheme == "http":
        if plain_http and to.netloc.lower() == registry.lower():
            return None
        if registry_host in LOOPBACK_HOSTS and (to.hostname or "") in LOOPBACK_HOSTS:
            return None
        return "plain http only to a loopback registry's own loopback or to an --insecure-registry itself"
    return redirect_refusal(registry, plain_http, f"https://{registry}/", realm)


def _address_kinds(host: str) -> frozenset[str]:
    """The kinds of the addresses ``host`` is or resolves to now (none if it does not resolve)."""
    if not host:
        return frozenset()
    try:
        found = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            found = [ipaddress.ip_address(info[4][0]) for info in infos]
        except (OSError, UnicodeError, ValueError):
            return frozenset()
    return frozenset(_address_kind(ip) for ip in found)


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 reaches 169.254.169.254
    if ip.is_loopback or ip.is_unspecified:  # connecting to 0.0.0.0 reaches this host
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return "public" if ip.is_global else "private"


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows what ``redirect_refusal`` allows, without the Authorization header to another
    host and within the deadline of the request."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, registry: str, plain_http: bool) -> None:
        self.registry = registry
        self.plain_http = plain_http
        self.deadline = float("inf")  # of the request in progress (RegistryClient._open)

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: HTTPMessage, newurl: str,
    ) -> urllib.request.Request | None:
        fp.close()  # urllib would read the redirect's whole body first, however large
        why = redirect_refusal(self.registry, self.plain_http, req.full_url, newurl)
        if why is None and len(getattr(req, "redirect_dict", {})) >= self.max_redirections:
            why = f"more than {self.max_redirections} redirects"
        if why is not None:
            raise RedirectRefused(
                f"registry {self.registry} redirected {req.get_method()} {_path(req.full_url)} "
                f"to {_shown(newurl)}: refused, {why}"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        if urllib.parse.urlsplit(req.full_url).netloc != urllib.parse.urlsplit(new.full_url).netloc:
            new.remove_header("Authorization")
        # urllib opens the next hop with the first one's timeout: give it what is left.
        req.timeout = max(0.01, self.deadline - time.monotonic())
        return new


def _opener(
    ctx: ssl.SSLContext, watch: Watchdog, redirects: _Redirects
) -> urllib.request.OpenerDirector:
    """http and https only: build_opener would add ftp:, file: and data: handlers."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
        WatchedHTTPHandler(watch), WatchedHTTPSHandler(watch, context=ctx),
        urllib.request.HTTPDefaultErrorHandler(), redirects, urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@dataclass(frozen=True, slots=True)
class Response:
    """Status, headers and a body read under the deadline and a size limit."""

    status: int
    headers: Message
    body: bytes


class RegistryClient:
    """The distribution API for one registry: requests with auth, a deadline and size limits."""

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool,
        credentials: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.plain_http = plain_http
        self.credentials = credentials
        self.scheme = "https"
        self._scheme_known = not plain_http
        self._ssl: ssl.SSLContext | None = None
        self._watch = Watchdog()
        self._redirects = _Redirects(registry, plain_http)
        self.use_context(ssl_context or client_context())
        self._auth: dict[str, tuple[str, float]] = {}  # scope -> (Authorization value, expiry)
        self.requests = 0  # made to the registry, for logs and tests

    def use_context(self, ctx: ssl.SSLContext) -> None:
        """TLS for the next requests (a rotated --client-cert comes as a new context)."""
        if ctx is not self._ssl:
            self._ssl = ctx
            self._opener = _opener(ctx, self._watch, self._redirects)

    # --- requests ------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.registry}{path}"

    def request(
        self, method: str, path: str, *, scope: str, deadline: float, max_bytes: int,
        headers: Mapping[str, str] | None = None, body: bytes | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Response:
        """One API call; a 401 is answered once through the registry's challenge.

        ``path`` is absolute (``/v2/...``) or a full URL given by the registry (an upload
        location). Raises RegistryError for anything but an ``ok`` status.
        """
        if not self._scheme_known:
            self._pick_scheme(deadline)
        resp = self._send(method, path, scope, deadline, max_bytes, headers, body)
        if resp.status == 401:
            with_credentials = self._authenticate(
                resp.headers.get("WWW-Authenticate"), scope, deadline
            )
            resp = self._send(method, path, scope, deadline, max_bytes, headers, body)
            if resp.status == 401:
                raise RegistryError(
                    f"registry {self.registry} refused the credentials for {scope} (HTTP 401)"
                    if with_credentials else self._no_credentials()
                )
        if resp.status not in ok:
            raise RegistryError(
                f"registry {self.registry} answered HTTP {resp.status} to {method} {_path(path)}"
                f"{_api_error(resp.body)}"
            )
        return resp

    def _pick_scheme(self, deadline: float) -> None:
        """A loopback or insecure registry: https when it speaks TLS, else plain http."""
        try:
            self._open(urllib.request.Request(self.url("/v2/"), method="GET"), deadline, 65536)
        except RegistryError as exc:
            if not isinstance(exc.__cause__, ssl.SSLError) or isinstance(
                exc.__cause__, ssl.SSLCertVerificationError
            ):
                raise
            self.scheme = "http"
        self._scheme_known = True

    def _send(
        self, method: str, path: str, scope: str, deadline: float, max_bytes: int,
        headers: Mapping[str, str] | None, body: bytes | None,
    ) -> Response:
        url = path if "://" in path else self.url(path)
        req = urllib.request.Request(url, data=body, method=method)
        req.add_header("User-Agent", USER_AGENT)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        auth = self._auth.get(scope)
        # An upload location may name another host: credentials go to the registry only.
        same_host = urllib.parse.urlsplit(url).netloc == self.registry
        if auth is not None and auth[1] > time.monotonic() and same_host:
            req.add_header("Authorization", auth[0])
        return self._open(req, deadline, max_bytes)

    def _open(self, req: urllib.request.Request, deadline: float, max_bytes: int) -> Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._late(req)
        self.requests += 1
        self._redirects.deadline = deadline
        # The socket timeout bounds each wait; the watchdog bounds the whole exchange, which
        # a registry dripping its headers or body a byte at a time would stretch without end.
        with self._watch.armed(remaining):
            try:
                resp = self._opener.open(req, timeout=remaining)
            except RedirectRefused as exc:
                raise RegistryError(str(exc.reason)) from None
            except urllib.error.HTTPError as exc:
                try:
                    # Error bodies are small JSON; read a little for the reason, never more.
                    body = exc.read(4096) if exc.fp is not None else b""
                except (OSError, ValueError, http.client.HTTPException):
                    body = b""
                finally:
                    exc.close()
                if self._watch.fired:
                    raise self._late(req) from None
                return Response(exc.code, exc.headers, body)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if self._watch.fired or time.monotonic() >= deadline:
                    raise self._late(req) from None
                reason = getattr(exc, "reason", exc)
                raise RegistryError(f"registry {self.registry} unreachable: {reason}") from (
                    reason if isinstance(reason, BaseException) else exc
                )
            with resp:
                status, headers = int(resp.status), resp.headers
                if req.get_method() == "HEAD":
                    return Response(status, headers, b"")
                return Response(status, headers, self._read(resp, req, max_bytes))

    def _read(self, resp: Any, req: urllib.request.Request, limit: int) -> bytes:
        try:
            return read_body(resp, limit, self._watch)
        except BodyTooLarge as exc:
            raise _TooLarge(exc.size, limit) from None
        except BodyTooSlow:
            raise self._late(req) from None
        except BodyCut as exc:  # the connection's fault, not the artifact's: no digest verdict
            raise RegistryError(f"download of {_path(req.full_url)} {exc}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise RegistryError(f"download of {_path(req.full_url)} failed: {exc}") from None

    def _late(self, req: urllib.request.Request) -> _TimedOut:
        return _TimedOut(
            f"registry {self.registry}: {req.get_method()} {_path(req.full_url)} did not finish "
            "in time"
        )

    # --- auth ----------------------------------------------------------------------------

    def _authenticate(self, header: str | None, scope: str, deadline: float) -> bool:
        """Answer the challenge in ``header``; True when credentials were used."""
        challenge = parse_challenge(header)
        if challenge is None:
            raise RegistryError(f"registry {self.registry} answered 401 without a challenge")
        creds = self._credentials()
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryError(self._no_credentials())
            self._ensure_safe_transport(self.url("/"))
            self._auth[scope] = (f"Basic {_basic(creds)}", float("inf"))
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryError(
                f"registry {self.registry} asks for an unsupported authentication scheme "
                f"{challenge.scheme!r}"
            )
        realm = challenge.params["realm"]
        refusal = realm_refusal(self.registry, self.plain_http, realm)
        if refusal is not None:
            raise RegistryError(f"registry {self.registry}: token realm {_shown(realm)} refused: {refusal}")
        self._ensure_safe_transport(realm)
        query = [("service", challenge.params["service"])] if "service" in challenge.params else []
        # Our own scope (a push needs pull and push even where the registry's first
        # challenge, on a HEAD, names pull only) and the one the registry names, if other.
        query.append(("scope", scope))
        if challenge.params.get("scope", scope) != scope:
            query.append(("scope", challenge.params["scope"]))
        sep = "&" if urllib.parse.urlsplit(realm).query else "?"
        req = urllib.request.Request(realm + sep + urllib.parse.urlencode(query), method="GET")
        req.add_header("User-Agent", USER_AGENT)
        if creds is not None:
            req.add_header("Authorization", f"Basic {_basic(creds)}")
        resp = self._open(req, deadline, 1024 * 1024)
        if resp.status != 200:
            why = "refused the credentials" if creds is not None else "gave no anonymous token"
            raise RegistryError(
                f"token service of {self.registry} {why} for {scope} (HTTP {resp.status})"
                + ("" if creds is not None or resp.status not in (401, 403) else
                   "; " + self._no_credentials())
            )
        token: object = None
        lifetime = 0.0
        try:
            doc = json.loads(resp.body)
            token = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            pass
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service of {self.registry} answered without a token")
        # Renew a little early so a token never expires between resolve and download.
        self._auth[scope] = (f"Bearer {token}", time.monotonic() + max(1.0, lifetime - 5))
        return creds is not None

    def _credentials(self) -> tuple[str, str] | None:
        if self.credentials is None:
            return None
        return load_credentials(self.credentials, self.registry)

    def _no_credentials(self) -> str:
        where = (
            f"{self.credentials} has none for it" if self.credentials is not None
            else "give --registry-credentials FILE (Docker config.json)"
        )
        return f"registry {self.registry} requires authentication: {where}"

    def _ensure_safe_transport(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" or (parts.scheme == "http" and (
            (parts.hostname or "") in LOOPBACK_HOSTS
            or (self.plain_http and parts.netloc.lower() == self.registry.lower())
        )):
            return
        raise RegistryError(
            f"registry {self.registry}: credentials are sent only over https (or plain http to "
            f"a loopback address or the --insecure-registry itself), not to "
            f"{parts.scheme}://{parts.netloc}"
        )


def _basic(creds: tuple[str, str]) -> str:
    return base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


class _TooLarge(RegistryError):
    """A body over its size limit: for a bundle or manifest, the candidate is rejected."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, over the size limit of {limit}")
        self.size = size
        self.limit = limit


def _shown(url: str) -> str:
    """``url`` without user info and query, for an error message."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _path(url: str) -> str:
    """The path of ``url`` without its query (upload locations carry state, storage URLs
    carry signatures): what an error message may show."""
    return urllib.parse.urlsplit(url).path or url


def _api_error(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        codes = [str(e.get("code")) for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        return ""
    return f" ({', '.join(codes)})" if codes else ""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- serving: the source -------------------------------------------------------------------


class OciSource:
    """Polls a tag (or fetches a pinned digest) in an OCI registry; see the module docstring."""

    polled = True

    def __init__(
        self,
        reference: str,
        limits: Limits = DEFAULT_LIMITS,
        policy: PollPolicy = PollPolicy(),
        *,
        credentials: Path | None = None,
        insecure: Collection[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        tls: ClientTls | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``tls`` (``--ca-file``, ``--client-cert``) gives the context per fetch, so a
        rotated client certificate is used from the next fetch on; else ``ssl_context``."""
        if policy.min_delay <= 0 or policy.max_delay < policy.min_delay:
            raise ValueError("poll delays must satisfy 0 < min <= max")
        self.ref = parse_reference(reference)
        self.description = str(self.ref)
        self.limits = limits
        self.policy = policy
        self.client = RegistryClient(
            self.ref.registry, plain_http=self.ref.plain_http_allowed(insecure),
            credentials=credentials,
            ssl_context=ssl_context or (tls.context() if tls is not None else None),
        )
        self._tls = tls if ssl_context is None else None
        self.digest: str | None = None  # manifest digest of the last candidate judged
        self.failures = 0
        self._rng = rng or random.Random()
        self._scope = f"repository:{self.ref.repository}:pull"

    def fetch(self, force: bool = False) -> Snapshot | None:
        deadline = time.monotonic() + self.policy.timeout
        if self._tls is not None:
            self.client.use_context(self._tls.context())
        try:
            digest, manifest = self._resolve(deadline)
            if digest == self.digest and not force:
                self.failures = 0
                return None
            log.info("%s: manifest %s, downloading the bundle", self.description, digest)
            data = self._download(digest, manifest, deadline)
        except SourceUnavailable:
            self.failures += 1
            raise
        except _Rejected as exc:
            # Remember the digest: the same manifest would be rejected again at every poll.
            self.failures = 0
            self.digest = exc.digest
            raise reject(_where(self.ref), str(exc)) from None
        self.failures = 0
        self.digest = digest
        snap = unpack(data, self.ref.pinned(digest), self.limits)
        return snap

    def _resolve(self, deadline: float) -> tuple[str, bytes | None]:
        """The manifest digest the reference names now, and the manifest when it was read."""
        if self.ref.digest is not None:
            return self.ref.digest, None
        path = f"/v2/{self.ref.repository}/manifests/{self.ref.tag}"
        head = self._call(
            "HEAD", path, deadline, headers={"Accept": MANIFEST_MEDIA_TYPE}, ok=(200, 404)
        )
        if head.status == 404:
            raise RegistryError(f"{self.description}: the registry has no such tag (HTTP 404)")
        digest = head.headers.get("Docker-Content-Digest", "").strip()
        if _DIGEST.fullmatch(digest):
            return digest, None
        # Registries need not send the digest on HEAD: read the manifest and hash it.
        manifest = self._manifest(path, deadline, "")
        return sha256_digest(manifest), manifest

    def _download(self, digest: str, manifest: bytes | None, deadline: float) -> bytes:
        if manifest is None:
            manifest = self._manifest(
                f"/v2/{self.ref.repository}/manifests/{digest}", deadline, digest
            )
        if sha256_digest(manifest) != digest:
            raise _Rejected(digest, f"manifest {digest} does not match its digest "
                                    f"(the registry sent {sha256_digest(manifest)})")
        layer = _bundle_layer(digest, manifest)
        size, blob_digest = layer
        if size > self.limits.max_bytes:
            raise _Rejected(digest, f"bundle layer is {size} bytes, over the size limit of "
                                    f"{self.limits.max_bytes}")
        try:
            data = self._call(
                "GET", f"/v2/{self.ref.repository}/blobs/{blob_digest}", deadline,
                max_bytes=self.limits.max_bytes,
            ).body
        except _TooLarge as exc:
            raise _Rejected(digest, f"bundle layer is {exc}") from None
        got = sha256_digest(data)
        if len(data) < size:
            # Cut in transit (the registry's Content-Length may not say so): tried again at
            # the next poll, not remembered as what the registry holds under this digest.
            raise SourceUnavailable(f"bundle layer of {digest} ended after {len(data)} of {size} bytes")
        if len(data) != size or got != blob_digest:
            raise _Rejected(
                digest,
                f"bundle layer digest mismatch: manifest {digest} says {blob_digest} "
                f"({size} bytes), the registry sent {got} ({len(data)} bytes)",
            )
        return data

    def _manifest(self, path: str, deadline: float, digest: str) -> bytes:
        try:
            return self._call(
                "GET", path, deadline, headers={"Accept": MANIFEST_MEDIA_TYPE},
                max_bytes=MAX_MANIFEST_BYTES,
            ).body
        except _TooLarge as exc:
            raise _Rejected(digest, f"manifest is {exc}") from None

    def _call(
        self, method: str, path: str, deadline: float, *, headers: Mapping[str, str] | None = None,
        max_bytes: int = MAX_MANIFEST_BYTES, ok: tuple[int, ...] = (200,),
    ) -> Response:
        try:
            return self.client.request(
                method, path, scope=self._scope, deadline=deadline, max_bytes=max_bytes,
                headers=headers, ok=ok,
            )
        except _TooLarge:
            raise
        except _TimedOut as exc:
            raise RegistryError(
                f"{self.description}: {exc} (--poll-timeout {self.policy.timeout:g}s covers the "
                "whole fetch)"
            ) from None
        except RegistryError as exc:
            raise RegistryError(f"{self.description}: {exc}") from None

    def fingerprint(self) -> None:
        return None

    def next_delay(self, ok: bool) -> float:
        return poll_delay(self.policy, self._rng, self.failures, ok)


class _Rejected(Exception):
    """What the registry holds under ``digest`` is not an acceptable bundle."""

    def __init__(self, digest: str, message: str) -> None:
        super().__init__(message)
        self.digest = digest


def _where(ref: Reference) -> str:
    return f"{ref.repository.rsplit('/', 1)[-1]}:{ref.tag}" if ref.tag else str(ref)


def _bundle_layer(digest: str, manifest: bytes) -> tuple[int, str]:
    """(size, digest) of the bundle layer of an OCI manifest; _Rejected when there is none."""
    try:
        doc = json.loads(manifest)
    except (ValueError, UnicodeDecodeError):
        raise _Rejected(digest, f"manifest {digest} is not JSON") from None
    if not isinstance(doc, dict):
        raise _Rejected(digest, f"manifest {digest} is not a JSON object")
    media = doc.get("mediaType")
    if media in INDEX_MEDIA_TYPES or "manifests" in doc:
        raise _Rejected(digest, f"{digest} is an image index, not an authz bundle")
    layers = doc.get("layers")
    found = [
        item for item in (layers if isinstance(layers, list) else [])
        if isinstance(item, dict) and item.get("mediaType") == LAYER_MEDIA_TYPE
    ]
    if len(found) != 1:
        what = "no layer" if not found else f"{len(found)} layers"
        raise _Rejected(
            digest, f"manifest {digest} has {what} of media type {LAYER_MEDIA_TYPE} "
                    f"(artifactType {doc.get('artifactType')!r}): not an authz bundle",
        )
    size, blob = found[0].get("size"), found[0].get("digest")
    if not isinstance(size, int) or size < 0 or not isinstance(blob, str):
        raise _Rejected(digest, f"manifest {digest}: the bundle layer has no valid size and digest")
    if not _DIGEST.fullmatch(blob):
        raise _Rejected(digest, f"manifest {digest}: layer digest {blob!r} is not sha256")
    return size, blob


# --- building: push ------------------------------------------------------------------------


def manifest_for(layer: bytes, name: str, revision: str) -> bytes:
    """The artifact manifest of a bundle archive, as pushed (and as its digest is taken)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": sha256_digest(EMPTY_BLOB),
            "size": len(EMPTY_BLOB),
            "data": base64.b64encode(EMPTY_BLOB).decode(),
        },
        "layers": [
            {
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": sha256_digest(layer),
                "size": len(layer),
                "annotations": {"org.opencontainers.image.title": "bundle.tar.gz"},
            }
        ],
        "annotations": {
            "io.authz.bundle.name": name,
            "io.authz.bundle.revision": revision,
        },
    }
    return json.dumps(doc, indent=2).encode()


def push(
    reference: str,
    layer: bytes,
    name: str,
    revision: str,
    *,
    credentials: Path | None = None,
    insecure: Collection[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> str:
    """Upload the bundle archive ``layer`` and tag its manifest; returns the manifest digest.

    Raises ValueError for a bad reference, RegistryError when the registry refuses.
    """
    ref = parse_reference(reference)
    if ref.tag is None:
        raise ValueError(f"pushing needs a tag (oci://REGISTRY/REPOSITORY:TAG): {reference!r}")
    client = RegistryClient(
        ref.registry, plain_http=ref.plain_http_allowed(insecure), credentials=credentials,
        ssl_context=ssl_context,
    )
    scope = f"repository:{ref.repository}:pull,push"
    deadline = time.monotonic() + timeout
    for blob in (EMPTY_BLOB, layer):
        _upload_blob(client, ref.repository, blob, scope, deadline)
    manifest = manifest_for(layer, name, revision)
    digest = sha256_digest(manifest)
    resp = client.request(
        "PUT", f"/v2/{ref.repository}/manifests/{ref.tag}", scope=scope, deadline=deadline,
        max_bytes=65536, headers={"Content-Type": MANIFEST_MEDIA_TYPE}, body=manifest, ok=(201,),
    )
    said = resp.headers.get("Docker-Content-Digest", "").strip()
    if said and said != digest:
        raise RegistryError(f"registry {ref.registry} stored the manifest as {said}, not {digest}")
    return digest


def _upload_blob(
    client: RegistryClient, repository: str, blob: bytes, scope: str, deadline: float
) -> None:
    digest = sha256_digest(blob)
    exists = client.request(
        "HEAD", f"/v2/{repository}/blobs/{digest}", scope=scope, deadline=deadline,
        max_bytes=0, ok=(200, 404),
    )
    if exists.status == 200:
        return
    started = client.request(
        "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, deadline=deadline,
        max_bytes=65536, body=b"", ok=(202,),
    )
    location = started.headers.get("Location")
    if not location:
        raise RegistryError(f"registry {client.registry} started an upload without a Location")
    url = urllib.parse.urljoin(client.url("/"), location)
    url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(
        {"digest": digest}
    )
    client.request(
        "PUT", url, scope=scope, deadline=deadline, max_bytes=65536, body=blob,
        headers={"Content-Type": "application/octet-stream"}, ok=(201,),
    )
