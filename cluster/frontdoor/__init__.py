"""The public gRPC front door (``levante.v1.Inference``): auth, limits, TLS, health, drain.

Protobuf types appear only in ``convert.py``; everything else speaks ``cluster.types``.
"""

from cluster.frontdoor.server import FrontDoor

__all__ = ["FrontDoor"]
