// The torch binding of proper_kernels._C. CPU kernels always; CUDA kernels only when the extension is built
// against a CUDA torch (setup.py defines PROPER_WITH_CUDA), so a CPU wheel never needs the CUDA headers.
#include <torch/extension.h>

void register_cpu(pybind11::module& m);   // csrc/cpu/
#ifdef PROPER_WITH_CUDA
void register_cuda(pybind11::module& m);  // csrc/cuda_binding.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "proper_kernels compiled kernels: routed multi-LoRA forward and backward";
  register_cpu(m);
#ifdef PROPER_WITH_CUDA
  register_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
