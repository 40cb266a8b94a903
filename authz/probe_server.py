"""The probe port (``--http-addr``): /healthz, /readyz, /v1/status and /metrics, and with
``--http-decision-api`` the JSON decision API (POST /v1/decide, /v1/explain).

The kubelet restarts the pod when /healthz does not answer, and a restarted authz denies
everything until it is back: whoever can hold this port's serving capacity can take the
service down. So nothing a client does may keep /healthz and /readyz from being answered:

    accept ─▶ count (open, per peer) ─▶ TLS handshake ─▶ head ─▶ answer ─▶ keep-alive ...
              beyond a bound: closed       bounded       total     bounded in time
              at once (``refused``)                      deadline

- An asyncio server on its own event loop in its own daemon thread: idle and slow clients
  cost a coroutine, not a thread, and the probes are answered however busy the gRPC serving
  threads and the main thread's loop are.
- Connections: at most ``max_connections`` (1024, less under a low open-files limit) open at
  once and ``max_per_peer`` (64) from one peer address (an IPv6 /64), counted at accept,
  before the TLS handshake. Past ``max_per_peer`` a new connection is closed at once
  (``refused``). Past ``max_connections`` the connection that has waited longest for a
  request head (idle, trickling, in its handshake) is cancelled to let the new one in
  (``evicted``); only when every connection is mid-request is the new one refused. A kubelet
  sends its head at once, so clients from any number of addresses cannot keep it out.
- Time: the TLS handshake within ``handshake_timeout`` (10 s). On a new connection the whole
  request head within ``head_timeout`` (10 s) of the moment the server starts reading; on a
  keep-alive connection the next request's first byte within ``idle_timeout`` (10 s), then
  its whole head within ``head_timeout`` of that byte. These are deadlines, not timeouts per
  read: a byte every few seconds does not extend them. A body within ``body_timeout`` (10 s)
  of the end of its head. An answer taken by the client within ``answer_timeout`` (10 s).
  A connection past any of them is dropped.
- Size: a head of at most 64 KiB (431) and 200 headers; a decision API body of at most 1 MiB
  with a content-length (411, 413), at most ``_BODIES`` held at once.
- CPU: /healthz, /readyz and /v1/status are answered on the loop (cheap). /metrics and the
  decision API run in a pool of ``_CPU_THREADS`` threads, so a flood of them queues there
  while /healthz is still answered on the loop.

The head is parsed by authz.http1, as HTTP ext_authz's is, except that a Host header is not
required (an HTTP/1.0 probe may send none).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from authz import decision_api
from authz.bundle.store import BundleStore
from authz.check import Checker
from authz.http1 import ANSWER_TIMEOUT, MAX_HEADER_BYTES, Malformed, linger, parse_head, render
from authz.metrics import CONTENT_TYPE, Metrics
from authz.ports import split_addr
from authz.redact import hide_paths
from authz.tls_server import ServerTls, http_ssl_context
from authz.version import VERSION

log = logging.getLogger("authz.probes")

T = TypeVar("T")
TEXT = "text/plain"
JSON = "application/json"
_CPU_THREADS = 2
# Decision API bodies (up to 1 MiB each) held at once: 1024 connections could otherwise make
# the process hold 1 GiB; 8 is what the threaded server this replaced could read at once.
_BODIES = 8
_STOP_SECONDS = 5.0
_CLOSE_SECONDS = 2.0  # for a graceful close (TLS close_notify) before the connection is dropped
_REFUSED_LOG_EVERY = 60.0


class _Failed(Exception):
    """Our own work for an answer failed (already logged): answered 500."""


class ProbeServer:
    """The probe port. Bound by the constructor (a port in use is an OSError naming the
    address), served from ``start()`` until ``stop()``."""

    def __init__(self, addr: str, store: BundleStore, metrics: Metrics, worker: int | None = None,
                 checker: Checker | None = None, tls: ServerTls | None = None,
                 hidden: Mapping[str, str] | None = None, *, head_timeout: float = 10.0,
                 body_timeout: float = 10.0, idle_timeout: float = 10.0,
                 answer_timeout: float = ANSWER_TIMEOUT, handshake_timeout: float = 10.0,
                 max_connections: int = 1024, max_per_peer: int = 64) -> None:
        """``hidden`` maps file system paths to the labels /readyz and /v1/status show instead.
        ``checker``: serve the JSON decision API with it (None: those paths are 404)."""
        self.addr = addr
        self.store = store
        self.metrics = metrics
        self.worker = worker
        self.checker = checker
        self.tls = tls
        self.hidden = dict(hidden or {})
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.answer_timeout = answer_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.draining = False
        # False while a worker holds its gRPC port closed until its first load has finished
        # (serve): it is not ready then even though its bundle may already be loaded.
        self.grpc_listening = True
        self.connections = 0  # open now
        self.refused = 0  # closed at accept: over max_connections or max_per_peer
        self.timed_out = 0  # dropped at the head or body deadline
        self.evicted = 0  # cancelled while waiting for a head, to let a new connection in
        self._per_peer: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[asyncio.Task[Any], float] = {}  # connections awaiting a head, since
        self._refused_logged = (0.0, 0)  # (when, refused then)
        self._accept_failed_logged = 0.0
        host, port = split_addr(addr)
        try:
            self._sock = _listen(host, port, reuse_port=worker is not None)
        except OSError as exc:  # one line naming the address (authz serve exits 2)
            raise OSError(f"cannot listen on HTTP address {addr}: {exc.strerror or exc}") from None
        self._port = int(self._sock.getsockname()[1])
        try:
            self._ssl = http_ssl_context(tls.http) if tls is not None and tls.http is not None else None
        except BaseException:
            self._sock.close()
            raise
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_loop_error)
        self._wake = asyncio.Event()  # bound to the loop at its first wait, in the thread
        self._bodies = asyncio.Semaphore(_BODIES)
        self._cpu = ThreadPoolExecutor(_CPU_THREADS, thread_name_prefix="authz-http-cpu")
        self._lock = threading.Lock()
        self._started = self._stopped = False
        self.thread = threading.Thread(target=self._run, name="authz-http", daemon=True)

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        self.thread.start()

    def stop(self) -> None:
        """Stop listening, drop every connection, end the thread (at most ~5 s). Idempotent;
        fine before ``start()`` (it then only releases the port)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            started = self._started
        if started:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop has ended already
                pass
            self.thread.join(_STOP_SECONDS + 1.0)
            if self.thread.is_alive():
                log.warning("the probe server's thread did not end within %.0f s", _STOP_SECONDS + 1.0)
        else:
            self._sock.close()
            self._loop.close()
        self._cpu.shutdown(wait=False, cancel_futures=True)

    close = stop

    # --- the loop's thread -------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:  # noqa: BLE001 - nothing to hand it to: say so
            log.exception("the probe server stopped")
        finally:
            self._sock.close()
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()

    async def _main(self) -> None:
        accepting = asyncio.create_task(self._accept())
        accepting.add_done_callback(_accept_ended)
        await self._wake.wait()
        accepting.cancel()
        try:
            await accepting
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a failure was logged as it ended
            pass
        self._sock.close()  # no longer listening: new connections are refused by the kernel
        for task in list(self._tasks):
            task.cancel()  # each aborts its transport
        pending = set(self._tasks)
        for _ in range(3):  # a task may be between two awaits when cancelled: ask again
            if not pending:
                break
            _, pending = await asyncio.wait(pending, timeout=_STOP_SECONDS / 3)
            for task in pending:
                task.cancel()
        if pending:
            log.warning("%d probe connections did not close at shutdown", len(pending))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except ConnectionError:  # reset before we took it: nothing to serve
                continue
            except OSError as exc:  # out of file descriptors and the like: later it may work
                now = time.monotonic()
                if now - self._accept_failed_logged >= _REFUSED_LOG_EVERY:
                    self._accept_failed_logged = now
                    log.warning("the probe server cannot accept connections: %s", exc)
                await asyncio.sleep(0.5)
                continue
            address = _peer_key(peer)
            if self._per_peer.get(address, 0) >= self.max_per_peer or (
                    self.connections >= self.max_connections and not self._evict()):
                self.refused += 1
                conn.close()
                self._log_refused(address)
                continue
            self.connections += 1
            self._per_peer[address] = self._per_peer.get(address, 0) + 1
            task = loop.create_task(self._connection(conn, address))
            self._tasks.add(task)
            self._waiting[task] = loop.time()  # evictable through its TLS handshake too
            # Counted down on the task's end, not in its body: a task cancelled before it
            # ever ran (at stop) runs no finally.
            task.add_done_callback(functools.partial(self._ended, address))

    def _evict(self) -> bool:
        """Make room for a new connection by cancelling the one that has waited longest for a
        request head (idle or trickling), if any. Refusing the newcomer instead would let
        clients from a few addresses, reconnecting as each is dropped, keep the kubelet out:
        its head comes at once, so its connection is never the one that waited longest."""
        if not self._waiting:
            return False
        oldest = min(self._waiting, key=self._waiting.__getitem__)
        del self._waiting[oldest]
        oldest.cancel()
        self.evicted += 1
        return True

    def _ended(self, address: str, task: asyncio.Task[None]) -> None:
        self._waiting.pop(task, None)
        self._tasks.discard(task)
        self.connections -= 1
        left = self._per_peer[address] - 1
        if left:
            self._per_peer[address] = left
        else:
            del self._per_peer[address]

    def _log_refused(self, address: str) -> None:
        log.debug("probe connection from %s refused (%d open, %d from it)", address,
                  self.connections, self._per_peer.get(address, 0))
        now = time.monotonic()
        when, count = self._refused_logged
        if now - when >= _REFUSED_LOG_EVERY:  # a flood is one line a minute, not one each
            log.warning("probe server: %d connections refused in the last %.0f s (at most %d open, %d "
                        "from one address)", self.refused - count, min(now - when, _REFUSED_LOG_EVERY),
                        self.max_connections, self.max_per_peer)
            self._refused_logged = (now, self.refused)

    # --- one connection ------------------------------------------------------------------

    async def _connection(self, sock: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            if self._ssl is None:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
            else:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self._ssl, ssl_handshake_timeout=self.handshake_timeout,
                    ssl_shutdown_timeout=_CLOSE_SECONDS)
        except OSError as exc:  # ssl.SSLError, the handshake timeout, a reset: the client's fault
            log.debug("probe connection from %s not set up (TLS handshake): %s", address, exc)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        # drain() then waits until the whole answer is in the kernel, so the answer deadline
        # covers all of it, not all but the last 64 KiB.
        transport.set_write_buffer_limits(high=0)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
            log.debug("probe connection from %s dropped: %r", address, exc)
            _drop(sock, transport)
            return
        except Exception:  # noqa: BLE001 - our bug: this connection ends, the server does not
            log.exception("probe connection from %s failed", address)
            _drop(sock, transport)
            return
        except BaseException:  # cancelled: at stop, or evicted for a newer connection
            _drop(sock, transport)
            raise
        transport.close()
        try:
            async with asyncio.timeout(_CLOSE_SECONDS):
                await writer.wait_closed()
        except BaseException as exc:  # not closed in time, reset, or cancelled: dropped either way
            _drop(sock, transport)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            head = await self._head(reader, writer, first)
            if head is None:
                return
            first = False
            try:
                method, target, headers, close = parse_head(head, require_host=False)
            except Malformed as exc:
                await self._send(writer, exc.status, f"{exc.reason}\n".encode(), TEXT, True)
                await linger(reader, writer)
                return
            try:
                keep = await self._request(reader, writer, method, target, headers, close)
            except _Failed:
                await self._send(writer, 500, b"internal error\n", TEXT, True)
                return
            if not keep:
                return

    async def _head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    first: bool) -> bytes | None:
        """The next request head, or None when the connection is to end (closed, idle, late).
        Meanwhile the connection may be evicted (cancelled) to let a new one in."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        task = asyncio.current_task()
        assert task is not None
        self._waiting.setdefault(task, started)  # a new connection waits since its accept
        try:
            return await self._read_head(reader, writer, first, started)
        finally:
            self._waiting.pop(task, None)

    async def _read_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool,
                         started: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.head_timeout if first else self.idle_timeout):
                # One byte first: an idle keep-alive connection is given idle_timeout, a
                # request once begun head_timeout.
                begun = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return None  # closed between requests
        except TimeoutError:
            if first:
                self.timed_out += 1
            return None
        deadline = (started if first else loop.time()) + self.head_timeout
        try:
            async with asyncio.timeout_at(deadline):
                rest = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self.timed_out += 1
            log.debug("a request head not complete within %.1f s: dropped", self.head_timeout)
            return None
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, b"request head too large\n", TEXT, True)
            await linger(reader, writer)
            return None
        except asyncio.IncompleteReadError:
            return None  # gone in the middle of its head: nobody to answer
        return begun + rest

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str,
                       target: str, headers: dict[str, str], close: bool) -> bool:
        """Answer one request; False when the connection is to close."""
        path = target.split("?", 1)[0]
        if method == "POST" and self.checker is not None and path in decision_api.JSON_PATHS:
            return await self._decide(reader, writer, self.checker, path, headers, close)
        if method == "GET":
            status, body, ctype = await self._get(path)
        elif method == "POST":
            status, body, ctype = 404, b"not found\n", TEXT
        else:  # HEAD too: an answer without its body would need framing of its own
            status, body, ctype = 501, b"not implemented\n", TEXT
            close = True
        # A body left unread would be taken for the next request: close after the answer.
        unread = "transfer-encoding" in headers or bool(headers.get("content-length", "").lstrip("0"))
        await self._send(writer, status, body, ctype, close or unread)
        if unread:
            await linger(reader, writer)
        return not (close or unread)

    async def _get(self, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz":
            return 200, b"ok\n", TEXT
        if path == "/readyz":
            status, text = self._readyz()
            return status, text.encode(), TEXT
        if path == "/v1/status":
            return 200, json.dumps(self._status()).encode(), JSON
        if path == "/metrics":
            return 200, await self._offload(self.metrics.exposition), CONTENT_TYPE
        return 404, b"not found\n", TEXT

    def _readyz(self) -> tuple[int, str]:
        st = self.store.status()
        expired = self.tls.expired() if self.tls is not None else []
        if self.draining:
            return 503, "not ready: shutting down\n"
        if expired:
            return 503, f"not ready: the {' and '.join(expired)} serving certificate has expired\n"
        if st.revision is not None and not self.grpc_listening:
            return 503, "not ready: the gRPC port is not open yet\n"
        if st.revision is not None:
            note = f" (persisted copy: {st.persisted_reason})" if st.serving_persisted else ""
            return 200, hide_paths(f"ready: revision {st.revision}{note}\n", self.hidden)
        reason = hide_paths(st.last_error or "no bundle loaded yet", self.hidden)
        return 503, f"not ready: {reason}\n"

    def _status(self) -> dict[str, Any]:
        doc = hide_paths(self.store.status().as_dict(), self.hidden)
        doc["version"] = VERSION
        if self.tls is not None:
            doc["tls"] = self.tls.status()
        if self.worker is not None:
            doc["worker"] = {"index": self.worker, "pid": os.getpid(), "grpc_listening": self.grpc_listening}
        return doc

    async def _decide(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, checker: Checker,
                      path: str, headers: dict[str, str], close: bool) -> bool:
        length = headers.get("content-length", "")
        # isdigit() alone takes '²', and int() refuses over 4,300 digits. A transfer-encoding
        # beside a content-length is two framings of one body: refused, not guessed at.
        digits = length.isascii() and length.isdigit() and len(length) <= 12 and "transfer-encoding" not in headers
        if not digits or int(length) > decision_api.MAX_JSON_BYTES:
            status, body = decision_api.error_json(411 if not digits else 413,
                                                   "a body of at most 1 MiB with a content-length is required")
            await self._send(writer, status, body, JSON, True)
            await linger(reader, writer, max_bytes=2 * decision_api.MAX_JSON_BYTES)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._bodies.acquire()
        except TimeoutError:
            status, body = decision_api.error_json(503, "too many decision requests at once")
            await self._send(writer, status, body, JSON, True)
            await linger(reader, writer, max_bytes=2 * decision_api.MAX_JSON_BYTES)
            return False
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    if headers.get("expect", "").lower() == "100-continue":
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        await writer.drain()
                    data = await reader.readexactly(int(length))
            except TimeoutError:
                self.timed_out += 1
                log.debug("a request body not complete within %.1f s: dropped", self.body_timeout)
                return False
            status, body = await self._offload(functools.partial(decision_api.handle_json, checker, path, data))
        finally:
            self._bodies.release()
        await self._send(writer, status, body, JSON, close)
        return not close

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str,
                    close: bool) -> None:
        writer.write(render(status, [("content-type", ctype)], body, close))
        # A client that does not take its answer must not hold the connection for ever. Not
        # wait_for: on Python 3.11 it loses a cancel that meets the drain's end (gh-86296), and
        # stop() would wait for a client that keeps reading.
        async with asyncio.timeout(self.answer_timeout):
            await writer.drain()

    async def _offload(self, work: Callable[[], T]) -> T:
        """CPU work off the loop, so /healthz is answered meanwhile."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._cpu, work)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("probe server: answering failed")
            raise _Failed from exc


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restart on the same port must come up while the last one's connections linger in
        # TIME_WAIT; workers of one supervisor share the port, as they share the gRPC one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _drop(sock: socket.socket, transport: asyncio.Transport) -> None:
    """Close at once with a reset. A plain close would leave what the kernel still holds of
    an answer to be sent on after us, to a client that takes it as slowly as it likes. Any
    number of times, in any state of the transport (a TLS one that has lost its connection
    cannot even be asked for its socket)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:  # closed already
        pass
    try:
        transport.abort()
    except Exception:  # noqa: BLE001 - aborted or lost already: nothing left to close
        pass


def _peer_key(peer: Any) -> str:
    """Whom a connection is counted against: its address; for IPv6 its /64, which one host
    commonly holds whole (a client could otherwise take a new address for each connection)."""
    address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def _accept_ended(task: asyncio.Task[None]) -> None:
    # Only at stop (cancelled) or by a bug of ours; then nothing is accepted any more, /healthz
    # fails and the kubelet restarts us: say why.
    if not task.cancelled() and task.exception() is not None:
        log.error("the probe server stopped accepting connections", exc_info=task.exception())


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What asyncio itself reports (a transport's failure): a client's doing is a debug line,
    never a traceback on stderr."""
    exc = context.get("exception")
    if isinstance(exc, OSError):  # ssl.SSLError included: a failed handshake, a reset
        log.debug("probe server: %s: %s", context.get("message"), exc)
    else:
        log.error("probe server: %s", context.get("message"), exc_info=exc)
