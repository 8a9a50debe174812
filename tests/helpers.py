"""Test helpers shared by tests/ and bench/."""
import torch

from rocket.tiny import LLAMA_TARGETS

# The random bank of the lora_bank_dir fixture: (name, r, alpha, target modules, use_rslora).
BANK_SPEC = [
    ("qv_r4", 4, 8, ("q_proj", "v_proj"), False),
    ("all_r8", 8, 16, LLAMA_TARGETS, False),
    ("attn_r2_rs", 2, 4, ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    ("mlp_r16", 16, 8, ("gate_proj", "up_proj", "down_proj"), False),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere gives inf (never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape full of NaN: outputs written into it must overwrite every element."""
    return torch.full_like(t, float("nan"))
