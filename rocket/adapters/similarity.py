"""Group similarity of adapters: the cosine of their ΔW = scaling·B·A per module, averaged over the
modules two adapters share, computed without forming ΔW: <B_iA_i, B_jA_j>_F = tr((B_iᵀB_j)(A_jA_iᵀ)).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from rocket.errors import BankError
from rocket.progress import progress_bar

if TYPE_CHECKING:
    from rocket.adapters.bank import LoraAdapter, LoraBank


# --------------------------------------------------------------------------- group similarity
def _similarity(bank: LoraBank, device=None, block_rows: int = 4096, progress: bool = False):
    """(cos [N, N] float64 CPU, NaN where undefined; shared [N, N] module counts) of ΔW = s·B·A.

    Per module, the rows of all adapters' A (and of Bᵀ) are stacked into X_A [Σr, d_in] and
    X_B [Σr, d_out]; with G = X Xᵀ, <B_iA_i, B_jA_j>_F = Σ_{a∈i, b∈j} G_A[a, b]·G_B[a, b], i.e. the
    (i, j) block sum of G_A∘G_B: two Gram GEMMs give every pair's r×r trace at once. Cosine does
    not depend on the (positive) scalings, so they are not applied. A module an adapter does not
    cover, or covers with ΔW = 0 (an untrained B), is skipped for that adapter's pairs."""
    adapters = bank.adapters
    n = len(adapters)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    cos_sum = torch.zeros(n, n, dtype=torch.float64, device=device)
    shared = torch.zeros(n, n, dtype=torch.int64, device=device)
    modules = bank.modules
    if progress:
        modules = progress_bar(modules, desc="ΔW similarity", unit="module")
    for module in modules:
        idx = [i for i, a in enumerate(adapters) if module in a.weights]
        XA, XB, rows = _stack_rows(adapters, idx, module, device)
        inner = _block_inner(XA, XB, rows, block_rows)                 # [n_m, n_m] float64
        norm2 = inner.diagonal()
        valid = norm2 > 0
        cos = inner / (norm2.clamp_min(1e-300).sqrt()[:, None] * norm2.clamp_min(1e-300).sqrt()[None, :])
        pair = valid[:, None] & valid[None, :]
        if len(idx) == n:  # every adapter covers the module: no index (and no host→device copy)
            cos_sum += torch.where(pair, cos.clamp(-1, 1), 0.0)
            shared += pair.long()
            continue
        sel = torch.tensor(idx)
        sel = (sel.pin_memory() if device.type == "cuda" else sel).to(device, non_blocking=True)
        cos_sum[sel[:, None], sel[None, :]] += torch.where(pair, cos.clamp(-1, 1), 0.0)
        shared[sel[:, None], sel[None, :]] += pair.long()
    cos = torch.where(shared > 0, cos_sum / shared.clamp_min(1), float("nan"))
    return cos.cpu(), shared.cpu()


def _compute_dtype(dtypes: set, device: torch.device) -> torch.dtype:
    if torch.float64 in dtypes:
        return torch.float64
    if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} and device.type == "cuda":
        return dtypes.pop()  # tensor-core GEMM with a float32 output (_gram)
    return torch.float32


def _stack_rows(adapters: list[LoraAdapter], idx: list[int], module: str, device):
    """Rows of A [r, d_in] and of Bᵀ [r, d_out] of adapters `idx`, zero-padded to the largest rank r
    of the module so that pair blocks are equal-sized: XA [n, r, d_in], XB [n, r, d_out]."""
    first = adapters[idx[0]]
    d_in, d_out = first.weights[module][0].shape[1], first.weights[module][1].shape[0]
    for i in idx:
        A, B = adapters[i].weights[module]
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise BankError(f"adapter '{adapters[i].name}': module '{module}' is {A.shape[1]}→{B.shape[0]}, "
                            f"adapter '{first.name}' has {d_in}→{d_out}")
    dtype = _compute_dtype({t.dtype for i in idx for t in adapters[i].weights[module]}, device)
    ranks = [adapters[i].rank(module) for i in idx]
    r = max(ranks)
    if min(ranks) == r:  # the common case: one batched copy each, no per-adapter conversions
        pairs = [adapters[i].weights[module] for i in idx]
        XA = torch.stack([A for A, _ in pairs]).to(device=device, dtype=dtype)
        XB = torch.stack([B for _, B in pairs]).to(device=device, dtype=dtype).transpose(1, 2)
        return XA, XB.contiguous(), r
    XA = torch.zeros(len(idx), r, d_in, dtype=dtype, device=device)
    XB = torch.zeros(len(idx), r, d_out, dtype=dtype, device=device)
    for rank in sorted(set(ranks)):  # one batched copy per distinct rank
        pos = [k for k, rk in enumerate(ranks) if rk == rank]
        As = torch.stack([adapters[idx[k]].weights[module][0].to(dtype) for k in pos]).to(device)
        Bs = torch.stack([adapters[idx[k]].weights[module][1].to(dtype) for k in pos]).to(device)
        where = torch.tensor(pos, device=device)
        XA[where, :rank] = As
        XB[where, :rank] = Bs.transpose(1, 2)
    return XA, XB, r


