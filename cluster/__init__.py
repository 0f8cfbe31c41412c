"""The serving cluster: front door, routing policy, Ray Serve replicas, regions, telemetry and operations.

Reaches the engine only through ``engine.api``, ``engine.types`` and ``engine.config``.
"""
