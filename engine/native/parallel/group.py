"""One process's membership in an expert-parallel group, over torch.distributed.

The group is handed to whoever needs it (the MoE combine, the step
broadcaster); model code only ever sees the ``all_reduce_sum`` callable.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from engine.config import ParallelConfig
from engine.native.parallel.rendezvous import client_store


def message_device(parallel: ParallelConfig, engine_device: torch.device) -> torch.device:
    """Where the group's tensors live: nccl moves only CUDA tensors (the engine's GPU); gloo, host memory."""
    if parallel.backend != "nccl":
        return torch.device("cpu")
    if engine_device.type != "cuda":
        raise ValueError(
            f"parallel.backend: 'nccl' moves only CUDA tensors, but the model is on {engine_device} "
            f"(set model.device to 'cuda', or use 'gloo')"
        )
    return engine_device


class ExpertGroup:
    """``ep_size`` processes joined through ``init_method``; every collective is bounded by ``timeout_s``."""

    def __init__(self, parallel: ParallelConfig, engine_device: torch.device = torch.device("cpu")):
        self.parallel = parallel
        self.device = message_device(parallel, engine_device)
        self._joined = False

    @classmethod
    def join(cls, parallel: ParallelConfig, engine_device: torch.device = torch.device("cpu")) -> ExpertGroup:
        """Rendezvous with the other ranks (blocks until all ``ep_size`` have joined, or ``timeout_s``).

        ``engine_device``: where the model runs; with nccl the group's messages and the combine go there.
        """
        if parallel.ep_size < 2:
            raise ValueError(
                f"parallel.ep_size: an expert-parallel group needs at least 2 ranks, got {parallel.ep_size}"
            )
        if dist.is_initialized():
            # torch.distributed keeps one default group per process: one rank per process
            raise RuntimeError(
                "this process is already in a torch.distributed group; run one expert-parallel rank per process"
            )
        group = cls(parallel, engine_device)
        if group.device.type == "cuda":
            torch.cuda.set_device(group.device)  # NCCL binds this rank's communicator to the current device
        # A hosted store (rendezvous.HostedStore): every rank a client. Otherwise rank 0 binds init_method.
        where = {"store": client_store(parallel)} if parallel.store_hosted else {"init_method": parallel.init_method}
        dist.init_process_group(
            parallel.backend,
            world_size=parallel.ep_size,
            rank=parallel.ep_rank,
            timeout=timedelta(seconds=parallel.timeout_s),
            **where,
        )
        group._joined = True
        return group

    @property
    def rank(self) -> int:
        return self.parallel.ep_rank

    @property
    def size(self) -> int:
        return self.parallel.ep_size

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """In place: every rank ends with the sum of all ranks' ``t`` (the MoE combine).

        A tensor away from the group's device (a CUDA model over gloo) makes a round trip through it.
        """
        if t.device == self.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        moved = t.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return t.copy_(moved)

    def all_reduce_max(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast_from_driver(self, t: Tensor) -> Tensor:
        """In place: every rank ends with rank 0's ``t``."""
        dist.broadcast(t, src=0)
        return t

    def close(self) -> None:
        """Leave the group (also after a failed collective); safe to call twice."""
        if self._joined:
            self._joined = False
            if dist.is_initialized():
                dist.destroy_process_group()
