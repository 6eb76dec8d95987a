// Backward rank-space combine, the weight-gradient segment reductions and the fp32 -> dtype conversion.
// CUDA headers only.
#include "kernels.cuh"

namespace proper_cuda {
namespace detail {
namespace {

// -------------------------------------------------------------------------------------------------------------
// combine (backward, rank space, one thread per (token, group))
//
// Semantics, with h = sum_s h_part[s] (= A x, raw) and g = sum_s g_part[s] (= B^T dy, raw):
//   expert k (group k < K), gate gv = gates[t, k], j = k r_e + r:
//     dgates[t, k] = [gv != 0] * s_e * sum_r g[t, j] h[t, j]
//     dh[t, j]     = [gv != 0] * (gv s_e) * g[t, j]          (flows into d(expert_a) and dx)
//     hc[t, j]     = [gv != 0] * (gv s_e) * h[t, j]          (multiplies dy in d(expert_b))
//   user (group K), u = user of t, c = s_u[u] w[t], j = R_e + r:
//     dw[t]        = [u >= 0] * s_u[u] * sum_{r < r_u} g[t, j] h[t, j]
//     dh[t, j]     = [u >= 0, r < r_u] * c * g[t, j];   hc[t, j] = [u >= 0, r < r_u] * c * h[t, j]
//   Masked entries are written as 0 without reading h / g (structural zeros, padded ranks).
// Shapes: h_part [h_splits, T, R], g_part [g_splits, T, R], dh, hc [T, R] fp32; dgates [T, K]; dw [T].
//   h_part (g_part) may be null when no requested output needs it (then h (g) reads as 0); any output may be null.
// Grid: ceil(T * groups / 256) blocks of 256 threads, groups = K + (U > 0).
__global__ void __launch_bounds__(kThreads) combine_kernel(const KParams p) {
  const int groups = p.K + (p.U > 0 ? 1 : 0);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(p.T) * groups) return;
  const int t = static_cast<int>(i / groups);
  const int grp = static_cast<int>(i % groups);

