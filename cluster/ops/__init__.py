"""Operating regions: up/down/status, failover drills, benchmarks."""
