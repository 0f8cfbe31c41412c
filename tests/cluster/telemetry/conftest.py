"""The telemetry tests use the shared fixtures of tests/cluster/conftest.py (tiny_moe, engines, loop)."""
