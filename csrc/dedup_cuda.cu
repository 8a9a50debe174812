// CUDA near-duplicate filter: tensor-core similarity tiles (cuBLAS through at::mm) per row block,
// then a warp-per-row "any earlier neighbour above threshold" reduction over the lower triangle.
#include "dedup.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

__global__ void any_earlier_above(const float* __restrict__ sim, int64_t rows, int64_t cols,
                                  int64_t first_row, float thr, bool* __restrict__ dropped) {
  const int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int64_t p = first_row + r;  // global rank position of this row
  const float* row = sim + r * cols;
  bool hit = false;
  for (int64_t q = lane; q < p; q += 32) hit |= row[q] > thr;
  hit = __any_sync(0xffffffffu, hit);
  if (lane == 0) dropped[p] = hit;
}

}  // namespace

torch::Tensor dedup_sorted_cuda(const torch::Tensor& emb_in, double threshold, int64_t block) {
  TORCH_CHECK(emb_in.dim() == 2, "dedup: embeddings must be 2-D [n, d], got ", emb_in.dim(), "-D");
  TORCH_CHECK(block > 0, "dedup: block must be positive");
  const at::cuda::CUDAGuard guard(emb_in.device());
  auto emb = emb_in.contiguous();
  const int64_t n = emb.size(0);
  auto dropped = torch::zeros({n}, emb.options().dtype(torch::kBool));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < n; s += block) {
    const int64_t e = std::min(n, s + block);
    auto sim = torch::mm(emb.slice(0, s, e), emb.slice(0, 0, e).t()).to(torch::kFloat32).contiguous();
    const int64_t rows = e - s;
    const int warps = 8;
    const dim3 grid((rows + warps - 1) / warps);
    any_earlier_above<<<grid, warps * 32, 0, stream>>>(sim.data_ptr<float>(), rows, e, s,
                                                     static_cast<float>(threshold),
                                                     dropped.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dropped;
}
