// Internal header of the CUDA routed multi-LoRA kernels: the parameter block every kernel receives, tile sizes,
// device helpers and the per-kernel launchers that routed_lora.cu strings together.
// CUDA headers only (no torch / ATen).
//
// Index conventions used by every kernel (see routed_lora.cuh for the semantics):
//   R_e = K * r_e                 expert part of the rank space; column j < R_e is expert k = j / r_e, rank
//                                 r = j % r_e; expert_a viewed as a [R_e, d_in] matrix has row j = A_k[r, :]
//   R   = R_e + r_max             width (row stride) of every fp32 rank-space buffer [*, T, R]; column R_e + r is
//                                 rank r of the token's user, meaningful only for r < r_u
//   blocks                        block b of the segment table owns positions [start, end) of `order`, all
//                                 tokens of one user (user == U: tokens without a user; -1: idle block)
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "routed_lora.cuh"

namespace proper_cuda {
namespace detail {

// ------------------------------------------------------------------------------------------- tile sizes
constexpr int kThreads = 256;          // every kernel runs 256-thread blocks (8 warps)
constexpr int kWarps = kThreads / 32;

// shrink_x: a warp owns kShrinkRowsPerWarp rows of the concatenated A, the block kShrinkRows rows.
constexpr int kShrinkRowsPerWarp = 4;
constexpr int kShrinkRows = kWarps * kShrinkRowsPerWarp;   // 32
constexpr int kShrinkTok = 8;          // tokens per register tile
// shrink_dy: a warp owns one tile of kDyCols rank columns of the concatenated B.
constexpr int kDyCols = 8;
constexpr int kDyTok = 8;
// expand_y: a thread owns one output column o; tokens in smem tiles of kExpTok.
constexpr int kExpTok = 8;
// expand_dx: a thread owns kDxVec consecutive d; tokens in smem tiles of kDxTok.
constexpr int kDxTok = 8;
constexpr int kDxVec = 4;
// seg_outer (dA / dB): a block owns kOutRanks rank rows x kThreads * kOutVec columns of the big dimension.
constexpr int kOutRanks = 16;
constexpr int kOutVec = 4;
constexpr int kOutTok = 32;            // tokens staged in smem per round
// split of the long reduction (d_in / d_out) of the shrinks: at least this many elements per split.
constexpr int kMinSplit = 1024;

// ------------------------------------------------------------------------------------------- parameters
// Everything a kernel may read, passed by value (a few hundred bytes of kernel parameters).
struct KParams {
  int T, d_in, d_out, K, r_e, U, r_max;
  int R_e, R;                  // K * r_e, R_e + r_max
  float expert_scale;
  const void* x;               // [T, d_in]
  const void* ea;              // [K, r_e, d_in] = [R_e, d_in]
  const void* eb;              // [K, d_out, r_e]
  const float* gates;          // [T, K] fp32
  const void* ua;              // [U, r_max, d_in]
  const void* ub;              // [U, d_out, r_max]
  const int32_t* uid;          // [T]
  const int32_t* uranks;       // [U] or null
  const float* uscale;         // [U] or null
  const float* uweight;        // [T] or null
  const void* dy;              // [T, d_out] (backward)
  // segment table (fine) and coarse reduction table
  const int32_t* order;        // [T] or null (identity)
  const int32_t* blk_user;     // [P] or null (arithmetic blocks of kBlockTokens, U must be 0)
  const int32_t* blk_start;
  const int32_t* blk_end;
  int P;
  const int32_t* red_user;     // [Q]
  const int32_t* red_start;
  const int32_t* red_end;
  int Q;
  // vector-load permissions decided on the host from sizes and pointer alignment
  int vec_eb;                  // expert_b rows of 8 ranks: r_e % 8 == 0 and 16-byte aligned base
  int vec_ub;                  // user_b rows of 8 ranks: r_max % 8 == 0 and 16-byte aligned base
  // fp32 rank-space workspaces
  float* h_part;               // [h_splits, T, R]  partial A x over d_in splits (raw, ungated)
  int h_splits, h_chunk;
  float* g_part;               // [g_splits, T, R]  partial B^T dy over d_out splits (raw, ungated)
  int g_splits, g_chunk;
  float* dh;                   // [T, R]  gated B^T dy: what flows back into A and x
  float* hc;                   // [T, R]  gated A x: what multiplies dy in d(B)
  // outputs
  void* y;                     // [T, d_out]
  void* dx;                    // [T, d_in]
  float* dgates;               // [T, K]
  float* dw;                   // [T]
  float* acc_ea;               // [R_e, d_in]        fp32 accumulators of the weight gradients
  float* acc_eb;               // [K, d_out, r_e]
  float* acc_ua;               // [U, r_max, d_in]
  float* acc_ub;               // [U, d_out, r_max]
};

// ------------------------------------------------------------------------------------------- launchers
// One per kernel (dtype dispatch inside); grids are derived from KParams. Defined in the .cu files.
cudaError_t launch_shrink_x(const KParams& p, DType dt, bool vec, cudaStream_t stream);     // shrink.cu
cudaError_t launch_shrink_dy(const KParams& p, DType dt, cudaStream_t stream);             // shrink.cu
cudaError_t launch_expand_y(const KParams& p, DType dt, cudaStream_t stream);              // expand.cu
cudaError_t launch_expand_dx(const KParams& p, DType dt, bool vec, cudaStream_t stream);   // expand.cu
cudaError_t launch_combine(const KParams& p, cudaStream_t stream);                         // reduce.cu
// mode_b: 0 = d(A) (big operand x, rank rows x d_in), 1 = d(B) (big operand dy, d_out x rank columns);
// users: 0 = the expert part over all tokens in chunks of `chunk`, 1 = per-user part over the coarse table.
cudaError_t launch_seg_outer(const KParams& p, DType dt, int mode_b, int users, int chunk, bool vec,
                             cudaStream_t stream);                                         // reduce.cu
cudaError_t launch_to_dtype(const float* src, void* dst, int64_t n, DType dt, cudaStream_t stream);  // reduce.cu

// Dynamic shared memory of the expand kernels: a [tok_tile, R] fp32 tile, K selection flags, tok_tile ids.
inline size_t expand_smem_bytes(const KParams& p, int tok_tile) {
  return (static_cast<size_t>(tok_tile) * p.R + p.K + tok_tile) * 4;
}

// ------------------------------------------------------------------------------------------- host utils
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned_to(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}
inline size_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Launch `kernel` on (grid, block, smem, stream). The emulator build (PROPER_CUDA_EMULATE, tests only) runs
// the same kernel on host fibers instead of the triple-chevron launch.
template <typename Kernel, typename... Args>
inline cudaError_t launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                 Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;   // nothing to do
#ifdef PROPER_CUDA_EMULATE
  (void)stream;
  return ::proper_emu::launch(kernel, grid, block, smem, args...);
#else
  kernel<<<grid, block, smem, stream>>>(args...);
  return cudaGetLastError();
#endif
}

// ------------------------------------------------------------------------------------------- device utils
__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Raw unsigned type of B bytes, for vector memory access.
template <int B> struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// N consecutive elements at p, converted to fp32, with vector loads of at most 16 bytes.
// Precondition: p is aligned to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kChunk = kBytes >= 16 ? 16 : kBytes;
  constexpr int kPer = kChunk / static_cast<int>(sizeof(T));
  static_assert(kBytes % kChunk == 0, "vector size must be a multiple of the chunk");
  using Raw = typename RawVec<kChunk>::type;
#pragma unroll
  for (int c = 0; c < N / kPer; ++c) {
    const Raw raw = reinterpret_cast<const Raw*>(p)[c];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_f<T>(e[i]);
  }
}

