"""Each bound of `authz serve`, shown by its behaviour: request size limits, audit memory with a
hung collector, external rotation of audit files, SIGHUP at start, a second --workers instance,
ports open while the first load is slow, and the probe server's bounds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from bundle_factory import check_request, spiffe
from envoy.service.auth.v3 import external_auth_pb2_grpc
from support.bundle_sources import BundleServer
from test_serve import free_port, http_get, start
from test_workers import status, wait_for, workers_seen

from authz.audit import MAX_FIELD, FileSink
from authz.bundle import archive

CHARGE = dict(principal=spiffe("order", "order-service"), method="POST", path="/v1/charges",
              destination=spiffe("payment", "payment-service"))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- request size limits ---------------------------------------------------------------


def test_a_1mb_path_is_denied_with_a_reason_before_matching_and_never_stalls_others(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    proc, g, h = start("--audit-log", str(audit))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g}", options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            huge = dict(CHARGE, path="/v1/charges/" + "a" * 1_000_000)
            resp = stub.Check(check_request(**huge), timeout=10)
            assert resp.status.code == 7 and resp.denied_response.status.code == 403
            body = resp.denied_response.body
            assert "request too large: path over 65536 bytes" in body
            ids = [hv.header.value for hv in resp.denied_response.headers if hv.header.key == "x-authz-decision-id"]
            assert ids and len(ids[0]) == 32
            # many more of them, interleaved with normal checks: the normal ones stay fast
            worst = 0.0
            for _ in range(20):
                stub.Check.future(check_request(**huge), timeout=30)
                t0 = time.monotonic()
                assert stub.Check(check_request(**CHARGE), timeout=30).status.code == 0
                worst = max(worst, time.monotonic() - t0)
            assert worst < 2.0, worst  # generous for a loaded machine; was 0.7 s per huge path
            # a whole message over --max-request-bytes is denied without being parsed
            headers = {f"x-h{i}": "v" * 1000 for i in range(1200)}
            resp = stub.Check(check_request(**dict(CHARGE, headers=headers)), timeout=10)
            assert "request too large: over 1048576 bytes" in resp.denied_response.body
            resp = stub.Check(check_request(**dict(CHARGE, headers={f"x-h{i}": "v" for i in range(300)})), timeout=10)
            assert "request too large: over 200 headers" in resp.denied_response.body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert wait_for(lambda: len(audit.read_text().splitlines()) >= 23, 10)
    lines = audit.read_text().splitlines()
    assert max(len(line) for line in lines) < 4096  # records stay small
    rec = json.loads(lines[0])
    assert rec["reason"] == "request too large: path over 65536 bytes" and rec["path"] is None
    text = http_get  # noqa: F841 - metrics checked in the serve tests


def test_long_fields_are_truncated_and_marked_in_audit_records(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    proc, g, h = start("--audit-log", str(audit))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            long_path = "/v1/charges/" + "b" * 10_000  # under the path limit: decided
            resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(
                check_request(**dict(CHARGE, path=long_path)), timeout=10)
            assert resp.status.code in (0, 7)
            assert "request too large" not in resp.denied_response.body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    rec = json.loads(audit.read_text().splitlines()[0])
    assert rec["path"].startswith("/v1/charges/bbbb")
    assert rec["path"].endswith(f"...[truncated {len(long_path) - MAX_FIELD} chars]")
    assert len(rec["path"]) < MAX_FIELD + 64


# --- audit memory with a hung collector --------------------------------------------------


class HungCollector:
    """Accepts connections and reads the request, never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/ingest"

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def test_hung_collector_with_large_records_keeps_memory_bounded_and_visible(tmp_path: Path) -> None:
    collector = HungCollector()
    bound = 2 * 1024 * 1024
    proc, g, h = start("--audit-log", collector.url, "--audit-queue-bytes", str(bound),
                       "--audit-queue-size", "1000000", "--audit-header", "x-big")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            big = dict(CHARGE, path="/v1/charges/" + "c" * 15_000, headers={"x-big": "d" * 60_000})
            for _ in range(50):  # warm up, then measure
                stub.Check(check_request(**big), timeout=10)
            time.sleep(1.0)
            before = rss_kb(proc.pid)
            # ~380 MB of requests, in batches under the 256 calls authz admits at once
            # (--max-concurrent-checks); every record is queued for the stuck collector
            for _ in range(25):
                futures = [stub.Check.future(check_request(**big), timeout=60) for _ in range(200)]
                assert all(f.result().status.code in (0, 7) for f in futures)
        assert wait_for(lambda: metric(http_get(h, "/metrics")[1],
                                       'authz_audit_oldest_queued_seconds{sink="http"}') > 2, 20)
        text = http_get(h, "/metrics")[1]
        after = rss_kb(proc.pid)
        queued = metric(text, 'authz_audit_queued_bytes{sink="http"}')
        # Dropped at the sink's full queue, or before it (the first queue is bounded in
        # bytes too) when the dispatcher had not yet moved the records on: either is counted.
        dropped = sum(metric(text, f'authz_audit_dropped_total{{reason="{reason}"}}')
                      for reason in ("sink_blocked", "queue_full"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        collector.close()
    assert 0 < queued <= bound
    assert dropped > 0  # what did not fit was dropped and counted
    # Unbounded, with whole paths, the records alone would hold 5000 x 17 KB = 85 MB; fields
    # truncated and the queue bounded in bytes, it holds <= 2 MiB. 50 MB leaves room for the
    # allocator and gRPC's buffers on a loaded machine.
    growth_mb = (after - before) / 1024
    assert growth_mb < 50, growth_mb


# --- audit files rotated by someone else ----------------------------------------------------


def test_audit_file_removed_or_replaced_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = FileSink(path, max_bytes=0)
    sink.write(['{"n":1}'])
    path.rename(tmp_path / "audit.log.1")  # logrotate without copytruncate: move, then...
    sink.write(['{"n":2}'])  # ...the next batch goes to a new file at the path
    assert (tmp_path / "audit.log.1").read_text() == '{"n":1}\n'
    assert path.read_text() == '{"n":2}\n'
    path.unlink()  # removed outright
    sink.write(['{"n":3}'])
    assert path.read_text() == '{"n":3}\n'
    replacement = tmp_path / "other"
    replacement.write_text("")
    os.replace(replacement, path)  # replaced by another file
    sink.write(['{"n":4}'])
    assert path.read_text() == '{"n":4}\n'
    assert sink.reopened == 3
    sink.write(['{"n":5}'])  # unchanged file: appended, not reopened
    assert path.read_text() == '{"n":4}\n{"n":5}\n' and sink.reopened == 3
    sink.close()


def test_served_audit_log_survives_external_rotation(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    proc, g, h = start("--audit-log", str(audit))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            stub.Check(check_request(**CHARGE), timeout=10)
            assert wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) == 1, 10)
            audit.rename(tmp_path / "audit.log.1")
            for _ in range(3):
                stub.Check(check_request(**CHARGE), timeout=10)
            assert wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) == 3, 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert len((tmp_path / "audit.log.1").read_text().splitlines()) == 1
    assert "removed or replaced; reopening" in err


