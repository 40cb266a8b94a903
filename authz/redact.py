"""What may be shown of a URL or a path in logs, metrics, status and audit records.

A URL is shown without its user info (``https://***@host/...``) and with every query value
replaced (presigned URLs carry their signature there). File system paths are replaced by
the label an operator configured them as (``<bundle directory>``), unless
``--status-show-paths`` asks for them.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

REDACTED = "REDACTED"


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{urllib.parse.quote(k)}={REDACTED}" for k, _ in pairs) or REDACTED
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def hide_paths(value: T, hidden: Mapping[str, str]) -> T:
    """``value`` (a string, or dicts and lists of them) with each key of ``hidden`` replaced
    by its label, longest first so a directory does not leave its file names behind."""
    if not hidden:
        return value
    if isinstance(value, str):
        out: str = value
        for path in sorted(hidden, key=len, reverse=True):
            if path:
                out = out.replace(path, hidden[path])
        return out  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: hide_paths(v, hidden) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [hide_paths(v, hidden) for v in value]  # type: ignore[return-value]
    return value
