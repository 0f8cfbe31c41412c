"""Build a native model from a checkpoint: its class from the config, its weights read through ``engine.checkpoint``.

Where the checkpoint is (a folder, a ``.gguf``, a ``tiny:`` URI) and what its
files hold is ``engine.checkpoint``'s; this module only builds the
``CausalLM`` on ``model.device`` and copies the tensors into it.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.files import ModelLoadError
from engine.checkpoint.folder import read_config, resolve_model_dir, weight_files
from engine.checkpoint.formats import read_tensors
from engine.config import ModelConfig, ParallelConfig
from engine.native.models.base import CausalLM
from engine.native.models.registry import resolve_architecture


def load_model(
    model_path: str | None,
    model_config: ModelConfig = ModelConfig(),
    parallel: ParallelConfig = ParallelConfig(),
    attention_backend: str = "cpu",
    moe_backend: str = "cpu",
) -> tuple[CausalLM, dict]:
    """(model in ``model_config.dtype`` on ``model_config.device`` with weights loaded, its config.json dict).

    ``model_path``: a Hugging Face folder or a ``.gguf`` file; None falls back
    to ``model_config.model``, then to the embedded default model.
    """
    from engine.native.device import engine_device
    from kernels.backend import get_attention_backend, get_moe_backend

    device = engine_device(model_config.device)  # refuses an unseen CUDA device before any file is read
    folder = Path(resolve_model_dir(model_path or model_config.model))
    hf = read_config(folder)
    config_path = folder / "config.json"
    try:
        cls = resolve_architecture(hf)
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: {e}") from None
    files = weight_files(folder)
    attn, moe = get_attention_backend(attention_backend), get_moe_backend(moe_backend)
    try:
        with device:  # parameters are born on the device; load_weights copies each tensor straight there
            model = cls(hf, dtype=model_config.dtype, attention_backend=attn, moe_backend=moe, parallel=parallel)
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{config_path}: cannot build {cls.__name__}: {e}") from None

    where: dict = {"file": None}
    try:
        model.load_weights(read_tensors(files, hf, model, where))
    except ModelLoadError as e:
        place = str(where["file"] if where["file"] is not None else folder)
        raise ModelLoadError(str(e) if place in str(e) else f"{e} (in {place})") from None
    from engine.native.models.prepare import prepare_experts, prepare_linears
    from kernels.backend import get_linear_kernel

    prepare_linears(model, model_config.quantization, get_linear_kernel(model_config.linear_backend))
    prepare_experts(model)
    model.eval()
    return model, hf
