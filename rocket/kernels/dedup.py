"""Fused near-duplicate join (the rule of docs/design.md) as one Triton kernel: tiles of E·Eᵀ on the tensor
cores with the threshold test and the per-row "any earlier neighbour above τ" reduction in the
epilogue. The n×n similarity matrix never exists; each tile ends in one atomic max per row.

Rows arrive in rank order (row 0 outranks all), so only tiles on or below the diagonal are
computed (~n²/2 work). Tiles are BM×BN with BN = R·BM; a "super-row" is BN rows (R row tiles)
and needs the column tiles 0..I. Programs are numbered group by group (GS super-rows a group),
column tile outer, row tile inner, so the programs resident at one time share column tiles in L2.

Each row ends with a code: 0 = every computed sim ≤ lo, 1 = some sim in (lo, hi] and none above,
2 = some sim > hi. With lo = τ − δ, hi = τ + δ and δ a bound on the computation's rounding error,
0 and 2 are certain; rows with code 1 are re-decided in float64 by the caller (rocket.dedup).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile configuration for Hopper (wgmma): 128×256 tiles, K step 64, 8 warps. Tuned on the device.
CONFIG = dict(BM=128, BN=256, BK=64, GS=8, num_warps=8, num_stages=3)
# The interpreter miscomputes tl.dot on 16-bit operands (see rocket/kernels/multi_lora.py): there the dots
# run on the same values upcast to float32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tri_inv(x):
    """Largest m with m(m+1)/2 <= x (x an int64 scalar), by float estimate plus one correction."""
    m = ((tl.sqrt((8 * x + 1).to(tl.float32)) - 1) * 0.5).to(tl.int64)
    m = tl.where((m + 1) * (m + 2) // 2 <= x, m + 1, m)
    m = tl.where(m * (m + 1) // 2 > x, m - 1, m)
    return m


@triton.jit
def _tile_of(t, n_super, R: tl.constexpr, GS: tl.constexpr):
    """(row tile i, column tile j) of program t: groups of GS super-rows, contiguous in t as the
    super-rows are; inside a group, column tile outer, row tile inner."""
    s0 = (_tri_inv(t // R) // GS) * GS
    gs = tl.minimum(n_super - s0, GS)
    u = t - R * (s0 * (s0 + 1) // 2)
    full = s0 * gs * R  # tiles left of the group's diagonal block: gs·R row tiles per column
    v = tl.maximum(u - full, 0)
    ip = _tri_inv(v // R)  # diagonal block: local super-row ip, then column, then row tile
    w = v - R * (ip * (ip + 1) // 2)
    i = tl.where(u < full, s0 * R + u % (gs * R), (s0 + ip) * R + w % R)
    j = tl.where(u < full, u // (gs * R), s0 + w // R)
    return i, j


@triton.jit
def _row_codes(acc, rows, cols, n, lo, hi, codes):
    """Epilogue: threshold the tile, keep earlier columns only, one atomic max per flagged row."""
    earlier = (cols[None, :] < rows[:, None]) & (rows[:, None] < n)
    code = tl.where(acc > hi, 2, tl.where(acc > lo, 1, 0))
    row_code = tl.max(tl.where(earlier, code, 0), axis=1)
    tl.atomic_max(codes + rows, row_code, mask=row_code > 0)


@triton.jit
def _dedup_tiles(E, codes, n, stride, n_super, lo, hi,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 R: tl.constexpr, GS: tl.constexpr, DOT_F32: tl.constexpr):
    i, j = _tile_of(tl.program_id(0).to(tl.int64), n_super, R, GS)
    row0 = i * BM
    if row0 < n:
        rows = row0 + tl.arange(0, BM)
        cols = j * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        a_ptrs = E + rows[:, None] * stride + kk[None, :]
        b_ptrs = E + cols[None, :] * stride + kk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, D, BK):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK
        _row_codes(acc, rows, cols, n, lo, hi, codes)


@triton.jit
def _dedup_tiles_tma(a_desc, b_desc, codes, n, n_super, lo, hi,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     R: tl.constexpr, GS: tl.constexpr):
    """The same join with tiles brought in by the tensor-memory accelerator (Hopper TMA)."""
    i, j = _tile_of(tl.program_id(0).to(tl.int64), n_super, R, GS)
    row0 = (i * BM).to(tl.int32)
    col0 = (j * BN).to(tl.int32)
    if row0 < n:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, D, BK):
            a = a_desc.load([row0, k])
            b = b_desc.load([col0, k])
            acc = tl.dot(a, b.T, acc)
        _row_codes(acc, row0 + tl.arange(0, BM), col0 + tl.arange(0, BN), n, lo, hi, codes)


def padded_rows(n: int, config: dict = CONFIG) -> int:
    """Rows the kernel reads: n rounded up to a whole column tile (pad rows are never flagged)."""
    return triton.cdiv(max(n, 1), config["BN"]) * config["BN"]


def dedup_codes(emb: torch.Tensor, n: int, lo: float, hi: float, config: dict = CONFIG) -> torch.Tensor:
    """Row codes (int32 [n], see module doc) of rank-sorted rows emb[:n].

    emb: [padded_rows(n), D] float16/bfloat16/float32, contiguous, D a multiple of BK, rows past n
    zero (callers build it with `pad_for_kernel`).
    """
    BM, BN, BK = config["BM"], config["BN"], config["BK"]
    assert BN % BM == 0 and emb.is_contiguous() and emb.shape[1] % BK == 0 and emb.shape[0] % BN == 0
    codes = torch.zeros(emb.shape[0], dtype=torch.int32, device=emb.device)
    if n == 0:
        return codes[:0]
    R, n_super = BN // BM, triton.cdiv(n, BN)
    grid = (R * n_super * (n_super + 1) // 2,)
    common = dict(D=emb.shape[1], BM=BM, BN=BN, BK=BK, R=R, GS=config["GS"], num_warps=config["num_warps"],
                  num_stages=config["num_stages"])
    if config.get("TMA") and emb.is_cuda and emb.dtype != torch.float32:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc = TensorDescriptor.from_tensor(emb, [BM, BK])
        b_desc = TensorDescriptor.from_tensor(emb, [BN, BK])
        _dedup_tiles_tma[grid](a_desc, b_desc, codes, n, n_super, float(lo), float(hi), **common)
    else:
        _dedup_tiles[grid](emb, codes, n, emb.stride(0), n_super, float(lo), float(hi),
                           DOT_F32=_INTERPRET or emb.dtype == torch.float32, **common)
    return codes[:n]


def pad_for_kernel(ranked: torch.Tensor, dtype: torch.dtype, config: dict = CONFIG) -> torch.Tensor:
    """ranked [n, d] as a zero-padded contiguous [padded_rows(n), ceil(d / BK)·BK] tensor of dtype."""
    n, d = ranked.shape
    out = torch.zeros(padded_rows(n, config), triton.cdiv(d, config["BK"]) * config["BK"], dtype=dtype,
                      device=ranked.device)
    out[:n, :d] = ranked
    return out
