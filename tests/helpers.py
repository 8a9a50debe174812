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


def assert_stacked(st, adapters, module: str, dtype) -> None:
    """The stacked layout of `module` over `adapters` (rocket.adapters.stacking.StackedModule): each adapter's A and
    B cast to dtype in the leading rows/columns, zero rank padding, zeros with scaling 0 and
    present=False where an adapter lacks the module."""
    r_max = max((a.weights[module][0].shape[0] for a in adapters if module in a.weights), default=0)
    assert st.A.shape[:2] == (len(adapters), r_max) and st.B.shape[::2] == (len(adapters), r_max)
    assert st.A.dtype == st.B.dtype == dtype and st.scaling.dtype == torch.float32
    A_s, B_s, scaling, present = (t.cpu() for t in (st.A, st.B, st.scaling, st.present))
    for n, a in enumerate(adapters):
        if module in a.weights:
            A, B = (t.to(dtype) for t in a.weights[module])
            r = A.shape[0]
            assert present[n] and float(scaling[n]) == float(torch.tensor(a.scalings[module], dtype=torch.float32))
            assert torch.equal(A_s[n, :r], A) and torch.equal(B_s[n, :, :r], B)
            assert not A_s[n, r:].any() and not B_s[n, :, r:].any()
        else:
            assert not present[n] and scaling[n] == 0 and not A_s[n].any() and not B_s[n].any()
