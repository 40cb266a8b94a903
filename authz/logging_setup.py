"""How authz's own log lines look: ``--log-format text`` (default) or ``json``.

JSON is one object per line with ``time`` (UTC, RFC 3339 with milliseconds), ``level``,
``logger``, ``message``, then the record's fields: anything a call passes as
``extra={...}`` (``revision``, ``decision_id``, ``reason``, ``source``...), ``worker`` in a
worker process of ``--workers``, and ``exception`` with the traceback when there is one. The
same setup serves ``authz serve``, its reloads and its workers (which inherit the flags),
so a log pipeline reads one shape. Audit records are a separate stream (docs/audit.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record is a field passed with extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line (its message already says what the fields hold); a worker's lines
    carry its index after the logger's name."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        worker = getattr(record, "worker", None)
        if worker is None:
            return line
        head = f" {record.name}: "
        return line.replace(head, f" {record.name}[worker {worker}]: ", 1)


class _Worker(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def _rfc3339(created: float) -> str:
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def configure(level: str = "INFO", fmt: str = "text", worker: int | None = None,
              stream: TextIO | None = None) -> None:
    """Send every logger's records to stderr (or ``stream``) in the chosen format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_Worker(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
