"""`levante up` / `levante down`: several regions on one machine, each its own process group and Ray cluster."""
