"""Hugging Face ``Mistral3ForConditionalGeneration`` folders (Mistral Small 3.1+/4): text model only.

``config.json`` wraps the text model's config in ``text_config`` (model_type
``mistral`` or ``mistral4``) beside a ``vision_config``. Weights are named
``language_model.model.*`` / ``language_model.lm_head.*`` (what
``save_pretrained`` writes) or ``model.language_model.*`` / ``lm_head.*``
(transformers' in-memory names); both map onto the text model's names. The
vision tower and projector are skipped before they are read.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.files import ModelLoadError

ARCHITECTURE = "Mistral3ForConditionalGeneration"
FORMAT = "mistral3"
TEXT_MODEL_TYPES = ("mistral", "mistral4")

_SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
_RENAMES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
# Keys of the wrapper that hold for its text model too.
_INHERITED = ("quantization_config", "bos_token_id", "eos_token_id", "pad_token_id")


def is_mistral3(hf: dict) -> bool:
    return ARCHITECTURE in (hf.get("architectures") or []) or hf.get("model_type") == "mistral3"


def text_config(hf: dict, path: Path) -> dict:
    """The text model's config dict from a Mistral3 ``config.json`` (``path``, for errors)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ModelLoadError(f"{path}: a {ARCHITECTURE} config needs a text_config object")
    model_type = text.get("model_type", "mistral")  # Mistral3Config's default text model
    if model_type not in TEXT_MODEL_TYPES:
        raise ModelLoadError(
            f"{path}: text_config.model_type {model_type!r} is not supported (supported: {', '.join(TEXT_MODEL_TYPES)})"
        )
    out = {k: v for k, v in text.items() if k != "architectures"}  # resolved by model_type
    out["model_type"] = model_type
    for key in _INHERITED:
        if key in hf and key not in out:
            out[key] = hf[key]
    # transformers ties the head by the wrapper's flag when config.json sets it
    if "tie_word_embeddings" in hf:
        out["tie_word_embeddings"] = hf["tie_word_embeddings"]
    out["levante_format"] = FORMAT
    return out


def text_name(name: str) -> str | None:
    """The text model's name of a Mistral3 checkpoint tensor; None for the vision parts."""
    if name.startswith(_SKIPPED):
        return None
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name  # lm_head.* already, or unexpected: the model then names it
