"""Multi-adapter LoRA (SGMV style): rows of a batch carry an adapter id, and one launch adds
`s_m · B_m A_m x` to every row of every adapter segment.

Rows are grouped into contiguous segments of one adapter (the caller sorts them); a tile table
splits each segment into BLOCK_M-row tiles, so every program works on one adapter only. A program
computes its tile's shrink `h = x A_mᵀ` ([BLOCK_M, r], float32) once, scales it, and then streams
the expand `y += h B_mᵀ` over its share of the output columns: x is read once, y once read and
written in place, and the r-wide intermediate never leaves registers.

For prefill passes of few adapters, `multi_lora_blocks` runs the shrink alone into one
[T, adapters · r] operand, so that the expand is one cuBLAS GEMM and the base GEMM adds onto its
result (rocket.runtime.adapters.MultiLoraLinear picks per pass).

Forward only (scoring and generation run without gradients). The reference is
`rocket.kernels.reference.multi_lora`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rocket.kernels import use_triton
from rocket.kernels import reference

BLOCK_M = 64
# Triton's interpreter miscomputes tl.dot on bfloat16 operands: there (CPU tests only) the dots run
# on the same bf16 values upcast to float32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _shrink(x_ptr, a_ptr, s_ptr, adapter, rows, row_ok, rr, r_ok, d_in, sxm, sxk, sam, sar, sak,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
            DOT_F32: tl.constexpr):
    """s_m · x_tile A_mᵀ ([BLOCK_M, BLOCK_R], float32 accumulation), rounded to x's dtype as peft does."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < d_in
        xt = tl.load(x_ptr + rows[:, None] * sxm + kk[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + adapter * sam + rr[None, :] * sar + kk[:, None] * sak,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_F32:
            h = tl.dot(xt.to(tl.float32), at.to(tl.float32), h, input_precision="ieee")
        elif IEEE:
            h = tl.dot(xt, at, h, input_precision="ieee")
        else:
            h = tl.dot(xt, at, h)
    scale = tl.load(s_ptr + adapter).to(tl.float32)
    return (h * scale).to(x_ptr.dtype.element_ty)


@triton.jit
def _tile_shrink(x_ptr, a_ptr, s_ptr, tiles_ptr, n_tiles, d_in, rank, sxm, sxk, sam, sar, sak,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """This program's tile (adapter, rows, row mask, rank columns, their mask) and its shrink."""
    t = tl.program_id(0)
    adapter = tl.load(tiles_ptr + t).to(tl.int64)
    start = tl.load(tiles_ptr + n_tiles + t)
    end = tl.load(tiles_ptr + 2 * n_tiles + t)
    rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < end
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    h = _shrink(x_ptr, a_ptr, s_ptr, adapter, rows, row_ok, rr, r_ok, d_in, sxm, sxk, sam, sar, sak,
                BLOCK_M, BLOCK_K, BLOCK_R, IEEE, DOT_F32)
    return adapter, rows, row_ok, rr, r_ok, h


@triton.jit
def _sgmv_shrink_expand(x_ptr, y_ptr, a_ptr, b_ptr, s_ptr, tiles_ptr, n_tiles, d_in, d_out, rank, cols_per_prog,
                        sxm, sxk, sym, syn, sam, sar, sak, sbm, sbn, sbr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    adapter, rows, row_ok, rr, r_ok, h = _tile_shrink(x_ptr, a_ptr, s_ptr, tiles_ptr, n_tiles, d_in, rank, sxm, sxk,
                                                      sam, sar, sak, BLOCK_M, BLOCK_K, BLOCK_R, IEEE, DOT_F32)

    # expand into y, in place, over this program's column range
    col0 = tl.program_id(1) * cols_per_prog
    for n0 in range(col0, tl.minimum(col0 + cols_per_prog, d_out), BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < d_out
        bt = tl.load(b_ptr + adapter * sbm + nn[None, :] * sbn + rr[:, None] * sbr,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            d = tl.dot(h.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
        elif IEEE:
            d = tl.dot(h, bt, input_precision="ieee")
        else:
            d = tl.dot(h, bt)
        y_ptrs = y_ptr + rows[:, None] * sym + nn[None, :] * syn
        y_mask = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + d).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sgmv_shrink_blocks(x_ptr, h_ptr, a_ptr, s_ptr, tiles_ptr, block_ptr, n_tiles, d_in, rank,
                        sxm, sxk, shm, shn, sam, sar, sak,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                        DOT_F32: tl.constexpr):
    adapter, rows, row_ok, rr, r_ok, h = _tile_shrink(x_ptr, a_ptr, s_ptr, tiles_ptr, n_tiles, d_in, rank, sxm, sxk,
                                                      sam, sar, sak, BLOCK_M, BLOCK_K, BLOCK_R, IEEE, DOT_F32)
    cols = tl.load(block_ptr + adapter).to(tl.int64) * rank + rr
    tl.store(h_ptr + rows[:, None] * shm + cols[None, :] * shn, h, mask=row_ok[:, None] & r_ok[None, :])


def segment_tiles(row_adapters, tokens_per_row=1, device=None, block_m: int = BLOCK_M) -> torch.Tensor:
    """Tile table [3, n_tiles] int32 (adapter, first token, end token) for rows whose adapter ids are
    grouped in contiguous runs; row i spans `tokens_per_row` consecutive tokens (an int for all rows, or
    one length per row for packed rows). Rows with id < 0 get no tile (no delta)."""
    ids = [int(a) for a in (row_adapters.tolist() if torch.is_tensor(row_adapters) else row_adapters)]
    if isinstance(tokens_per_row, int):
        lengths = [tokens_per_row] * len(ids)
    else:
        lengths = [int(n) for n in tokens_per_row]
        if len(lengths) != len(ids):
            raise ValueError(f"segment_tiles: {len(ids)} rows but {len(lengths)} row lengths")
    adapters, starts, ends = [], [], []
    i = tok = 0
    while i < len(ids):
        j, seg_start = i, tok
        while j < len(ids) and ids[j] == ids[i]:
            tok += lengths[j]
            j += 1
        if ids[i] >= 0:
            for s in range(seg_start, tok, block_m):
                adapters.append(ids[i])
                starts.append(s)
                ends.append(min(s + block_m, tok))
        i = j
    return torch.tensor([adapters, starts, ends], dtype=torch.int32).reshape(3, -1).to(device)


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    scaling: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """y[rows] += s_m · B_m A_m x[rows] for every tile of `tiles` (see segment_tiles), in place.

    x: [T, d_in]; y: [T, d_out] (any float dtype, e.g. the base layer's output); lora_A: [M, r, d_in];
    lora_B: [M, d_out, r] (x's dtype); scaling: [M] float32.
    """
    T, d_in = x.shape
    M, rank, _ = lora_A.shape
    d_out = lora_B.shape[1]
    if y.shape != (T, d_out) or lora_A.shape[2] != d_in or lora_B.shape != (M, d_out, rank):
        raise ValueError(f"multi_lora_add_: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(lora_A.shape)}, "
                         f"B {tuple(lora_B.shape)} do not compose")
    n_tiles = tiles.shape[1]
    if n_tiles == 0 or T == 0:
        return y
    tiles = tiles.contiguous()
    block_n = 128 if d_out >= 128 else max(16, triton.next_power_of_2(d_out))
    # enough programs to fill the GPU when tiles are few (decode), one column pass otherwise
    n_col_blocks = triton.cdiv(d_out, block_n)
    splits = max(1, min(n_col_blocks, triton.cdiv(264, n_tiles)))
    cols_per_prog = triton.cdiv(n_col_blocks, splits) * block_n
    splits = triton.cdiv(d_out, cols_per_prog)
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = 64 if d_in >= 64 else max(16, triton.next_power_of_2(d_in))
    _sgmv_shrink_expand[(n_tiles, splits)](
        x, y, lora_A, lora_B, scaling, tiles, n_tiles, d_in, d_out, rank, cols_per_prog,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r,
        IEEE=x.dtype == torch.float32, DOT_F32=_INTERPRET and x.dtype == torch.bfloat16, num_warps=4)
    return y


def multi_lora_blocks(x: torch.Tensor, lora_A: torch.Tensor, scaling: torch.Tensor, tiles: torch.Tensor,
                      block_of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The shrink alone, laid out for one GEMM: h [T, n_blocks · r] in x's dtype, where row i holds
    s_m · A_m x_i (rounded) in columns block_of[m] · r … + r of its adapter m and zeros elsewhere
    (rows without a tile: zeros). Then `h @ B_blocksᵀ`, B_blocks [d_out, n_blocks · r] the adapters'
    B side by side, is the multi-adapter delta, and a base GEMM can add x Wᵀ onto it in place:
    x is read once here and y is never read back and rewritten (multi_lora_add_ does both).

    tiles: segment_tiles' table; block_of: int32 by adapter id, each tiled adapter's block (the
    entries of other adapters are not read)."""
    T, d_in = x.shape
    rank = lora_A.shape[1]
    if lora_A.shape[2] != d_in or block_of.dim() != 1:
        raise ValueError(f"multi_lora_blocks: x {tuple(x.shape)}, A {tuple(lora_A.shape)}, block_of "
                         f"{tuple(block_of.shape)} do not compose")
    h = torch.zeros(T, n_blocks * rank, device=x.device, dtype=x.dtype)
    n_tiles = tiles.shape[1]
    if n_tiles == 0 or T == 0:
        return h
    block_k = 64 if d_in >= 64 else max(16, triton.next_power_of_2(d_in))
    _sgmv_shrink_blocks[(n_tiles,)](
        x, h, lora_A, scaling, tiles.contiguous(), block_of.contiguous(), n_tiles, d_in, rank,
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        BLOCK_M=BLOCK_M, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        IEEE=x.dtype == torch.float32, DOT_F32=_INTERPRET and x.dtype == torch.bfloat16, num_warps=4)
    return h


def multi_lora(x, lora_A, lora_B, scaling, adapter_ids) -> torch.Tensor:
    """Same contract as reference.multi_lora: float32 delta [N, d_out], ids in any order, -1 = none."""
    if not use_triton(x, lora_A, lora_B):
        return reference.multi_lora(x, lora_A, lora_B, scaling, adapter_ids)
    ids = adapter_ids.long()
    order = torch.argsort(ids, stable=True)
    xs = x[order].contiguous()
    out = torch.zeros(x.shape[0], lora_B.shape[1], dtype=torch.float32, device=x.device)
    tiles = segment_tiles(ids[order].cpu(), 1, x.device)
    multi_lora_add_(out, xs, lora_A.to(x.dtype).contiguous(), lora_B.to(x.dtype).contiguous(),
                    scaling.to(device=x.device, dtype=torch.float32), tiles)
    return torch.empty_like(out).index_copy_(0, order, out)


@triton.jit
def _merge(w0_ptr, a_ptr, b_ptr, out_ptr, d_out, d_in, rank, scale,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    row_ok, col_ok, r_ok = rows < d_out, cols < d_in, rr < rank
    b = tl.load(b_ptr + rows[:, None] * rank + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(a_ptr + rr[:, None] * d_in + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if IEEE:
        d = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    else:
        d = tl.dot(b, a)
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w0_ptr + rows[:, None] * d_in + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * d_in + cols[None, :], (w + scale * d).to(out_ptr.dtype.element_ty), mask=mask)


def lora_merge(out: torch.Tensor, base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """out = base + scaling · B A (float32 accumulation, one rounding), written in place into `out`.
    base/out: [d_out, d_in]; lora_A: [r, d_in]; lora_B: [d_out, r]; all contiguous, one dtype."""
    if not use_triton(out, base):
        return out.copy_(reference.lora_merge(base, lora_A, lora_B, scaling))
    d_out, d_in = base.shape
    rank = lora_A.shape[0]
    if out.shape != base.shape or lora_A.shape != (rank, d_in) or lora_B.shape != (d_out, rank) \
            or not all(t.is_contiguous() for t in (out, base, lora_A, lora_B)):
        raise ValueError(f"lora_merge: W {tuple(base.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} "
                         "must compose and be contiguous")
    grid = (triton.cdiv(d_out, 128), triton.cdiv(d_in, 128))
    _merge[grid](base, lora_A, lora_B, out, d_out, d_in, rank, float(scaling), BLOCK_M=128, BLOCK_N=128,
                 BLOCK_R=max(16, triton.next_power_of_2(rank)), IEEE=base.dtype == torch.float32 or _INTERPRET,
                 num_warps=8)
    return out
