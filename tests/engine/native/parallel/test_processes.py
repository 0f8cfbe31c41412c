"""Expert parallelism across OS processes: rank 0 runs the engine, rank 1 follows its steps.

Two processes per group (spawned, each with one torch thread), talking over
gloo on loopback, exactly as two Ray actors would. Greedy outputs of the
2-rank group must equal the single-process engine on the same weights, and
a dead or frozen rank must fail rank 0's streams within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import errno
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
from typing import Self

import pytest
import torch

from engine.checkpoint.tiny import make_tiny
from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from engine.native.async_engine import AsyncEngine
from engine.native.builder import build_engine_core
from tests.engine.native.models.helpers import prompts_of
from tests.engine.native.parallel import ranks

pytestmark = pytest.mark.slow

PROMPT_LENS = [3, 9, 21, 37]  # with a 16-token step budget, the two longer prompts are prefilled in chunks
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return {
        arch: make_tiny(arch, seed=1, out=str(tmp_path_factory.mktemp(f"ep_{arch}")))
        for arch in ("mixtral", "mistral4")
    }


def config(
    path: str, ep_size: int = 1, ep_rank: int = 0, init_method: str | None = None, timeout_s: float = 30.0
) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=path, num_threads=1),  # 2 cores, 2 ranks
        cache=CacheConfig(num_blocks=256, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=16),
        parallel=ParallelConfig(
            ep_size=ep_size,
            ep_rank=ep_rank,
            init_method=init_method,
            store_hosted=init_method is not None,  # ranks.rendezvous
            timeout_s=timeout_s,
        ),
    )


class Group:
    """Spawned rank processes, each reporting on its own queue (a process killed mid-``put`` can
    leave a shared queue's lock held); any left alive are killed on exit."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[str, mp.Process] = {}
        self.queues: list = []
        self.seen: dict[str, object] = {}

    def start(self, name: str, target, *args) -> mp.Process:
        results = self.ctx.Queue()
        p = self.ctx.Process(target=target, args=(*args, results), name=name, daemon=True)
        p.start()
        self.procs[name] = p
        self.queues.append(results)
        return p

    def get(self, tag: str, timeout: float = 60.0):
        """The value reported under ``tag`` by any rank (other reports are kept for later)."""
        deadline = time.monotonic() + timeout
        while tag not in self.seen:
            got_any = False
            for q in self.queues:
                try:
                    got, value = q.get(timeout=0.05)
                except queue.Empty:
                    continue
                self.seen[got], got_any = value, True
            if got_any:
                continue
            all_exited = all(p.exitcode is not None for p in self.procs.values())
            if all_exited or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {tag!r} report ({'all ranks exited' if all_exited else f'{timeout}s'}); "
                    f"have {sorted(self.seen)}; exit codes "
                    f"{ ({n: p.exitcode for n, p in self.procs.items()}) }"
                )
        return self.seen[tag]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs.values():
            if p.is_alive():
                if p.pid is not None:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot die until continued
                p.kill()
            p.join(10)


