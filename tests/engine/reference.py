import json
import os

import torch


def load_hf_reference(path: str):
    """transformers' own model class for a checkpoint (Auto* does not map mistral4 in 5.23)."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
