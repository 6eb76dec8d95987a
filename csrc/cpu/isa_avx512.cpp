// AVX-512 micro-kernels (16 fp32 lanes): the same templates as AVX2 (kernels_impl.h) over a 16-lane `V`, with
// fault-suppressing masked loads/stores for tails. Selected at run time when the CPU reports avx512f, avx512bw
// and avx512vl (the bf16 tail load uses a masked 16-bit load). See isa_avx2.cpp for why nothing else is
// included here.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside avx512fintrin.h
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace proper_cpu {
namespace {

struct V {
  static constexpr int W = 16;
  typedef __m512 R;
  static inline __mmask16 mask(int n) { return (__mmask16)((1u << n) - 1u); }  // 0 < n < 16
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float f) { return _mm512_set1_ps(f); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline R widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline R load(const uint16_t* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
  static inline R load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static inline R load_n(const uint16_t* p, int n) { return widen(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline void store_n(float* p, R v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline float hsum(R v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
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
  static inline void reduce8(const R* a, float* out) {
    for (int i = 0; i < 8; ++i) out[i] = hsum(a[i]);
  }
};

struct Cfg {  // 32 zmm registers
  static constexpr int SHRINK_M = 4, SHRINK_N = 4;     // 16 accumulators
  static constexpr int BSHRINK_M = 8, BSHRINK_NV = 2;  // 16 accumulators
  static constexpr int ACCUM_M = 4, ACCUM_NV = 4;      // 16 accumulators
  static constexpr int TN_MJ = 4, TN_NV = 4;           // 16 accumulators
};

#define PK_ISA_NAME "avx512"
#include "kernels_impl.h"
#undef PK_ISA_NAME

}  // namespace

const KernelTable* kernels_avx512() { return &kTable; }

}  // namespace proper_cpu
#pragma GCC pop_options

#else
namespace proper_cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace proper_cpu
#endif