def run_single_process(path: str, prompts: list[list[int]]):
    threads = torch.get_num_threads()
    engine = AsyncEngine(build_engine_core(config(path)))
    try:
        outputs = asyncio.run(asyncio.wait_for(ranks.generate_all(engine, prompts, MAX_TOKENS), 120))
        return outputs, asyncio.run(engine.info())
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["mixtral", "mistral4"])
def test_two_ranks_generate_what_one_process_generates(checkpoints, arch):
    path = checkpoints[arch]
    prompts = prompts_of(PROMPT_LENS, seed=7)
    expected, single_info = run_single_process(path, prompts)

    with ranks.rendezvous() as init, Group() as group:
        group.start("rank1", ranks.follow, config(path, 2, 1, init))
        group.start("rank0", ranks.drive, config(path, 2, 0, init), prompts, MAX_TOKENS)
        got = group.get("outputs")
        rank0, rank1 = group.get("info"), group.get("worker_info")
        stats = group.get("stats")
        group.get("worker_done")  # rank 0's shutdown stopped rank 1 cleanly
        group.get("driver_done")
        for p in group.procs.values():
            p.join(20)
            assert p.exitcode == 0, p.name

    total = single_info.num_expert_params
    print(
        f"\n{arch}: ep1 holds {single_info.num_local_expert_params} routed-expert params of {total}; "
        f"ep2 rank 0 holds {rank0.num_local_expert_params}, rank 1 holds {rank1.num_local_expert_params}"
    )
    for i, (g, e) in enumerate(zip(got, expected)):
        worst = max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"]))
        print(
            f"{arch} prompt {i} ({PROMPT_LENS[i]} tokens): ep2 == ep1 {g['tokens'] == e['tokens']}, "
            f"max |logprob diff| {worst:.2e}, first tokens {g['tokens'][:6]}"
        )

    for g, e in zip(got, expected):
        assert len(set(e["tokens"])) > 4  # a lively sequence, so equality means something
        assert g["finish_reason"] == e["finish_reason"] == "length"
        assert len(g["tokens"]) == MAX_TOKENS
        assert g["tokens"] == e["tokens"]
        assert max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"])) < 1e-5

    assert single_info.num_local_expert_params == total > 0
    for info, rank in ((rank0, 0), (rank1, 1)):
        assert (info.ep_size, info.ep_rank) == (2, rank)
        assert info.num_expert_params == total
        assert info.num_local_expert_params * 2 == total
    assert rank0.architecture == single_info.architecture
    assert stats.num_used_blocks == 0


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_worker_fails_rank0_streams_within_the_timeout(checkpoints, how):
    """Killed: the socket closes and the next collective fails at once. Frozen (SIGSTOP): nothing
    closes, and only the collective timeout can tell; either way no stream hangs."""
    timeout_s = 3.0
    path = checkpoints["mixtral"]
    with ranks.rendezvous() as init, Group() as group:
        worker = group.start("rank1", ranks.follow, config(path, 2, 1, init, timeout_s))
        group.start("rank0", ranks.drive_long_request, config(path, 2, 0, init, timeout_s), [5, 6, 7, 8])
        group.get("streaming")
        time.sleep(0.3)  # a few decode steps in
        signalled = time.time()
        os.kill(worker.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        ended, reason = group.get("stream_end", timeout=timeout_s + 20)
        print(
            f"\nworker {how}: rank 0's stream ended ({reason}) {ended - signalled:.2f}s later (timeout_s={timeout_s})"
        )
        assert reason == "abort"
        assert ended - signalled < timeout_s + 2.0
        assert group.get("healthy") is False
        assert group.get("submit_after") == "unavailable"


def test_a_worker_lost_while_idle_turns_rank0_unhealthy(checkpoints):
    """No traffic: rank 0's keepalives notice the loss, so health checks see it before any request."""
    timeout_s = 3.0
    path = checkpoints["mixtral"]
    with ranks.rendezvous() as init, Group() as group:
        worker = group.start("rank1", ranks.follow, config(path, 2, 1, init, timeout_s))
        group.start("rank0", ranks.drive_then_idle, config(path, 2, 0, init, timeout_s), [5, 6, 7], 3 * timeout_s)
        group.get("idle")
        killed = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        unhealthy = group.get("unhealthy", timeout=4 * timeout_s)
        print(f"\nidle rank 0 unhealthy {unhealthy - killed:.2f}s after its worker was killed")
        assert unhealthy - killed < timeout_s + 1.0


def test_a_lost_driver_ends_the_worker_instead_of_hanging(checkpoints):
    """The other direction: rank 1 blocked waiting for steps raises once rank 0 is gone."""
    timeout_s = 3.0
    path = checkpoints["mixtral"]
    with ranks.rendezvous() as init, Group() as group:
        group.start("rank1", ranks.follow, config(path, 2, 1, init, timeout_s))
        driver = group.start("rank0", ranks.drive_long_request, config(path, 2, 0, init, timeout_s), [5, 6, 7, 8])
        group.get("streaming")
        killed = time.time()
        os.kill(driver.pid, signal.SIGKILL)
        failed_at, error = group.get("worker_error", timeout=timeout_s + 20)
        print(f"\nrank 1 gave up {failed_at - killed:.2f}s after rank 0 was killed: {error[:120]}")
        assert failed_at - killed < timeout_s + 2.0


def test_ranks_that_loaded_different_models_refuse_to_start(checkpoints, tmp_path):
    other = make_tiny("mixtral", seed=1, out=str(tmp_path / "other"), intermediate_size=32)
    with ranks.rendezvous() as init, Group() as group:
        group.start("rank1", ranks.follow, config(other, 2, 1, init, 10.0))
        group.start("rank0", ranks.start_engine, config(checkpoints["mixtral"], 2, 0, init, 10.0))
        assert "loaded a different model" in group.get("engine_error")
        assert "routed-expert params" in group.get("worker_error")[1]


def test_a_hosted_rendezvous_holds_its_port_before_any_rank_starts():
    """The launcher binds the store on port 0 and reads the port back, so no other process can take
    it before the ranks arrive (a port picked free and bound later can be); then both ranks meet there."""
    with ranks.rendezvous() as init, Group() as group:
        port = int(init.rsplit(":", 1)[1])
        with socket.socket() as s, pytest.raises(OSError) as taken:
            s.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
        for rank in (1, 0):
            parallel = ParallelConfig(ep_size=2, ep_rank=rank, init_method=init, store_hosted=True, timeout_s=30)
            group.start(f"rank{rank}", ranks.join_and_sum, parallel)
        assert group.get("sum") == 3.0  # 1 + 2: both ranks joined the one group
