"""uvicorn on the front door's event loop, on a socket we bind (port 0: any free port, read back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from cluster.config import FrontDoorConfig
from cluster.frontdoor.http.app import build_app

if TYPE_CHECKING:
    from cluster.frontdoor.server import FrontDoor

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Signals are the front door's owner's (``levante serve`` drains on SIGTERM), never uvicorn's."""
        yield


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket; ``OSError`` naming the config key when the address is taken or wrong."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(address[:2], family=family, backlog=backlog)
    except OSError as e:
        raise OSError(f"frontdoor.http.port: cannot bind {host}:{port} ({e.strerror or e})") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """The HTTP API of one front door, while it runs."""

    def __init__(self, server: _Uvicorn, task: asyncio.Task[None], sock: socket.socket, scheme: str):
        self._server, self._task = server, task
        host, self.port = sock.getsockname()[:2]
        self.url = f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"

    @classmethod
    async def start(cls, door: FrontDoor, config: FrontDoorConfig) -> HttpServer:
        http, tls = config.http, config.tls
        assert http.port is not None
        sock = _bind(http.host or config.host, http.port, backlog=2048)
        settings = uvicorn.Config(
            build_app(door),
            lifespan="off",
            log_config=None,  # the process's logging stays as levante set it
            access_log=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=tls.cert,
            ssl_keyfile=tls.key,
            ssl_ca_certs=tls.client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE,
        )
        server = _Uvicorn(settings)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:  # the socket already listens: this only surfaces a failed start
            if task.done():
                sock.close()
                task.result()
                raise OSError("frontdoor.http: the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return cls(server, task, sock, "https" if tls.enabled else "http")

    async def stop(self) -> None:
        """Stop at once: running calls are cancelled (their engine requests aborted)."""
        self._server.should_exit = True
        for task in list(self._server.server_state.tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
