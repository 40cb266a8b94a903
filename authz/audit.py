"""Audit records: one JSON object per decision, written off the hot path.

A check only builds a small tuple and puts it on a bounded queue (never blocking); a
writer thread turns it into JSON and hands it to each sink. A full queue or a failing
sink drops records and counts them by reason; it never slows or changes a decision.
Header values are never recorded, except names an operator allow-lists, and the
credential headers can never be allow-listed.
"""

from __future__ import annotations

import datetime
import json
import queue
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from authz.engine.model import Decision
from authz.metrics import Metrics
from authz.request import Request

NEVER_LOGGED = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


class Sink(Protocol):
    name: str

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    def __init__(self, stream: IO[str], name: str = "stdout") -> None:
        self.stream = stream
        self.name = name

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """Appends to a file; rotates to FILE.1 .. FILE.N when it grows past max_bytes."""

    def __init__(self, path: Path, max_bytes: int = 100 * 1024 * 1024, backups: int = 5) -> None:
        self.path = Path(path)
        self.name = "file"
        self.max_bytes = max_bytes
        self.backups = backups
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, lines: list[str]) -> None:
        self._fh.write("".join(line + "\n" for line in lines))
        self._fh.flush()
        if self.max_bytes and self._fh.tell() >= self.max_bytes:
            self._rotate()

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
        self._fh = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._fh.close()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What the hot path hands over; formatting happens in the writer thread."""

    when: float
    decision_id: str
    decision: Decision
    request: Request | None
    revision: str
    latency_us: int


class AuditLog:
    def __init__(
        self,
        sinks: Iterable[Sink],
        metrics: Metrics,
        *,
        queue_size: int = 10_000,
        header_allowlist: Iterable[str] = (),
        log_query: bool = False,
    ) -> None:
        self.sinks = list(sinks)
        self.metrics = metrics
        self.header_allowlist = tuple(h.lower() for h in header_allowlist if h.lower() not in NEVER_LOGGED)
        self.log_query = log_query
        self._queue: queue.Queue[AuditEntry | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="authz-audit", daemon=True)
        self._thread.start()

    def submit(self, entry: AuditEntry) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.metrics.audit_dropped.labels("queue_full").inc()

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing must not raise at shutdown
                pass

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            batch = [entry]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            lines = [json.dumps(self.record(e), separators=(",", ":")) for e in batch if e is not None]
            if lines:
                for sink in self.sinks:
                    try:
                        sink.write(lines)
                        self.metrics.audit_records.labels(sink.name).inc(len(lines))
                    except Exception:  # noqa: BLE001 - a sink failure must never reach a check
                        self.metrics.audit_dropped.labels("sink_error").inc(len(lines))
            if stop:
                return

    def record(self, e: AuditEntry) -> dict[str, Any]:
        d = e.decision
        r = e.request
        rec: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(e.when, datetime.timezone.utc)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "decision_id": e.decision_id,
            "allowed": d.allowed,
            "http_status": d.http_status,
            "reason": d.reason,
            "policy": d.policy,
            "rule": d.rule,
            "action": d.action,
            "audit": list(d.audit),
            "dry_run": list(d.dry_run),
            "tenant": d.tenant,
            "revision": e.revision,
            "latency_us": e.latency_us,
        }
        if r is not None:
            rec.update(
                {
                    "source_principal": r.principal,
                    "destination_principal": r.destination_principal,
                    "source_address": r.source_address,
                    "method": r.method,
                    "host": r.host,
                    "path": r.path + ("?" + r.query if self.log_query and r.query else ""),
                }
            )
            if r.request_id:
                rec["request_id"] = r.request_id
            traceparent = r.headers.get("traceparent")
            if traceparent:
                rec["traceparent"] = traceparent
            if self.header_allowlist:
                rec["headers"] = {h: r.headers[h] for h in self.header_allowlist if h in r.headers}
        return rec


def stdout_sink() -> StreamSink:
    return StreamSink(sys.stdout)
