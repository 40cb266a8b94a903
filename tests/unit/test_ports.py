"""The test helper that hands out ports never hands out one port twice (a CI run once gave
authz the same port for gRPC and HTTP, and the server refused to start)."""

from __future__ import annotations

import socket

from support import ports


def test_no_port_is_handed_out_twice() -> None:
    drawn = [ports.free_port() for _ in range(3000)]  # more than a quarter of the range
    assert len(set(drawn)) == len(drawn)
    assert all(ports.LOW <= p < ports.HIGH for p in drawn)


def test_a_port_in_use_is_not_handed_out(monkeypatch) -> None:
    with socket.socket() as held:
        for port in range(ports.LOW, ports.HIGH):
            try:
                held.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        held.listen()
        taken = held.getsockname()[1]
        draws = iter([taken, taken])
        real = ports.random.randrange
        monkeypatch.setattr(ports, "_given", set())  # only the bind may refuse `taken`
        monkeypatch.setattr(ports.random, "randrange", lambda a, b: next(draws, None) or real(a, b))
        got = ports.free_port()
    assert got != taken
