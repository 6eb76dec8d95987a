// Host side of the CUDA routed multi-LoRA op: argument checks, the launch plan (splits, vector paths, workspace
// layout) and the forward / backward launch sequences. CUDA headers only; no host synchronisation anywhere.
//
// Forward (3 launches at most):
//   shrink_x   h_part = Acat x                          [splits, T, R] fp32      (shrink.cu)
//   expand_y   y = Bcat (gate(sum_s h_part))            [T, d_out]               (expand.cu)
// Backward (each step only when a requested gradient needs it):
//   shrink_x   h_part = Acat x                          raw A x, for d(B), d(gates), d(w)
//   shrink_dy  g_part = Bcat^T dy                       raw B^T dy, for dx, d(A), d(gates), d(w)
//   combine    dgates, dw, dh = gate * g, hc = gate * h (reduce.cu)
//   expand_dx  dx = Acat^T dh                           (expand.cu)
//   seg_outer  d(A) += dh^T x, d(B) += dy^T hc          per expert over all tokens, per user over its segment
//   to_dtype   fp32 accumulators -> the weights' dtype  (fp32 problems accumulate straight into the outputs)
#include <climits>

#include "kernels.cuh"

namespace proper_cuda {
namespace {

using namespace detail;

constexpr size_t kWsAlign = 256;
constexpr size_t kAbsent = static_cast<size_t>(-1);

size_t align_up(size_t v) { return (v + kWsAlign - 1) / kWsAlign * kWsAlign; }
bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }
bool valid_dtype(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16;
}

// Streaming multiprocessors of the current device (the split heuristics aim at ~2 waves). Host query, no sync.
int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 108;
  return n;
}

// Split a reduction of `len` elements over S blocks so that `ctas` blocks become about two waves; each split is
// a multiple of `step` elements and at least kMinSplit long.
void plan_split(int64_t len, int64_t ctas, int64_t step, int sms, int* splits, int* chunk) {
  int64_t s = 1;
  if (len > 0 && ctas > 0 && ctas < 2 * static_cast<int64_t>(sms)) s = ceil_div(2 * static_cast<int64_t>(sms), ctas);
  const int64_t s_max = len / kMinSplit > 1 ? len / kMinSplit : 1;
  if (s > s_max) s = s_max;
  int64_t c = ceil_div(len > 0 ? len : 1, s);
  c = ceil_div(c, step) * step;
  *chunk = static_cast<int>(c);
  *splits = static_cast<int>(len > 0 ? ceil_div(len, c) : 1);
}

struct Plan {
  KParams kp{};
  DType dt = DType::kFloat32;
  bool vec_x = false;     // shrink_x: 16-byte loads of x and A rows
  bool vec_dx = false;    // expand_dx: 4-element loads of A rows and stores of dx
  bool vec_bx = false;    // seg_outer mode A: 4-element loads of x
  bool vec_bdy = false;   // seg_outer mode B: 4-element loads of dy
  bool need_h = false, need_g = false, need_dh = false, need_hc = false;
  // workspace layout: byte offsets (kAbsent: not in the workspace)
  size_t off_h = kAbsent, off_g = kAbsent, off_dh = kAbsent, off_hc = kAbsent;
  size_t off_ea = kAbsent, off_eb = kAbsent, off_ua = kAbsent, off_ub = kAbsent;
  size_t bytes = 0;
};

size_t take(size_t* bytes, size_t n_floats) {
  const size_t off = *bytes;
  *bytes = align_up(*bytes + n_floats * sizeof(float));
  return off;
}

