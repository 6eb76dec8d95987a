// Expand kernels: multiply a small rank-space tile by the concatenated weights and write a long output row
// (y over d_out in the forward, dx over d_in in the backward). A block works on the tokens of one segment-table
// block (one user), staging their fp32 rank-space rows in shared memory; each thread owns output columns and
// reads the weights once per token tile. CUDA headers only.
#include "kernels.cuh"

namespace proper_cuda {
namespace detail {
namespace {

// -------------------------------------------------------------------------------------------------------------
// expand_y (forward; the rank-space gating is fused into the smem staging)
//
// Semantics:
//   hg[t, j] = gain(t, j) * sum_s h_part[s, t, j]
//       gain = s_e * g[t, j / r_e]         for j < R_e where g != 0   (structural zero: hg = 0, h not read)
//            = w[t] * s_u[u]               for j = R_e + r, r < r_u   (padded ranks r >= r_u: hg = 0)
//   y[t, o] = sum_{j < R_e} hg[t, j] * expert_b[j / r_e, o, j % r_e] + sum_{r < r_u} hg[t, R_e + r] * user_b[u, o, r]
//   i.e. the reference's  h * (g * s_e) @ b_cat^T  +  bmm(b, h * coef).
// Shapes: h_part [h_splits, T, R] fp32; gates [T, K]; expert_b [K, d_out, r_e]; user_b [U, d_out, r_max];
//         y [T, d_out].
// Grid: (P blocks, ceil(d_out / 256)); block 256; thread = one output column o, all tokens of the block in tiles
//   of 8 (an [8] fp32 accumulator). Per expert selected by a token of the tile the thread reads row o of B_k
//   (r_e contiguous values; 16-byte loads when r_e % 8 == 0), then row o of B_u up to r_u.
// Dynamic smem: hs [8, R] fp32, sel [K] int, tok [8] int (expand_smem_bytes).
// Written: y[t, o] for every token of the block (0 when nothing applies to the token).
template <typename T>
__global__ void __launch_bounds__(kThreads) expand_y_kernel(const KParams p) {
  constexpr int NT = kExpTok;
  const Block blk = load_block(p.blk_user, p.blk_start, p.blk_end, blockIdx.x, p.T, p.U);
  if (blk.user < 0) return;                             // block-uniform, before any barrier
  const int u = blk.user < p.U ? blk.user : -1;
  const int r_u = rank_of(p, u);
  float* hs = dynamic_smem();                           // [NT, R]
  int* s_sel = reinterpret_cast<int*>(hs + NT * p.R);   // [K]
  int* s_tok = s_sel + p.K;                             // [NT]
  const int o = blockIdx.y * kThreads + threadIdx.x;
  const T* eb = static_cast<const T*>(p.eb);
  const T* ub = static_cast<const T*>(p.ub);
  T* y = static_cast<T*>(p.y);

  for (int s0 = blk.start; s0 < blk.end; s0 += NT) {
    const int nt = imin(NT, blk.end - s0);
    __syncthreads();                                    // the previous tile's readers are done
    if (threadIdx.x < NT) s_tok[threadIdx.x] = token_at(p, s0 + imin(threadIdx.x, nt - 1));
    __syncthreads();
    for (int idx = threadIdx.x; idx < NT * p.R; idx += kThreads) {
      const int tt = idx / p.R, j = idx - tt * p.R;
      float v = 0.0f;
      if (tt < nt) {
        const int t = s_tok[tt];
        bool on;
        float gain;
        if (j < p.R_e) {
          const float g = p.gates[static_cast<int64_t>(t) * p.K + j / p.r_e];
          on = g != 0.0f;
          gain = g * p.expert_scale;
        } else {
          on = j - p.R_e < r_u;
          gain = on ? user_coef(p, t, u) : 0.0f;
        }
        if (on) {
          float h = 0.0f;
          for (int s = 0; s < p.h_splits; ++s) h += p.h_part[(static_cast<int64_t>(s) * p.T + t) * p.R + j];
          v = h * gain;
        }
      }
      hs[idx] = v;
    }
    for (int k = threadIdx.x; k < p.K; k += kThreads) {
      bool any = false;
      for (int tt = 0; tt < nt; ++tt) any |= p.gates[static_cast<int64_t>(s_tok[tt]) * p.K + k] != 0.0f;
      s_sel[k] = any;
    }
    __syncthreads();
    if (o < p.d_out) {
      float acc[NT];
#pragma unroll
      for (int tt = 0; tt < NT; ++tt) acc[tt] = 0.0f;
      for (int k = 0; k < p.K; ++k) {
        if (!s_sel[k]) continue;                        // block-uniform: no token of the tile selects k
        const T* row = eb + (static_cast<int64_t>(k) * p.d_out + o) * p.r_e;
        for (int r0 = 0; r0 < p.r_e; r0 += 8) {
          const int n = imin(8, p.r_e - r0);
          float b[8];
          load_part<T, 8>(row + r0, n, p.vec_eb && n == 8, b);
          const float* hcol = hs + k * p.r_e + r0;
#pragma unroll
          for (int c = 0; c < 8; ++c)
            if (c < n)
#pragma unroll
              for (int tt = 0; tt < NT; ++tt) acc[tt] += hcol[tt * p.R + c] * b[c];
        }
      }
      if (r_u > 0) {
        const T* row = ub + (static_cast<int64_t>(u) * p.d_out + o) * p.r_max;
        for (int r0 = 0; r0 < r_u; r0 += 8) {
          const int n = imin(8, r_u - r0);
          float b[8];
          load_part<T, 8>(row + r0, n, p.vec_ub && n == 8, b);
          const float* hcol = hs + p.R_e + r0;
#pragma unroll
          for (int c = 0; c < 8; ++c)
            if (c < n)
#pragma unroll
              for (int tt = 0; tt < NT; ++tt) acc[tt] += hcol[tt * p.R + c] * b[c];
        }
      }
#pragma unroll
      for (int tt = 0; tt < NT; ++tt)
        if (tt < nt) y[static_cast<int64_t>(s_tok[tt]) * p.d_out + o] = from_f<T>(acc[tt]);
    }
  }
}

// -------------------------------------------------------------------------------------------------------------
// expand_dx (backward)
//
// Semantics:
//   dx[t, d] = sum_{j < R_e} dh[t, j] * expert_a[j / r_e, j % r_e, d] + sum_{r < r_u} dh[t, R_e + r] * user_a[u, r, d]
//   with dh the gated B^T dy from combine (0 where the gate is 0 and for r >= r_u): the reference's
//   einsum("tkr,krd->td", dh, a) + bmm(a^T, dh).
// Shapes: dh [T, R] fp32; expert_a [K, r_e, d_in]; user_a [U, r_max, d_in]; dx [T, d_in].
// Grid: (P blocks, ceil(d_in / 1024)); block 256; thread = 4 consecutive d (8/16-byte loads and stores when VEC:
//   d_in % 4 == 0 and aligned pointers), tokens in tiles of 8 (an [8 x 4] fp32 accumulator). Rows of experts no
//   token of the tile selects are skipped (their dh is 0); user rows stop at r_u.
// Dynamic smem: hs [8, R] fp32, sel [K] int, tok [8] int.
// Written: dx[t, d] for every token of the block.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) expand_dx_kernel(const KParams p) {
  constexpr int NT = kDxTok;
  constexpr int NV = kDxVec;
  const Block blk = load_block(p.blk_user, p.blk_start, p.blk_end, blockIdx.x, p.T, p.U);
  if (blk.user < 0) return;
  const int u = blk.user < p.U ? blk.user : -1;
  const int r_u = rank_of(p, u);
  float* hs = dynamic_smem();
  int* s_sel = reinterpret_cast<int*>(hs + NT * p.R);
  int* s_tok = s_sel + p.K;
  const int d0 = (blockIdx.y * kThreads + threadIdx.x) * NV;
  const int nd = imin(NV, p.d_in - d0);                 // <= 0: this thread has no columns
  const T* ea = static_cast<const T*>(p.ea);
  const T* ua = static_cast<const T*>(p.ua);
  T* dx = static_cast<T*>(p.dx);

