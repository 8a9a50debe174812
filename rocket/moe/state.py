"""The trained state of a LoRA-MoE model (routers + experts, never the base): save and load.

Two forms (docs/design.md §3):

- the MoE state file `moe.safetensors` (save_moe_state): the tensors, with the MoE config as JSON
  under the metadata key 'rocket_moe_config'. Training checkpoints hold one; a run's output was
  this file alone before the directory form, and it still loads.
- the trained-MoE directory (save_moe; what `rocket train --out DIR` writes): `moe.safetensors`,
  `rocket_moe_config.json` (the same config as readable JSON, and the one load_moe uses: the base
  model's path and fingerprint, the experts and their adapter directories, modules, top-k, rank,
  dropout, router settings, rocket version) and the tokenizer's files when one is known. The
  config file is written last, so its presence marks a complete directory.

load_moe(base_model, DIR) puts either onto a base model, after checking that the base model's
fingerprint (rocket.resume.model_fingerprint) is the one the mixture was trained on.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
import torch
from torch import nn
from rocket import __version__
from rocket.modeling import default_device, load_model, resolve_dtype
from rocket.moe.inject import _replace, moe_layers
from rocket.moe.layer import LoraMoELinear, MoEError
from rocket.io import atomic_path, read_json, write_json
from rocket.resume import model_fingerprint


CONFIG_KEY = "rocket_moe_config"
MOE_FILE, MOE_CONFIG_FILE = "moe.safetensors", "rocket_moe_config.json"
# The parts of a base-model fingerprint, as a mismatch names them.
FINGERPRINT_PARTS = {"config": "config.json", "shapes": "parameter names or shapes", "samples": "weights"}


# --------------------------------------------------------------------------- save
def moe_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MoE state of `model`: '<layer>.lora_A', '.lora_B', '.scaling', '.router.weight' of every
    LoraMoELinear (CPU, contiguous). The frozen base is never part of it."""
    state = {}
    for name, layer in moe_layers(model).items():
        for key, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("scaling", layer.scaling),
                       ("router.weight", layer.router.weight)):
            state[f"{name}.{key}"] = t.detach().cpu().contiguous()
    return state


def moe_config(model: nn.Module) -> dict:
    """The injection config of `model` (see inject_lora_moe: base model, experts, settings), with
    the modules actually wrapped, their peft-style target names, the largest expert rank and the
    rocket version."""
    layers = moe_layers(model)
    if not layers:
        raise MoEError("the model has no LoRA-MoE layers")
    cfg = dict(getattr(model, "rocket_moe_config", {}))
    first = next(iter(layers.values()))
    cfg.update(modules=sorted(layers), target_modules=sorted({n.rsplit(".", 1)[-1] for n in layers}),
               top_k=first.top_k, n_experts=first.n_experts, rank=max(layer.rank for layer in layers.values()),
               train_router_only=first.train_router_only, load_balancing=first.load_balancing,
               rocket_version=__version__)
    return cfg


def save_moe_state(model: nn.Module, path: str | Path) -> Path:
    """Write moe_state_dict(model) to `path` (safetensors, written atomically) with moe_config(model)
    as JSON under the metadata key 'rocket_moe_config'."""
    from safetensors.torch import save_file
    path = Path(path)
    cfg = moe_config(model)
    with atomic_path(path) as tmp:
        save_file(moe_state_dict(model), str(tmp), metadata={CONFIG_KEY: json.dumps(cfg)})
    return path


def _save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.save_pretrained into `out`, every file whole or absent (through rocket.io)."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer.") as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            with atomic_path(out / file.name) as part:
                os.replace(file, part)


def write_moe_dir(out: str | Path, tokenizer=None) -> Path:
    """Complete the trained-MoE directory `out` whose moe.safetensors is written (save_moe_state):
    the tokenizer's files, then rocket_moe_config.json, the weights' config, last."""
    out = Path(out)
    cfg = _file_config(out / MOE_FILE)
    if hasattr(tokenizer, "save_pretrained"):
        _save_tokenizer(tokenizer, out)
    elif tokenizer is not None:  # a tokenizer of the caller's own: the directory loads without it
        warnings.warn(f"{out}: the tokenizer ({type(tokenizer).__name__}) has no save_pretrained and is not "
                      "saved with the model", stacklevel=2)
    write_json(out / MOE_CONFIG_FILE, cfg, indent=2)
    return out


def save_moe(model: nn.Module, out: str | Path, tokenizer=None) -> Path:
    """Save the trained mixture of `model` as a directory (moe.safetensors, rocket_moe_config.json,
    the tokenizer's files when given) that load_moe reads; the base model is never stored."""
    save_moe_state(model, Path(out) / MOE_FILE)
    return write_moe_dir(out, tokenizer)


# --------------------------------------------------------------------------- load
def _file_config(file: Path) -> dict:
    """The config in the metadata of a save_moe_state file (reads the header only)."""
    from safetensors import safe_open
    if not file.is_file():
        raise MoEError(f"{file}: no such MoE state file")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise MoEError(f"{file}: unreadable safetensors ({e})") from None
    if CONFIG_KEY not in meta:
        raise MoEError(f"{file}: not a rocket MoE state (no '{CONFIG_KEY}' metadata)")
    return json.loads(meta[CONFIG_KEY])


