// Python bindings of rocket._C.
#include <torch/extension.h>

#include "dedup.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rocket C++/CUDA operators";
  m.def("dedup_sorted_cpu", &dedup_sorted_cpu, "near-duplicate flags of rank-sorted embeddings (CPU)",
        py::arg("emb"), py::arg("threshold"), py::arg("block") = 2048);
#ifdef ROCKET_WITH_CUDA
  m.def("dedup_sorted_cuda", &dedup_sorted_cuda, "near-duplicate flags of rank-sorted embeddings (CUDA)",
        py::arg("emb"), py::arg("threshold"), py::arg("block") = 8192);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
