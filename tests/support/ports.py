"""Free TCP ports for the servers tests start, taken below the kernel's ephemeral range.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, which outgoing
connections draw from too: between the test closing its probe socket and Envoy or authz
binding the port, a client connection elsewhere on the machine could take it ("Address
already in use", a flaky test). Ports below that range are never given to outgoing
connections.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20_000, 32_000  # below Linux's default ephemeral range (32768-60999)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago, outside the ephemeral range."""
    for _ in range(200):
        port = random.randrange(LOW, HIGH)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: any port
        s.bind((host, 0))
        return int(s.getsockname()[1])
