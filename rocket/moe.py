"""Stage 4 model: LoRA mixture-of-experts layers, their injection into HF models, save and load.

`LoraMoELinear` is a drop-in for `nn.Linear`: a frozen base linear plus E LoRA experts and a router
(DESIGN §3 'LoRA mixture of experts'); the math runs in `rocket.kernels.lora_moe` (fused Triton on
CUDA, the torch reference on the CPU). `inject_lora_moe` wraps the linears of a model with experts
taken from bank adapters; `save_moe_state` / `load_moe_state` keep the MoE layers (never the base)
in one safetensors file with its config in the metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from rocket.errors import RocketError
from rocket.kernels import reference as R
from rocket.kernels.lora_moe import lora_moe

CONFIG_KEY = "rocket_moe_config"


class MoEError(RocketError):
    """A LoRA-MoE layer, injection or state file that cannot be used."""


class LoraMoELinear(nn.Module):
    """y = base(x) + Σ_{(e,w) in topk(softmax(x Gᵀ))} w · s_e · B_e A_e dropout(x).

    base: the frozen nn.Linear (kept as `self.base`, its parameters get requires_grad=False).
    lora_A: [E, r, d_in], lora_B: [E, d_out, r] (become trainable parameters, base's dtype/device
    unless `dtype` is given); scaling: [E] (a float32 buffer, saved with the state); top_k ≤ E;
    router: an nn.Linear(d_in, E, bias=False) or None for a fresh one with N(0, router_std) weights
    drawn from a generator seeded with `seed`; dropout: on the expert input only (peft's
    lora_dropout). `load_balancing=True` sets `self.aux_loss` (Switch loss, reference
    `load_balancing_loss`, differentiable to router and input) on every forward; otherwise it stays
    None. `train_router_only=True` freezes the experts (see `set_train_router_only`). On CUDA the
    layer can be captured in a CUDA graph: `torch.cuda.make_graphed_callables` warms it up itself;
    before a raw `torch.cuda.graph` capture, call it once at that token count. Under `torch.compile`
    the layer runs as it is and the model around it is compiled. `gemm_backend` picks the GEMM of the
    fused layer (`rocket.kernels.lora_moe.lora_moe`'s argument of that name; "auto" by default).
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling, top_k: int = 2,
                 router: nn.Linear | None = None, dropout: float = 0.0, *, router_std: float = 0.01, seed: int = 0,
                 load_balancing: bool = False, train_router_only: bool = False, dtype: torch.dtype | None = None,
                 gemm_backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise MoEError(f"LoraMoELinear: base must be an nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        if lora_A.dim() != 3 or lora_B.dim() != 3:
            raise MoEError(f"LoraMoELinear: lora_A must be [E, r, d_in] and lora_B [E, d_out, r], got "
                           f"{list(lora_A.shape)} and {list(lora_B.shape)}")
        E, r = lora_A.shape[0], lora_A.shape[1]
        if lora_A.shape[2] != d_in or lora_B.shape != (E, d_out, r):
            raise MoEError(f"LoraMoELinear: base is {d_in}→{d_out} but lora_A is {list(lora_A.shape)} and "
                           f"lora_B {list(lora_B.shape)} (expected [E, r, {d_in}] and [E, {d_out}, r])")
        scaling = torch.as_tensor(scaling, dtype=torch.float32).reshape(-1)
        if scaling.shape[0] != E:
            raise MoEError(f"LoraMoELinear: scaling has {scaling.shape[0]} entries for {E} experts")
        if not 1 <= int(top_k) <= E:
            raise MoEError(f"LoraMoELinear: top_k={top_k} must be in [1, {E}] (the number of experts)")
        if not 0.0 <= dropout < 1.0:
            raise MoEError(f"LoraMoELinear: dropout={dropout} must be in [0, 1)")
        self.base = base
        base.requires_grad_(False)
        dev, dtype = base.weight.device, dtype or base.weight.dtype
        self.lora_A = nn.Parameter(lora_A.detach().to(device=dev, dtype=dtype).contiguous().clone())
        self.lora_B = nn.Parameter(lora_B.detach().to(device=dev, dtype=dtype).contiguous().clone())
        self.register_buffer("scaling", scaling.to(dev))
        if router is None:
            router = nn.Linear(d_in, E, bias=False, device=dev, dtype=dtype)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                router.weight.copy_(torch.randn(E, d_in, generator=gen) * router_std)
        elif not isinstance(router, nn.Linear) or router.weight.shape != (E, d_in) or router.bias is not None:
            raise MoEError(f"LoraMoELinear: router must be nn.Linear({d_in}, {E}, bias=False)")
        self.router = router
        self.top_k = int(top_k)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.load_balancing = load_balancing
        self.gemm_backend = gemm_backend
        self.aux_loss: torch.Tensor | None = None
        self.set_train_router_only(train_router_only)

    # nn.Linear look-alike attributes, so code that inspects linears keeps working
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def n_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def set_train_router_only(self, flag: bool = True) -> None:
        """Router only (experts frozen) or experts + router (the default) trainable."""
        self.train_router_only = bool(flag)
        self.lora_A.requires_grad_(not flag)
        self.lora_B.requires_grad_(not flag)
        self.router.weight.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        # float32 masters go in as they are: the fused layer rounds them to x's dtype in its kernels
        # (no cast nodes in the graph); the CPU reference computes in float32 anyway
        out = lora_moe(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                       self.router.weight, self.top_k, x_lora, return_routing=self.load_balancing,
                       gemm_backend=self.gemm_backend)
        if not self.load_balancing:
            if self.aux_loss is not None:  # nn.Module.__setattr__ costs host time on every call
                self.aux_loss = None
            return out
        y, probs, experts = out
        self.aux_loss = R.load_balancing_loss(probs, experts, self.n_experts)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.n_experts}, "
                f"rank={self.rank}, top_k={self.top_k}, train_router_only={self.train_router_only}")


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
    if not 1 <= int(top_k) <= len(idx):
        raise MoEError(f"inject_lora_moe: top_k={top_k} must be in [1, {len(idx)}] (the number of experts)")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = moe_config(model)
    tmp = path.with_name(path.name + ".tmp")
    save_file(moe_state_dict(model), str(tmp), metadata={CONFIG_KEY: json.dumps(cfg)})
    os.replace(tmp, path)
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
