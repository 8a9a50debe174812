"""Test helpers shared by tests/ and bench/."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN or Inf anywhere gives inf (never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape full of NaN: outputs written into it must overwrite every element."""
    return torch.full_like(t, float("nan"))
