"""Device parametrization for the numerics tests: ``cpu`` always, ``cuda`` where this process sees a GPU.

The ``cuda`` cases carry the ``gpu`` marker, so ``pytest -m gpu`` on a GPU machine runs exactly them;
elsewhere they skip with the reason (printed by ``-ra``).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def no_cuda_reason(need: int = 1) -> str | None:
    """None when this process sees ``need`` CUDA devices; otherwise why not, for a skip."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if torch.version.cuda is None:
        return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return (
            f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none, "
            f"CUDA_VISIBLE_DEVICES={visible}"
        )
    if torch.cuda.device_count() < need:
        return (
            f"needs {need} CUDA devices, this process sees {torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={visible})"
        )
    return None


def usable(device: str) -> str:
    """``device``, or a skip when it is CUDA and this process has none."""
    reason = no_cuda_reason() if device.startswith("cuda") else None
    if reason is not None:
        pytest.skip(reason)
    return device
