// Public host API of the CUDA routed multi-LoRA kernels (csrc/cuda/*.cu).
//
// Plain C++ on raw device pointers and a cudaStream_t: no torch, no ATen. csrc/cuda_binding.cpp wraps it for
// torch tensors; anything else (a C++ server, a test driver) can call it directly.
//
// Semantics (proper_kernels/reference.py is the source of truth), for every token t with u = user_ids[t]:
//
//   delta[t] = s_e * sum_k [g[t,k] != 0] g[t,k] B_k (A_k x[t])
//            + [u >= 0] w[t] s_u[u] B_u[:, :r_u] (A_u[:r_u] x[t])
//
// Zero gates are structural (no term, d(gates) = 0 there). Rows r >= r_u of A_u and columns r >= r_u of B_u are
// never read and get zero gradient. Tokens with u = -1 get no user term and d(user_weight) = 0. Everything
// accumulates in fp32; outputs and gradients are written in the input dtype (d_gates, d_user_weight in fp32).
//
// Decomposition (SGMV style, tokens grouped by user):
//   shrink   h[t, :]  = [A_1; ..; A_K; A_u[:r_u]] x[t]          (one wide shrink over the concatenated rank space)
//   gate     hg[t, :] = h[t, :] * (s_e g[t,k] for expert columns, w[t] s_u[u] for user columns)
//   expand   y[t, :]  = [B_1 | .. | B_K | B_u[:, :r_u]] hg[t, :]
// and for the backward the same pieces transposed (see the "Semantics:" blocks of each kernel).
//
// Every launcher is asynchronous on `stream`, performs no host synchronisation and allocates nothing (the
// caller passes a workspace of the size the matching *_workspace_bytes function returns), so the whole call can
// be captured in a CUDA graph. Launchers return cudaErrorInvalidValue on inconsistent sizes or null pointers
// for parts that are present, and the launch error otherwise (cudaSuccess when everything was enqueued).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace proper_cuda {

// Element type of x, the adapters, grad_out and the dtype outputs.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Recommended token block of the segment table (Layout::blk_*): the kernels accept any block size, this one
// balances weight reuse against parallelism.
constexpr int kBlockTokens = 16;
// Recommended token block of the coarse table used by the gradient reductions (Layout::red_*).
constexpr int kReduceBlockTokens = 256;

// One routed_lora problem. All tensors are row-major, contiguous and on the current device.
struct Problem {
  DType dtype = DType::kFloat32;
  int64_t T = 0, d_in = 0, d_out = 0;
  int64_t K = 0, r_e = 0;      // group experts; K = 0: none
  int64_t U = 0, r_max = 0;    // per-user adapters; U = 0: none
  float expert_scale = 1.0f;   // s_e
  const void* x = nullptr;              // [T, d_in]            dtype
  const void* expert_a = nullptr;       // [K, r_e, d_in]       dtype
  const void* expert_b = nullptr;       // [K, d_out, r_e]      dtype
  const float* gates = nullptr;         // [T, K]               fp32 (0 = expert not selected)
  const void* user_a = nullptr;         // [U, r_max, d_in]     dtype
  const void* user_b = nullptr;         // [U, d_out, r_max]    dtype
  const int32_t* user_ids = nullptr;    // [T]  in [-1, U); ids outside [0, U) get no user term
  const int32_t* user_ranks = nullptr;  // [U]  r_u in [0, r_max] (clamped); null: every user has r_max
  const float* user_scale = nullptr;    // [U]  s_u; null: 1
  const float* user_weight = nullptr;   // [T]  w[t]; null: 1
};

// Token -> user metadata, built on the device (proper_kernels/cuda.py: argsort + proper_kernels.layout.block_table,
// no host sync). Segment u in [0, U) holds the tokens of user u; segment U the tokens with no user adapter.
// With U = 0 every pointer may be null: tokens are then taken in their natural order, in blocks of kBlockTokens.
struct Layout {
  const int32_t* order = nullptr;      // [T]  token indices sorted by segment
  // Segment table used by the shrink / expand kernels: block b owns positions [blk_start[b], blk_end[b]) of
  // `order`, all of one segment blk_user[b] in [0, U]; blk_user[b] = -1 marks an idle (padding) block.
  // Every position of `order` must belong to exactly one block.
  const int32_t* blk_user = nullptr;   // [P]
  const int32_t* blk_start = nullptr;  // [P]
  const int32_t* blk_end = nullptr;    // [P]
  int64_t num_blocks = 0;              // P
  // Coarse table of the same form (larger blocks), used by the backward's per-user gradient reductions
  // d(user_a), d(user_b). Only read when those gradients are requested and U > 0.
  const int32_t* red_user = nullptr;   // [Q]
  const int32_t* red_start = nullptr;  // [Q]
  const int32_t* red_end = nullptr;    // [Q]
  int64_t num_red_blocks = 0;          // Q
};

// Outputs of the backward; a null pointer means "not needed".
struct Grads {
  void* dx = nullptr;           // [T, d_in]          dtype
  void* d_expert_a = nullptr;   // [K, r_e, d_in]     dtype
  void* d_expert_b = nullptr;   // [K, d_out, r_e]    dtype
  float* d_gates = nullptr;     // [T, K]             fp32
  void* d_user_a = nullptr;     // [U, r_max, d_in]   dtype (rows r >= r_u are written as 0)
  void* d_user_b = nullptr;     // [U, d_out, r_max]  dtype (columns r >= r_u are written as 0)
  float* d_user_weight = nullptr;  // [T]            fp32 (0 for tokens with no user)
};

// Bytes of device workspace forward() needs (256-byte aligned pointer expected). Host-only, no sync.
size_t forward_workspace_bytes(const Problem& pr, const Layout& lay);

// y[T, d_out] (dtype) = delta. Every element of y is written.
cudaError_t forward(const Problem& pr, const Layout& lay, void* y, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream);

// Bytes of device workspace backward() needs for the requested gradients (same arguments as backward()).
size_t backward_workspace_bytes(const Problem& pr, const Layout& lay, const void* grad_out, const Grads& grads);

// Gradients of sum(grad_out * delta) for the non-null outputs of `grads`. grad_out: [T, d_out] dtype.
// Every element of each requested output is written.
cudaError_t backward(const Problem& pr, const Layout& lay, const void* grad_out, const Grads& grads,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace proper_cuda