# --- SIGHUP at any moment ------------------------------------------------------------------


def _hup_storm(pid: int, seconds: float, every: float = 0.02) -> int:
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(every)
    return sent


def _hup_ignored(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_sighup_from_the_first_moment_does_not_kill_the_service(tmp_path: Path) -> None:
    """From the first line of authz's own code (before its imports, before the bundle loads)
    a SIGHUP is harmless. Only the interpreter's own start-up, before any of our code runs,
    is left to the caller (supervisors start workers with HUP ignored, see the next test)."""
    g, h = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
                             "--http-addr", f"127.0.0.1:{h}", "--audit-log", str(tmp_path / "a.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _hup_ignored(proc.pid), 10)
        sent = _hup_storm(proc.pid, 3.0)
        assert sent > 50 and proc.poll() is None
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 20)
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            assert external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=10).status.code == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_sighup_storm_under_workers_restarts_nobody(tmp_path: Path) -> None:
    g, h = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--workers", "2",
                             "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}",
                             "--audit-log", str(tmp_path / "a.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: _hup_ignored(proc.pid), 10)
        _hup_storm(proc.pid, 3.0)  # from the start: workers are starting meanwhile
        assert proc.poll() is None
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10)) == 2, 20)
        pids = workers_seen(h)
        _hup_storm(proc.pid, 2.0)
        time.sleep(1.0)
        assert workers_seen(h) == pids  # same two processes: none died and was restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "restarting it" not in err


