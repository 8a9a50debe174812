"""Loading a base model and its tokenizer from an HF directory, with one dtype rule and one
device rule for every command."""
from __future__ import annotations

from pathlib import Path

import torch

from rocket.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device(device=None) -> torch.device:
    """`device` as given, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype or its name; "auto" (or None): bfloat16 on CUDA, float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in (None, "auto"):
        raise ModelError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(base_model, device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.nn.Module:
    """An HF causal LM from its directory (or a model object, moved), on `device` in `dtype`."""
    dtype = resolve_dtype(dtype, device)
    if isinstance(base_model, torch.nn.Module):
        return base_model.to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    path = Path(base_model)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)  # transformers < 4.56 ignores dtype=


def load_tokenizer(base_model, tokenizer=None):
    """`tokenizer` if given, else the one saved with the model directory."""
    if tokenizer is not None:
        return tokenizer
    if isinstance(base_model, torch.nn.Module):
        raise ModelError("a tokenizer is needed when the base model is a model object")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model))


def load_base(base_model, device: torch.device, dtype: str | torch.dtype | None = "auto", tokenizer=None):
    """(model in eval mode, tokenizer) of an HF causal-LM directory."""
    return load_model(base_model, device, dtype).eval(), load_tokenizer(base_model, tokenizer)
