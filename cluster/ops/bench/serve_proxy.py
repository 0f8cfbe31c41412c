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
from collections.abc import Callable

from ray import serve
from ray.serve.config import gRPCOptions

from cluster.ops.ports import reserve_port

SERVICER = "levante.v1.inference_pb2_grpc.add_InferenceServicer_to_server"


class ProxyStartError(RuntimeError):
    """Serve's gRPC proxy could not bind any of the ports it was given."""


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else repr(e)


class ServeGrpcProxy:
    """Starts Serve with its gRPC proxy (``start``, in place of ``serve.start``); ``port`` once bound."""

    def __init__(
        self,
        attempts: int = 5,
        reserve: Callable[[], socket.socket] = reserve_port,
        progress: Callable[[str], None] = print,
    ):
        self.attempts, self.reserve, self.progress = attempts, reserve, progress
        self.port: int | None = None

    def start(self) -> None:
        error = ""
        for attempt in range(1, self.attempts + 1):
            reservation = self.reserve()
            port = reservation.getsockname()[1]
            try:
                serve.start(  # waits for the proxy to bind; HTTP on loopback port 0, so it never takes 8000
                    proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": 0},
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
                )
                self.port = port
                return
            except Exception as e:
                if "Failed to bind" not in str(e):
                    raise
                error = _last_line(e)
            finally:
                reservation.close()  # the proxy listens on the port now, or never bound it
            self.progress(f"Serve's gRPC proxy did not start on port {port} ({error}); attempt {attempt}")
            serve.shutdown()  # its controller and proxy: Serve takes proxy options only when it starts
        raise ProxyStartError(f"Serve's gRPC proxy could not bind a port in {self.attempts} attempts; last: {error}")