def read_moe_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a trained-MoE directory (the config from its rocket_moe_config.json),
    of a directory holding a moe.safetensors (an earlier output, a checkpoint), or of that file."""
    from safetensors.torch import load_file
    path = Path(path)
    if (path / MOE_CONFIG_FILE).is_file():
        file, cfg = path / MOE_FILE, read_json(path / MOE_CONFIG_FILE, MoEError)
        where = path / MOE_CONFIG_FILE
        if not isinstance(cfg, dict):
            raise MoEError(f"{where}: expected a JSON object, got a {type(cfg).__name__}")
        if not file.is_file():
            raise MoEError(f"{file}: no such MoE state file (its {MOE_CONFIG_FILE} is there)")
    else:
        file = path / MOE_FILE if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            raise MoEError(f"{path}: no {MOE_CONFIG_FILE} or {MOE_FILE} (expected a rocket train output or checkpoint)")
        cfg, where = _file_config(file), file
    for key in ("modules", "top_k"):
        if key not in cfg:
            raise MoEError(f"{where}: no field '{key}'")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise MoEError(f"{file}: unreadable safetensors ({e})") from None
    return tensors, cfg


def _check_base(cfg: dict, model: nn.Module, given, where, force_base: bool) -> None:
    """Refuse `model` as the base of the saved mixture `cfg` unless its fingerprint is the saved one
    (force_base: warn instead); a mixture saved without a fingerprint loads with a warning."""
    saved = cfg.get("base_model")
    if saved is None:
        warnings.warn(f"{where}: saved without the base model's fingerprint (an earlier rocket); the base model "
                      "is not checked", stacklevel=3)
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), dict):
        raise MoEError(f"{where}: field 'base_model' must hold the base model's 'path' and 'fingerprint'")
    now = model_fingerprint(model)
    differ = [what for part, what in FINGERPRINT_PARTS.items() if saved["fingerprint"].get(part) != now[part]]
    if not differ:
        return
    if isinstance(given, nn.Module):
        given = getattr(getattr(given, "config", None), "name_or_path", None)
    message = (f"{where}: trained on base model {saved.get('path') or 'an in-memory model'} but given "
               f"{given or 'an in-memory model'}, which differs in {', '.join(differ)}")
    if not force_base:
        raise MoEError(f"{message}; pass force_base=True (--force-base) to load it anyway")
    warnings.warn(f"{message}; loaded anyway (force_base)", stacklevel=3)


def _inject_state(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: dict, path) -> nn.Module:
    """load_moe_state on tensors and config already read from `path` (named in errors)."""
    modules = cfg["modules"]
    for name in modules:
        for key in ("lora_A", "lora_B", "scaling", "router.weight"):
            if f"{name}.{key}" not in tensors:
                raise MoEError(f"{path}: missing tensor '{name}.{key}'")
    layers = moe_layers(model)
    if layers:
        if sorted(layers) != sorted(modules):
            extra = sorted(set(layers) ^ set(modules))
            raise MoEError(f"{path}: its MoE layers differ from the model's (e.g. '{extra[0]}')")
        for name, layer in layers.items():
            for key, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B), ("scaling", layer.scaling),
                           ("router.weight", layer.router.weight)):
                if tensors[f"{name}.{key}"].shape != t.shape:
                    raise MoEError(f"{path}: '{name}.{key}' is {list(tensors[f'{name}.{key}'].shape)}, "
                                   f"the model's is {list(t.shape)}")
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.copy_(tensors[f"{name}.lora_A"])
                layer.lora_B.copy_(tensors[f"{name}.lora_B"])
                layer.scaling.copy_(tensors[f"{name}.scaling"])
                layer.router.weight.copy_(tensors[f"{name}.router.weight"])
        return model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name in modules:
        base = linears.get(name)
        A = tensors[f"{name}.lora_A"]
        if base is None:
            raise MoEError(f"{path}: module '{name}' is not a linear layer of the model")
        if A.shape[2] != base.in_features or tensors[f"{name}.lora_B"].shape[1] != base.out_features:
            raise MoEError(f"{path}: module '{name}' is {A.shape[2]}→{tensors[f'{name}.lora_B'].shape[1]}, "
                           f"the model's is {base.in_features}→{base.out_features}")
    model.requires_grad_(False)
    top_k = int(cfg["top_k"])
    for name in modules:
        base = linears[name]
        router = nn.Linear(base.in_features, tensors[f"{name}.lora_A"].shape[0], bias=False,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            router.weight.copy_(tensors[f"{name}.router.weight"])
        _replace(model, name, LoraMoELinear(base, tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"],
                                            tensors[f"{name}.scaling"], top_k, router,
                                            dropout=float(cfg.get("dropout", 0.0)),
                                            load_balancing=bool(cfg.get("load_balancing", False)),
                                            train_router_only=bool(cfg.get("train_router_only", False))))
    model.rocket_moe_config = cfg
    return model


def load_moe_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a saved mixture (a trained-MoE directory or a save_moe_state file, see read_moe_state)
    into `model` (in place; returned too).

    A model that already has MoE layers must have exactly the saved layers and shapes; a plain
    model gets them injected first from the saved state alone (no bank needed): each listed module
    is wrapped with experts, scalings and router from the file. Every layer is checked before any
    is changed, so a mismatch leaves the model as it was. The base model is not checked (load_moe
    checks it).
    """
    tensors, cfg = read_moe_state(path)
    return _inject_state(model, tensors, cfg, path)


def load_moe(base_model, checkpoint, *, device=None, dtype=None, force_base: bool = False):
    """The base model (directory or model object) with the trained LoRA-MoE of `checkpoint` (a
    `rocket train` output directory, a checkpoint directory, or a moe.safetensors), in eval mode.

    A base model whose fingerprint differs from the one the mixture was trained on is refused with
    one MoEError line naming both and what differs, unless force_base (then a warning)."""
    tensors, cfg = read_moe_state(checkpoint)
    device = default_device(device)
    dtype = resolve_dtype(dtype, device)
    model = load_model(base_model, device, dtype)
    _check_base(cfg, model, base_model, checkpoint, force_base)
    _inject_state(model, tensors, cfg, checkpoint)
    return model.to(device=device, dtype=dtype).eval()