# --- ports: one supervisor's workers only ----------------------------------------------------


def test_a_second_workers_instance_on_ports_in_use_is_refused(tmp_path: Path) -> None:
    g, h = free_port(), free_port()
    cmd = [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
           "--http-addr", f"127.0.0.1:{h}", "--audit-log", str(tmp_path / "a.log")]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert wait_for(lambda: len(workers_seen(h, 10)) == 2, 20)
        mine = set(workers_seen(h).values())
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 2
        assert f"127.0.0.1:{g} is already in use" in second.stderr
        # and nothing of the second one answers on the shared port
        assert set(workers_seen(h, 40).values()) == mine
        # a single-process instance is refused too
        single = subprocess.run([sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
                                 "--http-addr", f"127.0.0.1:{free_port()}"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert single.returncode == 2 and f"cannot listen on gRPC address 127.0.0.1:{g}" in single.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=90)
    assert first.returncode == 0


# --- a slow source: ports first, then --persist --------------------------------------------


def _persisted_p1(tmp_path: Path, server: BundleServer, poll_timeout: float) -> list[str]:
    """Flags of `authz serve` from ``server``, publishing bundle p1, with p1 already in --persist
    (one run served it)."""
    from test_sources import bundle_bytes

    server.publish(archive.build_archive(bundle_bytes(tmp_path, "p1"), "t", "p1"), '"p1"')
    flags = ["--bundle", server.url, "--persist", str(tmp_path / "state"), "--poll-timeout",
             str(poll_timeout), "--audit-log", str(tmp_path / "a.log")]
    proc, _, h = start(*flags)
    assert status(h)["revision"] == "p1"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return flags


def _assert_decided(grpc_port: int) -> None:
    """A check on a new connection is decided by a bundle (p1), not denied for want of one."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=10)
        assert "no policy bundle loaded" not in resp.denied_response.body


def test_ports_open_while_a_slow_first_load_runs_then_persist_serves(tmp_path: Path) -> None:
    server = BundleServer()
    try:
        flags = _persisted_p1(tmp_path, server, poll_timeout=4)
        server.drip = 0.5  # the server now drips one byte every half second
        g, h = free_port(), free_port()
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}",
                                 "--http-addr", f"127.0.0.1:{h}", *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # /healthz answers while the download is in flight; not ready yet
            assert wait_for(lambda: http_get(h, "/healthz")[0] == 200, 20)
            up_after = time.monotonic() - t0
            code, body = http_get(h, "/readyz")
            assert code == 503 and "no bundle loaded yet" in body
            # at --poll-timeout the download is given up and the persisted copy serves
            assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
            ready_after = time.monotonic() - t0
            st = status(h)
            assert st["revision"] == "p1" and st["serving_persisted"]
            assert "took longer than 4.0s" in st["persisted_reason"]
            _assert_decided(g)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert up_after < ready_after and ready_after >= 4.0
        assert proc.returncode == 0, err
    finally:
        server.close()


def test_a_worker_takes_no_checks_before_its_first_load_finishes(tmp_path: Path) -> None:
    """Workers share the gRPC port and the kernel spreads its connections over every process
    listening on it: a worker still loading must not listen, or it denies what its siblings
    could decide. Here both load slowly: the port refuses connections (Envoy then tries
    another endpoint) instead of answering "no policy bundle loaded"; then both decide."""
    server = BundleServer()
    try:
        flags = _persisted_p1(tmp_path, server, poll_timeout=3)
        server.drip = 0.5  # one byte every half second: the first loads give up at --poll-timeout
        g, h = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "authz", "serve", "--workers", "2",
                                 "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}", *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: http_get(h, "/healthz")[0] == 200, 20)
            refused = 0
            deadline = time.monotonic() + 30
            while "no bundle loaded yet" in http_get(h, "/readyz")[1] and time.monotonic() < deadline:
                with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
                    try:
                        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request(**CHARGE), timeout=2)
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        refused += 1
                    else:  # only a worker that has finished its first load may answer
                        assert "no policy bundle loaded" not in resp.denied_response.body
                st = status(h)  # and one still loading says its port is closed
                assert st["revision"] is not None or st["worker"]["grpc_listening"] is False, st
                time.sleep(0.2)
            assert refused > 0
            assert wait_for(lambda: len(workers_seen(h, 10, loaded=True)) == 2, 30)
            for _ in range(20):  # a new connection each time: both workers
                _assert_decided(g)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        server.close()


# --- the probe server -----------------------------------------------------------------------


def test_idle_probe_connections_neither_pile_up_threads_nor_block_probes() -> None:
    """300 idle connections, from ten addresses (30 each, within the default 64 per peer, so
    every one is accepted and held): /healthz from another address is answered while they
    are all still open, and they cost no thread each."""
    proc, g, h = start()
    idle: list[socket.socket] = []
    try:
        threads_before = len(os.listdir(f"/proc/{proc.pid}/task"))
        for i in range(300):
            s = socket.socket()
            s.bind((f"127.0.0.{10 + i % 10}", 0))  # all of 127.0.0.0/8 is the loopback
            s.connect(("127.0.0.1", h))
            idle.append(s)
        time.sleep(0.5)
        threads_during = len(os.listdir(f"/proc/{proc.pid}/task"))
        assert threads_during - threads_before <= 10  # no thread per connection
        for _ in range(5):  # answered at once, every time, while the 300 are open
            t0 = time.monotonic()
            assert http_get(h, "/healthz") == (200, "ok\n")
            assert time.monotonic() - t0 < 1.0
        still_open = 0
        for s in idle:  # not refused nor timed out: the server still holds each of them
            s.setblocking(False)
            try:
                s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        assert still_open == 300
    finally:
        for s in idle:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_metrics_directory_of_a_killed_supervisor_is_removed_by_the_next(tmp_path: Path) -> None:
    import tempfile

    g, h = free_port(), free_port()
    cmd = [sys.executable, "-m", "authz", "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{g}",
           "--http-addr", f"127.0.0.1:{h}", "--audit-log", str(tmp_path / "a.log"), "--drain-grace", "0"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        mine = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"authz-metrics-{first.pid}-")]
        assert len(mine) == 1
    finally:
        first.kill()  # no clean-up possible; its workers die with it
        first.wait(30)
    assert os.path.isdir(os.path.join(tempfile.gettempdir(), mine[0]))
    assert wait_for(lambda: _port_free(g) and _port_free(h), 30)
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: http_get(h, "/readyz")[0] == 200, 30)
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), mine[0]))
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(90)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not in use
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# --- open files ----------------------------------------------------------------------------


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
            "from authz.limits import raise_open_files_limit as r; print(r(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split()[0] == "4096", out


def test_under_a_low_open_files_limit_probe_connections_leave_room_for_grpc_and_healthz() -> None:
    """With a limit of 1024 open files (common in containers) the probe port's 1024
    connections took every descriptor: Envoy's next gRPC connection, reloads and the
    kubelet's probe all failed. The probe port now holds at most a quarter of the limit."""
    import resource

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    g, h = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--grpc-addr", f"127.0.0.1:{g}", "--http-addr", f"127.0.0.1:{h}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=low)
    held: list[socket.socket] = []
    try:
        assert wait_for(lambda: http_get(h, "/healthz")[0] == 200 if proc.poll() is None else True, 20)
        assert proc.poll() is None
        for i in range(300):  # from 10 addresses, under the per-address bound
            s = socket.socket()
            s.bind((f"127.0.4.{1 + i % 10}", 0))
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", h))
            except OSError:
                s.close()
                continue
            held.append(s)
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 200
        assert http_get(h, "/healthz")[0] == 200
        with grpc.insecure_channel(f"127.0.0.1:{g}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for s in held:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
