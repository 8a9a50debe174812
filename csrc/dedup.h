// Exact near-duplicate removal (SemDeDup rule, DESIGN.md §3): the similarity join of rank-sorted
// rows, reduced per row to a certainty code (see rocket/dedup.py for how codes are used).
#pragma once
#include <torch/extension.h>

// Items are given in rank order (position 0 outranks all). For each row p, over q < p:
//   code[p] = 2 if some <emb[p], emb[q]> > hi, else 1 if some > lo, else 0   (int8 [n]).
// With lo = τ − δ and hi = τ + δ, δ bounding the float32 rounding error, codes 0 and 2 decide the
// rule exactly and code 1 marks the few rows the caller re-decides in float64.
// CPU: emb [n, d] any float dtype, computed as float32 (BLAS tiles of block × block).
torch::Tensor dedup_codes_cpu(const torch::Tensor& emb, double lo, double hi, int64_t block);
#ifdef ROCKET_WITH_CUDA
// CUDA, the unfused comparison path: cuBLAS tiles (at::mm in the input dtype, so bf16/fp16 sims are
// rounded to that dtype: callers widen δ accordingly) and a warp-per-row reduction kernel.
torch::Tensor dedup_codes_cuda(const torch::Tensor& emb, double lo, double hi, int64_t block);
#endif