// Check sizes and pointers and derive the plan. grads == nullptr: the forward.
cudaError_t make_plan(const Problem& pr, const Layout& lay, const Grads* grads, const void* dy, Plan* out) {
  Plan pl;
  if (!valid_dtype(pr.dtype)) return cudaErrorInvalidValue;
  for (int64_t v : {pr.T, pr.d_in, pr.d_out, pr.K, pr.r_e, pr.U, pr.r_max})
    if (!fits_int(v)) return cudaErrorInvalidValue;
  const int64_t R_e = pr.K * pr.r_e;
  const int64_t R = R_e + pr.r_max;
  if (!fits_int(R) || !fits_int(lay.num_blocks) || !fits_int(lay.num_red_blocks)) return cudaErrorInvalidValue;
  // launch-grid limits (y and z dimensions): rank chunks and output column tiles
  if (ceil_div(R, kShrinkRows) > 65535 || ceil_div(pr.d_out, kThreads) > 65535 ||
      ceil_div(pr.d_in, static_cast<int64_t>(kThreads) * kOutVec) > 65535 ||
      ceil_div(pr.d_out, static_cast<int64_t>(kThreads) * kOutVec) > 65535)
    return cudaErrorInvalidValue;
  const bool has_e = pr.K > 0, has_u = pr.U > 0;
  // present parts need their pointers (tensors with no element may have a null data pointer)
  if (pr.T * pr.d_in > 0 && !pr.x) return cudaErrorInvalidValue;
  if (has_e) {
    if ((R_e * pr.d_in > 0 && !pr.expert_a) || (R_e * pr.d_out > 0 && !pr.expert_b) || (pr.T > 0 && !pr.gates))
      return cudaErrorInvalidValue;
  }
  if (has_u) {
    if ((pr.U * pr.r_max * pr.d_in > 0 && !pr.user_a) || (pr.U * pr.r_max * pr.d_out > 0 && !pr.user_b) ||
        (pr.T > 0 && !pr.user_ids))
      return cudaErrorInvalidValue;
    if (pr.T > 0 && (!lay.order || !lay.blk_user || !lay.blk_start || !lay.blk_end || lay.num_blocks <= 0))
      return cudaErrorInvalidValue;
  }
  const bool user_grads = grads && (grads->d_user_a || grads->d_user_b);
  if (has_u && user_grads && pr.T > 0 &&
      (!lay.red_user || !lay.red_start || !lay.red_end || lay.num_red_blocks <= 0))
    return cudaErrorInvalidValue;
  if (grads && pr.T * pr.d_out > 0 && !dy) return cudaErrorInvalidValue;
  if (grads && ((!has_e && (grads->d_expert_a || grads->d_expert_b || grads->d_gates)) ||
                (!has_u && (grads->d_user_a || grads->d_user_b || grads->d_user_weight))))
    return cudaErrorInvalidValue;

  KParams& kp = pl.kp;
  pl.dt = pr.dtype;
  kp.T = static_cast<int>(pr.T);
  kp.d_in = static_cast<int>(pr.d_in);
  kp.d_out = static_cast<int>(pr.d_out);
  kp.K = static_cast<int>(pr.K);
  kp.r_e = static_cast<int>(pr.r_e);
  kp.U = static_cast<int>(pr.U);
  kp.r_max = static_cast<int>(pr.r_max);
  kp.R_e = static_cast<int>(R_e);
  kp.R = static_cast<int>(R);
  kp.expert_scale = pr.expert_scale;
  kp.x = pr.x;
  kp.ea = has_e ? pr.expert_a : nullptr;
  kp.eb = has_e ? pr.expert_b : nullptr;
  kp.gates = has_e ? pr.gates : nullptr;
  kp.ua = has_u ? pr.user_a : nullptr;
  kp.ub = has_u ? pr.user_b : nullptr;
  kp.uid = has_u ? pr.user_ids : nullptr;
  kp.uranks = has_u ? pr.user_ranks : nullptr;
  kp.uscale = has_u ? pr.user_scale : nullptr;
  kp.uweight = has_u ? pr.user_weight : nullptr;
  kp.dy = dy;
  if (has_u || lay.blk_user) {   // the segment table (required with users; optional without)
    kp.order = lay.order;
    kp.blk_user = lay.blk_user;
    kp.blk_start = lay.blk_start;
    kp.blk_end = lay.blk_end;
    kp.P = static_cast<int>(lay.num_blocks);
  } else {                       // no users: arithmetic blocks over the natural order
    kp.P = static_cast<int>(ceil_div(pr.T, kBlockTokens));
  }
  kp.red_user = lay.red_user;
  kp.red_start = lay.red_start;
  kp.red_end = lay.red_end;
  kp.Q = static_cast<int>(lay.num_red_blocks);

  const size_t sz = dtype_size(pr.dtype);
  const int v16 = static_cast<int>(16 / sz);   // elements per 16-byte vector
  kp.vec_eb = has_e && pr.r_e % 8 == 0 && aligned_to(pr.expert_b, 16);
  kp.vec_ub = has_u && pr.r_max % 8 == 0 && aligned_to(pr.user_b, 16);
  pl.vec_x = pr.d_in % v16 == 0 && aligned_to(pr.x, 16) && (!has_e || aligned_to(pr.expert_a, 16)) &&
             (!has_u || aligned_to(pr.user_a, 16));
  pl.vec_dx = grads && grads->dx && pr.d_in % kDxVec == 0 && aligned_to(grads->dx, kDxVec * sz) &&
              (!has_e || aligned_to(pr.expert_a, kDxVec * sz)) && (!has_u || aligned_to(pr.user_a, kDxVec * sz));
  pl.vec_bx = pr.d_in % kOutVec == 0 && aligned_to(pr.x, kOutVec * sz);
  pl.vec_bdy = dy && pr.d_out % kOutVec == 0 && aligned_to(dy, kOutVec * sz);

  const int sms = sm_count();
  plan_split(pr.d_in, static_cast<int64_t>(kp.P) * ceil_div(R, kShrinkRows), 32LL * (pl.vec_x ? v16 : 1), sms,
             &kp.h_splits, &kp.h_chunk);
  const int64_t dy_tiles = ceil_div(R_e, kDyCols) + ceil_div(pr.r_max, kDyCols);
  plan_split(pr.d_out, static_cast<int64_t>(kp.P) * ceil_div(dy_tiles, kWarps), 32, sms, &kp.g_splits,
             &kp.g_chunk);

  // which rank-space buffers the call needs
  const size_t TR = static_cast<size_t>(pr.T) * static_cast<size_t>(R);
  if (!grads) {
    pl.need_h = R > 0 && pr.d_out > 0;
  } else {
    pl.need_dh = grads->dx || grads->d_expert_a || grads->d_user_a;
    pl.need_hc = grads->d_expert_b || grads->d_user_b;
    pl.need_h = R > 0 && (pl.need_hc || grads->d_gates || grads->d_user_weight);
    pl.need_g = R > 0 && (pl.need_dh || grads->d_gates || grads->d_user_weight);
  }
  size_t bytes = 0;
  if (pl.need_h) pl.off_h = take(&bytes, static_cast<size_t>(kp.h_splits) * TR);
  if (pl.need_g) pl.off_g = take(&bytes, static_cast<size_t>(kp.g_splits) * TR);
  if (pl.need_dh) pl.off_dh = take(&bytes, TR);
  if (pl.need_hc) pl.off_hc = take(&bytes, TR);
  if (grads && pr.dtype != DType::kFloat32) {   // fp32 accumulators of the weight gradients
    if (grads->d_expert_a) pl.off_ea = take(&bytes, static_cast<size_t>(R_e * pr.d_in));
    if (grads->d_expert_b) pl.off_eb = take(&bytes, static_cast<size_t>(R_e * pr.d_out));
    if (grads->d_user_a) pl.off_ua = take(&bytes, static_cast<size_t>(pr.U * pr.r_max * pr.d_in));
    if (grads->d_user_b) pl.off_ub = take(&bytes, static_cast<size_t>(pr.U * pr.r_max * pr.d_out));
  }
  pl.bytes = bytes;
  *out = pl;
  return cudaSuccess;
}

