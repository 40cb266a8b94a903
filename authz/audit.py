"""Audit records: one JSON object per decision, written off the hot path.

The schema is documented in docs/audit.md. The flow::

    Checker._observe ──put_nowait──▶ shared queue (bounded) ──▶ dispatcher thread
        (sampling, O(1))                                        formats JSON once
                                                                  │ offer (never blocks)
                                             ┌────────────────────┼────────────────────┐
                                             ▼                    ▼                    ▼
                                      sink queue + thread  sink queue + thread  sink queue + thread
                                          stdout               file (rotating)      http (batched)

A check only samples and puts a small frozen entry on a bounded queue; it never waits. A
full queue, a sink that raises or a sink that blocks drops records and counts them in
``authz_audit_dropped_total{reason}``; each sink has its own queue and thread, so one stuck
sink cannot stall the others, and none of them can slow or change a decision.

Header values are never recorded, except names an operator allow-lists, and the
credential headers in ``NEVER_LOGGED`` (authz.redact) can never be allow-listed. The
authority is recorded without its user info.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import json
import logging
import os
import random
import re
import select
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

from authz.credentials import TokenFile, client_auth
from authz.engine.model import Decision
from authz.metrics import DROP_WORKER_KILLED, Metrics
from authz.redact import NEVER_LOGGED, header_value, redact_authority, redact_url
from authz.request import Request
from authz.tls import ClientTls, client_context

log = logging.getLogger("authz.audit")

# Reasons of authz_audit_dropped_total. Allows left out by sampling are not drops; they
# are counted in authz_audit_sampled_out_total.
DROP_QUEUE_FULL = "queue_full"  # the shared queue was full: the dispatcher fell behind
DROP_SINK_BLOCKED = "sink_blocked"  # a sink's own queue was full: that sink is slow or stuck
DROP_SINK_ERROR = "sink_error"  # a sink raised (disk full, collector gave up after retries)
DROP_FORMAT_ERROR = "format_error"  # a record could not be turned into JSON
DROP_SHUTDOWN = "shutdown"  # still queued for a stuck sink when the service stopped
# DROP_WORKER_KILLED (authz.metrics): queued in a worker of `authz serve --workers` that was
# killed (SIGKILL, a crash), counted by the supervisor from the worker's last report
# What a queued entry costs besides its request's bytes (the tuple, the decision, the id).
ENTRY_OVERHEAD = 512
REPORT_INTERVAL = 1.0  # seconds between updates of the queue age and size gauges

DROP_REASONS = (DROP_QUEUE_FULL, DROP_SINK_BLOCKED, DROP_SINK_ERROR, DROP_FORMAT_ERROR, DROP_SHUTDOWN,
                DROP_WORKER_KILLED)

# W3C trace context: version-traceid-parentid-flags (future versions may append fields).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]*)?\Z")
_MAX_REQUEST_ID = 128
_MAX_HEADER_VALUE = 1024
# Longer request fields (path, host, principals...) keep this many characters and say how
# many more there were: a record stays a few KiB whatever the request carried.
MAX_FIELD = 2048


def truncate(value: str, limit: int = MAX_FIELD) -> str:
    """``value`` cut to ``limit`` characters, marked with how much was cut."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[truncated {len(value) - limit} chars]"


class Sink(Protocol):
    """Where formatted records go. ``write`` may block or raise; the caller copes."""

    name: str

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


# --- sinks -------------------------------------------------------------------------------


