// The 16-lane fp32 SIMD abstraction `V` and the tile sizes `Cfg` of the AVX-512 micro-kernels, shared by
// isa_avx512.cpp and isa_avx512bf16.cpp. Include it inside their anonymous namespace, after their
// `#pragma GCC target` and <immintrin.h> (see isa_avx2.cpp for why nothing is shared between ISA units).
#pragma once

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
    return hsum4(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  // dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block (r, c < 8)
  static inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
    transpose8x8(src, lds, dst, ldd);
  }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  // Lane i = the sum of the lanes of a[i], i < 16: one transposing tree (15 adds, 30 shuffles for 16 rows) instead
  // of a horizontal sum per row (9 dependent operations each).
  static inline R reduce_rows(const R* a) {
    R u[2];
    reduce_halves(a, u);
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  }
  // The first three levels of that tree: u[i]'s 128-bit lane 2h + g (h, g < 2) holds, for the rows
  // 8i + 4g .. 8i + 4g + 3, the sum of their lanes 8h .. 8h + 7 (each row's low or high half).
  static inline void reduce_halves(const R* a, R* u) {
    R s[8], t[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a_2i, a_2i+1, a_2i, a_2i+1] partial sums (lanes 0+2, 1+3)
      s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of rows 4i .. 4i + 3
      const __m512d p = _mm512_castps_pd(s[2 * i]), q = _mm512_castps_pd(s[2 * i + 1]);
      t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    for (int i = 0; i < 2; ++i)  // 128-bit lanes 0+1 and 2+3 of rows 8i .. 8i + 3, then of 8i + 4 .. 8i + 7
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  }
};

struct Cfg {  // 32 zmm registers
  static constexpr int SHRINK_M = 4, SHRINK_N = 4;     // 16 accumulators
  static constexpr int BSHRINK_M = 8, BSHRINK_NV = 2;  // 16 accumulators
  static constexpr int ACCUM_M = 4, ACCUM_NV = 4;      // 16 accumulators
  static constexpr int TN_MJ = 4, TN_NV = 4;           // 16 accumulators
};
