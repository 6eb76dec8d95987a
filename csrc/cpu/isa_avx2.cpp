// AVX2 + FMA micro-kernels (8 fp32 lanes). Compiled with `#pragma GCC target` so the extension runs on any
// x86-64 CPU; routed_lora_cpu.cpp selects this table at run time when the CPU reports avx2 and fma.
// Only <immintrin.h> and <cstdint> are included, and everything lives in an anonymous namespace: no inline
// function compiled for AVX2 here can be picked by the linker for code that runs without it.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma")
#include <immintrin.h>

namespace proper_cpu {
namespace {

#include "avx_shared.h"

struct V {
  static constexpr int W = 8;
  typedef __m256 R;
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float f) { return _mm256_set1_ps(f); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline R load(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit left shift
    const __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline __m256i mask(int n) {  // first n lanes on, 0 < n < 8
    static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i*)(m + 8 - n));
  }
  static inline R load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static inline R load_n(const uint16_t* p, int n) {
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return load(tmp);
  }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline void store_n(float* p, R v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static inline float hsum(R v) {
    return hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
  }
  // dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block (r, c < 8)
  static inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
    transpose8x8(src, lds, dst, ldd);
  }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  // Lane i = the sum of the lanes of a[i], i < 8, with one hadd tree.
  static inline R reduce_rows(const R* a) {
    const R s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const R s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const R s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    const R lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
  }
};

struct Cfg {  // 16 ymm registers
  static constexpr int SHRINK_M = 3, SHRINK_N = 4;     // 12 accumulators
  static constexpr int BSHRINK_M = 6, BSHRINK_NV = 2;  // 12 accumulators
  static constexpr int ACCUM_M = 3, ACCUM_NV = 4;      // 12 accumulators + 3 broadcasts + 1 load
  static constexpr int TN_MJ = 4, TN_NV = 3;           // 12 accumulators
};

#define PK_ISA_NAME "avx2"
#include "kernels_impl.h"
#undef PK_ISA_NAME

}  // namespace

const KernelTable* kernels_avx2() { return &kTable; }

}  // namespace proper_cpu
#pragma GCC pop_options

#else
namespace proper_cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace proper_cpu
#endif
