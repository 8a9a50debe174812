// CPU near-duplicate filter: blocked BLAS similarity, then a multithreaded triangular scan.
#include "dedup.h"

#include <omp.h>

torch::Tensor dedup_sorted_cpu(const torch::Tensor& emb_in, double threshold, int64_t block) {
  TORCH_CHECK(emb_in.dim() == 2, "dedup: embeddings must be 2-D [n, d], got ", emb_in.dim(), "-D");
  TORCH_CHECK(block > 0, "dedup: block must be positive");
  auto emb = emb_in.to(torch::kFloat32).contiguous();
  const int64_t n = emb.size(0);
  auto dropped = torch::zeros({n}, torch::dtype(torch::kBool));
  bool* out = dropped.data_ptr<bool>();
  const float thr = static_cast<float>(threshold);
  for (int64_t s = 0; s < n; s += block) {
    const int64_t e = std::min(n, s + block);
    // Only columns [0, e) can outrank rows [s, e): the upper triangle is never computed.
    auto sim = torch::mm(emb.slice(0, s, e), emb.slice(0, 0, e).t()).contiguous();
    const float* S = sim.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t p = s; p < e; ++p) {
      const float* row = S + (p - s) * e;
      bool hit = false;
      for (int64_t q = 0; q < p && !hit; ++q) hit = row[q] > thr;
      out[p] = hit;
    }
  }
  return dropped;
}
