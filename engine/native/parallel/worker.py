"""Ranks 1.. of an expert-parallel group: the model forward on this rank's experts, nothing else.

Each step rank 0 sends is run through the same ``ModelRunner.forward`` as on
rank 0, against this rank's own paged KV cache (same block ids, since rank 0
sized it in its hello), so the all-reduces inside the MoE layers pair up one
to one. No logits, no sampling: rank 0 does those.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from engine.config import EngineConfig
from engine.native.builder import load_native_model
from engine.native.parallel.broadcast import StepReceiver
from engine.native.parallel.driver import check_expert_parallel
from engine.native.parallel.group import ExpertGroup
from engine.native.runner import ModelRunner
from engine.types import EngineInfo


class ExpertWorker:
    """Loads this rank's slice, joins the group and waits for rank 0's hello (blocking)."""

    def __init__(self, config: EngineConfig):
        parallel = config.parallel
        if parallel.ep_size < 2 or parallel.ep_rank == 0:
            raise ValueError(
                f"parallel.ep_rank: an expert worker is rank 1..ep_size-1 of a group, "
                f"got rank {parallel.ep_rank} of {parallel.ep_size}"
            )
        self.config = config
        loaded = load_native_model(config)  # as rank 0 loads it, this rank's experts only
        self.model, self.model_name = loaded.model, loaded.model_path
        check_expert_parallel(self.model, parallel)
        self.architecture = (loaded.hf_config.get("architectures") or ["?"])[0]
        self.vocab_size = int(loaded.hf_config["vocab_size"])
        self.group = ExpertGroup.join(parallel, self.model.device)
        try:
            self.model.set_moe_combine(self.group.all_reduce_sum)
            self.receiver = StepReceiver(self.group)
            self.hello = self.receiver.hello(self.vocab_size, self.model.num_expert_params())
            self.runner = ModelRunner(self.model, self.hello.num_blocks, self.hello.block_size)
        except BaseException:
            self.group.close()
            raise

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.model_name,
            architecture=self.architecture,
            max_model_len=self.hello.max_model_len,
            vocab_size=self.vocab_size,
            ep_size=self.group.size,
            ep_rank=self.group.rank,
            num_local_expert_params=self.model.num_local_expert_params(),
            num_expert_params=self.model.num_expert_params(),
        )

    def run(self) -> None:
        """Run rank 0's steps until it says stop; raises if rank 0 dies or goes silent for ``timeout_s``."""
        try:
            while (inputs := self.receiver.recv()) is not None:
                self.runner.forward(inputs)
        finally:
            self.group.close()


def run_worker(config: EngineConfig, on_ready: Callable[[EngineInfo], None] | None = None) -> None:
    """``engine.api.run_expert_worker``: blocks until rank 0 shuts the group down (returns) or fails (raises)."""
    worker = ExpertWorker(config)
    info = worker.info()
    print(
        f"levante: expert-parallel rank {info.ep_rank}/{info.ep_size} holds {info.num_local_expert_params} "
        f"of {info.num_expert_params} routed-expert params",
        file=sys.stderr,
        flush=True,
    )
    if on_ready is not None:
        on_ready(info)
    worker.run()
