"""The public gRPC front door (``levante.v1.Inference``): auth, limits, TLS, health, drain.

Protobuf types appear only in ``convert.py``; everything else speaks ``cluster.types``.
"""

from cluster.frontdoor.server import FrontDoor, install_sigterm_drain

__all__ = ["FrontDoor", "install_sigterm_drain"]
