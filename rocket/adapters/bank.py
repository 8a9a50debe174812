"""LoRA bank: load and validate peft adapters, stack them per module into padded tensors."""
from __future__ import annotations

import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import torch
from torch import nn
from rocket.adapters.similarity import group_similarity
from rocket.adapters.stacking import StackedModule, stack_modules
from rocket.errors import BankError
from rocket.io import read_json, read_text
from rocket.progress import progress_bar


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")



@dataclass
class LoraAdapter:
    """One peft LoRA adapter: per-module A [r, d_in], B [d_out, r] and scaling (alpha/r or alpha/√r)."""
    name: str
    path: Path
    r: int
    alpha: float
    use_rslora: bool
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]
    config: dict = field(default_factory=dict, repr=False)

    @property
    def modules(self) -> list[str]:
        return sorted(self.weights)

    @property
    def scaling(self) -> float:
        return _scaling(self.alpha, self.r, self.use_rslora)

    def rank(self, module: str) -> int:
        return self.weights[module][0].shape[0]

    def config_rank_scaling(self, module: str) -> tuple[int, float]:
        """(rank, scaling) that peft gives a fresh LoRA of this adapter's config on `module`: r and
        lora_alpha, or their rank_pattern / alpha_pattern entries matching the module name."""
        r = int(_pattern_value(self.config.get("rank_pattern"), module, self.r))
        alpha = float(_pattern_value(self.config.get("alpha_pattern"), module, self.alpha))
        return r, _scaling(alpha, r, self.use_rslora)


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: a key matches the module name or its suffix."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(file))
        except Exception as e:  # safetensors raises several types for a corrupt header
            raise BankError(f"{file}: unreadable safetensors ({e})") from None
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BankError(f"{file}: refused: this pickle needs code execution, which rocket never allows "
                        f"(torch.load weights_only=True: {first})") from None
    except Exception as e:
        raise BankError(f"{file}: unreadable adapter weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BankError(f"{file}: expected a dict of tensors")
    return state


def weights_file(adapter_dir: Path) -> Path:
    """The weights file of a peft adapter directory (safetensors preferred)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise BankError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load one peft LoRA adapter from its directory (or its adapter_model.* file)."""
    path = Path(path)
    adapter_dir, file = (path.parent, path) if path.is_file() else (path, None)
    if not adapter_dir.is_dir():
        raise BankError(f"{path}: no such adapter directory")
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise BankError(f"{adapter_dir}: missing adapter_config.json")
    cfg = read_json(cfg_file, BankError)
    if not isinstance(cfg, dict):
        raise BankError(f"{cfg_file}: expected a JSON object, got a {type(cfg).__name__}")
    name = name or adapter_dir.name
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BankError(f"adapter '{name}': peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise BankError(f"adapter '{name}': DoRA adapters are not supported")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BankError(f"{cfg_file}: field '{key}' must be a positive number, got {value!r}")
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    state = _load_state(file or weights_file(adapter_dir))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise BankError(f"adapter '{name}': unsupported LoRA weight {key!r}")
            continue  # modules_to_save and other non-LoRA tensors are not part of ΔW
        halves.setdefault(m["module"], {})[m["ab"]] = tensor
    if not halves:
        raise BankError(f"adapter '{name}': no lora_A/lora_B weights in its file")
    weights, scalings = {}, {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise BankError(f"adapter '{name}': module '{module}' lacks lora_{'B' if 'A' in ab else 'A'}")
        A, B = ab["A"], ab["B"]
        for half, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise BankError(f"adapter '{name}': module '{module}' {half} is {t.dtype}, not a floating-point tensor")
            if not torch.isfinite(t).all():
                raise BankError(f"adapter '{name}': module '{module}' {half} has non-finite values (NaN or Inf)")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise BankError(f"adapter '{name}': module '{module}' has lora_A {list(A.shape)} and "
                            f"lora_B {list(B.shape)}, which do not compose")
        mod_r = A.shape[0]
        mod_alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
        weights[module] = (A, B)
        scalings[module] = _scaling(mod_alpha, mod_r, rslora)
    return LoraAdapter(name, adapter_dir, r, alpha, rslora, weights, scalings, cfg)


def _manifest_entries(manifest: Path) -> list[Path]:
    """The paths a manifest lists, one per line: an adapter directory (what `rocket select` writes)
    or its weights file (the reference implementation's manifests list `.../adapter_model.bin`);
    blank and `#` lines skipped, relative paths taken from the manifest's directory."""
    entries = []
    for lineno, line in enumerate(read_text(manifest, BankError).split("\n"), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        p = p if p.is_absolute() else manifest.parent / p
        if not p.exists():
            raise BankError(f"{manifest}:{lineno}: {line} does not exist")
        entries.append(p)
    if not entries:
        raise BankError(f"{manifest}: no adapter paths")
    return entries


def bank_entries(path: str | Path) -> list[tuple[str, Path]]:
    """(name, path) of every adapter of a bank directory, a single adapter directory or a manifest
    .txt, in bank order and named as LoraBank names them (a repeated name gets '#2', '#3', …),
    without loading any weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".txt":
        entries = _manifest_entries(path)
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        entries = [path]
    elif path.is_dir():
        entries = sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
        if not entries:
            raise BankError(f"{path}: no adapter directories (with adapter_config.json) inside")
        skipped = sorted(p.name for p in path.iterdir() if p.is_dir() and p not in entries
                         and not p.name.startswith("."))
        if skipped:
            warnings.warn(f"{path}: {len(skipped)} director{'y' if len(skipped) == 1 else 'ies'} without "
                          f"adapter_config.json skipped: {', '.join(skipped[:5])}{' …' if len(skipped) > 5 else ''}",
                          stacklevel=2)
    else:
        raise BankError(f"{path}: expected a directory of peft adapters or a manifest .txt")
    out, seen = [], {}
    for p in entries:
        name = (p.parent if p.is_file() else p).name
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", p))
    return out


class LoraBank:
    """A set of LoRA adapters. `LoraBank.load(dir | manifest.txt)`."""

    def __init__(self, adapters: list[LoraAdapter]):
        if not adapters:
            raise BankError("empty LoRA bank")
        seen = {}
        for a in adapters:  # names must be unique: they key scores and reports
            if a.name in seen:
                seen[a.name] += 1
                a.name = f"{a.name}#{seen[a.name]}"
            else:
                seen[a.name] = 1
        self.adapters = adapters

    @classmethod
    def load(cls, path: str | Path, progress: bool = False) -> "LoraBank":
        entries = [p for _, p in bank_entries(path)]
        if progress:
            entries = progress_bar(entries, desc="loading adapters", unit="adapter")
        return cls([load_adapter(p) for p in entries])

    # ---- views
    def __len__(self) -> int:
        return len(self.adapters)

    def __getitem__(self, key: int | str) -> LoraAdapter:
        if isinstance(key, str):
            return self.adapters[self.index(key)]
        return self.adapters[key]

    def index(self, name: str) -> int:
        for i, a in enumerate(self.adapters):
            if a.name == name:
                return i
        raise KeyError(f"adapter {name!r} is not in the bank")

    def subset(self, indices) -> "LoraBank":
        return LoraBank([self.adapters[i] for i in indices])

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def ranks(self) -> list[int]:
        return [a.r for a in self.adapters]

    @property
    def modules(self) -> list[str]:
        return sorted(set().union(*(a.weights for a in self.adapters)))

    def coverage(self) -> dict[str, list[str]]:
        """Adapter name → modules it covers."""
        return {a.name: a.modules for a in self.adapters}

    def summary(self) -> list[dict]:
        return [{"name": a.name, "path": str(a.path), "r": a.r, "alpha": a.alpha, "rslora": a.use_rslora,
                 "scaling": a.scaling, "modules": len(a.weights)} for a in self.adapters]

    def delta_cos(self) -> torch.Tensor:
        """[N, N] mean per-module cosine of the adapters' ΔW (see group_similarity)."""
        return group_similarity(self)

    # ---- kernels
    def stack(self, module: str, indices=None, dtype=None, device=None) -> StackedModule:
        """Stack `module` of the chosen adapters: A [N, r_max, d_in], B [N, d_out, r_max], zero-padded;
        adapters that do not cover the module get zeros and scaling 0."""
        chosen = [self.adapters[i] for i in (range(len(self)) if indices is None else indices)]
        having = [a for a in chosen if module in a.weights]
        if not having:
            raise BankError(f"no chosen adapter covers module '{module}'")
        d_out, d_in = having[0].weights[module][1].shape[0], having[0].weights[module][0].shape[1]
        for a in having:
            A, B = a.weights[module]
            if A.shape[1] != d_in or B.shape[0] != d_out:
                raise BankError(f"adapter '{a.name}': module '{module}' is {A.shape[1]}→{B.shape[0]}, "
                                f"other adapters have {d_in}→{d_out}")
        dtype = dtype or having[0].weights[module][0].dtype
        target = torch.empty((), dtype=dtype, device=device).expand(d_out, d_in)  # shape, dtype, device: no memory
        return stack_modules(chosen, {module: target})[module]  # the one implementation of the layout

    def validate(self, model: nn.Module) -> None:
        """Check every adapter module against the base model: it must exist as a linear layer with
        matching in/out features. Errors name the adapter and the module."""
        layers = dict(model.named_modules())
        for a in self.adapters:
            for module, (A, B) in a.weights.items():
                layer = layers.get(module)
                if layer is None:
                    raise BankError(f"adapter '{a.name}': module '{module}' is not in the base model")
                shape = _linear_shape(layer)
                if shape is None:
                    raise BankError(f"adapter '{a.name}': module '{module}' is a {type(layer).__name__}, "
                                    "not a linear layer")
                if shape != (A.shape[1], B.shape[0]):
                    raise BankError(f"adapter '{a.name}': module '{module}' is {A.shape[1]}→{B.shape[0]} "
                                    f"but the base model's layer is {shape[0]}→{shape[1]}")


def _linear_shape(layer: nn.Module):
    """(in_features, out_features) of a linear layer, nn.Linear or HF's Conv1D; None otherwise."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "weight"):
        return tuple(layer.weight.shape)
    return None
