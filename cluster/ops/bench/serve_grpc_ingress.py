"""The peer path of the serving benchmark: Ray Serve's built-in gRPC proxy in front of our replicas.

A thin Serve deployment (its own application) that Serve's gRPC proxy calls
with a decoded ``levante.v1.GenerateRequest``. It converts with the front
door's own functions (cluster/frontdoor/convert.py) and streams from the
same engine replicas through the same ``ReplicaRouter`` the Levante front
door uses, so the two paths differ only in what sits between the client and
the replicas: our grpc.aio front door, or Serve's proxy actor plus this replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.schema import LoggingConfig

from cluster.config_loader import config_from_dict
from cluster.frontdoor.convert import (
    Limits,
    RequestError,
    ResponseEncoder,
    decode_generate,
)
from cluster.serve.replica_router import ReplicaRouter
from levante.v1 import inference_pb2 as pb


def ingress_app_name(router_app: str) -> str:
    return f"{router_app}-serve-grpc"


class ServeGrpcIngress:
    def __init__(self, levante_app: str, config: dict):
        cfg = config_from_dict(config, source="serve deployment")
        self.router = ReplicaRouter(serve.get_app_handle(levante_app), cfg)  # the Levante app's replicas
        self.model_name = cfg.model_name
        self.max_request_bytes = cfg.frontdoor.max_request_bytes
        self.backend_timeout_s = cfg.frontdoor.backend_timeout_s
        self._limits: Limits | None = None

    async def _get_limits(self) -> Limits:
        if self._limits is None:  # asked once, as the front door does
            models = await asyncio.wait_for(self.router.models(), self.backend_timeout_s)
            model = next((m for m in models if m.name == self.model_name), models[0])
            self._limits = Limits(self.model_name, model.max_model_len, self.max_request_bytes)
        return self._limits

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        import grpc

        # Serve's proxy already parsed the message; convert.py takes bytes (as our front door
        # receives them), so it is serialized once more: a few microseconds, kept for equal work.
        try:
            req = decode_generate(request.SerializeToString(), await self._get_limits())
        except RequestError as e:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details(str(e))
            return
        encoder = ResponseEncoder(req.request_id)
        # the same router (and idle timeout) as our front door's backend, so both paths do equal work
        async with contextlib.aclosing(self.router.generate(req)) as chunks:
            async for chunk in chunks:
                if chunk.error is not None:
                    if grpc_context is not None:
                        grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
                        grpc_context.set_details(f"{chunk.error.field}: {chunk.error.message}")
                    return
                # ResponseEncoder yields bytes; Serve's proxy serializes messages itself.
                for raw in encoder.encode(chunk):
                    yield pb.GenerateResponse.FromString(raw)


def build_ingress_app(levante_app: str, config: dict) -> serve.Application:
    deployment = serve.deployment(ServeGrpcIngress).options(
        name="ServeGrpcIngress",
        num_replicas=1,
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
        logging_config=LoggingConfig(enable_access_log=False),  # as the replicas: equal work
    )
    return deployment.bind(levante_app, config)
