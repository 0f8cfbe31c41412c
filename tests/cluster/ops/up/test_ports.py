"""Ports that other processes must know before a server binds them (`levante up`'s regions, Serve's
gRPC proxy): reserved, not picked free and let go, so nothing else on the machine takes them meanwhile."""

from __future__ import annotations

import asyncio
import errno
import socket

import grpc
import pytest
import yaml

from cluster.ops.ports import Reservations, reserve_port
from cluster.ops.up.topology import PEER_KEY_ENV, region_configs


def taken(port: int) -> bool:
    """Whether a plain bind of ``port`` fails (as any other process's would)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE
            return True
    return False


def test_a_reserved_port_is_taken_for_others_yet_a_grpc_server_binds_it(loop):
    reservation = reserve_port()
    port = reservation.getsockname()[1]
    try:
        assert taken(port)
        assert port not in {_autobound() for _ in range(200)}  # nor handed to a bind to port 0

        async def serve_once() -> int:
            server = grpc.aio.server()
            bound = server.add_insecure_port(f"127.0.0.1:{port}")  # gRPC sets SO_REUSEADDR, as reserve_port
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    await asyncio.wait_for(ch.channel_ready(), 10)  # it listens there
            finally:
                await server.stop(None)
            return bound

        assert loop.run(serve_once(), timeout=30) == port
    finally:
        reservation.close()
    # not `assert not taken(port)` here: the connection's TIME_WAIT may hold the port a minute after the
    # server stops (the side that closes first keeps it); release is checked below, with no connection


def _autobound() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_region_configs_hold_the_ports_they_choose_until_released(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model_name": "m"}))
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "regions": [{"name": "a"}, {"name": "b"}]}))
    with Reservations() as reserved:
        configs = region_configs(str(path), reservations=reserved)
        ports = {n: c["frontdoor"]["port"] for n, c in configs.items()}
        assert configs["a"]["regions"]["peers"] == [
            {"name": "b", "target": f"127.0.0.1:{ports['b']}", "api_key_env": PEER_KEY_ENV}
        ]
        assert all(taken(p) for p in ports.values()), "a chosen port was let go before its region bound it"
    assert not any(taken(p) for p in ports.values())


def test_a_port_with_a_listener_cannot_be_reserved():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError) as e:
            reserve_port(s.getsockname()[1]).close()
        assert e.value.errno == errno.EADDRINUSE