  int j0, n_on, n_all;   // columns [j0, j0 + n_all) of the group, the first n_on of them live
  float c, s_dot;        // factor of dh / hc, factor of the dot product
  bool live;
  if (grp < p.K) {
    const float gv = p.gates[static_cast<int64_t>(t) * p.K + grp];
    live = gv != 0.0f;
    j0 = grp * p.r_e;
    n_all = p.r_e;
    n_on = live ? p.r_e : 0;
    c = gv * p.expert_scale;
    s_dot = p.expert_scale;
  } else {
    const int u = user_of(p, t);
    live = u >= 0;
    j0 = p.R_e;
    n_all = p.r_max;
    n_on = rank_of(p, u);
    c = live ? user_coef(p, t, u) : 0.0f;
    s_dot = live ? (p.uscale ? p.uscale[u] : 1.0f) : 0.0f;
  }
  float dot = 0.0f;
  for (int r = 0; r < n_all; ++r) {
    const int64_t off = static_cast<int64_t>(t) * p.R + j0 + r;
    float dhv = 0.0f, hcv = 0.0f;
    if (r < n_on) {
      float h = 0.0f, g = 0.0f;
      if (p.h_part)
        for (int s = 0; s < p.h_splits; ++s) h += p.h_part[static_cast<int64_t>(s) * p.T * p.R + off];
      if (p.g_part)
        for (int s = 0; s < p.g_splits; ++s) g += p.g_part[static_cast<int64_t>(s) * p.T * p.R + off];
      dot += g * h;
      dhv = g * c;
      hcv = h * c;
    }
    if (p.dh) p.dh[off] = dhv;
    if (p.hc) p.hc[off] = hcv;
  }
  if (grp < p.K) {
    if (p.dgates) p.dgates[static_cast<int64_t>(t) * p.K + grp] = live ? dot * s_dot : 0.0f;
  } else {
    if (p.dw) p.dw[t] = live ? dot * s_dot : 0.0f;
  }
}

// -------------------------------------------------------------------------------------------------------------
// seg_outer: the weight gradients, outer products summed over the tokens of a segment
//
// Semantics:
//   mode A (d(A), S = dh, big = x, N = d_in):
//     experts:  acc_ea[j, d]        += sum_{t in chunk} dh[t, j] * x[t, d]                 j < R_e
//     users:    acc_ua[u, r, d]     += sum_{t in chunk of u} dh[t, R_e + r] * x[t, d]      r < r_u
//   mode B (d(B), S = hc, big = dy, N = d_out):
//     experts:  acc_eb[k, o, r]     += sum_{t in chunk} dy[t, o] * hc[t, k r_e + r]
//     users:    acc_ub[u, o, r]     += sum_{t in chunk of u} dy[t, o] * hc[t, R_e + r]     r < r_u
//   the reference's einsum("tkr,td->krd") / einsum("to,tkr->kor") and index_add_ over user ids. Padded ranks
//   r >= r_u are never touched (the accumulators were zeroed, so they come out 0), nor are users with no token.
// Shapes: dh, hc [T, R] fp32; x [T, d_in]; dy [T, d_out]; acc_* fp32 with the shapes of the weights.
// Grid: (chunks, ceil(ranks / 16), ceil(N / 1024)); block 256.
//   Expert chunks: tokens [c * chunk, (c + 1) * chunk) in natural order, ranks = R_e. User chunks: the coarse
//   table's blocks (tokens of one user), ranks = r_max (tiles at or past r_u exit at once).
//   A thread owns 4 consecutive n and the block's 16 ranks: an [16 x 4] fp32 accumulator over the chunk's tokens,
//   staged 32 at a time in smem (tokens whose 16 S values are all 0 -- unselected experts -- are skipped). The
//   chunk's partial sums are added to the fp32 accumulators with atomicAdd (order-dependent rounding only).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, 2) seg_outer_kernel(const KParams p, const int mode_b, const int users,
                                                             const int chunk) {
  constexpr int NR = kOutRanks;
  constexpr int NV = kOutVec;
  constexpr int NT = kOutTok;
  __shared__ float s_S[NT][NR];
  __shared__ int s_tok[NT];
  __shared__ int s_nz[NT];

  int start, end, u = -1;
  if (!users) {
    start = blockIdx.x * chunk;
    end = imin(p.T, start + chunk);
    if (start >= end) return;                          // block-uniform, before any barrier
  } else {
    const Block b = load_block(p.red_user, p.red_start, p.red_end, blockIdx.x, p.T, p.U);
    if (b.user < 0 || b.user >= p.U) return;           // idle, or the tokens without a user
    u = b.user;
    start = b.start;
    end = b.end;
  }
  const int nrank = users ? rank_of(p, u) : p.R_e;
  const int r0 = blockIdx.y * NR;
  if (r0 >= nrank) return;
  const int width = imin(NR, nrank - r0);
  const int col0 = (users ? p.R_e : 0) + r0;           // first rank-space column of the tile
  const int N = mode_b ? p.d_out : p.d_in;
  const T* big = static_cast<const T*>(mode_b ? p.dy : p.x);
  const float* S = mode_b ? p.hc : p.dh;
  const int n0 = (blockIdx.z * kThreads + threadIdx.x) * NV;
  const int nn = imin(NV, N - n0);                     // <= 0: no columns for this thread

  float acc[NR][NV];
#pragma unroll
  for (int c = 0; c < NR; ++c)
#pragma unroll
    for (int v = 0; v < NV; ++v) acc[c][v] = 0.0f;

  for (int base = start; base < end; base += NT) {
    __syncthreads();                                   // the previous round's readers are done
    for (int idx = threadIdx.x; idx < NT * NR; idx += kThreads) {
      const int tt = idx / NR, c = idx % NR;
      const int pos = base + tt;
      float v = 0.0f;
      if (pos < end && c < width) {
        const int t = users ? p.order[pos] : pos;
        v = S[static_cast<int64_t>(t) * p.R + col0 + c];
      }
      s_S[tt][c] = v;
    }
    if (threadIdx.x < NT) {
      const int pos = base + threadIdx.x;
      s_tok[threadIdx.x] = pos < end ? (users ? p.order[pos] : pos) : -1;
    }
    __syncthreads();
    if (threadIdx.x < NT) {
      bool nz = false;
#pragma unroll
      for (int c = 0; c < NR; ++c) nz |= s_S[threadIdx.x][c] != 0.0f;
      s_nz[threadIdx.x] = nz;
    }
    __syncthreads();
    if (nn > 0) {
      for (int tt = 0; tt < NT; ++tt) {
        const int t = s_tok[tt];
        if (t < 0 || !s_nz[tt]) continue;              // block-uniform
        float bv[NV];
        load_part<T, NV>(big + static_cast<int64_t>(t) * N + n0, nn, VEC, bv);
#pragma unroll
        for (int c = 0; c < NR; ++c) {
          const float sv = s_S[tt][c];
#pragma unroll
          for (int v = 0; v < NV; ++v) acc[c][v] += sv * bv[v];
        }
      }
    }
  }
  if (nn <= 0) return;
#pragma unroll
  for (int c = 0; c < NR; ++c) {
    if (c >= width) break;
    const int r = r0 + c;                              // rank row within the part (expert: j < R_e; user: r < r_u)
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      if (v >= nn) break;
      const int n = n0 + v;
      float* dst;
      if (!mode_b) {
        dst = users ? p.acc_ua + (static_cast<int64_t>(u) * p.r_max + r) * p.d_in + n
                    : p.acc_ea + static_cast<int64_t>(r) * p.d_in + n;
      } else {
        dst = users ? p.acc_ub + (static_cast<int64_t>(u) * p.d_out + n) * p.r_max + r
                    : p.acc_eb + (static_cast<int64_t>(r / p.r_e) * p.d_out + n) * p.r_e + r % p.r_e;
      }
      atomicAdd(dst, acc[c][v]);
    }
  }
}