class StreamSink:
    """A text stream, stdout by default; records are flushed batch by batch."""

    max_batch = 512
    max_delay = 0.0

    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.stream = stream
        self.name = name
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # an in-memory stream
            self._fd = None

    def write(self, lines: list[str]) -> None:
        if self._fd is None:
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()
            return
        # Straight to the descriptor in whole lines of at most PIPE_BUF bytes a write: each
        # write to a pipe is then atomic, so workers sharing stdout never interleave a line.
        self.stream.flush()
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            data = (line + "\n").encode()
            if chunk and size + len(data) > select.PIPE_BUF:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write_all(b"".join(chunk))

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """Appends to a file; rotates to FILE.1 .. FILE.N once it reaches ``max_bytes``.

    Writes are unbuffered appends, so a failed write (disk full) leaves nothing queued in
    memory; a line cut short by a failure is terminated before the next write so the
    following records still parse line by line. Before each batch the path is checked
    (one stat): a file removed or replaced by someone else (logrotate, an operator) is
    reopened at the path, so records never go on into a file nobody can see.
    """

    max_batch = 512
    max_delay = 0.0

    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024, backups: int = 5,
                 name: str = "file") -> None:
        self.path = Path(path)
        self.name = name
        self.max_bytes = max_bytes
        self.backups = backups
        self._identity: tuple[int, int] | None = None
        self._fh = self._open()
        self._torn = False
        self.reopened = 0  # times the file was found removed or replaced

    def _open(self) -> Any:
        fh = open(self.path, "ab", buffering=0)
        st = os.fstat(fh.fileno())
        self._identity = (st.st_dev, st.st_ino)
        return fh

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            log.warning("audit log %s was removed or replaced; reopening it", self.path)
            self._fh.close()
            self._fh = self._open()
            self._torn = False
            self.reopened += 1

    def write(self, lines: list[str]) -> None:
        self._reopen_if_moved()
        data = "".join(line + "\n" for line in lines).encode()
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += self._fh.write(view[done:]) or 0
        finally:
            if done == len(data):
                self._torn = False
            elif done > 0:
                self._torn = True
        if self.max_bytes and self._fh.tell() >= self.max_bytes:
            try:
                self._rotate()
            except OSError as exc:  # the records are written; keep appending to one file
                log.warning("cannot rotate audit log %s: %s", self.path, exc)
                if self._fh.closed:
                    self._fh = self._open()

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._fh = self._open()

    def close(self) -> None:
        self._fh.close()


class UploadError(Exception):
    """The collector did not take a batch, after every retry allowed."""


# Statuses worth retrying: the collector is overloaded, restarting or timed out.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class HttpSink:
    """POSTs batches to a collector as a gzipped JSON array (``Content-Encoding: gzip``).

    A batch is sent when it holds ``max_batch`` records or ``max_delay`` seconds after its
    first record arrived. A failed upload is retried up to ``max_attempts`` times in all,
    waiting ``backoff_base * 2**n`` (capped at ``backoff_max``) with jitter between
    attempts; then the batch is dropped and counted, so records never pile up while the
    collector is away, and the next batch goes through once it is back.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 500,
        max_delay: float = 1.0,
        timeout: float = 5.0,
        max_attempts: int = 4,
        backoff_base: float = 0.25,
        backoff_max: float = 4.0,
        rng: Callable[[], float] = random.random,
        name: str = "http",
        ssl_context: ssl.SSLContext | None = None,
        tls: ClientTls | None = None,
        token: TokenFile | None = None,
    ) -> None:
        url, self._auth = client_auth(url, token)  # user info becomes Basic authentication
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) collector URL: {redact_url(url)!r}")
        self.name = name
        self.max_batch = max(1, max_batch)
        self.max_delay = max(0.0, max_delay)
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = rng
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._ssl = (ssl_context or client_context()) if self._https else None
        self._tls = tls if ssl_context is None else None
        self._interrupt = threading.Event()
        self.uploads = 0  # batches the collector accepted
        self.failures = 0  # attempts that failed

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based): half fixed, half jitter."""
        delay = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return float(delay / 2 + self._rng() * delay / 2)

    def write(self, lines: list[str]) -> None:
        body = gzip.compress(("[" + ",".join(lines) + "]").encode(), compresslevel=6)
        attempt = 0
        while True:
            attempt += 1
            try:
                status = self._post(body)
                if 200 <= status < 300:
                    self.uploads += 1
                    return
                problem = f"collector answered HTTP {status}"
                retry = status in _RETRY_STATUSES
            except (OSError, http.client.HTTPException) as exc:
                problem = f"upload failed: {exc.__class__.__name__}: {exc}"
                retry = True
            self.failures += 1
            if not retry or attempt >= self.max_attempts or self._interrupt.is_set():
                raise UploadError(f"{problem} (attempt {attempt} of {self.max_attempts})")
            if self._interrupt.wait(self.backoff(attempt)):
                raise UploadError(f"{problem}; shutting down")

    def _post(self, body: bytes) -> int:
        conn: http.client.HTTPConnection
        if self._https:
            ctx = self._tls.context() if self._tls is not None else self._ssl
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=ctx)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            conn.request("POST", self._target, body=body, headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "User-Agent": "authz-audit",
                **self._auth.headers(),
            })
            resp = conn.getresponse()
            resp.read()
            return int(resp.status)
        finally:
            conn.close()

    def interrupt(self) -> None:
        """Stop retrying (shutdown): the batch in flight gets no further attempts."""
        self._interrupt.set()

    def close(self) -> None:
        self._interrupt.set()


