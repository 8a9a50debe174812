"""The hyperparameters of a training run and what it returns."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
import torch
from rocket.errors import TrainError


# Settings a checkpoint must share with the run that resumes it (else the batch plan or schedule differ).
PLAN_KEYS = ("epochs", "max_steps", "lr", "warmup_ratio", "batch_size", "grad_accum", "seed", "cutoff",
             "template", "overflow", "group_by_length", "top_k", "train_router_only")

# What TrainConfig accepts: integer fields and their least value; float fields must be finite and pass
# the test (save_total_limit 0 would delete every checkpoint; max_grad_norm 0 turns clipping off).
INT_FIELDS = {"epochs": 1, "cutoff": 1, "batch_size": 1, "grad_accum": 1, "top_k": 1, "pad_to_multiple": 1,
              "save_steps": 0, "save_total_limit": 1}
FLOAT_FIELDS = {
    "lr": (lambda x: x > 0, "> 0"),
    "warmup_ratio": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "weight_decay": (lambda x: x >= 0, "≥ 0"),
    "max_grad_norm": (lambda x: x >= 0, "≥ 0 (0: no clipping)"),
    "lora_dropout": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "aux_loss_coef": (lambda x: x >= 0, "≥ 0 (0: off)"),
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Hyperparameters of a run (saved with every checkpoint). Defaults are the paper's recipe (the
    reference implementation's): micro-batch 2 × accumulation 16, lr 5e-5, 5 epochs, cutoff 1024,
    lora_dropout 0.05, no balancing loss (docs/design.md)."""
    epochs: int = 5
    lr: float = 5e-5
    cutoff: int = 1024
    batch_size: int = 2              # micro-batch per device
    grad_accum: int = 16             # micro-batches per optimizer step
    top_k: int = 2
    train_router_only: bool = False
    template: str = "alpaca"
    overflow: str = "drop"           # examples longer than cutoff: drop | truncate | error
    group_by_length: bool = True
    pad_to_multiple: int = 16        # few distinct batch shapes: kernels tuned per shape are reused
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_dropout: float = 0.05
    aux_loss_coef: float = 0.0       # Switch load-balancing loss, off as in the reference implementation
    target_modules: list[str] | None = None
    seed: int = 0
    max_steps: int | None = None     # stop (and end the schedule) after this many steps
    save_steps: int = 0              # checkpoint every N steps (0: at the end of each epoch)
    save_total_limit: int = 2
    cuda_graphs: bool = False        # capture each micro-batch shape in a CUDA graph (torch engine, CUDA)

    def __post_init__(self):
        # Checked where the settings enter, one line naming the field (docs/design.md §2.2), so a bad
        # value stops `rocket train` before anything is loaded instead of training to NaN.
        for name, low in INT_FIELDS.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise TrainError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise TrainError(f"max_steps must be an integer ≥ 1 (or None), got {self.max_steps!r}")
        if not _is_int(self.seed):
            raise TrainError(f"seed must be an integer, got {self.seed!r}")
        for name, (allowed, rule) in FLOAT_FIELDS.items():
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                    and allowed(value)):
                raise TrainError(f"{name} must be a finite number {rule}, got {value!r}")
        for name in ("train_router_only", "group_by_length", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TrainError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.overflow not in ("drop", "truncate", "error"):
            raise TrainError(f"overflow must be drop, truncate or error, got {self.overflow!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class StepInfo:
    """What on_step callbacks receive after each optimizer step."""
    step: int          # steps done so far (1-based)
    total: int
    epoch: int
    loss: float        # mean output-token cross-entropy of the step
    lr: float
    tokens: int        # non-padding tokens of the step (this rank)
    padded: int        # batch elements including padding (this rank)
    seconds: float     # wall time of the step


@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float]
    steps: int
    backend: str
    out: Path
    tokens: int = 0
    seconds: float = 0.0
    history: list[StepInfo] = field(default_factory=list, repr=False)
