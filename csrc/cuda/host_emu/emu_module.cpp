// Python module of the host-emulated CUDA backend (tests only): the real csrc/cuda_binding.cpp, compiled with
// PROPER_CUDA_EMULATE against CPU tensors, over the real kernels compiled as C++ (see cuda_emu.h).
#include <torch/extension.h>

void register_cuda(pybind11::module& m);  // csrc/cuda_binding.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "proper_kernels CUDA kernels on the host emulator (tests only)";
  register_cuda(m);
  m.attr("emulated") = true;
}
