// Torch binding of the CUDA kernels (csrc/cuda/routed_lora.cuh): cuda_forward / cuda_backward on tensors.
// Compiled only when the extension is built against a CUDA torch (setup.py defines PROPER_WITH_CUDA); the
// tests also compile it against CPU tensors with PROPER_CUDA_EMULATE (csrc/cuda/host_emu), where it runs the
// same launchers on the host emulator.
//
// proper_kernels/cuda.py prepares every argument (contiguous, fp32 gates / scales / weights, int32 ids, ranks
// and layout tables built on the device); the checks here only guard those internal invariants.
#include <torch/extension.h>

#ifndef PROPER_CUDA_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>   // c10::cuda::getCurrentCUDAStream (what at::cuda::getCurrentCUDAStream is)
#endif

#include <optional>
#include <vector>

#include "cuda/routed_lora.cuh"

namespace {

using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

proper_cuda::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return proper_cuda::DType::kFloat32;
    case at::kHalf: return proper_cuda::DType::kFloat16;
    case at::kBFloat16: return proper_cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "proper cuda kernels: unsupported dtype ", x.scalar_type());
  }
}

void check(const at::Tensor& t, const at::Tensor& x, at::ScalarType st, int64_t dim, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "proper cuda kernels: ", name, " must be on ", x.device());
  TORCH_CHECK(t.scalar_type() == st, "proper cuda kernels: ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "proper cuda kernels: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "proper cuda kernels: ", name, " must be contiguous");
}

// Data pointer of an optional tensor after checking it (nullptr when absent).
template <typename T>
const T* ptr(const OptTensor& t, const at::Tensor& x, at::ScalarType st, int64_t dim, const char* name) {
  if (!given(t)) return nullptr;
  check(*t, x, st, dim, name);
  return static_cast<const T*>(t->data_ptr());
}

struct Call {
  proper_cuda::Problem pr;
  proper_cuda::Layout lay;
};

Call make_call(const at::Tensor& x, const OptTensor& expert_a, const OptTensor& expert_b, const OptTensor& gates,
               const OptTensor& user_a, const OptTensor& user_b, const OptTensor& user_ids,
               const OptTensor& user_ranks, double expert_scale, const OptTensor& user_scale,
               const OptTensor& user_weight, const OptTensor& order, const OptTensor& blk_user,
               const OptTensor& blk_start, const OptTensor& blk_end, const OptTensor& red_user,
               const OptTensor& red_start, const OptTensor& red_end) {
  Call c;
  proper_cuda::Problem& pr = c.pr;
  proper_cuda::Layout& lay = c.lay;
  pr.dtype = dtype_of(x);
  const at::ScalarType dt = x.scalar_type();
  check(x, x, dt, 2, "x");
  pr.T = x.size(0);
  pr.d_in = x.size(1);
  pr.x = x.data_ptr();
  pr.expert_scale = static_cast<float>(expert_scale);
  TORCH_CHECK(given(expert_a) == given(expert_b) && given(expert_a) == given(gates),
              "proper cuda kernels: expert_a, expert_b and gates go together");
  TORCH_CHECK(given(user_a) == given(user_b) && given(user_a) == given(user_ids),
              "proper cuda kernels: user_a, user_b and user_ids go together");
  if (given(expert_a)) {
    pr.expert_a = ptr<void>(expert_a, x, dt, 3, "expert_a");
    pr.expert_b = ptr<void>(expert_b, x, dt, 3, "expert_b");
    pr.gates = ptr<float>(gates, x, at::kFloat, 2, "gates");
    pr.K = expert_a->size(0);
    pr.r_e = expert_a->size(1);
    pr.d_out = expert_b->size(1);
    TORCH_CHECK(expert_a->size(2) == pr.d_in && expert_b->size(0) == pr.K && expert_b->size(2) == pr.r_e &&
                    gates->size(0) == pr.T && gates->size(1) == pr.K,
                "proper cuda kernels: inconsistent expert shapes");
  }
  if (given(user_a)) {
    pr.user_a = ptr<void>(user_a, x, dt, 3, "user_a");
    pr.user_b = ptr<void>(user_b, x, dt, 3, "user_b");
    pr.user_ids = ptr<int32_t>(user_ids, x, at::kInt, 1, "user_ids");
    pr.user_ranks = ptr<int32_t>(user_ranks, x, at::kInt, 1, "user_ranks");
    pr.user_scale = ptr<float>(user_scale, x, at::kFloat, 1, "user_scale");
    pr.user_weight = ptr<float>(user_weight, x, at::kFloat, 1, "user_weight");
    pr.U = user_a->size(0);
    pr.r_max = user_a->size(1);
    TORCH_CHECK(!given(expert_b) || user_b->size(1) == pr.d_out, "proper cuda kernels: d_out mismatch");
    pr.d_out = user_b->size(1);
    TORCH_CHECK(user_a->size(2) == pr.d_in && user_b->size(0) == pr.U && user_b->size(2) == pr.r_max &&
                    user_ids->size(0) == pr.T && (!given(user_ranks) || user_ranks->size(0) == pr.U) &&
                    (!given(user_scale) || user_scale->size(0) == pr.U) &&
                    (!given(user_weight) || user_weight->size(0) == pr.T),
                "proper cuda kernels: inconsistent user shapes");
  }
  TORCH_CHECK(given(expert_a) || given(user_a), "proper cuda kernels: neither experts nor users given");
  lay.order = ptr<int32_t>(order, x, at::kInt, 1, "order");
  lay.blk_user = ptr<int32_t>(blk_user, x, at::kInt, 1, "blk_user");
  lay.blk_start = ptr<int32_t>(blk_start, x, at::kInt, 1, "blk_start");
  lay.blk_end = ptr<int32_t>(blk_end, x, at::kInt, 1, "blk_end");
  lay.num_blocks = given(blk_user) ? blk_user->numel() : 0;
  TORCH_CHECK(!given(order) || order->numel() == pr.T, "proper cuda kernels: order must have T entries");
  TORCH_CHECK((!given(blk_start) || blk_start->numel() == lay.num_blocks) &&
                  (!given(blk_end) || blk_end->numel() == lay.num_blocks),
              "proper cuda kernels: inconsistent block table");
  lay.red_user = ptr<int32_t>(red_user, x, at::kInt, 1, "red_user");
  lay.red_start = ptr<int32_t>(red_start, x, at::kInt, 1, "red_start");
  lay.red_end = ptr<int32_t>(red_end, x, at::kInt, 1, "red_end");
  lay.num_red_blocks = given(red_user) ? red_user->numel() : 0;
  TORCH_CHECK((!given(red_start) || red_start->numel() == lay.num_red_blocks) &&
                  (!given(red_end) || red_end->numel() == lay.num_red_blocks),
              "proper cuda kernels: inconsistent reduction table");
  return c;
}

