"""The hyperparameters of a training run and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
import torch
from rocket.errors import TrainError


# Settings a checkpoint must share with the run that resumes it (else the batch plan or schedule differ).
PLAN_KEYS = ("epochs", "max_steps", "lr", "warmup_ratio", "batch_size", "grad_accum", "seed", "cutoff",
             "template", "overflow", "group_by_length", "top_k", "train_router_only")



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

    def __post_init__(self):
        for name in ("epochs", "cutoff", "batch_size", "grad_accum", "top_k", "pad_to_multiple"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.overflow not in ("drop", "truncate", "error"):
            raise TrainError(f"overflow must be drop, truncate or error, got {self.overflow!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be ≥ 1, got {self.max_steps}")

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
