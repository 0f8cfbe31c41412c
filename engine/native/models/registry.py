"""Which model class runs a Hugging Face config: by ``architectures``, else by ``model_type``."""

from __future__ import annotations

from engine.native.models.base import CausalLM


def _architectures() -> dict[str, type[CausalLM]]:
    from engine.native.models.mistral import LlamaForCausalLM, MistralForCausalLM
    from engine.native.models.mistral4 import Mistral4ForCausalLM
    from engine.native.models.mixtral import MixtralForCausalLM

    return {
        "MistralForCausalLM": MistralForCausalLM,
        "LlamaForCausalLM": LlamaForCausalLM,
        "MixtralForCausalLM": MixtralForCausalLM,
        "Mistral4ForCausalLM": Mistral4ForCausalLM,
    }


_MODEL_TYPES = {
    "mistral": "MistralForCausalLM",
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "mistral4": "Mistral4ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_architectures())


def resolve_architecture(hf_config: dict) -> type[CausalLM]:
    """The CausalLM class for a config.json dict; ValueError naming it if unsupported."""
    classes = _architectures()
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in classes:
            return classes[arch]
    model_type = hf_config.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return classes[_MODEL_TYPES[model_type]]
    what = f"architecture {archs[0]!r}" if archs else f"model_type {model_type!r}"
    raise ValueError(f"unsupported {what}; supported architectures: {', '.join(supported_architectures())}")
