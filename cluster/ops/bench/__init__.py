"""Benchmarks of the serving cluster (``levante bench-serving``)."""