// -------------------------------------------------------------------------------------------------------------
// to_dtype
// Semantics: dst[i] = (T) src[i] (round to nearest even), i < n. Grid-stride, 256 threads.
template <typename T>
__global__ void __launch_bounds__(kThreads) to_dtype_kernel(const float* src, T* dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    dst[i] = from_f<T>(src[i]);
}

template <typename T>
cudaError_t seg_outer_typed(const KParams& p, int mode_b, int users, int chunk, bool vec, cudaStream_t stream) {
  const int64_t chunks = users ? p.Q : ceil_div(p.T, chunk);
  const int64_t ranks = users ? p.r_max : p.R_e;
  const int64_t N = mode_b ? p.d_out : p.d_in;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(ceil_div(ranks, kOutRanks)),
                  static_cast<unsigned>(ceil_div(N, static_cast<int64_t>(kThreads) * kOutVec)));
  if (vec) return launch_kernel(seg_outer_kernel<T, true>, grid, dim3(kThreads), 0, stream, p, mode_b, users, chunk);
  return launch_kernel(seg_outer_kernel<T, false>, grid, dim3(kThreads), 0, stream, p, mode_b, users, chunk);
}

template <typename T>
cudaError_t to_dtype_typed(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  const int64_t blocks = ceil_div(n, kThreads);
  const dim3 grid(static_cast<unsigned>(blocks < 4096 ? blocks : 4096));
  return launch_kernel(to_dtype_kernel<T>, grid, dim3(kThreads), 0, stream, src, static_cast<T*>(dst), n);
}

}  // namespace

cudaError_t launch_combine(const KParams& p, cudaStream_t stream) {
  const int64_t groups = p.K + (p.U > 0 ? 1 : 0);
  const dim3 grid(static_cast<unsigned>(ceil_div(static_cast<int64_t>(p.T) * groups, kThreads)));
  return launch_kernel(combine_kernel, grid, dim3(kThreads), 0, stream, p);
}

cudaError_t launch_seg_outer(const KParams& p, DType dt, int mode_b, int users, int chunk, bool vec,
                             cudaStream_t stream) {
  if (chunk <= 0) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32: return seg_outer_typed<float>(p, mode_b, users, chunk, vec, stream);
    case DType::kFloat16: return seg_outer_typed<__half>(p, mode_b, users, chunk, vec, stream);
    case DType::kBFloat16: return seg_outer_typed<__nv_bfloat16>(p, mode_b, users, chunk, vec, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_to_dtype(const float* src, void* dst, int64_t n, DType dt, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32: return to_dtype_typed<float>(src, dst, n, stream);
    case DType::kFloat16: return to_dtype_typed<__half>(src, dst, n, stream);
    case DType::kBFloat16: return to_dtype_typed<__nv_bfloat16>(src, dst, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace proper_cuda
