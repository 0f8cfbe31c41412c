"""The hint a call to the engine deployment carries for ``LevanteRequestRouter``.

The request router's module is shipped by value (Serve pickles it so handles
anywhere can build it), so the hint's class lives here, in an ordinary module
both sides import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoutingHint:
    """Passed as the ``hint`` keyword of an engine call.

    The request router runs in the caller's process on this very object (Serve keeps a call's
    arguments as they are until it sends them), and writes its ``choice`` into it: (replica, reason).
    """

    prefix_key: str | None = None
    avoid: frozenset[str] = frozenset()  # replicas the router saw fail recently
    choice: tuple[str, str] | None = None
