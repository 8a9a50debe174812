"""Injection of LoRA-MoE layers into HF models, router-only training, the load-balancing loss."""
from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn
from rocket.moe.layer import LoraMoELinear, MoEError
from rocket.resume import model_fingerprint

log = logging.getLogger("rocket.moe")

# Offset of the seeds of the fresh experts' generators (seed + layer index + FRESH_SEED_OFFSET), so
# that their stream is not the router's of the same layer (seed + layer index).
FRESH_SEED_OFFSET = 1 << 32


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


def _with_fresh_experts(stacked, adapters, module: str, gen: torch.Generator):
    """(A, B, scaling) of `module`'s layer where every expert whose adapter lacks the module is a fresh
    LoRA as peft initialises one (init_lora_weights=True): A kaiming-uniform with a = √5 (drawn from
    `gen` in float32, expert order), B = 0, at the adapter's configured rank and with its scaling;
    ranks zero-padded to the largest of the layer. `stacked`: bank.stack of the module."""
    fresh = [(e, *a.config_rank_scaling(module)) for e, a in enumerate(adapters) if module not in a.weights]
    if not fresh:
        return stacked.A, stacked.B, stacked.scaling
    E, r_stacked, d_in = stacked.A.shape
    r = max([r_stacked] + [r_e for _, r_e, _ in fresh])
    A = stacked.A.new_zeros(E, r, d_in)
    B = stacked.B.new_zeros(E, stacked.B.shape[1], r)
    A[:, :r_stacked] = stacked.A
    B[:, :, :r_stacked] = stacked.B
    scaling = stacked.scaling.clone()
    for e, r_e, s_e in fresh:
        A[e, :r_e] = nn.init.kaiming_uniform_(torch.empty(r_e, d_in), a=math.sqrt(5), generator=gen)
        scaling[e] = s_e
    return A, B, scaling


def inject_lora_moe(model: nn.Module, bank, experts, target_modules=None, top_k: int = 2, *, dropout: float = 0.0,
                    router_std: float = 0.01, seed: int = 0, load_balancing: bool = False,
                    train_router_only: bool = False) -> nn.Module:
    """Wrap every matching nn.Linear of `model` (in place; returned too) with a LoraMoELinear.

    experts: bank adapter names or indices (E of them, duplicates allowed), expert e of every layer
    is adapter experts[e] for that module, its scaling kept; ranks are zero-padded to the largest
    (`bank.stack`). Where an adapter lacks a module, its expert there is a fresh LoRA as peft would
    start it (A kaiming-uniform, B = 0, the adapter's configured rank and scaling; see
    _with_fresh_experts), drawn from a generator seeded with seed + layer index + FRESH_SEED_OFFSET,
    and trained like the others; one warning names those adapters and modules.
    target_modules: None → every module some chosen adapter covers; else peft-style names (a module
    matches when its name equals one or ends with '.'+one); every match must be covered by some
    chosen adapter. Each layer gets its own router, seeded with seed + layer index (reproducible).
    All base parameters are frozen; the experts (unless train_router_only) and routers are trainable.
    The config is kept as `model.rocket_moe_config` (used by save_moe_state), with the experts' adapter
    directories and the base model's path and fingerprint (load_moe checks it).
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
    config = getattr(model, "config", None)
    base_model = {"path": getattr(config, "name_or_path", None) or None, "fingerprint": model_fingerprint(model)}
    model.requires_grad_(False)
    adapters = [bank[i] for i in idx]
    lacking: dict[str, list[str]] = {}  # adapter → the wrapped modules it lacks (fresh experts there)
    for i, name in enumerate(names):
        base = linears[name]
        gen = torch.Generator().manual_seed(seed + i + FRESH_SEED_OFFSET)
        A, B, scaling = _with_fresh_experts(bank.stack(name, idx, dtype=base.weight.dtype), adapters, name, gen)
        for adapter in dict.fromkeys(a.name for a in adapters if name not in a.weights):
            lacking.setdefault(adapter, []).append(name)
        layer = LoraMoELinear(base, A, B, scaling, top_k, dropout=dropout, router_std=router_std, seed=seed + i,
                              load_balancing=load_balancing, train_router_only=train_router_only)
        _replace(model, name, layer)
    if lacking:
        log.warning("inject_lora_moe: fresh LoRA experts (A random, B = 0, trained from scratch) where an "
                    "adapter lacks a wrapped module: " + "; ".join(f"'{a}' lacks {len(m)} ({', '.join(m)})"
                                                              for a, m in lacking.items()))
    model.rocket_moe_config = {"base_model": base_model, "experts": [bank.names[i] for i in idx],
                               "expert_dirs": [os.path.abspath(bank[i].path) for i in idx], "modules": names,
                               "top_k": int(top_k), "dropout": float(dropout), "router_std": float(router_std),
                               "seed": int(seed), "load_balancing": bool(load_balancing),
                               "train_router_only": bool(train_router_only)}
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
