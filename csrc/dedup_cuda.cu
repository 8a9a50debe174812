// CUDA near-duplicate codes, the unfused comparison path (rocket's default is the fused Triton
// kernel in kernels/dedup.py): cuBLAS similarity tiles per row block (at::mm on the tensor cores,
// lower triangle only), then a warp-per-row reduction to codes. Each tile makes a round trip
// through device memory, which is what the fused kernel avoids.
#include "dedup.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

template <typename T>
__global__ void row_codes(const T* __restrict__ sim, int64_t rows, int64_t cols, int64_t first_row,
                          float lo, float hi, int8_t* __restrict__ codes) {
  const int64_t r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int64_t p = first_row + r;  // global rank position of this row
  const T* row = sim + r * cols;
  int code = 0;
  for (int64_t q = lane; q < p; q += 32) {
    const float v = static_cast<float>(row[q]);
    code = max(code, v > hi ? 2 : (v > lo ? 1 : 0));
  }
  for (int off = 16; off > 0; off /= 2) code = max(code, __shfl_xor_sync(0xffffffffu, code, off));
  if (lane == 0) codes[p] = static_cast<int8_t>(code);
}

}  // namespace

torch::Tensor dedup_codes_cuda(const torch::Tensor& emb_in, double lo, double hi, int64_t block) {
  TORCH_CHECK(emb_in.dim() == 2, "dedup: embeddings must be 2-D [n, d], got ", emb_in.dim(), "-D");
  TORCH_CHECK(block > 0, "dedup: block must be positive");
  const at::cuda::CUDAGuard guard(emb_in.device());
  auto emb = emb_in.contiguous();
  const int64_t n = emb.size(0);
  auto codes = torch::zeros({n}, emb.options().dtype(torch::kInt8));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < n; s += block) {
    const int64_t e = std::min(n, s + block);
    auto sim = torch::mm(emb.slice(0, s, e), emb.slice(0, 0, e).t()).contiguous();
    const int64_t rows = e - s;
    const int warps = 8;
    const dim3 grid((rows + warps - 1) / warps);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sim.scalar_type(), "row_codes", [&] {
      row_codes<scalar_t><<<grid, warps * 32, 0, stream>>>(sim.data_ptr<scalar_t>(), rows, e, s,
                                                            static_cast<float>(lo), static_cast<float>(hi),
                                                            codes.data_ptr<int8_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return codes;
}
