// Exact near-duplicate removal (SemDeDup rule, DESIGN.md §3).
#pragma once
#include <torch/extension.h>

// Items are given in rank order (position 0 outranks all). dropped[p] = exists q < p with
// <emb[p], emb[q]> > threshold. emb: [n, d] float32 (CPU) or float16/bfloat16/float32 (CUDA).
torch::Tensor dedup_sorted_cpu(const torch::Tensor& emb, double threshold, int64_t block);
#ifdef ROCKET_WITH_CUDA
torch::Tensor dedup_sorted_cuda(const torch::Tensor& emb, double threshold, int64_t block);
#endif
