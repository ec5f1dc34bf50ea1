// pybind11 binding of the raw kernels as alignkit._C. Tensors cross as integer addresses
// (tensor.data_ptr()) plus sizes and strides, so the build needs neither torch nor its headers:
// `pip install .` never pulls a torch (let alone a CUDA one) into the isolated build environment.
// Validation (dtype, contiguity, shapes, devices) is the Python launcher's job.
#include <pybind11/pybind11.h>

#include "logprob_kernels.h"

namespace py = pybind11;
using alignkit::isa;

namespace {
template <class T>
T* ptr(uintptr_t a) { return reinterpret_cast<T*>(a); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignkit fused CPU kernels (raw buffers; see csrc/logprob_kernels.h)";
  // One argument order for both: pointers (data, then per-row vectors), sizes, strides, the
  // column offset, flags and scalars.
  m.def(
      "fold",
      [](uintptr_t tile, uintptr_t targets, uintptr_t m_, uintptr_t s, uintptr_t a, uintptr_t tgt,
         int64_t rows, int64_t cols, int64_t ld, int64_t col0, bool bf16, float inv_temp,
         float softcap, int nthreads) {
        py::gil_scoped_release nogil;
        if (bf16)
          alignkit::fold_bf16(ptr<const uint16_t>(tile), rows, cols, ld, ptr<const int64_t>(targets),
                              col0, ptr<float>(m_), ptr<float>(s), ptr<float>(a), ptr<float>(tgt),
                              inv_temp, softcap, nthreads);
        else
          alignkit::fold_f32(ptr<const float>(tile), rows, cols, ld, ptr<const int64_t>(targets), col0,
                             ptr<float>(m_), ptr<float>(s), ptr<float>(a), ptr<float>(tgt), inv_temp,
                             softcap, nthreads);
      },
      py::arg("tile"), py::arg("targets"), py::arg("m"), py::arg("s"), py::arg("a"), py::arg("tgt"),
      py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("col0"), py::arg("bf16"),
      py::arg("inv_temp"), py::arg("softcap"), py::arg("nthreads"));
  m.def(
      "grad",
      [](uintptr_t tile, uintptr_t out, uintptr_t targets, uintptr_t m_, uintptr_t logs,
         uintptr_t g_lp, uintptr_t ent, uintptr_t g_ent, int64_t rows, int64_t cols, int64_t ld,
         int64_t ld_out, int64_t col0, bool bf16, float inv_temp, float softcap, int nthreads) {
        py::gil_scoped_release nogil;
        if (bf16) {
          alignkit::grad_bf16(ptr<const uint16_t>(tile), ld, ptr<float>(out), ld_out, rows, cols,
                              ptr<const int64_t>(targets), col0, ptr<const float>(m_),
                              ptr<const float>(logs),
                              ptr<const float>(g_lp), ptr<const float>(ent), ptr<const float>(g_ent),
                              inv_temp, softcap, nthreads);
        } else {
          if (out != tile) throw std::invalid_argument("fp32 grad runs in place: out must equal tile");
          alignkit::grad_in_place_f32(ptr<float>(tile), rows, cols, ld, ptr<const int64_t>(targets), col0,
                                      ptr<const float>(m_), ptr<const float>(logs), ptr<const float>(g_lp),
                                      ptr<const float>(ent), ptr<const float>(g_ent), inv_temp,
                                      softcap, nthreads);
        }
      },
      py::arg("tile"), py::arg("out"), py::arg("targets"), py::arg("m"), py::arg("logs"),
      py::arg("g_lp"), py::arg("ent"), py::arg("g_ent"), py::arg("rows"), py::arg("cols"),
      py::arg("ld"), py::arg("ld_out"), py::arg("col0"), py::arg("bf16"), py::arg("inv_temp"),
      py::arg("softcap"), py::arg("nthreads"));
  m.def("isa", &isa, "instruction set picked at load time: avx512, avx2 or scalar");
}
