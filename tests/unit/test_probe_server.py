"""The probe port (authz/probe_server.py) over real sockets on 127.0.0.0/8: its endpoints as
`authz serve` answers them, and its bounds shown by what a hostile client can no longer do.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a client socket bound to
127.0.0.2 before it connects is another peer address to the server: the per-peer bound is
shown that way, and the probes that must still be answered come from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.bundle.store import BundleStore, Status
from authz.check import Checker
from authz.example import example_bundle
from authz.metrics import CONTENT_TYPE, Metrics
from authz.probe_server import ProbeServer
from authz.tls_server import ServerTls

REVISION = "2026-11-25.1"
TD = "spiffe://cluster.local"
DECIDE = json.dumps({"principal": f"{TD}/ns/prod/sa/checkout-api",
                     "destinationPrincipal": f"{TD}/ns/prod/sa/orders-api",
                     "method": "POST", "path": "/v1/tenants/acme/orders"}).encode()


@pytest.fixture(scope="module")
def loaded() -> tuple[BundleStore, Metrics]:
    metrics = Metrics()
    store = BundleStore(metrics)
    assert store.load(example_bundle())
    return store, metrics


@contextlib.contextmanager
def probes(store: Any, metrics: Any, **kw: Any) -> Iterator[ProbeServer]:
    server = ProbeServer("127.0.0.1:0", store, metrics, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Client:
    """One HTTP/1.1 connection from ``source``; answers read by content-length."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 5.0,
                 wrap: ssl.SSLContext | None = None) -> None:
        raw = connect(port, source, timeout)
        self.sock: socket.socket = wrap.wrap_socket(raw, server_hostname="localhost") if wrap else raw
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buf += chunk

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._more()
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split(" ")[1]), headers, body

    def get(self, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
        self.send(f"GET {path} HTTP/1.1\r\nHost: probe\r\n{extra}\r\n".encode())
        return self.answer()

    def close(self) -> None:
        self.sock.close()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0, rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def get(port: int, path: str, source: str = "127.0.0.1", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    c = Client(port, source, timeout)
    try:
        return c.get(path)
    finally:
        c.close()


def post(port: int, path: str, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    c = Client(port)
    try:
        c.send(f"POST {path} HTTP/1.1\r\nHost: probe\r\n{head}\r\n".encode() + body)
        return c.answer()
    finally:
        c.close()


def is_open(s: socket.socket) -> bool:
    """Not closed by the server (no EOF, no reset waiting to be read)."""
    timeout = s.gettimeout()
    s.setblocking(False)  # with a timeout set, recv would first wait that long for data
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.settimeout(timeout)


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``s`` (EOF or reset), or None if it is still open then."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic() - t0


def wait_for(cond: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Tricklers:
    """Sockets that each send one byte of a never-ending request head every ``every`` seconds
    until the server closes them; records when that happened and how much each sent."""

    def __init__(self, socks: list[socket.socket], every: float) -> None:
        self.socks, self.every = socks, every
        self.opened = {s: time.monotonic() for s in socks}
        self.cut: dict[socket.socket, float] = {}
        self.sent = {s: 0 for s in socks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        payload = b"GET /healthz HTTP/1.1\r\nx-slow: " + b"a" * 10_000
        due = time.monotonic()
        while not self._stop.is_set() and len(self.cut) < len(self.socks):
            now = time.monotonic()
            send = now >= due
            for s in self.socks:
                if s in self.cut:
                    continue
                if not is_open(s):
                    self.cut[s] = now - self.opened[s]
                elif send:
                    try:
                        s.send(payload[self.sent[s]:self.sent[s] + 1])
                        self.sent[s] += 1
                    except OSError:
                        self.cut[s] = now - self.opened[s]
            if send:
                due += self.every
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- the endpoints, as before --------------------------------------------------------------


def test_every_endpoint_answers_as_before(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics) as server:
        p = server.port
        assert get(p, "/healthz") == (200, {"content-type": "text/plain", "content-length": "3"}, b"ok\n")
        status, headers, body = get(p, "/readyz")
        assert (status, headers["content-type"], body) == (200, "text/plain", f"ready: revision {REVISION}\n".encode())
        status, headers, body = get(p, "/v1/status?verbose=1")  # a query is ignored
        doc = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        assert doc["revision"] == REVISION and doc["ready"] is True and doc["version"] and "worker" not in doc
        status, headers, body = get(p, "/metrics")
        assert status == 200 and headers["content-type"] == CONTENT_TYPE
        assert f'authz_bundle_info{{name="example",revision="{REVISION}"}} 1.0' in body.decode()
        assert get(p, "/nope")[::2] == (404, b"not found\n")
        assert post(p, "/healthz", "")[::2] == (404, b"not found\n")
        assert post(p, "/v1/decide", "content-length: 2\r\n", b"{}")[0] == 404  # no checker given
        for method in ("PUT", "DELETE", "HEAD"):
            c = Client(p)
            c.send(f"{method} /healthz HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            assert c.answer()[0] == 501
            assert closed_within(c.sock, 2) is not None
            c.close()


def test_keep_alive_pipelining_and_http_1_0(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics) as server:
        c = Client(server.port)
        assert c.get("/healthz")[::2] == (200, b"ok\n")
        assert c.get("/readyz")[0] == 200  # the same connection
        c.send(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\nGET /v1/status HTTP/1.1\r\nHost: p\r\n\r\n")
        assert c.answer()[0] == 200 and json.loads(c.answer()[2])["revision"] == REVISION
        c.send(b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        status, headers, _ = c.answer()
        assert status == 200 and headers["connection"] == "close"
        assert closed_within(c.sock, 2) is not None
        c.close()
        # An HTTP/1.0 probe without a Host header is answered, then closed.
        c = Client(server.port)
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert c.answer()[::2] == (200, b"ok\n")
        assert closed_within(c.sock, 2) is not None
        c.close()


def test_readyz_and_status_follow_the_store_draining_grpc_and_certificates(tmp_path: Path) -> None:
    metrics = Metrics()
    store = BundleStore(metrics)
    with probes(store, metrics) as server:
        assert get(server.port, "/readyz")[::2] == (503, b"not ready: no bundle loaded yet\n")
        assert not store.load(tmp_path / "missing")
        status, _, body = get(server.port, "/readyz")
        assert status == 503 and str(tmp_path) in body.decode()
    hidden = {str(tmp_path): "<bundle>"}
    with probes(store, metrics, hidden=hidden) as server:
        for path in ("/readyz", "/v1/status"):
            body = get(server.port, path)[2].decode()
            assert "<bundle>" in body and str(tmp_path) not in body
    assert store.load(example_bundle())
    tls = ServerTls()
    with probes(store, metrics, worker=3, tls=tls) as server:
        doc = json.loads(get(server.port, "/v1/status")[2])
        assert doc["worker"]["index"] == 3 and doc["worker"]["grpc_listening"] is True and doc["tls"] == {}
        server.grpc_listening = False
        assert get(server.port, "/readyz")[::2] == (503, b"not ready: the gRPC port is not open yet\n")
        assert json.loads(get(server.port, "/v1/status")[2])["worker"]["grpc_listening"] is False
        server.grpc_listening = True
        tls.expired = lambda: ["grpc"]  # type: ignore[method-assign]
        assert get(server.port, "/readyz")[::2] == (503, b"not ready: the grpc serving certificate has expired\n")
        server.draining = True
        assert get(server.port, "/readyz")[::2] == (503, b"not ready: shutting down\n")


def test_readyz_names_a_persisted_copy_with_its_paths_hidden() -> None:
    class Persisted:
        def status(self) -> Status:
            return Status(revision="p1", loaded_at=1.0, last_attempt_at=1.0, last_error=None,
                          serving_persisted=True, persisted_reason="/srv/bundles unreachable")

    with probes(Persisted(), Metrics(), hidden={"/srv/bundles": "<bundle>"}) as server:
        assert get(server.port, "/readyz")[::2] == (
            200, b"ready: revision p1 (persisted copy: <bundle> unreachable)\n")


def test_malformed_and_oversized_heads_are_answered_and_closed(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics) as server:
        for raw, status in ((b"GET /healthz HTTP/1.1\nHost: p\r\n\r\n", 400),  # a bare LF
                            (b"GET /healthz HTTP/2.0\r\n\r\n", 400),
                            (b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n", 400),
                            (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
                            (b"GET /healthz HTTP/1.1\r\n" + b"x: y\r\n" * 201 + b"\r\n", 431),
                            (b"GET /healthz HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", 431)):
            c = Client(server.port)
            c.send(raw)
            assert c.answer()[0] == status, raw[:40]
            assert closed_within(c.sock, 3) is not None
            c.close()
        assert get(server.port, "/healthz")[0] == 200


# --- the bounds ------------------------------------------------------------------------------


def test_idle_and_trickling_connections_neither_block_probes_nor_outlive_the_head_deadline(
        loaded: tuple[BundleStore, Metrics]) -> None:
    """THE point: 300 idle connections and 20 that trickle a byte every 0.5 s (spread over
    peer addresses within the per-peer bound, so all of them are accepted and held) do not
    keep /healthz from another address from being answered, at once and every time; and each
    trickler is cut off at the head deadline though it never stops sending. The threaded
    server (8 threads, 64 waiting, a 10 s timeout per recv) answered nothing meanwhile and
    held a trickler for ever."""
    store, metrics = loaded
    head_timeout = 4.0
    threads_before = threading.active_count()
    with probes(store, metrics, head_timeout=head_timeout) as server:
        idle = [connect(server.port, f"127.0.0.{10 + i % 10}") for i in range(300)]
        slow = [connect(server.port, f"127.0.0.{20 + i % 2}") for i in range(20)]
        tricklers = Tricklers(slow, every=0.5)
        try:
            t0 = time.monotonic()
            wait_for(lambda: server.connections == 320, 1)
            answered = []
            while time.monotonic() - t0 < 2.0:
                t = time.monotonic()
                assert get(server.port, "/healthz", timeout=1.0)[::2] == (200, b"ok\n")
                answered.append(time.monotonic() - t)
                time.sleep(0.1)
            assert len(answered) >= 5 and max(answered) < 1.0, answered
            # ... while every one of the 320 was accepted and still held
            assert server.connections == 320 and server.refused == 0, (server.connections, server.refused)
            assert all(is_open(s) for s in idle)
            assert threading.active_count() - threads_before <= 4  # loop, 2 CPU threads, tricklers
            # At the head deadline the tricklers are cut off, though they kept sending.
            assert wait_for(lambda: len(tricklers.cut) == 20, head_timeout + 3), tricklers.cut
            assert all(head_timeout - 0.5 <= t <= head_timeout + 1.5 for t in tricklers.cut.values()), tricklers.cut
            assert all(n >= 6 for n in tricklers.sent.values()), tricklers.sent
            assert wait_for(lambda: server.connections == 0, 3)  # and the idle ones with them
            assert get(server.port, "/healthz")[0] == 200
        finally:
            tricklers.stop()
            for s in idle + slow:
                s.close()


def test_a_trickled_head_is_cut_off_at_its_deadline(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, head_timeout=1.0) as server:
        s = connect(server.port)
        tricklers = Tricklers([s], every=0.2)
        try:
            assert wait_for(lambda: s in tricklers.cut, 4)
            assert 0.8 <= tricklers.cut[s] <= 2.0 and tricklers.sent[s] >= 4, (tricklers.cut, tricklers.sent)
        finally:
            tricklers.stop()
            s.close()
        # A silent new connection meets the same deadline; an idle keep-alive one idle_timeout.
        assert 0.8 <= (closed_within(connect(server.port), 4) or 99) <= 2.0


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, idle_timeout=0.5) as server:
        c = Client(server.port)
        assert c.get("/healthz")[0] == 200
        assert 0.3 <= (closed_within(c.sock, 4) or 99) <= 1.5
        c.close()


def test_no_peer_address_gets_more_than_max_per_peer_connections(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, max_per_peer=5) as server:
        held = [connect(server.port, "127.0.0.2") for _ in range(5)]
        assert wait_for(lambda: server.connections == 5, 2)
        extra = connect(server.port, "127.0.0.2")
        assert (closed_within(extra, 2) or 99) < 1.0  # closed at once
        assert server.refused == 1
        assert get(server.port, "/healthz")[::2] == (200, b"ok\n")  # another address gets in
        assert all(is_open(s) for s in held)
        held.pop().close()  # a slot of its own comes free
        assert wait_for(lambda: server.connections == 4, 2)
        again = connect(server.port, "127.0.0.2")
        assert wait_for(lambda: server.connections == 5, 2) and is_open(again)
        for s in [*held, extra, again]:
            s.close()


def test_when_full_the_connection_waiting_longest_for_its_head_makes_room(
        loaded: tuple[BundleStore, Metrics]) -> None:
    """At max_connections a new connection evicts the one that has waited longest for a
    request head: refusing the newcomer let clients from a few addresses, reconnecting as each
    was dropped, keep the kubelet out for good."""
    store, metrics = loaded
    with probes(store, metrics, max_connections=8) as server:
        held = [connect(server.port, f"127.0.0.{2 + i % 4}") for i in range(8)]
        assert wait_for(lambda: server.connections == 8, 2)
        assert get(server.port, "/healthz", source="127.0.0.9")[0] == 200
        assert (closed_within(held[0], 2) or 99) < 1.0  # the oldest idle one
        assert server.evicted >= 1 and server.refused == 0
        for s in held:
            s.close()


def test_when_every_connection_is_mid_request_a_new_one_is_refused(loaded: tuple[BundleStore, Metrics]) -> None:
    store, _ = loaded

    class Big:
        def exposition(self) -> bytes:
            return b"#" * (16 << 20)

    with probes(store, Big(), max_connections=4, answer_timeout=5.0) as server:
        busy = [connect(server.port, f"127.0.0.{2 + i}", rcvbuf=4096) for i in range(4)]
        for s in busy:  # each answer far larger than the socket buffers: still being sent
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: p\r\n\r\n")
        assert wait_for(lambda: server.connections == 4 and not server._waiting, 3)
        extra = connect(server.port, "127.0.0.9")
        assert (closed_within(extra, 2) or 99) < 1.0
        assert server.refused == 1 and server.evicted == 0
        for s in [*busy, extra]:
            s.close()


def test_clients_of_many_addresses_reconnecting_cannot_keep_healthz_out(loaded: tuple[BundleStore, Metrics]) -> None:
    """16 addresses x 4 idle connections fill max_connections=64; each one dropped comes back
    at once. A kubelet-like probe from another address is answered every time."""
    store, metrics = loaded
    with probes(store, metrics, max_connections=64, max_per_peer=4, head_timeout=1.0) as server:
        stop = threading.Event()

        def attacker(source: str) -> None:
            socks: list[socket.socket] = []
            while not stop.is_set():
                socks = [s for s in socks if s.fileno() != -1 and not _gone(s)]
                while len(socks) < 4 and not stop.is_set():
                    try:
                        socks.append(connect(server.port, source, timeout=1.0))
                    except OSError:
                        break
                stop.wait(0.02)
            for s in socks:
                s.close()

        threads = [threading.Thread(target=attacker, args=(f"127.0.3.{i + 1}",), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: server.connections >= 60, 5)
            deadline = time.monotonic() + 3
            answered = 0
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                assert get(server.port, "/healthz", source="127.0.0.1", timeout=1.0)[0] == 200
                assert time.monotonic() - t0 < 1.0
                answered += 1
                time.sleep(0.1)
            assert answered >= 10
        finally:
            stop.set()
            for t in threads:
                t.join(5)


def _gone(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (a read would return EOF or fail at once)."""
    try:
        s.setblocking(False)
        try:
            return s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
    finally:
        if s.fileno() != -1:
            s.setblocking(True)


def test_an_answer_not_taken_in_time_ends_the_connection(loaded: tuple[BundleStore, Metrics]) -> None:
    """A client reading its answer a little at a time (here a 16 MiB /metrics) is cut off
    at the answer deadline, not given another 10 s for each bit it takes."""
    store, _ = loaded

    class Big:
        def exposition(self) -> bytes:
            return b"#" * (16 << 20)

    with probes(store, Big(), answer_timeout=1.0) as server:
        s = connect(server.port, rcvbuf=4096)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: p\r\n\r\n")
        t0 = time.monotonic()
        got, cut = 0, None
        while time.monotonic() - t0 < 6:
            try:
                chunk = s.recv(2048)
            except OSError:
                chunk = b""
            if not chunk:
                cut = time.monotonic() - t0
                break
            got += len(chunk)
            time.sleep(0.05)
        s.close()
        assert cut is not None and cut < 3.0, (cut, got)
        assert got < 16 << 20
        assert wait_for(lambda: server.connections == 0, 3)
        assert get(server.port, "/healthz")[0] == 200


def test_a_flood_of_metrics_does_not_delay_healthz(loaded: tuple[BundleStore, Metrics]) -> None:
    store, _ = loaded

    class Slow:
        def exposition(self) -> bytes:
            time.sleep(1.0)
            return b"# slow\n"

    with probes(store, Slow()) as server:
        flood = [Client(server.port, "127.0.0.2") for _ in range(12)]
        for c in flood:
            c.send(b"GET /metrics HTTP/1.1\r\nHost: p\r\n\r\n")
        time.sleep(0.2)
        for _ in range(3):
            t = time.monotonic()
            assert get(server.port, "/healthz", timeout=2)[0] == 200
            assert time.monotonic() - t < 0.5
        assert flood[0].answer()[::2] == (200, b"# slow\n")
        for c in flood:
            c.close()


def test_a_failure_of_ours_is_a_500_and_the_server_carries_on(
        loaded: tuple[BundleStore, Metrics], caplog: pytest.LogCaptureFixture) -> None:
    store, _ = loaded

    class Broken:
        def exposition(self) -> bytes:
            raise RuntimeError("a bug")

    with probes(store, Broken()) as server:
        assert get(server.port, "/metrics")[0] == 500
        assert get(server.port, "/healthz")[0] == 200
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


# --- the decision API --------------------------------------------------------------------------


def test_decision_api_bodies_and_their_framing(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, checker=Checker(store, metrics)) as server:
        p = server.port
        status, headers, body = post(p, "/v1/decide", f"content-length: {len(DECIDE)}\r\n", DECIDE)
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body)["allowed"] is True
        status, _, body = post(p, "/v1/explain", f"content-length: {len(DECIDE)}\r\n", DECIDE)
        assert status == 200 and json.loads(body)["text"].startswith("ALLOW")
        assert post(p, "/v1/decide", "content-length: 1\r\n", b"{")[0] == 400
        c = Client(p)  # keep-alive after a decision; 100-continue answered before the body
        c.send(b"POST /v1/decide HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\n"
               + f"content-length: {len(DECIDE)}\r\n\r\n".encode())
        assert c.answer()[0] == 100
        c.send(DECIDE)
        assert c.answer()[0] == 200
        assert c.get("/healthz")[0] == 200
        c.close()
        for head, status in (("content-length: 1048577\r\n", 413), ("", 411), ("content-length: 12a\r\n", 411),
                             ("content-length: ²\r\n", 411), ("content-length: 1234567890123\r\n", 411),
                             ("content-length: 2\r\ncontent-length: 2\r\n", 411),
                             ("transfer-encoding: chunked\r\n", 411),
                             ("transfer-encoding: chunked\r\ncontent-length: 2\r\n", 411)):
            c = Client(p)
            c.send(f"POST /v1/decide HTTP/1.1\r\nHost: p\r\n{head}\r\n".encode())
            answer, headers, body = c.answer()
            assert answer == status and headers["connection"] == "close", head
            assert json.loads(body)["code"] == 3
            assert closed_within(c.sock, 3) is not None  # lingered a moment, then closed
            c.close()


def test_a_refused_body_is_drained_not_reset(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, checker=Checker(store, metrics)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 413")
            s.sendall(b" " * (1024 * 1024 + 1))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # a reset would raise here
                pass


def test_a_trickled_body_is_cut_off_at_its_deadline(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics, checker=Checker(store, metrics), body_timeout=1.0) as server:
        s = connect(server.port)
        s.sendall(b"POST /v1/decide HTTP/1.1\r\nHost: p\r\ncontent-length: 100\r\n\r\n")
        t0 = time.monotonic()
        cut = None
        for _ in range(30):  # one byte every 0.2 s: 6 s to send it all
            if not is_open(s):
                cut = time.monotonic() - t0
                break
            try:
                s.send(b" ")
            except OSError:
                cut = time.monotonic() - t0
                break
            time.sleep(0.2)
        s.close()
        assert cut is not None and 0.8 <= cut <= 2.0, cut


# --- TLS -----------------------------------------------------------------------------------------


def https(tmp_path: Path) -> tuple[ServerTls, ssl.SSLContext]:
    """A serving certificate for the probe port, and a client context that trusts it."""
    from support.pki import generate_pki, issue

    from authz.certs import CertFiles, RotatingCertificate

    pki = generate_pki(tmp_path / "pki", servers={}, clients={})
    cert = issue(pki, tmp_path, "authz-http", f"{TD}/ns/authz/sa/authz", server=True)
    tls = ServerTls(http=RotatingCertificate("http", CertFiles(cert.cert, cert.key)))
    return tls, ssl.create_default_context(cafile=str(pki.ca_cert))


def test_https_and_a_plain_http_client_on_the_tls_port(
        loaded: tuple[BundleStore, Metrics], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store, metrics = loaded
    tls, client_ctx = https(tmp_path)
    with probes(store, metrics, tls=tls, handshake_timeout=1.0) as server:
        c = Client(server.port, wrap=client_ctx)
        assert c.get("/healthz")[::2] == (200, b"ok\n")
        assert c.get("/readyz")[0] == 200  # keep-alive over TLS
        c.close()
        plain = connect(server.port)
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
        plain.settimeout(3)
        try:
            got = plain.recv(65536)
        except OSError:
            got = b""
        assert not got.startswith(b"HTTP/")
        plain.close()
        silent = connect(server.port)  # never starts its handshake
        assert (closed_within(silent, 4) or 99) < 2.5
        silent.close()
        c = Client(server.port, wrap=client_ctx)
        assert c.get("/healthz")[0] == 200
        c.close()
        assert wait_for(lambda: server.connections == 0, 3)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


def test_tls_clients_that_reset_are_debug_lines_not_tracebacks(
        loaded: tuple[BundleStore, Metrics], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A TLS connection reset by its client was dropped twice, the second time on a transport
    that had lost its socket: an AttributeError logged at ERROR, one traceback per connection
    for anyone to cause."""
    caplog.set_level(logging.DEBUG)
    store, metrics = loaded
    tls, ctx = https(tmp_path)
    with probes(store, metrics, tls=tls) as server:
        for i in range(10):
            t = ctx.wrap_socket(connect(server.port), server_hostname="localhost")
            if i % 2:
                t.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.close()  # a reset
        assert wait_for(lambda: server.connections == 0, 5)
        c = Client(server.port, wrap=ctx)
        assert c.get("/healthz")[0] == 200
        c.close()
    gc.collect()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


# --- life cycle ------------------------------------------------------------------------------------


def test_stop_closes_everything_and_ends_the_thread(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    server = ProbeServer("127.0.0.1:0", store, metrics)
    server.start()
    idle = connect(server.port)
    kept = Client(server.port)
    assert kept.get("/healthz")[0] == 200
    assert wait_for(lambda: server.connections == 2, 2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3 and not server.thread.is_alive()
    assert closed_within(idle, 2) is not None and closed_within(kept.sock, 2) is not None
    with pytest.raises(ConnectionRefusedError):
        connect(server.port)
    server.stop()  # twice: nothing more to do
    idle.close()
    kept.close()


def test_stop_ends_connections_that_keep_pipelining_at_once(loaded: tuple[BundleStore, Metrics]) -> None:
    """wait_for on Python 3.11 loses a cancel that meets the end of the awaited drain: clients
    pipelining requests kept being served for the whole 5 s stop() allows, then the loop was
    closed under them."""
    store, metrics = loaded
    server = ProbeServer("127.0.0.1:0", store, metrics)
    server.start()
    stop = threading.Event()

    def pipeline(sock: socket.socket) -> None:
        sock.settimeout(0.5)
        while not stop.is_set():
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n" * 32)
                sock.recv(1 << 16)
            except OSError:
                if stop.is_set() or sock.fileno() == -1:
                    return
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        return
                except OSError:
                    return

    socks = [connect(server.port, f"127.0.0.{2 + i}") for i in range(4)]
    threads = [threading.Thread(target=pipeline, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    assert wait_for(lambda: server.connections == 4, 2)
    time.sleep(0.3)
    t0 = time.monotonic()
    server.stop()
    took = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(5)
    for s in socks:
        s.close()
    assert took < 2.0 and not server.thread.is_alive() and server.connections == 0, took


def test_ipv6_peers_are_counted_by_their_64() -> None:
    from authz.probe_server import _peer_key

    assert _peer_key(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == _peer_key(("2001:db8:1:2:bbbb::2", 1, 0, 0))
    assert _peer_key(("2001:db8:1:2::1", 1, 0, 0)) != _peer_key(("2001:db8:1:3::1", 1, 0, 0))
    assert _peer_key(("::ffff:10.0.0.1", 1, 0, 0)) == _peer_key(("10.0.0.1", 1)) == "10.0.0.1"


def test_stop_before_start_releases_the_port(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    server = ProbeServer("127.0.0.1:0", store, metrics)
    port = server.port
    server.stop()
    server.stop()
    again = ProbeServer(f"127.0.0.1:{port}", store, metrics)
    again.close()


def test_a_port_in_use_is_one_oserror_naming_the_address(loaded: tuple[BundleStore, Metrics]) -> None:
    store, metrics = loaded
    with probes(store, metrics) as server:
        addr = f"127.0.0.1:{server.port}"
        with pytest.raises(OSError) as err:
            ProbeServer(addr, store, metrics)
        assert str(err.value) == f"cannot listen on HTTP address {addr}: Address already in use"
