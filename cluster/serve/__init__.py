"""Ray Serve deployments: engine replicas (each an expert-parallel group of Ray actors) and the router."""
