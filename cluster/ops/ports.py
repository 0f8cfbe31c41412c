"""Ports for servers in other processes that must be known before those servers bind them.

A port found free (bind to 0, close) and bound later by another process can be
taken in between: by any bind to port 0 or outgoing connection on the machine.
``reserve_port`` keeps it instead: bound on the wildcard address with
SO_REUSEADDR and never listening. The kernel then hands it to no bind to port
0 and no outgoing connection, while a server that sets SO_REUSEADDR too (gRPC
does, as does our preflight check) may still bind and listen on it. Close the
reservation once that server listens; from then on the listener holds the port.
"""

from __future__ import annotations

import errno
import socket
from typing import Self

_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def reserve_port(port: int = 0) -> socket.socket:
    """A reservation of ``port`` (0: one the kernel picks; read it with ``getsockname()[1]``)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            if e.errno in _NO_IPV6:
                continue
            raise
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4's wildcard too
            s.bind((host, port))
            return s
        except OSError as e:
            s.close()
            if family != socket.AF_INET6 or e.errno not in _NO_IPV6:
                raise
    raise OSError(errno.EAFNOSUPPORT, "no IPv4 or IPv6 to reserve a port on")


class Reservations:
    """Reserved ports by name (``take``), all released together (``release``, or leaving the block)."""

    def __init__(self) -> None:
        self._held: dict[str, socket.socket] = {}

    def take(self, name: str, port: int = 0) -> int:
        self.drop(name)
        s = reserve_port(port)
        self._held[name] = s
        return s.getsockname()[1]

    def drop(self, name: str) -> None:
        s = self._held.pop(name, None)
        if s is not None:
            s.close()

    def release(self) -> None:
        for name in list(self._held):
            self.drop(name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()
