"""Where an expert-parallel group's ranks meet: a torch.distributed TCPStore.

``HostedStore`` is bound by whoever launches the ranks, on port 0: the kernel
picks a free port and the store reads it back, so no other process can take
the port between choosing it and binding it (a port picked free, closed and
bound again later can be). Every rank, rank 0 too, then joins it as a client.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

import torch.distributed as dist

from engine.config import ParallelConfig


class HostedStore:
    """A rendezvous store listening on a port of ``host`` that the kernel picked; keep it for the group's life."""

    def __init__(self, host: str, world_size: int, timeout_s: float):
        self._store: dist.TCPStore | None = dist.TCPStore(
            host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.port: int = self._store.port
        self.init_method = f"tcp://{host}:{self.port}"

    def close(self) -> None:
        """Stop listening (the store's server ends with its last reference); safe to call twice."""
        self._store = None


def client_store(parallel: ParallelConfig) -> dist.TCPStore:
    """This rank's connection to a ``HostedStore`` at ``parallel.init_method`` (retried up to ``timeout_s``)."""
    url = urlsplit(parallel.init_method or "")
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ValueError(f"parallel.init_method: a hosted store needs 'tcp://host:port', got {parallel.init_method!r}")
    return dist.TCPStore(
        url.hostname, url.port, parallel.ep_size, is_master=False, timeout=timedelta(seconds=parallel.timeout_s)
    )
