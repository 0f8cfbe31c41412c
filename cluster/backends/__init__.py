"""Implementations of ``cluster.types.Backend``: in-process (``local``); Ray Serve lives in ``cluster.serve``."""

from cluster.backends.local import LocalBackend

__all__ = ["LocalBackend"]
