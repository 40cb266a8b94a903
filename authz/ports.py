"""Listen addresses: parsing ``host:port`` and asking the OS whether one can be bound.

Shared by `authz serve` (before gRPC binds, for a clear message) and the supervisor of
`--workers` (before any worker starts); it imports nothing but the standard library.
"""

from __future__ import annotations

import socket


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_error(addr: str) -> OSError | None:
    """Why ``addr`` cannot be bound (None: it can), asked of the OS with a plain socket.

    With SO_REUSEADDR, as gRPC binds: connections of a previous instance lingering in
    TIME_WAIT do not make the port "in use" (a restart on the same port must come up)."""
    host, port = split_addr(addr)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc
    return None