def stdout_sink() -> StreamSink:
    return StreamSink(sys.stdout)


def sink_for(target: str, *, file_max_bytes: int = 100 * 1024 * 1024, file_backups: int = 5,
             http_max_batch: int = 500, http_max_delay: float = 1.0,
             ssl_context: ssl.SSLContext | None = None, tls: ClientTls | None = None,
             token: TokenFile | None = None) -> Sink:
    """``-`` is stdout, ``http(s)://...`` a collector, anything else a file path."""
    if target == "-":
        return stdout_sink()
    if target.startswith(("http://", "https://")):
        return HttpSink(target, max_batch=http_max_batch, max_delay=http_max_delay,
                        ssl_context=ssl_context, tls=tls, token=token)
    return FileSink(Path(target), max_bytes=file_max_bytes, backups=file_backups)


# --- records -----------------------------------------------------------------------------


class AuditEntry(NamedTuple):
    """What the hot path hands over (a tuple: cheap to build); formatted off the hot path."""

    when: float
    decision_id: str
    decision: Decision
    request: Request | None
    revision: str
    latency_us: int
    caller: str = "envoy_grpc"  # envoy_grpc, envoy_http or api (authz.check.CALLERS)


def action_of(decision: Decision) -> str:
    """AUDIT when an AUDIT rule matched; otherwise ALLOW, DENY or default (docs/audit.md)."""
    return "AUDIT" if decision.audit else decision.action


def check_header_allowlist(names: Iterable[str]) -> tuple[str, ...]:
    """Lower-cased, de-duplicated names; a credential header is refused with ValueError."""
    out: list[str] = []
    for name in names:
        lowered = name.strip().lower()
        if lowered in NEVER_LOGGED:
            raise ValueError(f"header {name!r} carries credentials: it can never be written to audit "
                             "records (docs/audit.md, Never logged)")
        if lowered and lowered not in out:
            out.append(lowered)
    return tuple(out)


