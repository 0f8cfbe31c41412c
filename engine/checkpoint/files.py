"""What every checkpoint reader raises, and how it reads a checkpoint's JSON files.

Torch-free: the tokenizer, the vLLM backend and the native loader all name a
bad checkpoint the same way, in one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming the file or tensor."""


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, params.json) as a dict; ModelLoadError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data
