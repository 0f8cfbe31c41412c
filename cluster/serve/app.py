"""The Serve application of one region: Router -> EngineReplica (each an EP group)."""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.config import ClusterConfig
from cluster.config_loader import config_from_dict, config_to_dict
from cluster.serve.replica import EngineReplica
from cluster.serve.request_router import LevanteRequestRouter
from cluster.serve.router import Router

ENGINE_DEPLOYMENT = "EngineReplica"
ROUTER_MAX_ONGOING = 100_000  # the router only forwards; the replicas' caps are what admit work


def app_name(cfg: ClusterConfig) -> str:
    return f"levante-{cfg.region}"


def build_app(cfg: ClusterConfig) -> serve.Application:
    shipped = config_to_dict(cfg)  # plain data: every replica rebuilds (and re-checks) the typed config
    r = cfg.replica
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        num_replicas=r.num_replicas,
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        ray_actor_options={"num_cpus": 0},  # the ranks hold the CPUs/GPUs, in their placement group
        request_router_config=RequestRouterConfig(
            request_router_class=LevanteRequestRouter,
            request_router_kwargs={
                "affinity_entries": cfg.router.affinity_entries,
                "affinity_slack": cfg.router.affinity_slack,
            },
        ),
        health_check_period_s=5,
        health_check_timeout_s=r.rank_timeout_s,
        graceful_shutdown_timeout_s=cfg.frontdoor.drain_timeout_s,
        max_constructor_retry_count=2,  # a model that fails to load fails again: say so soon
    )
    router = serve.deployment(Router).options(
        name="Router",
        num_replicas=cfg.router.num_replicas,
        max_ongoing_requests=ROUTER_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
    )
    return router.bind(engine.bind(shipped), shipped)


def app_builder(args: dict) -> serve.Application:
    """Entry point for a Serve config file (KubeRay's ``serveConfigV2``).

    ``import_path: cluster.serve.app:app_builder`` with ``args: {config: <a cluster config mapping>}``; name
    the application ``levante-<region>`` so the region's front door (``ray.deploy: false``) finds it.
    """
    if not isinstance(args, dict) or "config" not in args:
        raise ValueError("args.config: missing; pass the cluster config as a mapping under args.config")
    return build_app(config_from_dict(args["config"], "serveConfigV2 args.config"))
