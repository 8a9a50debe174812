"""Loading a base model and its tokenizer from an HF directory, with one dtype rule and one
device rule for every command."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rocket.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# A saved tokenizer has one of these sets: the fast tokenizer, a sentencepiece / tiktoken model, BPE files.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


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


def _model_dir(base_model) -> Path:
    path = Path(base_model)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory")
    return path


def check_model_dir(base_model) -> Path:
    """`base_model` as a Path if it is a Hugging Face model directory (config.json naming a
    model_type or architectures, weights); else one line saying what it is instead. Cheap: run
    before any long work, and by load_model before transformers sees the directory."""
    path = _model_dir(base_model)
    config = path / "config.json"
    if not config.is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelError(f"{path}: looks like a peft adapter (adapter_config.json, no config.json), not a base "
                             "model; give the directory of the model it was trained on")
        what = "an empty directory" if not any(path.iterdir()) else "no config.json"
        raise ModelError(f"{path}: {what}, not a Hugging Face model directory")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:  # malformed JSON or not UTF-8
        raise ModelError(f"{config}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict) or not (cfg.get("model_type") or cfg.get("architectures")):
        raise ModelError(f"{config}: no model_type or architectures, not a transformers model config")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{path}: no model weights (none of {', '.join(WEIGHT_FILES)})")
    return path


def check_tokenizer_dir(base_model, tokenizer=None) -> Path:
    """The directory the tokenizer of `base_model` loads from, checked: `tokenizer` (a directory:
    `--tokenizer`, for a model saved without its tokenizer) when given, else the model directory.
    It must hold a saved tokenizer (TOKENIZER_FILES); else one line naming what is missing. Cheap:
    run before any long work, and by load_tokenizer before transformers sees the directory."""
    if tokenizer is not None:
        path = Path(tokenizer)
        where, fix = f"--tokenizer {path}", ""
        if not path.is_dir():
            raise ModelError(f"{where}: no such directory")
    else:
        path = _model_dir(base_model)
        where, fix = str(path), "; save the tokenizer with the model, or give its directory with --tokenizer"
    present = {p.name for p in path.iterdir()}
    if any(present.issuperset(group) for group in TOKENIZER_FILES):
        return path
    partial = next((group for group in TOKENIZER_FILES if present.intersection(group)), None)
    if partial is not None:
        raise ModelError(f"{where}: incomplete tokenizer: {', '.join(sorted(present.intersection(partial)))} "
                         f"without {', '.join(sorted(set(partial) - present))}")
    raise ModelError(f"{where}: no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
                     + fix)


def add_tokenizer_argument(parser, model: str = "--base-model") -> None:
    """--tokenizer DIR, on every command that loads a model directory (`model` names its flag)."""
    parser.add_argument("--tokenizer", metavar="DIR", help=f"tokenizer directory to use instead of the one saved "
                        f"with {model} (for a model directory saved without its tokenizer files)")


def load_model(base_model, device: torch.device, dtype: str | torch.dtype | None = "auto") -> torch.nn.Module:
    """An HF causal LM from its directory (or a model object, moved), on `device` in `dtype`."""
    dtype = resolve_dtype(dtype, device)
    if isinstance(base_model, torch.nn.Module):
        return base_model.to(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    path = check_model_dir(base_model)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype)  # transformers < 4.56 ignores dtype=


def load_tokenizer(base_model, tokenizer=None):
    """`tokenizer` if it is a tokenizer object; else the one saved in the directory `tokenizer`
    (`--tokenizer`), or, when None, the one saved with the model directory (check_tokenizer_dir)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and isinstance(base_model, torch.nn.Module):
        raise ModelError("a tokenizer is needed when the base model is a model object")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(check_tokenizer_dir(base_model, tokenizer)))


def load_base(base_model, device: torch.device, dtype: str | torch.dtype | None = "auto", tokenizer=None):
    """(model in eval mode, tokenizer) of an HF causal-LM directory; `tokenizer` as in load_tokenizer
    (an object, a tokenizer directory, or None: the model directory's)."""
    return load_model(base_model, device, dtype).eval(), load_tokenizer(base_model, tokenizer)
