// Interface between the torch-facing driver (routed_lora_cpu.cpp) and the ISA-specific micro-kernels
// (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp).
//
// Only plain C types cross this boundary: the ISA translation units include no torch or standard-library
// header with inline functions, so no inline function is ever compiled with AVX-512 / AVX2 code generation and
// then shared (through a COMDAT symbol) with code that runs on a CPU without it.
//
// Vocabulary. The op is split into "groups": group g < K is expert g (A_g = expert_a[g], B_g = expert_b[g]),
// group K + u is user u (A = user_a[u][:r_u], B = user_b[u][:, :r_u]). An "entry" is one (token, group) pair
// with a term in the output; its `slot` is its offset in the per-entry rank-space buffers (H, Dr, ...), which
// hold `rank` fp32 values per entry, and `coef` its scale (s_e * gate for experts, s_u * w for users).
#pragma once

#include <cstdint>

namespace proper_cpu {

enum DType : int { kF32 = 0, kBF16 = 1 };  // bf16 is passed around as raw uint16 bits

struct Entry {
  int32_t tok;    // token index (row of x, dy, y)
  int32_t group;  // index into the GroupDesc table
  int64_t slot;   // offset of this entry's rank-space vector in H / Dr buffers
  float coef;     // s_e * g[t,k] (expert) or s_u[u] * w[t] (user)
};

struct GroupDesc {
  const void* a;  // [rank, D] rows of A with row stride D (the padded rows of user_a are never touched)
  const void* b;  // [O, ldb]: column j < rank of B is b[o * ldb + j]
  int64_t ldb;    // r_e for experts, r_max for users
  int32_t rank;   // r_e or r_u: rows of A / columns of B in use
};

// Tokens per block of the `tn` kernel; its scratch must hold kTnTokens * (round_up(q1 - q0, 16) + 16)
// + rank * (q1 - q0) floats.
constexpr int kTnTokens = 32;

// Every function takes the input dtype `dt` (kF32 / kBF16) of its x / dy / weight operand; rank-space buffers
// and outputs are fp32. Lists of entries are given as (ent, idx, n): the entries ent[idx[0..n)], all of one group.
struct KernelTable {
  const char* name;

  // H[slot_i + j] = c_i * <x[tok_i, :], A[j, :]>, j < rows, with c_i = coef_i if `scale` else 1.
  void (*shrink)(int dt, const void* x, int64_t D, const void* a, int rows, const Entry* ent,
                 const int32_t* idx, int n, int scale, float* H);

  // Dr[slot_i + j] = <dy[tok_i, :], B[:, j]>, j < rank  (B^T dy in rank space).
  void (*bshrink)(int dt, const void* dy, int64_t O, const void* b, int64_t ldb, int rank, const Entry* ent,
                  const int32_t* idx, int n, float* Dr);

  // Y[tok_i, o] += <B[o, 0:rank], H[slot_i : slot_i + rank]> for o in [o0, o1)  (expand, B unpacked).
  void (*rowdot)(int dt, const void* b, int64_t ldb, int rank, int64_t o0, int64_t o1, const Entry* ent,
                 const int32_t* idx, int n, const float* H, float* Y, int64_t ldy);

  // Y[tok_i, c] += sum_{j < rank} Hs[slot_i + j] * w[j * ldw + (c - c0)] for c in [c0, c1): w points at column c0
  // of a row-major block (expand with the block of B^T packed by pack_bt, dt = kF32; dx with the block of A).
  void (*accum)(int dt, const void* w, int64_t ldw, int rank, int64_t c0, int64_t c1, const Entry* ent,
                const int32_t* idx, int n, const float* Hs, float* Y, int64_t ldy);

  // S[j, c] = sum_i P[slot_i + j] * Q[tok_i, c] for j < rank, c in [q0, q1), summed over the entries in order.
  // trans = 0: S[j, c] is stored at C[j * ldc + c] (dA, C = A's gradient); trans = 1: at C[c * ldc + j] (dB).
  void (*tn)(int dt, const void* q, int64_t ldq, int64_t q0, int64_t q1, int rank, const Entry* ent,
             const int32_t* idx, int n, const float* P, float* C, int64_t ldc, int trans, float* scratch);

  // Bt[j * ldt + o] = B[o * ldb + j] in fp32, j < rank, o < O.
  void (*pack_bt)(int dt, const void* b, int64_t ldb, int rank, int64_t O, float* Bt, int64_t ldt);

  // dst[r * ldd + c] = src[r * lds + c] in fp32, r < rows, c < cols; each row zero-padded to a multiple of 16.
  void (*pack_rows)(int dt, const void* src, int64_t lds, int rows, int64_t cols, float* dst, int64_t ldd);

  // dst[i] = bf16(src[i]), i < n: round to nearest even, NaN -> 0x7FC0 (bitwise torch's .to(torch.bfloat16)).
  void (*to_bf16)(const float* src, int64_t n, uint16_t* dst);

  // The bf16 expand with vdpbf16ps, nullptr where the ISA has none (kernels_dpbf16.h). H is rounded to bf16 there,
  // as the torch reference's bf16 matmuls round it: used only where the delta is returned in bf16.
  // rowdot for bf16 B: Y[tok_i, o] += <B[o, 0:rank], bf16(H[slot_i : slot_i + rank])>, o in [o0, o1).
  void (*rowdot_bf16h)(int dt, const void* b, int64_t ldb, int rank, int64_t o0, int64_t o1, const Entry* ent,
                       const int32_t* idx, int n, const float* H, float* Y, int64_t ldy);
  // Bp[p * ldt + o] = B[o * ldb + 2p] | B[o * ldb + 2p + 1] << 16 (bf16 bits), p < ceil(rank / 2), o < O.
  void (*pack_bt_pairs)(const void* b, int64_t ldb, int rank, int64_t O, uint32_t* Bp, int64_t ldt);
  // accum for bf16 B packed by pack_bt_pairs: Y[tok_i, c] += sum_j bf16(Hs[slot_i + j]) * B[c, j], c in [c0, c1).
  void (*accum_pairs)(const uint32_t* bp, int64_t ldt, int rank, int64_t c0, int64_t c1, const Entry* ent,
                      const int32_t* idx, int n, const float* Hs, float* Y, int64_t ldy);
};

// Each returns its table, or nullptr when that ISA was not compiled in (non-x86 builds).
const KernelTable* kernels_avx512bf16();
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_generic();

}  // namespace proper_cpu
