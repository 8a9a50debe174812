// CPU near-duplicate codes: float32 BLAS similarity tiles over the lower triangle only, each
// reduced at once, so memory stays block² floats a thread. One OpenMP region over row blocks
// (largest first, dynamic), each thread running single-threaded sgemm on its own tiles: no
// barrier per tile, which matters on few and busy cores.
#include "dedup.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>

torch::Tensor dedup_codes_cpu(const torch::Tensor& emb_in, double lo_d, double hi_d, int64_t block) {
  TORCH_CHECK(emb_in.dim() == 2, "dedup: embeddings must be 2-D [n, d], got ", emb_in.dim(), "-D");
  TORCH_CHECK(block > 0, "dedup: block must be positive");
  TORCH_CHECK(lo_d <= hi_d, "dedup: band lo must not exceed hi");
  auto emb = emb_in.to(torch::kFloat32).contiguous();
  const int64_t n = emb.size(0);
  auto codes = torch::zeros({n}, torch::dtype(torch::kInt8));
  int8_t* out = codes.data_ptr<int8_t>();
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const int64_t blocks = (n + block - 1) / block;
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t b = blocks - 1; b >= 0; --b) {  // the last row blocks have the most columns
    at::NoGradGuard no_grad;
    const int64_t s = b * block, e = std::min(n, s + block);
    auto rows = emb.slice(0, s, e);
    auto sim = torch::empty({e - s, std::min(block, e)}, emb.options());
    // Columns [0, e) are the only ones that can outrank rows [s, e); stop once every row of the
    // block is certainly dropped.
    for (int64_t c = 0; c < e; c += block) {
      if (std::all_of(out + s, out + e, [](int8_t v) { return v == 2; })) break;
      const int64_t ce = std::min(e, c + block), width = ce - c;
      auto tile = sim.narrow(1, 0, width);
      at::mm_out(tile, rows, emb.slice(0, c, ce).t());  // single-threaded inside the parallel region
      const float* S = tile.data_ptr<float>();
      const int64_t ld = tile.stride(0);
      for (int64_t p = s; p < e; ++p) {
        if (out[p] == 2) continue;
        const float* row = S + (p - s) * ld;
        const int64_t stop = std::min(p, ce) - c;  // only q < p
        int8_t code = out[p];
        for (int64_t q = 0; q < stop; ++q) {
          const float v = row[q];
          if (v > hi) { code = 2; break; }
          if (v > lo) code = 1;
        }
        out[p] = code;
      }
    }
  }
  return codes;
}
