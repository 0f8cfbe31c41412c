"""A GPU replica's ranks: on CUDA over NCCL, and refused with the cluster key named when a rank sees no GPU.

No GPU and no Ray needed: the rank configs are built as ``EPGroup`` builds them, and the start
functions the rank actors call are called here directly.
"""

from __future__ import annotations

import os

import pytest
import torch

from cluster.config import ClusterConfig
from cluster.config_loader import config_from_dict
from cluster.serve.ep_group import group_shape, rank_bundles, rank_configs
from cluster.serve.ranks import run_rank_worker, start_rank_engine
from engine.config import DeviceUnavailableError

INIT = "tcp://127.0.0.1:29500"


def cluster(accelerator: str, **model) -> ClusterConfig:
    return config_from_dict({"replica": {"ep_size": 2, "accelerator": accelerator}, "engine": {"model": model}})


def test_gpu_ranks_run_on_cuda_over_nccl_and_cpu_ranks_stay_as_they_were():
    gpu = rank_configs(cluster("gpu"), INIT)
    assert [(c.model.device, c.parallel.backend, c.parallel.ep_rank) for c in gpu] == [
        ("cuda", "nccl", 0),
        ("cuda", "nccl", 1),
    ]
    bundles = rank_bundles(cluster("gpu").replica, group_shape(cluster("gpu"))[0])
    assert len(bundles) == 2 and all(b["GPU"] == 1 for b in bundles)
    assert [c.model.device for c in rank_configs(cluster("gpu", device="cuda:0"), INIT)] == ["cuda:0", "cuda:0"]
    cpu = rank_configs(cluster("cpu"), INIT)
    assert [(c.model.device, c.parallel.backend) for c in cpu] == [(None, "gloo"), (None, "gloo")]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_gpu_rank_that_sees_no_cuda_device_refuses_naming_replica_accelerator(rank, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a rank without its GPU sees
    config = rank_configs(cluster("gpu", model=str(tmp_path / "never-read")), INIT)[rank]
    start = (lambda: start_rank_engine(config)) if rank == 0 else (lambda: run_rank_worker(config))
    with pytest.raises(DeviceUnavailableError) as refused:
        start()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    assert str(refused.value) == (
        f"replica.accelerator: gpu reserved a GPU for this rank, which cannot use it: model.device: 'cuda' was asked "
        f"for but this process sees no CUDA device (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible})"
    )


def test_a_vllm_replica_holds_one_bundle_per_device_of_its_engine():
    def vllm(accelerator: str, tp: int) -> ClusterConfig:
        return config_from_dict(
            {
                "engine": {"backend": "vllm", "vllm": {"tensor_parallel_size": tp}},
                "replica": {"accelerator": accelerator},
            },
            "test",
        )

    assert group_shape(vllm("gpu", 2)) == (2, 0)  # vLLM's Ray workers take both GPUs; rank 0 only drives them
    assert group_shape(vllm("gpu", 1)) == (1, 1)  # one device: vLLM runs it in rank 0's own process tree
    assert group_shape(vllm("cpu", 1)) == (1, 0)
    assert rank_configs(vllm("gpu", 2), None)[0].model.device is None  # vLLM picks its own device
    assert group_shape(cluster("gpu")) == (2, 1)  # native: one rank per bundle, each on its GPU
