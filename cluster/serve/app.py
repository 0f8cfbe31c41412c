"""The Serve application of one region: EngineReplica deployments, each rank 0 of an EP group in its placement group."""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from cluster.config import ClusterConfig
from cluster.config_loader import config_from_dict, config_to_dict
from cluster.serve.ep_group import group_shape, rank_bundles
from cluster.serve.replica import EngineReplica
from cluster.serve.request_router import LevanteRequestRouter

ENGINE_DEPLOYMENT = "EngineReplica"
# ``generate`` runs on the replica's own event loop: Serve's default, a user-code loop in a thread of its
# own, hands every call and every streamed chunk across threads. The replica's methods never block.
REPLICA_ENV = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


def app_name(cfg: ClusterConfig) -> str:
    return f"levante-{cfg.region}"


def build_app(cfg: ClusterConfig) -> serve.Application:
    shipped = config_to_dict(cfg)  # plain data: every replica rebuilds (and re-checks) the typed config
    r = cfg.replica
    num_bundles, driver_gpus = group_shape(cfg)
    engine = serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        num_replicas=r.num_replicas,
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        # the replica is rank 0, in bundle 0; ranks 1.. (or vLLM's workers) take the other bundles
        ray_actor_options={"num_cpus": r.cpus_per_rank, "num_gpus": driver_gpus, "runtime_env": REPLICA_ENV},
        placement_group_bundles=rank_bundles(r, num_bundles),
        placement_group_strategy=r.placement_strategy,
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
        # a log line per streamed call costs the replica's CPU; the front door's metrics and traces count calls
        logging_config=LoggingConfig(enable_access_log=False),
    )
    return engine.bind(shipped)


def app_builder(args: dict) -> serve.Application:
    """Entry point for a Serve config file (KubeRay's ``serveConfigV2``).

    ``import_path: cluster.serve.app:app_builder`` with ``args: {config: <a cluster config mapping>}``; name
    the application ``levante-<region>`` so the region's front door (``ray.deploy: false``) finds it.
    """
    if not isinstance(args, dict) or "config" not in args:
        raise ValueError("args.config: missing; pass the cluster config as a mapping under args.config")
    return build_app(config_from_dict(args["config"], "serveConfigV2 args.config"))
