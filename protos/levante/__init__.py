"""Levante's public gRPC API (generated modules live in ``levante.v1``)."""