  for (int s0 = blk.start; s0 < blk.end; s0 += NT) {
    const int nt = imin(NT, blk.end - s0);
    __syncthreads();
    if (threadIdx.x < NT) s_tok[threadIdx.x] = token_at(p, s0 + imin(threadIdx.x, nt - 1));
    __syncthreads();
    for (int idx = threadIdx.x; idx < NT * p.R; idx += kThreads) {
      const int tt = idx / p.R, j = idx - tt * p.R;
      const bool on = tt < nt && (j < p.R_e || j - p.R_e < r_u);
      hs[idx] = on ? p.dh[static_cast<int64_t>(s_tok[tt]) * p.R + j] : 0.0f;
    }
    for (int k = threadIdx.x; k < p.K; k += kThreads) {
      bool any = false;
      for (int tt = 0; tt < nt; ++tt) any |= p.gates[static_cast<int64_t>(s_tok[tt]) * p.K + k] != 0.0f;
      s_sel[k] = any;
    }
    __syncthreads();
    if (nd > 0) {
      float acc[NT][NV];
#pragma unroll
      for (int tt = 0; tt < NT; ++tt)
#pragma unroll
        for (int v = 0; v < NV; ++v) acc[tt][v] = 0.0f;
      for (int k = 0; k < p.K; ++k) {
        if (!s_sel[k]) continue;
        for (int r = 0; r < p.r_e; ++r) {
          const int j = k * p.r_e + r;
          float a[NV];
          load_part<T, NV>(ea + static_cast<int64_t>(j) * p.d_in + d0, nd, VEC, a);
#pragma unroll
          for (int tt = 0; tt < NT; ++tt) {
            const float h = hs[tt * p.R + j];
#pragma unroll
            for (int v = 0; v < NV; ++v) acc[tt][v] += h * a[v];
          }
        }
      }
      for (int r = 0; r < r_u; ++r) {
        const int j = p.R_e + r;
        float a[NV];
        load_part<T, NV>(ua + (static_cast<int64_t>(u) * p.r_max + r) * p.d_in + d0, nd, VEC, a);
#pragma unroll
        for (int tt = 0; tt < NT; ++tt) {
          const float h = hs[tt * p.R + j];
#pragma unroll
          for (int v = 0; v < NV; ++v) acc[tt][v] += h * a[v];
        }
      }
#pragma unroll
      for (int tt = 0; tt < NT; ++tt)
        if (tt < nt) store_part<T, NV>(dx + static_cast<int64_t>(s_tok[tt]) * p.d_in + d0, nd, VEC, acc[tt]);
    }
  }
}

// Raise the dynamic smem limit of `kernel` when a tile needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;   // rank space too wide for one tile
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

template <typename T>
cudaError_t expand_y_typed(const KParams& p, cudaStream_t stream) {
  const size_t smem = expand_smem_bytes(p, kExpTok);
  cudaError_t err = allow_smem(expand_y_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.P, static_cast<unsigned>(ceil_div(p.d_out, kThreads)));
  return launch_kernel(expand_y_kernel<T>, grid, dim3(kThreads), smem, stream, p);
}

template <typename T, bool VEC>
cudaError_t expand_dx_vec(const KParams& p, cudaStream_t stream) {
  const size_t smem = expand_smem_bytes(p, kDxTok);
  cudaError_t err = allow_smem(expand_dx_kernel<T, VEC>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.P, static_cast<unsigned>(ceil_div(p.d_in, static_cast<int64_t>(kThreads) * kDxVec)));
  return launch_kernel(expand_dx_kernel<T, VEC>, grid, dim3(kThreads), smem, stream, p);
}

template <typename T>
cudaError_t expand_dx_typed(const KParams& p, bool vec, cudaStream_t stream) {
  return vec ? expand_dx_vec<T, true>(p, stream) : expand_dx_vec<T, false>(p, stream);
}

}  // namespace

cudaError_t launch_expand_y(const KParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return expand_y_typed<float>(p, stream);
    case DType::kFloat16: return expand_y_typed<__half>(p, stream);
    case DType::kBFloat16: return expand_y_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_expand_dx(const KParams& p, DType dt, bool vec, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return expand_dx_typed<float>(p, vec, stream);
    case DType::kFloat16: return expand_dx_typed<__half>(p, vec, stream);
    case DType::kBFloat16: return expand_dx_typed<__nv_bfloat16>(p, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace proper_cuda
