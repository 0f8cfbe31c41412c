"""What the front door's transports share about one call: where it came from, and how its chunks
become the transport's messages (``FrontDoor.run`` takes both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from cluster.types import Chunk

T = TypeVar("T")  # a transport's message
M_co = TypeVar("M_co", covariant=True)


@dataclass(frozen=True)
class CallInfo:
    """What a call brings besides its body, whatever the transport."""

    metadata: tuple[tuple[str, str | bytes], ...]  # gRPC metadata or HTTP headers (lower-case names)
    peer: str  # the client's connection (address and port): streams per connection are counted by it
    deadline: float | None = None  # absolute time.time(); None: none

    @property
    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self.metadata if isinstance(v, str)}


class Encoder(Protocol[M_co]):
    """Chunks of one call -> the transport's messages."""

    @property
    def progress(self) -> bool:
        """Whether heartbeats go out now."""
        ...

    def heartbeat(self) -> M_co: ...

    def encode(self, chunk: Chunk) -> list[M_co]: ...