cudaStream_t current_stream(const at::Tensor& x) {
#ifdef PROPER_CUDA_EMULATE
  (void)x;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
#endif
}

void check_status(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "proper cuda kernels: ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor workspace(size_t bytes, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

at::Tensor cuda_forward(const at::Tensor& x, const OptTensor& expert_a, const OptTensor& expert_b,
                        const OptTensor& gates, const OptTensor& user_a, const OptTensor& user_b,
                        const OptTensor& user_ids, const OptTensor& user_ranks, double expert_scale,
                        const OptTensor& user_scale, const OptTensor& user_weight, const OptTensor& order,
                        const OptTensor& blk_user, const OptTensor& blk_start, const OptTensor& blk_end) {
#ifndef PROPER_CUDA_EMULATE
  TORCH_CHECK(x.is_cuda(), "proper cuda kernels: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const Call c = make_call(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale,
                           user_scale, user_weight, order, blk_user, blk_start, blk_end, std::nullopt, std::nullopt,
                           std::nullopt);
  at::Tensor y = at::empty({c.pr.T, c.pr.d_out}, x.options());
  const size_t bytes = proper_cuda::forward_workspace_bytes(c.pr, c.lay);
  at::Tensor ws = workspace(bytes, x);
  check_status(proper_cuda::forward(c.pr, c.lay, y.data_ptr(), bytes ? ws.data_ptr() : nullptr, bytes,
                                    current_stream(x)),
               "forward");
  return y;
}

// Gradients in checks.GRAD_NAMES order (x, expert_a, expert_b, gates, user_a, user_b, user_weight); None where
// needs[i] is false. d(gates) and d(user_weight) come back in fp32.
std::vector<OptTensor> cuda_backward(const at::Tensor& grad_out, const at::Tensor& x, const OptTensor& expert_a,
                                     const OptTensor& expert_b, const OptTensor& gates, const OptTensor& user_a,
                                     const OptTensor& user_b, const OptTensor& user_ids,
                                     const OptTensor& user_ranks, double expert_scale,
                                     const OptTensor& user_scale, const OptTensor& user_weight,
                                     const OptTensor& order, const OptTensor& blk_user, const OptTensor& blk_start,
                                     const OptTensor& blk_end, const OptTensor& red_user,
                                     const OptTensor& red_start, const OptTensor& red_end,
                                     const std::vector<bool>& needs) {
#ifndef PROPER_CUDA_EMULATE
  TORCH_CHECK(x.is_cuda(), "proper cuda kernels: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  TORCH_CHECK(needs.size() == 7, "proper cuda kernels: needs must have 7 entries");
  const Call c = make_call(x, expert_a, expert_b, gates, user_a, user_b, user_ids, user_ranks, expert_scale,
                           user_scale, user_weight, order, blk_user, blk_start, blk_end, red_user, red_start,
                           red_end);
  check(grad_out, x, x.scalar_type(), 2, "grad_out");
  TORCH_CHECK(grad_out.size(0) == c.pr.T && grad_out.size(1) == c.pr.d_out,
              "proper cuda kernels: grad_out must be [T, d_out]");
  const bool has_e = given(expert_a), has_u = given(user_a);
  TORCH_CHECK(!(needs[1] || needs[2] || needs[3]) || has_e, "proper cuda kernels: expert gradients need experts");
  TORCH_CHECK(!(needs[4] || needs[5]) || has_u, "proper cuda kernels: user gradients need users");
  TORCH_CHECK(!needs[6] || given(user_weight), "proper cuda kernels: d(user_weight) needs user_weight");
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  std::vector<OptTensor> out(7);
  if (needs[0]) out[0] = at::empty_like(x);
  if (needs[1]) out[1] = at::empty_like(*expert_a);
  if (needs[2]) out[2] = at::empty_like(*expert_b);
  if (needs[3]) out[3] = at::empty({c.pr.T, c.pr.K}, f32);
  if (needs[4]) out[4] = at::empty_like(*user_a);
  if (needs[5]) out[5] = at::empty_like(*user_b);
  if (needs[6]) out[6] = at::empty({c.pr.T}, f32);
  proper_cuda::Grads g;
  g.dx = needs[0] ? out[0]->data_ptr() : nullptr;
  g.d_expert_a = needs[1] ? out[1]->data_ptr() : nullptr;
  g.d_expert_b = needs[2] ? out[2]->data_ptr() : nullptr;
  g.d_gates = needs[3] ? out[3]->data_ptr<float>() : nullptr;
  g.d_user_a = needs[4] ? out[4]->data_ptr() : nullptr;
  g.d_user_b = needs[5] ? out[5]->data_ptr() : nullptr;
  g.d_user_weight = needs[6] ? out[6]->data_ptr<float>() : nullptr;
  const size_t bytes = proper_cuda::backward_workspace_bytes(c.pr, c.lay, grad_out.data_ptr(), g);
  at::Tensor ws = workspace(bytes, x);
  check_status(proper_cuda::backward(c.pr, c.lay, grad_out.data_ptr(), g, bytes ? ws.data_ptr() : nullptr, bytes,
                                     current_stream(x)),
               "backward");
  return out;
}

}  // namespace

void register_cuda(pybind11::module& m) {
  namespace py = pybind11;
  m.def("cuda_forward", &cuda_forward, "routed_lora forward on the CUDA kernels (see proper_kernels/cuda.py)",
        py::arg("x"), py::arg("expert_a"), py::arg("expert_b"), py::arg("gates"), py::arg("user_a"),
        py::arg("user_b"), py::arg("user_ids"), py::arg("user_ranks"), py::arg("expert_scale"),
        py::arg("user_scale"), py::arg("user_weight"), py::arg("order"), py::arg("blk_user"),
        py::arg("blk_start"), py::arg("blk_end"));
  m.def("cuda_backward", &cuda_backward, "routed_lora backward on the CUDA kernels (see proper_kernels/cuda.py)",
        py::arg("grad_out"), py::arg("x"), py::arg("expert_a"), py::arg("expert_b"), py::arg("gates"),
        py::arg("user_a"), py::arg("user_b"), py::arg("user_ids"), py::arg("user_ranks"), py::arg("expert_scale"),
        py::arg("user_scale"), py::arg("user_weight"), py::arg("order"), py::arg("blk_user"),
        py::arg("blk_start"), py::arg("blk_end"), py::arg("red_user"), py::arg("red_start"), py::arg("red_end"),
        py::arg("needs"));
  m.attr("cuda_block_tokens") = proper_cuda::kBlockTokens;
  m.attr("cuda_reduce_block_tokens") = proper_cuda::kReduceBlockTokens;
}