// The first n (<= N) elements at p, zero-filled to N; vector load when vec (then n == N and p aligned).
template <typename T, int N>
__device__ __forceinline__ void load_part(const T* p, int n, bool vec, float* out) {
  if (vec) {
    load_vec<T, N>(p, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < n ? to_f<T>(p[i]) : 0.0f;
  }
}

// Store the first n (<= N) values at p; one vector store when vec (then n == N and p aligned to N*sizeof(T)).
template <typename T, int N>
__device__ __forceinline__ void store_part(T* p, int n, bool vec, const float* v) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes <= 16) {
    if (vec) {
      using Raw = typename RawVec<kBytes>::type;
      Raw raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = from_f<T>(v[i]);
      *reinterpret_cast<Raw*>(p) = raw;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) p[i] = from_f<T>(v[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;   // the xor butterfly leaves the same (bitwise) sum in every lane
}

// One block of the segment table. user: -1 idle, [0, U) a user, U the tokens without a user.
struct Block {
  int user, start, end;
};

__device__ __forceinline__ Block load_block(const int32_t* bu, const int32_t* bs, const int32_t* be, int b,
                                            int T, int U) {
  Block k;
  if (bu == nullptr) {   // no users: natural token order in blocks of kBlockTokens
    k.start = b * kBlockTokens;
    k.end = imin(T, k.start + kBlockTokens);
    k.user = k.start < T ? U : -1;
  } else {
    k.user = bu[b];
    k.start = bs[b];
    k.end = be[b];
    if (k.user < 0 || k.user > U || k.start < 0 || k.end > T || k.start >= k.end) k.user = -1;
  }
  return k;
}

// Token at position i of the user-sorted order (identity without a table).
__device__ __forceinline__ int token_at(const KParams& p, int i) { return p.order ? p.order[i] : i; }

// The user adapter of token t, or -1 (no user: id -1, or outside [0, U), or no users at all).
__device__ __forceinline__ int user_of(const KParams& p, int t) {
  if (p.uid == nullptr) return -1;
  const int u = p.uid[t];
  return (u >= 0 && u < p.U) ? u : -1;
}

// r_u of user u (0 for u < 0), clamped to [0, r_max] so a bad rank can never read past the adapter.
__device__ __forceinline__ int rank_of(const KParams& p, int u) {
  if (u < 0) return 0;
  if (p.uranks == nullptr) return p.r_max;
  return imin(imax(p.uranks[u], 0), p.r_max);
}

// w[t] * s_u[u]: the user-term factor of token t (u >= 0).
__device__ __forceinline__ float user_coef(const KParams& p, int t, int u) {
  const float su = p.uscale ? p.uscale[u] : 1.0f;
  const float w = p.uweight ? p.uweight[t] : 1.0f;
  return su * w;
}

// Does any of the first nt tokens select expert k (gate != 0)?
template <int N>
__device__ __forceinline__ bool any_selected(const KParams& p, const int* tok, int nt, int k) {
  bool any = false;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < nt) any |= p.gates[static_cast<int64_t>(tok[i]) * p.K + k] != 0.0f;
  return any;
}

// Pointer to the dynamic shared memory of the running block (16-byte aligned).
__device__ __forceinline__ float* dynamic_smem() {
#ifdef PROPER_CUDA_EMULATE
  return ::proper_emu::dynamic_smem();
#else
  extern __shared__ float4 proper_dynamic_smem[];
  return reinterpret_cast<float*>(proper_dynamic_smem);
#endif
}

}  // namespace detail
}  // namespace proper_cuda
