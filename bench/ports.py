"""Loopback ports for the servers the benchmarks and tests start: one the system picks, or
whether a given one is free or already answers."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now, picked by the system."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def is_free(port: int) -> bool:
    """Whether `port` can be bound now: a block of ports is checked before a server takes it."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def accepts(port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on the port."""
    try:
        socket.create_connection((HOST, port), timeout=timeout).close()
    except OSError:
        return False
    return True
