"""The Ray Serve cluster: front door, router, replicas (arrives with issue 3).

Imports the engine only through ``engine.api`` and ``engine.config``.
"""
