"""Injection of LoRA-MoE layers into HF models, router-only training, the load-balancing loss."""
from __future__ import annotations

import torch
from torch import nn
from rocket.moe.layer import LoraMoELinear, MoEError


# --------------------------------------------------------------------------- injection
def _matches(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module name equals a target or ends with '.'+target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def moe_layers(model: nn.Module) -> dict[str, LoraMoELinear]:
    """Qualified name → LoraMoELinear of every MoE layer in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraMoELinear)}


def _resolve_experts(bank, experts) -> list[int]:
    out = []
    for e in experts:
        if isinstance(e, str):
            try:
                out.append(bank.index(e))
            except KeyError:
                raise MoEError(f"inject_lora_moe: expert {e!r} is not in the bank ({', '.join(bank.names)})") from None
        elif isinstance(e, int) and 0 <= e < len(bank):
            out.append(e)
        else:
            raise MoEError(f"inject_lora_moe: expert {e!r} is neither a bank name nor an index in [0, {len(bank)})")
    if not out:
        raise MoEError("inject_lora_moe: no experts given")
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def inject_lora_moe(model: nn.Module, bank, experts, target_modules=None, top_k: int = 2, *, dropout: float = 0.0,
                    router_std: float = 0.01, seed: int = 0, load_balancing: bool = False,
                    train_router_only: bool = False) -> nn.Module:
    """Wrap every matching nn.Linear of `model` (in place; returned too) with a LoraMoELinear.

    experts: bank adapter names or indices (E of them, duplicates allowed), expert e of every layer
    is adapter experts[e] for that module, its scaling kept; ranks are zero-padded to the largest
    (`bank.stack`), and an adapter that lacks a module gives a zero expert (scaling 0) there.
    target_modules: None → every module some chosen adapter covers; else peft-style names (a module
    matches when its name equals one or ends with '.'+one); every match must be covered by some
    chosen adapter. Each layer gets its own router, seeded with seed + layer index (reproducible).
    All base parameters are frozen; the experts (unless train_router_only) and routers are trainable.
    The config is kept as `model.rocket_moe_config` (used by save_moe_state).
    """
    if moe_layers(model):
        raise MoEError("inject_lora_moe: the model already has LoRA-MoE layers")
    idx = _resolve_experts(bank, experts)
    chosen = bank.subset(sorted(set(idx)))
    chosen.validate(model)
    covered = set(chosen.modules)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if target_modules is None:
        names = sorted(covered)
    else:
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = sorted(n for n in linears if _matches(n, targets))
        if not names:
            raise MoEError(f"inject_lora_moe: no linear layer of the model matches target_modules {targets}")
        missing = [n for n in names if n not in covered]
        if missing:
            raise MoEError(f"inject_lora_moe: module '{missing[0]}' matches target_modules but no chosen expert "
                           f"covers it ({len(missing)} such modules)")
    model.requires_grad_(False)
    for i, name in enumerate(names):
        base = linears[name]
        stacked = bank.stack(name, idx, dtype=base.weight.dtype)
        layer = LoraMoELinear(base, stacked.A, stacked.B, stacked.scaling, top_k, dropout=dropout,
                              router_std=router_std, seed=seed + i, load_balancing=load_balancing,
                              train_router_only=train_router_only)
        _replace(model, name, layer)
    model.rocket_moe_config = {"experts": [bank.names[i] for i in idx], "modules": names, "top_k": int(top_k),
                               "dropout": float(dropout), "router_std": float(router_std), "seed": int(seed),
                               "load_balancing": bool(load_balancing), "train_router_only": bool(train_router_only)}
    return model


def set_train_router_only(model: nn.Module, flag: bool = True) -> None:
    """Switch every MoE layer of `model` to router-only (experts frozen) or full training."""
    for layer in moe_layers(model).values():
        layer.set_train_router_only(flag)
    if hasattr(model, "rocket_moe_config"):
        model.rocket_moe_config["train_router_only"] = bool(flag)


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss over the MoE layers of the last forward (None when disabled)."""
    losses = [m.aux_loss for m in moe_layers(model).values() if m.aux_loss is not None]
    return torch.stack([l.float() for l in losses]).mean() if losses else None
