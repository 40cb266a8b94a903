"""Where bundles come from: a directory, a .tar.gz archive, or an HTTP(S) bundle server.

Each source turns what it finds into a Snapshot (the bundle's bytes in memory) for the
gate in store.py. Sources never compile or swap anything.

- DirectorySource reads the files under a directory, skipping hidden ones. A Kubernetes
  ConfigMap mount (``..data`` -> ``..2024_01_01_00_00_00.1``, swapped atomically by the
  kubelet) is read through the resolved ``..data`` target, and re-read if the target
  changed while reading, so a snapshot never mixes two versions.
- ArchiveSource reads a bundle archive from a file.
- OciSource (oci.py) polls a tag in an OCI registry, with the same rules as HttpSource.
- HttpSource polls a URL with ``If-None-Match``, a deadline on the whole download (a server
  that drips one byte a second fails at the deadline, not never) and a size limit; the delay
  between polls is drawn between a minimum and a maximum (jitter), and grows
  exponentially after errors (backoff).

File sources also give a cheap ``fingerprint()`` (paths, sizes, mtimes, inodes) that the
watcher compares to notice changes without reading the files.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPMessage
from pathlib import Path
from typing import Any, Protocol

from authz.bundle.archive import DEFAULT_LIMITS, Limits, Snapshot, reject, unpack, unshowable
from authz.bundle.loader import BundleError
from authz.credentials import TokenFile, client_auth
from authz.redact import redact_url
from authz.tls import ClientTls, client_context

CONFIGMAP_DATA = "..data"


class SourceUnavailable(Exception):
    """The source could not be read (missing, unreachable, server error): nothing to judge."""


class Source(Protocol):
    description: str
    polled: bool  # True: fetch on a timer (next_delay); False: watch fingerprint()

    def fetch(self, force: bool = False) -> Snapshot | None:
        """A snapshot, or None when the source reports it unchanged.

        Raises SourceUnavailable when it cannot be read, BundleError when what it holds
        is not acceptable as a bundle (too large, a broken archive).
        """
        ...

    def fingerprint(self) -> Hashable: ...

    def next_delay(self, ok: bool) -> float: ...


# --- directories -----------------------------------------------------------------------


def directory_base(root: Path) -> Path:
    """The directory holding the files: the resolved ``..data`` of a ConfigMap mount, else root."""
    data = root / CONFIGMAP_DATA
    if os.path.lexists(data):
        return Path(os.path.realpath(data))
    return root


def _walk(base: Path, max_files: int) -> Iterator[tuple[str, Path]]:
    """(relative posix path, resolved path) of the non-hidden regular files under ``base``, sorted.

    Symbolic links are followed (a ConfigMap mount is made of them), but only within
    ``base``: a link out of it (`data/x.yaml -> /var/run/secrets/...`) would put a file of
    the host into the bundle, where a rule could send it upstream. A directory reached twice
    (``self -> .``) is a link loop. Whatever cannot be read as a file of the bundle (a
    dangling link, a FIFO, a device, a directory that cannot be listed, a name that is not
    UTF-8) rejects the bundle: skipped, it could be the file holding a DENY policy.
    """
    found = 0
    real_base = os.path.realpath(base)
    st = os.stat(real_base)
    seen = {(st.st_dev, st.st_ino)}

    def inside(rel: str, path: str) -> str:
        real = os.path.realpath(path)
        if real != real_base and not real.startswith(real_base + os.sep):
            raise reject(rel, "symbolic link leads out of the bundle directory")
        return real

    def unlistable(exc: OSError) -> None:
        raise reject(os.path.relpath(exc.filename or str(base), base), f"cannot list directory: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(base, followlinks=True, onerror=unlistable):
        rel_dir = os.path.relpath(dirpath, base)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            rel = _rel(rel_dir, d)
            try:
                dst = os.stat(inside(rel, os.path.join(dirpath, d)))
            except FileNotFoundError:
                if os.path.islink(os.path.join(dirpath, d)) and os.path.exists(base):
                    raise reject(rel, "dangling symbolic link") from None
                raise  # removed while we read (a ConfigMap swap): read_directory reads again
            key = (dst.st_dev, dst.st_ino)
            if key in seen:
                raise reject(rel, "directory reached twice through a symbolic link (a link loop?)")
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = _rel(rel_dir, name)
            path = os.path.join(dirpath, name)
            real = inside(rel, path)
            try:
                mode = os.stat(real).st_mode
            except FileNotFoundError:
                if os.path.islink(path):
                    raise reject(rel, "dangling symbolic link") from None
                raise  # removed while we read: read_directory reads again
            if not stat.S_ISREG(mode):
                raise reject(rel, "not a regular file (a FIFO, socket or device?)")
            found += 1
            if found > max_files:
                raise reject(rel, f"bundle has more than {max_files} files")
            yield rel, Path(real)


def _rel(rel_dir: str, name: str) -> str:
    rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates
        raise reject(ascii(rel), "file name is not UTF-8") from None
    if unshowable(rel):  # quoted in logs and /v1/status, it could forge a line
        raise reject(ascii(rel), "file name holds control characters") from None
    return rel


def _read_file(path: Path, rel: str, most: int, follow: bool = False) -> bytes:
    """A regular file's bytes, at most ``most`` + 1 of them (the caller tells "too large"):
    never a FIFO that would block, nor (unless ``follow``) a file swapped for a link after
    the walk saw it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise reject(rel, "not a regular file (a FIFO, socket or device?)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            # One byte more than the size: a file that grew since is seen to be over the limit
            # (read in full it could be any size), and no buffer of the whole allowance.
            data = f.read(min(st.st_size, most) + 1)
            if len(data) > st.st_size:  # it grew meanwhile: the rest, up to the allowance
                data += f.read(most + 1 - len(data))
            return data
    finally:
        os.close(fd)


def read_directory(
    root: Path, limits: Limits = DEFAULT_LIMITS, origin: str | None = None
) -> Snapshot:
    """A consistent snapshot of the bundle directory at ``root``."""
    root = Path(root)
    origin = origin or str(root)
    if not root.is_dir():
        raise SourceUnavailable(f"bundle directory {root} does not exist")
    for attempt in range(10):
        if attempt:
            time.sleep(0.02 * attempt)  # a writer still at work: give it time to finish
        base = directory_base(root)
        # A directory written file by file (not a ConfigMap's atomic swap) read meanwhile
        # would mix two states: read until what was read is what is there.
        before = directory_fingerprint(root, limits.max_files)
        files: dict[str, bytes] = {}
        total = 0
        try:
            for rel, path in _walk(base, limits.max_files):
                data = _read_file(path, rel, limits.max_bytes - total)
                total += len(data)
                if total > limits.max_bytes:
                    raise reject(rel, f"bundle files exceed the size limit of {limits.max_bytes} bytes")
                files[rel] = data
        except FileNotFoundError:
            time.sleep(0.05)  # a ConfigMap swap removed the old version while we read it
            continue
        except OSError as exc:
            raise SourceUnavailable(f"cannot read bundle directory {root}: {exc}") from exc
        if directory_base(root) != base or directory_fingerprint(root, limits.max_files) != before:
            continue  # swapped or written while reading: read the new version
        return Snapshot(files, origin)
    raise SourceUnavailable(f"bundle directory {root} kept changing while being read (a file written in it "
                            "all the time? keep logs and work files out of the bundle directory, or hidden)")


def directory_fingerprint(root: Path, max_files: int) -> Hashable:
    try:
        base = directory_base(Path(root))
        entries = []
        for rel, path in _walk(base, max_files):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
        return (str(base), tuple(entries))
    except Exception as exc:  # noqa: BLE001 - a fingerprint that can't be taken is a change to look at
        # Stable while the cause is: the watcher then tries the bundle once and rejects it
        # loudly, where a fingerprint new at every look would never settle (and say nothing).
        return ("unreadable", type(exc).__name__, str(exc))


class DirectorySource:
    polled = False

    def __init__(self, root: Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.root = Path(root)
        self.limits = limits
        self.description = str(self.root)

    def fetch(self, force: bool = False) -> Snapshot:
        return read_directory(self.root, self.limits, self.description)

    def fingerprint(self) -> Hashable:
        return directory_fingerprint(self.root, self.limits.max_files)

    def next_delay(self, ok: bool) -> float:
        return 1.0


# --- archive files ---------------------------------------------------------------------


class ArchiveSource:
    polled = False

    def __init__(self, path: Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.limits = limits
        self.description = str(self.path)

    def fetch(self, force: bool = False) -> Snapshot:
        try:
            # The path itself may be a link (a ConfigMap mount of the archive): followed.
            data = _read_file(self.path, self.path.name, self.limits.max_bytes, follow=True)
            if len(data) > self.limits.max_bytes:
                raise reject(self.path.name, f"bundle is over the size limit of {self.limits.max_bytes} bytes")
        except FileNotFoundError as exc:
            raise SourceUnavailable(f"bundle archive {self.path} does not exist") from exc
        except OSError as exc:
            raise SourceUnavailable(f"cannot read bundle archive {self.path}: {exc}") from exc
        return unpack(data, self.description, self.limits)

    def fingerprint(self) -> Hashable:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def next_delay(self, ok: bool) -> float:
        return 1.0


# --- bundle servers --------------------------------------------------------------------


class BodyTooLarge(Exception):
    """More bytes than the limit were declared (``declared``) or came."""

    def __init__(self, size: int, declared: bool) -> None:
        super().__init__(size)
        self.size = size
        self.declared = declared


class BodyTooSlow(Exception):
    """The download's deadline passed (the watchdog shut its socket, or the loop saw it)."""


class BodyCut(Exception):
    """The body ended before its Content-Length: the connection's fault, not the content's."""


def read_body(resp: Any, limit: int, watch: Watchdog, deadline: float = float("inf")) -> bytes:
    """An HTTP response body of at most ``limit`` bytes, read as it arrives: read1 returns
    what has come, where read(n) would wait for all n bytes, drip by drip, past any deadline.
    Raises BodyTooLarge, BodyTooSlow, BodyCut, or the transport's own error."""
    length = resp.headers.get("Content-Length")
    declared = int(length) if length is not None and length.isascii() and length.isdigit() else None
    if declared is not None and declared > limit:
        raise BodyTooLarge(declared, True)
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            if time.monotonic() > deadline or watch.fired:
                raise BodyTooSlow
            chunk = resp.read1(min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise BodyTooLarge(total, False)
    except (OSError, ValueError, http.client.HTTPException):
        if watch.fired:
            raise BodyTooSlow from None
        raise
    if watch.fired:  # the shut-down socket reads as a clean end of the body
        raise BodyTooSlow
    if declared is not None and total < declared:
        raise BodyCut(f"ended after {total} of {declared} bytes")
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class PollPolicy:
    min_delay: float = 10.0
    max_delay: float = 30.0
    backoff_max: float = 120.0
    timeout: float = 10.0


class RedirectRefused(urllib.error.URLError):
    """A redirect the fetch policy does not follow."""


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """No redirects unless allowed; allowed ones only to the same scheme, host and port, so an
    https:// bundle URL never downgrades and credentials never go to another server."""

    max_redirections = 5

    def __init__(self, allow: bool) -> None:
        self.allow = allow

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url)
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        where = f"bundle server redirected (HTTP {code}) {redact_url(req.full_url)} to {redact_url(newurl)}"
        if not self.allow:
            raise RedirectRefused(f"{where}: redirects are not followed without --allow-redirects")
        if new.scheme != old.scheme:
            raise RedirectRefused(f"{where}: refused, a redirect never changes the scheme "
                                  f"({old.scheme} to {new.scheme})")
        if (new.hostname, new.port) != (old.hostname, old.port) or "@" in new.netloc:
            raise RedirectRefused(f"{where}: refused, a redirect never leaves the host")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpSource:
    """Polls a bundle server; the body is a bundle archive (what `authz build` writes).

    ``tls`` gives the client context per fetch (a rotated client certificate is used from
    the next poll); ``token`` or user info in the URL authenticate; ``description``, used in
    every message, is the URL without credentials."""

    polled = True

    def __init__(
        self,
        url: str,
        limits: Limits = DEFAULT_LIMITS,
        policy: PollPolicy = PollPolicy(),
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        tls: ClientTls | None = None,
        token: TokenFile | None = None,
        allow_redirects: bool = False,
    ) -> None:
        if policy.min_delay <= 0 or policy.max_delay < policy.min_delay:
            raise ValueError("poll delays must satisfy 0 < min <= max")
        self.url, self.auth = client_auth(url, token)
        self.description = redact_url(url)  # '***@' says user info is in use
        self.limits = limits
        self.policy = policy
        self.etag: str | None = None
        self.failures = 0
        self._rng = rng or random.Random()
        self._tls = tls
        self._redirects = allow_redirects
        self._watch = Watchdog()
        self._ssl = ssl_context or (tls.context() if tls is not None else client_context())
        self._opener = self._build_opener(self._ssl)

    def _build_opener(self, ctx: ssl.SSLContext) -> urllib.request.OpenerDirector:
        return urllib.request.build_opener(
            WatchedHTTPHandler(self._watch),
            WatchedHTTPSHandler(self._watch, context=ctx),
            _RedirectPolicy(self._redirects),
        )

    def _current_opener(self) -> urllib.request.OpenerDirector:
        if self._tls is not None:
            ctx = self._tls.context()
            if ctx is not self._ssl:
                self._ssl, self._opener = ctx, self._build_opener(ctx)
        return self._opener

    def fetch(self, force: bool = False) -> Snapshot | None:
        headers = {
            "Accept": "application/gzip, application/octet-stream",
            "User-Agent": "authz-bundle-poller",
        }
        if self.etag and not force:
            headers["If-None-Match"] = self.etag
        deadline = time.monotonic() + self.policy.timeout
        # The socket timeout bounds each read; the watchdog bounds the whole download (a
        # server dripping a byte a second never trips the first).
        with self._watch.armed(self.policy.timeout):
            return self._fetch(headers, deadline)

    def _fetch(self, headers: dict[str, str], deadline: float) -> Snapshot | None:
        try:
            headers.update(self.auth.headers())
            req = urllib.request.Request(self.url, headers=headers)
            resp = self._current_opener().open(req, timeout=self.policy.timeout)
        except RedirectRefused as exc:
            self.failures += 1
            raise SourceUnavailable(str(exc.reason)) from None
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 304:
                self.failures = 0
                return None
            self.failures += 1
            raise SourceUnavailable(
                f"bundle server answered HTTP {exc.code} for {self.description}"
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.failures += 1
            if self._watch.fired:
                raise SourceUnavailable(self._too_slow()) from None
            reason = getattr(exc, "reason", exc)
            raise SourceUnavailable(f"bundle server {self.description} unreachable: {reason}") from None
        try:
            with resp:
                if resp.status == 304:
                    self.failures = 0
                    return None
                data = self._read_body(resp, deadline)
                etag = _etag(resp.headers)
                whole = resp.headers.get("Content-Length") is not None  # read_body checked it
        except SourceUnavailable:
            self.failures += 1
            raise
        try:
            snapshot = unpack(data, self.description, self.limits)
        except BundleError:
            # A close-delimited body that does not unpack may have been cut in transit (it
            # ends where the connection did): its ETag is not remembered, or every later poll
            # would be a 304 for bytes never received whole; it is fetched again, with
            # growing backoff. A body of its declared length is what the server holds.
            self.failures += 1
            if whole:
                self.etag = etag
            raise
        self.failures = 0
        # Once it unpacks, the ETag is remembered even if the gate rejects the bundle: the
        # same bytes would be rejected again, so there is no point downloading them each poll.
        self.etag = etag
        return snapshot

    def _read_body(self, resp: urllib.response.addinfourl, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        try:
            return read_body(resp, limit, self._watch, deadline)
        except BodyTooLarge as exc:
            self.etag = _etag(resp.headers)
            size = f"{exc.size} bytes, over" if exc.declared else "over"
            raise reject(_name(self.description), f"bundle is {size} the size limit of {limit}"
                         + ("" if exc.declared else " bytes")) from None
        except BodyTooSlow:
            raise SourceUnavailable(self._too_slow()) from None
        except BodyCut as exc:
            raise SourceUnavailable(f"bundle download from {self.description} {exc}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise SourceUnavailable(f"bundle download from {self.description} failed: {exc}") from None

    def _too_slow(self) -> str:
        return (f"bundle download from {self.description} took longer than {self.policy.timeout}s "
                "(--poll-timeout)")

    def fingerprint(self) -> Hashable:
        return None

    def next_delay(self, ok: bool) -> float:
        return poll_delay(self.policy, self._rng, self.failures, ok)


def poll_delay(p: PollPolicy, rng: random.Random, failures: int, ok: bool) -> float:
    """Seconds until the next poll: jittered between min and max, backing off on errors."""
    if ok or failures == 0:
        return rng.uniform(p.min_delay, p.max_delay)
    ceiling = min(p.backoff_max, p.min_delay * (2 ** min(failures, 30)))
    ceiling = max(ceiling, p.min_delay)
    return rng.uniform(ceiling / 2, ceiling)


class Watchdog:
    """Shuts the socket of the download in progress down once its deadline passes, which
    wakes a read blocked on it. One download at a time (the reloader thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self.fired = False

    def armed(self, seconds: float) -> Watchdog:
        self._seconds = seconds
        return self

    def __enter__(self) -> None:
        with self._lock:
            self.fired = False
            self._sock = None
            self._timer = threading.Timer(self._seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._sock = None

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _watched(base: type[http.client.HTTPConnection], watch: Watchdog) -> type[http.client.HTTPConnection]:
    class Watched(base):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            watch.attach(self.sock)

    return Watched


class WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watch: Watchdog) -> None:
        super().__init__()
        self._conn = _watched(http.client.HTTPConnection, watch)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._conn, req)


class WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: Watchdog, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._conn = _watched(http.client.HTTPSConnection, watch)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._conn, req, context=self._context)  # type: ignore[attr-defined]


def _etag(headers: Message) -> str | None:
    value = headers.get("ETag")
    return value.strip() if value else None


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] or url