def _gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X Yᵀ in float32 (or float64); half-precision inputs use tensor cores with a float32 output."""
    if X.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(X, Y.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype=): upcast instead
            return X.float() @ Y.float().T
    return X @ Y.T


def _block_inner(XA: torch.Tensor, XB: torch.Tensor, r: int, block_rows: int) -> torch.Tensor:
    """All pairwise <B_iA_i, B_jA_j>_F [n, n] float64, in blocks of adapters so Gram tiles stay
    ≤ block_rows² elements; only blocks on and above the diagonal are computed (symmetry)."""
    n = XA.shape[0]
    step = max(1, block_rows // r)
    starts = list(range(0, n, step))
    out = torch.empty(n, n, dtype=torch.float64, device=XA.device)
    flatA, flatB = XA.reshape(n * r, -1), XB.reshape(n * r, -1)
    for bi, i0 in enumerate(starts):
        i1 = min(i0 + step, n)
        for j0 in starts[bi:]:
            j1 = min(j0 + step, n)
            P = _gram(flatA[i0 * r:i1 * r], flatA[j0 * r:j1 * r])
            P *= _gram(flatB[i0 * r:i1 * r], flatB[j0 * r:j1 * r])
            # r² terms per pair: float32 sums, innermost (contiguous) dimension first
            block = P.view(i1 - i0, r, j1 - j0, r).sum(dim=3).sum(dim=1).double()
            out[i0:i1, j0:j1] = block
            out[j0:j1, i0:i1] = block.T
    return (out + out.T) / 2  # diagonal tiles are symmetric only up to GEMM rounding: make it exact


def group_similarity(bank: LoraBank, device=None, *, block_rows: int = 4096, progress: bool = False) -> torch.Tensor:
    """N×N mean per-module cosine similarity of the adapters' ΔW = s·B·A (float64, CPU).

    Computed with r×r traces (two Gram GEMMs per module, never a d_out×d_in matrix), on `device`
    (default: CUDA when available). Modules not shared by a pair are skipped; a pair sharing none
    gets NaN and a warning names it."""
    cos, shared = _similarity(bank, device, block_rows, progress)
    lonely = unshared_pairs(bank.names, shared)
    if lonely:
        shown = ", ".join(f"{a}/{b}" for a, b in lonely[:5])
        warnings.warn(f"group_similarity: {len(lonely)} adapter pair(s) share no (non-zero) module, "
                      f"similarity NaN: {shown}{' …' if len(lonely) > 5 else ''}", stacklevel=2)
    return cos

def unshared_pairs(names: list[str], shared: torch.Tensor) -> list[tuple[str, str]]:
    i, j = torch.triu_indices(len(names), len(names), offset=1)
    none = shared[i, j] == 0
    return [(names[a], names[b]) for a, b in zip(i[none].tolist(), j[none].tolist())]


def has_delta(adapter: LoraAdapter) -> bool:
    """Whether some module of the adapter has ΔW ≠ 0: ‖B·A‖²_F = tr((BᵀB)(AAᵀ)) > 0 (r×r work).
    An untrained adapter (B = 0) has none: its cosines are undefined."""
    for A, B in adapter.weights.values():
        a, b = A.double(), B.double()
        if float(((b.T @ b) * (a @ a.T)).sum()) > 0:
            return True
    return False
