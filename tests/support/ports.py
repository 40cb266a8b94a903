"""Free TCP ports for the servers tests start, taken below the kernel's ephemeral range.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, which outgoing
connections draw from too: between the test closing its probe socket and Envoy or authz
binding the port, a client connection elsewhere on the machine could take it ("Address
already in use", a flaky test). Ports below that range are never given to outgoing
connections.

A port is free only until its server binds it, so two calls before either server starts
could draw the same one (one CI run gave authz the same port for gRPC and HTTP). A port
handed out once is never handed out again by this process.
"""

from __future__ import annotations

import random
import socket
import threading

LOW, HIGH = 20_000, 32_000  # below Linux's default ephemeral range (32768-60999)

_given: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago, outside the ephemeral range, and not
    handed out before by this process."""
    with _lock:
        for _ in range(400):
            port = random.randrange(LOW, HIGH)
            if port in _given:
                continue
            if _bindable(host, port):
                _given.add(port)
                return port
        for _ in range(100):  # a crowded range: any port the kernel offers
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _given:
                _given.add(port)
                return port
    raise OSError("no free TCP port found")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