float* ws_ptr(void* ws, size_t off) {
  return off == kAbsent ? nullptr : reinterpret_cast<float*>(static_cast<char*>(ws) + off);
}

cudaError_t check_workspace(const Plan& pl, void* ws, size_t ws_bytes) {
  if (pl.bytes == 0) return cudaSuccess;
  if (!ws || ws_bytes < pl.bytes || !aligned_to(ws, 16)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Tokens per block of the expert weight-gradient reduction: enough chunks for ~2 waves of `tiles` blocks each,
// at least 32 tokens (one smem round) per chunk.
int expert_chunk(int64_t T, int64_t tiles, int sms) {
  int64_t n = tiles > 0 ? ceil_div(2 * static_cast<int64_t>(sms), tiles) : 1;
  const int64_t n_max = ceil_div(T, kOutTok);
  if (n > n_max) n = n_max;
  if (n < 1) n = 1;
  const int64_t c = ceil_div(T, n);
  return static_cast<int>(c > 0 ? c : 1);
}

// d(W) for one weight (which: 0 expert_a, 1 expert_b, 2 user_a, 3 user_b): zero the fp32 accumulator, reduce
// dh^T x or dy^T hc into it, and convert it into `out` when the dtype is not fp32 (fp32 accumulates in place).
cudaError_t weight_grad(const Plan& pl, KParams kp, int which, void* out, size_t off, void* ws, int64_t numel,
                        cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  const int mode_b = which & 1, users = which >> 1;
  float* acc = off == kAbsent ? static_cast<float*>(out) : ws_ptr(ws, off);
  cudaError_t err = cudaMemsetAsync(acc, 0, static_cast<size_t>(numel) * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  float** field[4] = {&kp.acc_ea, &kp.acc_eb, &kp.acc_ua, &kp.acc_ub};
  *field[which] = acc;
  int chunk = 1;
  if (!users) {
    const int64_t N = mode_b ? kp.d_out : kp.d_in;
    const int64_t tiles = ceil_div(kp.R_e, kOutRanks) * ceil_div(N, static_cast<int64_t>(kThreads) * kOutVec);
    chunk = expert_chunk(kp.T, tiles, sm_count());
  }
  if (kp.T > 0) {
    err = launch_seg_outer(kp, pl.dt, mode_b, users, chunk, mode_b ? pl.vec_bdy : pl.vec_bx, stream);
    if (err != cudaSuccess) return err;
  }
  if (off != kAbsent) return launch_to_dtype(acc, out, numel, pl.dt, stream);
  return cudaSuccess;
}

}  // namespace

size_t forward_workspace_bytes(const Problem& pr, const Layout& lay) {
  Plan pl;
  return make_plan(pr, lay, nullptr, nullptr, &pl) == cudaSuccess ? pl.bytes : 0;
}

size_t backward_workspace_bytes(const Problem& pr, const Layout& lay, const void* grad_out, const Grads& grads) {
  Plan pl;
  return make_plan(pr, lay, &grads, grad_out, &pl) == cudaSuccess ? pl.bytes : 0;
}

cudaError_t forward(const Problem& pr, const Layout& lay, void* y, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream) {
  Plan pl;
  cudaError_t err = make_plan(pr, lay, nullptr, nullptr, &pl);
  if (err != cudaSuccess) return err;
  if (pr.T == 0 || pr.d_out == 0) return cudaSuccess;
  if (!y) return cudaErrorInvalidValue;
  err = check_workspace(pl, workspace, workspace_bytes);
  if (err != cudaSuccess) return err;
  KParams kp = pl.kp;
  kp.y = y;
  kp.h_part = ws_ptr(workspace, pl.off_h);
  if (pl.need_h) {
    err = launch_shrink_x(kp, pl.dt, pl.vec_x, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_expand_y(kp, pl.dt, stream);
}

cudaError_t backward(const Problem& pr, const Layout& lay, const void* grad_out, const Grads& grads,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Plan pl;
  cudaError_t err = make_plan(pr, lay, &grads, grad_out, &pl);
  if (err != cudaSuccess) return err;
  err = check_workspace(pl, workspace, workspace_bytes);
  if (err != cudaSuccess) return err;
  KParams kp = pl.kp;
  kp.h_part = ws_ptr(workspace, pl.off_h);
  kp.g_part = ws_ptr(workspace, pl.off_g);
  kp.dh = ws_ptr(workspace, pl.off_dh);
  kp.hc = ws_ptr(workspace, pl.off_hc);
  kp.dx = grads.dx;
  kp.dgates = grads.d_gates;
  kp.dw = grads.d_user_weight;

  if (pr.T > 0) {
    if (pl.need_h) {
      err = launch_shrink_x(kp, pl.dt, pl.vec_x, stream);
      if (err != cudaSuccess) return err;
    }
    if (pl.need_g) {
      err = launch_shrink_dy(kp, pl.dt, stream);
      if (err != cudaSuccess) return err;
    }
    if (grads.d_gates || grads.d_user_weight || pl.need_dh || pl.need_hc) {
      err = launch_combine(kp, stream);
      if (err != cudaSuccess) return err;
    }
    if (grads.dx && pr.d_in > 0) {
      err = launch_expand_dx(kp, pl.dt, pl.vec_dx, stream);
      if (err != cudaSuccess) return err;
    }
  }
  // weight gradients (zeroed even when T == 0: no token, no gradient)
  void* outs[4] = {grads.d_expert_a, grads.d_expert_b, grads.d_user_a, grads.d_user_b};
  const size_t offs[4] = {pl.off_ea, pl.off_eb, pl.off_ua, pl.off_ub};
  const int64_t numels[4] = {pr.K * pr.r_e * pr.d_in, pr.K * pr.d_out * pr.r_e, pr.U * pr.r_max * pr.d_in,
                             pr.U * pr.d_out * pr.r_max};
  for (int which = 0; which < 4; ++which) {
    if (!outs[which]) continue;
    err = weight_grad(pl, kp, which, outs[which], offs[which], workspace, numels[which], stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace proper_cuda
