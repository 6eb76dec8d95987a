// Portable micro-kernels: the same templates (kernels_impl.h) over GCC/Clang vector extensions, compiled for the
// baseline target (SSE2 on x86-64, NEON on arm64). 16 lanes, like AVX-512, so this path also exercises the
// 16-lane tail logic on machines without AVX-512 (force it with PROPER_CPU_ISA=generic).
#include <cstdint>

#include "kernels.h"

// 64-byte vectors are only passed between inline functions of this file: the psABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace proper_cpu {
namespace {

struct V {
  static constexpr int W = 16;
  typedef float R __attribute__((vector_size(64)));
  static inline R zero() { return R{}; }
  static inline R set1(float f) { return R{} + f; }
  static inline R load(const float* p) {
    R r;
    __builtin_memcpy(&r, p, sizeof(r));
    return r;
  }
  static inline float widen(uint16_t h) {  // bf16 -> fp32 is a 16-bit left shift
    const uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  static inline R load(const uint16_t* p) {
    R r;
    for (int i = 0; i < W; ++i) r[i] = widen(p[i]);
    return r;
  }
  static inline R load_n(const float* p, int n) {
    R r = R{};
    for (int i = 0; i < n; ++i) r[i] = p[i];
    return r;
  }
  static inline R load_n(const uint16_t* p, int n) {
    R r = R{};
    for (int i = 0; i < n; ++i) r[i] = widen(p[i]);
    return r;
  }
  static inline R fma(R a, R b, R c) { return a * b + c; }
  static inline void store(float* p, R v) { __builtin_memcpy(p, &v, sizeof(v)); }
  static inline void store_n(float* p, R v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  static inline float hsum(R v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  static inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
  static inline R add(R a, R b) { return a + b; }
  static inline R reduce_rows(const R* a) {  // lane i = hsum(a[i]), i < W
    R r;
    for (int i = 0; i < W; ++i) r[i] = hsum(a[i]);
    return r;
  }
};

struct Cfg {  // small tiles: a 16-lane vector is 4 SSE registers
  static constexpr int SHRINK_M = 2, SHRINK_N = 2;
  static constexpr int BSHRINK_M = 2, BSHRINK_NV = 1;
  static constexpr int ACCUM_M = 2, ACCUM_NV = 1;
  static constexpr int TN_MJ = 2, TN_NV = 1;
};

#define PK_ISA_NAME "generic"
#include "kernels_impl.h"
#undef PK_ISA_NAME

}  // namespace

const KernelTable* kernels_generic() { return &kTable; }

}  // namespace proper_cpu
