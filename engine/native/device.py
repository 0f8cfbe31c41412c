"""Where the native engine keeps weights, KV cache and step tensors: ``model.device``, checked once at start.

A CUDA device that this process cannot see is refused, never replaced by the
CPU: a GPU replica that quietly ran on its host would look healthy and be slow.
"""

from __future__ import annotations

import os

import torch

from engine.config import DeviceUnavailableError


def engine_device(name: str | None) -> torch.device:
    """``model.device`` as a torch device (None: cpu; "cuda": with its index); raises DeviceUnavailableError
    for a CUDA device this process cannot see."""
    device = torch.device(name or "cpu")
    if device.type != "cuda":
        return device
    where = f"torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"model.device: {name!r} was asked for but this process sees no CUDA device ({where})"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailableError(
            f"model.device: {name!r} was asked for but this process sees {count} CUDA device(s) ({where})"
        )
    # "cuda" alone means the current device: name it, so tensors and collectives agree on one index
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
