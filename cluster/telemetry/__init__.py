"""Traces and metrics of a region (docs/observability.md).

- ``tracing``: the OpenTelemetry provider of each process, from config; carriers and span helpers.
- ``spans``: the span names, the region router's attempt spans, the engine's stage spans.
- ``calls``: one Generate call at the front door (its server span and metrics).
- ``metrics``, ``collectors``, ``poller``: the Prometheus registry of the front door's process.
- ``hookup``: what each kind of process sets up from the cluster config.

The engine knows none of this: it records plain figures (``RequestTimings``, ``EngineStats``).
"""
