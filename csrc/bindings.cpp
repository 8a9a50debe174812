// Python bindings of rocket._C.
#include <torch/extension.h>

#include "dedup.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rocket C++/CUDA operators";
  m.def("dedup_codes_cpu", &dedup_codes_cpu, "near-duplicate row codes of rank-sorted embeddings (CPU)",
        py::arg("emb"), py::arg("lo"), py::arg("hi"), py::arg("block") = 2048);
#ifdef ROCKET_WITH_CUDA
  m.def("dedup_codes_cuda", &dedup_codes_cuda, "near-duplicate row codes of rank-sorted embeddings (CUDA)",
        py::arg("emb"), py::arg("lo"), py::arg("hi"), py::arg("block") = 8192);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
