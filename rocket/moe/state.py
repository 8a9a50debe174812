"""The trained state of a LoRA-MoE model (routers + experts, never the base): save and load."""
from __future__ import annotations

import json
from pathlib import Path
import torch
from torch import nn
from rocket.modeling import default_device, load_model, resolve_dtype
from rocket.moe.inject import _replace, moe_layers
from rocket.moe.layer import LoraMoELinear, MoEError
from rocket.io import atomic_path


CONFIG_KEY = "rocket_moe_config"


# --------------------------------------------------------------------------- save / load
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
    """The injection config of `model` (see inject_lora_moe), with the modules actually wrapped."""
    layers = moe_layers(model)
    if not layers:
        raise MoEError("the model has no LoRA-MoE layers")
    cfg = dict(getattr(model, "rocket_moe_config", {}))
    first = next(iter(layers.values()))
    cfg.update(modules=sorted(layers), top_k=first.top_k, n_experts=first.n_experts,
               train_router_only=first.train_router_only, load_balancing=first.load_balancing)
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


def read_moe_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a file written by save_moe_state."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise MoEError(f"{path}: no such MoE state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise MoEError(f"{path}: unreadable safetensors ({e})") from None
    if CONFIG_KEY not in meta:
        raise MoEError(f"{path}: not a rocket MoE state (no '{CONFIG_KEY}' metadata)")
    return tensors, json.loads(meta[CONFIG_KEY])


def load_moe_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a save_moe_state file into `model` (in place; returned too).

    A model that already has MoE layers must have exactly the saved layers and shapes; a plain
    model gets them injected first from the file alone (no bank needed): each listed module is
    wrapped with experts, scalings and router from the file. Every layer is checked before any is
    changed, so a mismatch leaves the model as it was.
    """
    tensors, cfg = read_moe_state(path)
    modules = cfg.get("modules", [])
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


MOE_FILE = "moe.safetensors"


def load_moe(base_model, checkpoint, *, device=None, dtype=None):
    """The base model (directory or model object) with the trained LoRA-MoE of `checkpoint` (a run's
    output directory, a checkpoint directory, or its moe.safetensors), in eval mode."""
    ckpt = Path(checkpoint)
    file = ckpt / MOE_FILE if ckpt.is_dir() else ckpt
    if not file.is_file():
        raise MoEError(f"{checkpoint}: no {MOE_FILE} (expected a rocket train output or checkpoint)")
    device = default_device(device)
    dtype = resolve_dtype(dtype, device)
    model = load_model(base_model, device, dtype)
    load_moe_state(model, file)
    return model.to(device=device, dtype=dtype).eval()
