"""Serve's own gRPC proxy, started for the serving benchmark beside Levante's front door.

Ray Serve (2.60) cannot bind its proxy's gRPC port on 0 and report it: ``gRPCOptions(port=0)``
turns gRPC off (``is_grpc_enabled`` wants a port above 0), and the proxy never reads back the
port it bound. So the port is reserved here (cluster/ops/ports.py: the kernel picks it and gives
it to no one else meanwhile) and handed to Serve, which binds it with SO_REUSEADDR. Should the
proxy still fail to bind (another process bound that very port), Serve is shut down and started
again on a fresh port, a few times. Nothing is deployed until the proxy has bound.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cluster.ops.ports import reserve_port

SERVICER = "levante.v1.inference_pb2_grpc.add_InferenceServicer_to_server"
PROXY_ACTOR_PREFIX = "SERVE_PROXY_ACTOR"  # ray.serve._private.constants.SERVE_PROXY_NAME
SERVE_NAMESPACE = "serve"


class ProxyStartError(RuntimeError):
    """Serve's gRPC proxy did not come up on any of the ports tried."""


def _proxy_actors(timeout_s: float) -> list:
    """Serve's proxy actors, once its controller has made them (it does so in its own loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        named = ray.util.list_named_actors(all_namespaces=True)
        names = [a["name"] for a in named if a["namespace"] == SERVE_NAMESPACE and PROXY_ACTOR_PREFIX in a["name"]]
        if names:
            return [ray.get_actor(n, namespace=SERVE_NAMESPACE) for n in names]
        if time.monotonic() > deadline:
            raise ProxyStartError(f"Serve made no proxy within {timeout_s:g}s")
        time.sleep(0.2)


def proxy_bound(timeout_s: float) -> str | None:
    """None once every proxy has bound its ports; otherwise why not (e.g. "Failed to bind ...")."""
    try:
        ray.get([p.ready.remote() for p in _proxy_actors(timeout_s)], timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 -- the proxy's own error, or its actor gone after it
        return str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    return None


class ServeGrpcProxy:
    """Starts Serve with its gRPC proxy (``start``, in place of ``serve.start``); ``port`` once bound."""

    def __init__(
        self,
        attempts: int = 5,
        ready_timeout_s: float = 120.0,
        reserve: Callable[[], socket.socket] = reserve_port,
        progress: Callable[[str], None] = print,
    ):
        self.attempts, self.ready_timeout_s = attempts, ready_timeout_s
        self.reserve, self.progress = reserve, progress
        self.port: int | None = None

    def start(self) -> None:
        error = ""
        for attempt in range(1, self.attempts + 1):
            reservation = self.reserve()
            port = reservation.getsockname()[1]
            try:
                serve.start(  # HTTP too: loopback, on a port of the kernel's (0), so it never takes 8000
                    proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": 0},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
                )
                error = proxy_bound(self.ready_timeout_s) or ""
            finally:
                reservation.close()  # the proxy listens on the port now, or never bound it
            if not error:
                self.port = port
                return
            self.progress(f"Serve's gRPC proxy did not start on port {port} ({error}); attempt {attempt}")
            serve.shutdown()  # Serve takes proxy options only when it starts
        raise ProxyStartError(f"Serve's gRPC proxy did not start in {self.attempts} attempts; last: {error}")