def rfc3339(when: float) -> str:
    """UTC, microseconds, ``Z``: 2026-01-02T03:04:05.123456Z (microseconds truncated)."""
    sec = int(when)
    micro = min(999_999, int((when - sec) * 1_000_000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{micro:06d}Z"


def _request_id(r: Request) -> str | None:
    # The x-request-id header, not CheckRequest's http.id (Envoy's internal stream id).
    value = r.headers.get("x-request-id")
    return value[:_MAX_REQUEST_ID] if value else None


def _traceparent(r: Request) -> str | None:
    value = r.headers.get("traceparent")
    return value if value and _TRACEPARENT.match(value) else None


def build_record(e: AuditEntry, header_allowlist: tuple[str, ...] = (),
                 log_query: bool = False) -> dict[str, Any]:
    """The audit record of one decision as a dict (docs/audit.md); every key always present.

    The reference for :class:`RecordFormatter`, which writes the same JSON faster.
    """
    d = e.decision
    r = e.request
    rec: dict[str, Any] = {
        "time": rfc3339(e.when),
        "decision_id": e.decision_id,
        "allowed": d.allowed,
        "http_status": d.http_status,
        "reason": d.reason,
        "policy": d.policy,
        "rule": d.rule,
        "action": action_of(d),
        "audit": list(d.audit),
        "dry_run": list(d.dry_run),
        "tenant": d.tenant,
        "revision": e.revision,
        "latency_us": e.latency_us,
        "caller": e.caller,
        "source_principal": None,
        "destination_principal": None,
        "source_address": None,
        "method": None,
        "host": None,
        "path": None,
        "request_id": None,
        "traceparent": None,
        "headers": {},
    }
    if r is not None:
        rec["source_principal"] = truncate(r.principal) or None
        rec["destination_principal"] = truncate(r.destination_principal) or None
        rec["source_address"] = truncate(r.source_address) or None
        rec["method"] = truncate(r.method)
        rec["host"] = truncate(redact_authority(r.host))
        rec["path"] = truncate(r.path + ("?" + r.query if log_query and r.query else ""))
        rec["request_id"] = _request_id(r)
        rec["traceparent"] = _traceparent(r)
        rec["headers"] = {h: header_value(h, r.headers[h])[:_MAX_HEADER_VALUE]
                          for h in header_allowlist if h in r.headers and h not in NEVER_LOGGED}
    return rec


_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # C: quoted and escaped


def _opt(value: str | None) -> str:
    return _str(value) if value else "null"


class RecordFormatter:
    """One JSON line per record, byte for byte ``json.dumps(build_record(e))`` in content.

    Formatting runs in the audit thread but shares the interpreter with checks, so it is
    kept cheap: the part that depends only on the decision and revision (a few hundred
    distinct values per bundle) is cached, the time prefix is cached per second, and the
    request's strings go through the C string encoder.
    """

    CACHE_LIMIT = 4096

    def __init__(self, header_allowlist: tuple[str, ...] = (), log_query: bool = False) -> None:
        self.header_allowlist = tuple(h for h in header_allowlist if h not in NEVER_LOGGED)
        self.log_query = log_query
        self._decisions: dict[tuple[Decision, str], str] = {}
        self._second = -1
        self._second_text = ""

    def _decision_part(self, d: Decision, revision: str) -> str:
        key = (d, revision)
        part = self._decisions.get(key)
        if part is None:
            part = json.dumps({
                "allowed": d.allowed, "http_status": d.http_status, "reason": d.reason,
                "policy": d.policy, "rule": d.rule, "action": action_of(d), "audit": list(d.audit),
                "dry_run": list(d.dry_run), "tenant": d.tenant, "revision": revision,
            }, separators=(",", ":"))[1:-1]
            if len(self._decisions) >= self.CACHE_LIMIT:
                self._decisions.clear()
            self._decisions[key] = part
        return part

    def __call__(self, e: AuditEntry) -> str:
        when = e.when
        sec = int(when)
        if sec != self._second:
            self._second = sec
            self._second_text = time.strftime('{"time":"%Y-%m-%dT%H:%M:%S', time.gmtime(sec))
        micro = min(999_999, int((when - sec) * 1_000_000))
        head = (f'{self._second_text}.{micro:06d}Z","decision_id":{_str(e.decision_id)},'
                f'{self._decision_part(e.decision, e.revision)},"latency_us":{int(e.latency_us)},'
                f'"caller":{_str(e.caller)},')
        r = e.request
        if r is None:
            return head + ('"source_principal":null,"destination_principal":null,'
                           '"source_address":null,"method":null,"host":null,"path":null,'
                           '"request_id":null,"traceparent":null,"headers":{}}')
        path = truncate(r.path + ("?" + r.query if self.log_query and r.query else ""))
        headers = "{}"
        if self.header_allowlist:
            kept = {h: header_value(h, r.headers[h])[:_MAX_HEADER_VALUE]
                    for h in self.header_allowlist if h in r.headers}
            if kept:
                headers = json.dumps(kept, separators=(",", ":"))
        return (f'{head}"source_principal":{_opt(truncate(r.principal))},'
                f'"destination_principal":{_opt(truncate(r.destination_principal))},'
                f'"source_address":{_opt(truncate(r.source_address))},"method":{_str(truncate(r.method))},'
                f'"host":{_str(truncate(redact_authority(r.host)))},"path":{_str(path)},'
                f'"request_id":{_opt(_request_id(r))},'
                f'"traceparent":{_opt(_traceparent(r))},"headers":{headers}}}')


# --- the log -----------------------------------------------------------------------------


class _SinkWorker:
    """One sink's queue, bounded in records and in bytes, and the thread that drains it.

    The dispatcher is the only producer and this thread the only consumer, so the deque
    needs no lock; the byte count is two counters, each written by one side only. The
    thread polls every ``poll_interval`` seconds instead of being woken per batch: under
    load that is a handful of thread switches a second, not hundreds. Each queued line
    carries the time it was queued, so a stuck sink shows in ``age()`` (and the
    authz_audit_oldest_queued_seconds gauge) long before its queue overflows.
    """

    def __init__(self, sink: Sink, metrics: Metrics, capacity: int, poll_interval: float,
                 max_bytes: int = 64 * 1024 * 1024) -> None:
        self.sink = sink
        self.capacity = max(1, capacity)
        self.max_bytes = max(1, max_bytes)
        self.max_batch = max(1, int(getattr(sink, "max_batch", 512)))
        self.max_delay = max(0.0, float(getattr(sink, "max_delay", 0.0)))
        self.poll_interval = poll_interval
        self._queue: collections.deque[tuple[float, str]] = collections.deque()
        self._bytes_in = 0  # written by the dispatcher only
        self._bytes_out = 0  # written by this sink's thread only
        self._writing_since: float | None = None  # the batch being written, if any
        self._stop = threading.Event()
        self._written = metrics.audit_records.labels(sink.name)
        self._blocked = metrics.audit_dropped.labels(DROP_SINK_BLOCKED)
        self._errors = metrics.audit_dropped.labels(DROP_SINK_ERROR)
        self._shutdown = metrics.audit_dropped.labels(DROP_SHUTDOWN)
        self._age_gauge = metrics.audit_oldest_queued.labels(sink.name)
        self._bytes_gauge = metrics.audit_queued_bytes.labels(sink.name)
        self._records_gauge = metrics.audit_queued_records.labels(sink.name)
        self._writing = 0  # records in the batch being written
        self._last_error_log = 0.0
        self.thread = threading.Thread(target=self._run, name=f"authz-audit-{sink.name}", daemon=True)

    @property
    def queued_bytes(self) -> int:
        return self._bytes_in - self._bytes_out

    def offer(self, lines: list[str], now: float) -> None:
        """Queue a batch, or drop and count it when the sink is that far behind."""
        size = sum(len(line) for line in lines)
        if len(self._queue) + len(lines) > self.capacity or self.queued_bytes + size > self.max_bytes:
            self._blocked.inc(len(lines))
        else:
            self._queue.extend((now, line) for line in lines)
            self._bytes_in += size

    def age(self, now: float) -> float:
        """Seconds the oldest record not yet written has waited (0 when none waits)."""
        oldest = self._writing_since
        try:
            head = self._queue[0][0]
        except IndexError:
            head = None
        if head is not None and (oldest is None or head < oldest):
            oldest = head
        return max(0.0, now - oldest) if oldest is not None else 0.0

    def report(self, now: float, upstream: int = 0) -> None:
        """Publish this sink's queue; ``upstream``: records not yet dispatched, bound for it too."""
        self._age_gauge.set(self.age(now))
        self._bytes_gauge.set(self.queued_bytes)
        self._records_gauge.set(len(self._queue) + self._writing + upstream)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        q = self._queue
        pending: list[str] = []
        first_at = 0.0
        oldest = 0.0
        while True:
            stopping = self._stop.is_set()
            if q and not pending:
                first_at = time.monotonic()
                oldest = q[0][0]
            while q and len(pending) < self.max_batch:
                pending.append(q.popleft()[1])
            if pending and (stopping or len(pending) >= self.max_batch
                            or time.monotonic() - first_at >= self.max_delay):
                self._writing_since = oldest
                self._writing = len(pending)
                try:
                    self._write(pending)
                finally:
                    self._writing_since = None
                    self._writing = 0
                    self._bytes_out += sum(len(line) for line in pending)
                pending = []
                continue
            if stopping and not q and not pending:
                return
            self._stop.wait(self.poll_interval)

    def _write(self, lines: list[str]) -> None:
        try:
            self.sink.write(lines)
        except Exception as exc:  # noqa: BLE001 - a sink failure must never reach a check
            self._errors.inc(len(lines))
            now = time.monotonic()
            if now - self._last_error_log > 10.0:  # at most one line per 10 s per sink
                self._last_error_log = now
                log.warning("audit sink %s dropped %d records: %s", self.sink.name, len(lines), exc)
            return
        self._written.inc(len(lines))

    def discard_queued(self) -> int:
        """Count what a stuck sink still holds at shutdown as dropped."""
        dropped = len(self._queue)
        self._queue.clear()
        self._bytes_out = self._bytes_in
        if dropped:
            self._shutdown.inc(dropped)
        return dropped


class AuditLog:
    """Takes decisions from the hot path and fans formatted records out to the sinks.

    ``allow_sample_rate`` in [0, 1] keeps that share of plain allows; denies and
    decisions an AUDIT rule matched are always recorded. ``rng`` returns floats in
    [0, 1) and is injectable so sampling is testable. ``start=False`` leaves the threads
    unstarted (tests of the shared queue); call ``start()`` later. A sink with a
    ``queue_size`` attribute gets a queue of that many records instead of ``sink_queue_size``.

    Every queue is bounded in bytes as well as in records (``queue_bytes`` for the shared
    queue, by the size the caller gives each entry; ``sink_queue_bytes`` for each sink's,
    by formatted length), so large requests cannot make a stuck sink hold more memory
    than that.

    The shared queue is a deque whose length is checked before each append: no lock and
    no wake-up per record on the hot path. The dispatcher polls it every ``poll_interval``
    seconds, formats what it finds and offers each batch to every sink's worker, which
    polls its own queue likewise: a record reaches its sinks within a few poll intervals.
    """

    DISPATCH_BATCH = 512

    def __init__(
        self,
        sinks: Iterable[Sink],
        metrics: Metrics,
        *,
        queue_size: int = 10_000,
        sink_queue_size: int = 10_000,
        queue_bytes: int = 64 * 1024 * 1024,
        sink_queue_bytes: int = 64 * 1024 * 1024,
        header_allowlist: Iterable[str] = (),
        log_query: bool = False,
        allow_sample_rate: float = 1.0,
        rng: Callable[[], float] = random.random,
        poll_interval: float = 0.05,
        start: bool = True,
    ) -> None:
        if not 0.0 <= allow_sample_rate <= 1.0:
            raise ValueError(f"allow sample rate must be within [0, 1], not {allow_sample_rate}")
        self.sinks = list(sinks)
        self.metrics = metrics
        self.header_allowlist = check_header_allowlist(header_allowlist)
        self.log_query = log_query
        self.allow_sample_rate = allow_sample_rate
        self.queue_size = max(1, queue_size)
        self.queue_bytes = max(1, queue_bytes)
        self.poll_interval = poll_interval
        self.format = RecordFormatter(self.header_allowlist, log_query)
        self._rng = rng
        self._queue: collections.deque[tuple[AuditEntry, int]] = collections.deque()
        self._bytes_in = 0  # written by submit (the event loop) only
        self._bytes_out = 0  # written by the dispatcher only
        self._workers = [_SinkWorker(s, metrics, int(getattr(s, "queue_size", 0) or sink_queue_size),
                                     poll_interval, sink_queue_bytes) for s in self.sinks]
        for reason in DROP_REASONS:  # every series exists from the start, at 0
            metrics.audit_dropped.labels(reason)
        self._queue_full = metrics.audit_dropped.labels(DROP_QUEUE_FULL)
        self._format_error = metrics.audit_dropped.labels(DROP_FORMAT_ERROR)
        self._sampled_out = metrics.audit_sampled_out
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="authz-audit", daemon=True)
        self._started = False
        self._closed = False
        if start:
            self.start()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for w in self._workers:
            w.thread.start()
        self._thread.start()

    # The hot path ------------------------------------------------------------------------

    def submit(self, entry: AuditEntry, size: int = 0) -> None:
        """O(1) and never blocks: sample, then append to the bounded queue or count a drop.
        ``size`` is about how many bytes the entry holds (its request's size on the wire)."""
        d = entry.decision
        rate = self.allow_sample_rate
        if d.allowed and rate < 1.0 and not d.audit and (rate <= 0.0 or self._rng() >= rate):
            self._sampled_out.inc()
            return
        size += ENTRY_OVERHEAD
        if len(self._queue) >= self.queue_size or self._bytes_in - self._bytes_out + size > self.queue_bytes:
            self._queue_full.inc()
            return
        self._queue.append((entry, size))
        self._bytes_in += size

    # Off the hot path -------------------------------------------------------------------

    def record(self, e: AuditEntry) -> dict[str, Any]:
        return build_record(e, self.header_allowlist, self.log_query)

    def _dispatch(self) -> None:
        q = self._queue
        reported = 0.0
        while True:
            stopping = self._stopping.is_set()
            now = time.monotonic()
            if now - reported >= REPORT_INTERVAL:  # this thread is never stuck in a sink
                reported = now
                for w in self._workers:
                    w.report(now, len(q))
            if not q:
                if stopping:
                    return
                self._stopping.wait(self.poll_interval)
                continue
            lines: list[str] = []
            taken = 0
            while q and len(lines) < self.DISPATCH_BATCH:
                e, size = q.popleft()
                taken += size
                try:
                    lines.append(self.format(e))
                except Exception:
                    self._format_error.inc()
                    log.exception("cannot format audit record %s", e.decision_id)
            self._bytes_out += taken
            if lines:
                for w in self._workers:
                    w.offer(lines, now)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what the sinks can take within ``timeout`` seconds, then stop.

        A sink still stuck after half the time is interrupted (an HTTP sink stops
        retrying); what it still holds at the end is counted as dropped (shutdown).
        """
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self.start()
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for w in self._workers:
            w.stop()
        half = time.monotonic() + max(0.0, deadline - time.monotonic()) / 2
        for w in self._workers:
            w.thread.join(max(0.0, half - time.monotonic()))
        for w in self._workers:
            if w.thread.is_alive():
                interrupt = getattr(w.sink, "interrupt", None)
                if interrupt is not None:
                    interrupt()
        for w in self._workers:
            w.thread.join(max(0.0, deadline - time.monotonic()))
            if w.thread.is_alive():
                log.warning("audit sink %s did not finish in time; %d queued records dropped",
                            w.sink.name, w.discard_queued())
                continue  # closing a stuck sink could block shutdown too
            try:
                w.sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must not raise at shutdown
                log.warning("closing audit sink %s: %s", w.sink.name, exc)

    @property
    def queued(self) -> int:
        """Records waiting in the shared queue."""
        return len(self._queue)
