"""Outbound TLS: the one place that builds the client context for https:// bundle servers and
audit collectors. ``--ca-file`` replaces the system's trust store, for a mesh-internal CA."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies the server's certificate and host name against ``ca_file`` or the system CAs.

    Raises ValueError with a readable reason when the file is missing or not PEM certificates.
    """
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA file {ca_file}: {exc}") from None
