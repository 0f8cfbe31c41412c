"""What the router deployment and its request router share inside one process.

The request router's module is shipped by value (Serve pickles it so
handles anywhere can build it), so anything both sides must see as the same
object lives here, in an ordinary module, and is reached through it.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class RoutingHint:
    """Passed as the ``hint`` keyword of an engine call; the request router fills in the choice."""

    prefix_key: str | None = None
    avoid: frozenset[str] = frozenset()  # replicas the router saw fail recently
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


class RoutingLog:
    """The last choices of this process's request routers, by hint token (bounded)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._choices: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()  # Serve may run its routing loop in a thread of its own

    def record(self, token: str, replica_id: str, reason: str) -> None:
        with self._lock:
            self._choices[token] = (replica_id, reason)  # a retry after backoff overwrites the earlier try
            self._choices.move_to_end(token)
            while len(self._choices) > self.capacity:
                self._choices.popitem(last=False)

    def take(self, token: str) -> tuple[str, str] | None:
        with self._lock:
            return self._choices.pop(token, None)


CHOICES = RoutingLog()
