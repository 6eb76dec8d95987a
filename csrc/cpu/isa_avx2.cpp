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
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
  }
  // dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block (r, c < 8)
  static inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
           r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds),
           r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds),
           r7 = _mm256_loadu_ps(src + 7 * lds);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
  // out[i] = sum of the lanes of a[i], i < 8, with one hadd tree.
  static inline void reduce8(const R* a, float* out) {
    const R s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const R s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const R s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    const R lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
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
