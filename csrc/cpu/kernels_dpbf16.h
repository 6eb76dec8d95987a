// bf16 micro-kernels with vdpbf16ps (AVX512-BF16), included by kernels_impl.h in isa_avx512bf16.cpp only (inside
// its anonymous namespace, PK_DPBF16 defined, after `V`, ld1, imin, lmin and kRowdotAhead).
//
// vdpbf16ps multiplies 32 bf16 pairs exactly and adds each lane's two products into its fp32 accumulator: twice
// the multiply-adds of an fp32 FMA per instruction, and no widening of the bf16 operands (two instructions per 16
// values in the widening kernels, which bounded the bf16 shrink and expand).
//
// Semantics are those of the widening kernels except for two roundings, both ones the torch reference's own bf16
// matmuls make (tests/cases.py bounds every backend by that reference's error): bf16 subnormals read as zero;
// and the expands (rowdot_bf16h, accum_pairs) round the rank-space vector H (fp32, already scaled by the entry's
// coefficient) to bf16, round-to-nearest-even, before it meets B. The driver uses those two only where the
// delta itself is returned in bf16 (an error of the order of that final rounding); a bf16 call that adds its
// delta into an fp32 `out` (bf16 adapters on an fp32 model) keeps the widening expand and fp32 accuracy.
// Accumulation stays fp32. Each output is still one fixed sequence
// of operations (steps of 32 along the reduced dimension, one masked tail, the same final reduction) whatever the
// tile, task or thread, so results stay independent of the thread count.

constexpr int kDpMaxRank = 256;  // rowdot_bf16h's bf16 copies of H live on the stack; larger ranks widen instead

static inline __mmask32 dp_mask32(int n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }
static inline __mmask16 dp_mask16(int n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
static inline __m512bh dp_bh(__m512i v) { return (__m512bh)v; }

// 32 bf16 of h[j : j + 32] (fp32, the lanes past n zero), rounded to nearest even.
static inline __m512i dp_round32(const float* h, int n) {
  const __m512 lo = _mm512_maskz_loadu_ps(dp_mask16(n), h);
  const __m512 hi = _mm512_maskz_loadu_ps(dp_mask16(n - 16), h + 16);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// ------------------------------------------------------------------------------------------- shrink tile
// res[i * N + j] = <xr[i][0:D], wr[j][0:D]>, both bf16 (see dot_tile).
template <int M, int N, bool PF>
static void dot_tile_dp(const uint16_t* const* xr, const uint16_t* const* wr, int64_t D, float* res) {
  __m512 acc[M][N];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {  // 32 values = one cache line of each row per step
    if (PF) {
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) __builtin_prefetch(wr[j] + d + 32 * 32);
    }
    __m512bh xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = dp_bh(_mm512_loadu_si512((const void*)(xr[i] + d)));
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const __m512bh wv = dp_bh(_mm512_loadu_si512((const void*)(wr[j] + d)));
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
  }
  if (d < D) {
    const __mmask32 m = dp_mask32((int)(D - d));  // the other lanes read as zero
    __m512bh xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = dp_bh(_mm512_maskz_loadu_epi16(m, xr[i] + d));
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const __m512bh wv = dp_bh(_mm512_maskz_loadu_epi16(m, wr[j] + d));
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv[i], wv);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) res[i * N + j] = V::hsum(acc[i][j]);
}

// ---------------------------------------------------------------------------------------------- row-dot
// rank <= 16 (users' and experts' usual ranks): a rank-16 bf16 row is half a vector, so each instruction takes two
// rows of B (row 2k in the low 256 bits, row 2k + 1 in the high) against H's 16 values duplicated in both halves,
// and 32 rows make 16 accumulators. The first three levels of the transposing tree (V::reduce_rows) leave each
// lane with the sum of one half, i.e. of one row: rows 16i + [0 2 4 6 1 3 5 7 8 10 12 14 9 11 13 15] in vector
// i, which one permutation puts in order. Half the loads, products and reductions of one row per instruction.
static inline __m512i dp_dup16(const float* h, int rank) {  // bf16(h[0:rank]) in both halves, zero past rank
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(dp_mask16(rank), h));
  return _mm512_inserti64x4(_mm512_castsi256_si512(b), b, 1);
}

template <bool CONTIG>  // CONTIG: ld == 16, so rows 2k and 2k + 1 are one 64-byte load
static inline __m512i dp_rows2(const uint16_t* r0, const uint16_t* r1, __mmask16 m) {
  if (CONTIG) return _mm512_maskz_loadu_epi16((__mmask32)m | ((__mmask32)m << 16), r0);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, r0)), _mm256_maskz_loadu_epi16(m, r1),
                            1);
}

// 16 accumulators of row pairs -> the 32 row sums, in order, in r[0] (rows 0-15) and r[1] (rows 16-31)
static inline void dp_reduce_pairs(const __m512* a, __m512* r) {
  V::reduce_halves(a, r);
  const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
  for (int i = 0; i < 2; ++i) r[i] = _mm512_permutexvar_ps(order, r[i]);
}

template <bool CONTIG>
static void rowdot_pairs16(const uint16_t* B, int64_t ld, int rank, int64_t o0, int64_t o1,
                           const proper_cpu::Entry* ent, const int32_t* idx, int n, const float* H, float* Y,
                           int64_t ldy) {
  const __mmask16 m = dp_mask16(rank);
  constexpr int kQ = 4;  // entries whose rounded H is held at a time
  for (int q0 = 0; q0 < n; q0 += kQ) {
    const int nq = imin(kQ, n - q0);
    __m512i hv[kQ];
    for (int q = 0; q < nq; ++q) hv[q] = dp_dup16(H + ent[idx[q0 + q]].slot, rank);
    for (int64_t o = o0; o < o1; o += 32) {
      const int nv = (int)lmin(32, o1 - o);
      const uint16_t* br[32];  // row o + i (the last block: rows past o1 - 1 clamped to it)
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) br[i] = B + (nv == 32 ? o + i : lmin(o + i, o1 - 1)) * ld;
      if (q0 == 0 && o + 32 + kRowdotAhead < o1) {  // one sequential stream through B: ask for it well ahead
        const char* pf = (const char*)(B + (o + kRowdotAhead) * ld);
        for (int64_t off = 0; off < 32 * ld * 2; off += 64) __builtin_prefetch(pf + off);
      }
      for (int q = 0; q < nq; ++q) {
        __m512 acc[16];
        if (CONTIG && nv == 32) {  // (a clamped block's single loads would read past row o1 - 1)
#pragma GCC unroll 16
          for (int k = 0; k < 16; ++k)
            acc[k] = _mm512_dpbf16_ps(_mm512_setzero_ps(), dp_bh(dp_rows2<true>(br[2 * k], br[2 * k + 1], m)),
                                      dp_bh(hv[q]));
        } else {
#pragma GCC unroll 16
          for (int k = 0; k < 16; ++k)
            acc[k] = _mm512_dpbf16_ps(_mm512_setzero_ps(), dp_bh(dp_rows2<false>(br[2 * k], br[2 * k + 1], m)),
                                      dp_bh(hv[q]));
        }
        __m512 r[2];
        dp_reduce_pairs(acc, r);
        float* y = Y + (int64_t)ent[idx[q0 + q]].tok * ldy + o;
        add_rows(y, r[0], imin(16, nv));
        if (nv > 16) add_rows(y + 16, r[1], nv - 16);
      }
    }
  }
}

// Y[tok_i, o] += <B[o, 0:rank], bf16(H[slot_i : slot_i + rank])> for o in [o0, o1) (see rowdot_t): 16 rows of B at
// a time, 32 values of the rank per instruction, H rounded once per entry; rank <= 16: rowdot_pairs16.
static void rowdot_bf16h(int /*dt: kBF16*/, const void* bv, int64_t ld, int rank, int64_t o0, int64_t o1,
                         const proper_cpu::Entry* ent,
                         const int32_t* idx, int n, const float* H, float* Y, int64_t ldy) {
  const uint16_t* B = (const uint16_t*)bv;
  if (rank <= 16) {
    if (ld == 16) rowdot_pairs16<true>(B, ld, rank, o0, o1, ent, idx, n, H, Y, ldy);
    else rowdot_pairs16<false>(B, ld, rank, o0, o1, ent, idx, n, H, Y, ldy);
    return;
  }
  if (rank > kDpMaxRank) {  // (the rounded copies of H would not fit on the stack)
    rowdot_t<uint16_t>(B, ld, rank, o0, o1, ent, idx, n, H, Y, ldy);
    return;
  }
  constexpr int kQ = 4;  // entries whose rounded H is held at a time
  alignas(64) uint16_t hb[kQ][kDpMaxRank];
  const int steps = (rank + 31) / 32;
  for (int q0 = 0; q0 < n; q0 += kQ) {
    const int nq = imin(kQ, n - q0);
    for (int q = 0; q < nq; ++q) {
      const float* h = H + ent[idx[q0 + q]].slot;
      for (int s = 0; s < steps; ++s)
        _mm512_store_si512((void*)(hb[q] + 32 * s), dp_round32(h + 32 * s, rank - 32 * s));
    }
    for (int64_t o = o0; o < o1; o += 16) {
      const uint16_t* br[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) br[i] = B + lmin(o + i, o1 - 1) * ld;
      const int nv = (int)lmin(16, o1 - o);
      if (q0 == 0 && o + 16 + kRowdotAhead < o1) {  // one sequential stream through B: ask for it well ahead
        const char* pf = (const char*)(B + (o + kRowdotAhead) * ld);
        for (int64_t off = 0; off < 16 * ld * 2; off += 64) __builtin_prefetch(pf + off);
      }
      for (int q = 0; q < nq; ++q) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        for (int s = 0; s < steps; ++s) {
          const __mmask32 m = dp_mask32(rank - 32 * s);
          const __m512bh hv = dp_bh(_mm512_load_si512((const void*)(hb[q] + 32 * s)));
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            acc[i] = _mm512_dpbf16_ps(acc[i], dp_bh(_mm512_maskz_loadu_epi16(m, br[i] + 32 * s)), hv);
        }
        add_rows(Y + (int64_t)ent[idx[q0 + q]].tok * ldy + o, V::reduce_rows(acc), nv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ packed expand (pairs)
// Bp[p * ldt + o] = B[o, 2p] | B[o, 2p + 1] << 16 for p < ceil(rank / 2), o < O: B^T of a block of output rows as
// bf16 pairs, the operand layout of vdpbf16ps (an odd rank's last pair has a zero high half).
static void pack_bt_pairs(const void* bv, int64_t ldb, int rank, int64_t O, uint32_t* Bp, int64_t ldt) {
  const uint16_t* B = (const uint16_t*)bv;
  const int np = (rank + 1) / 2;
  int p8 = 0;
  int64_t O8 = 0;
  if (ldb % 2 == 0) {  // rows as 32-bit pairs: whole 8 x 8 blocks through the register transpose
    p8 = (rank / 2) / 8 * 8;
    O8 = O / 8 * 8;
    for (int64_t o = 0; o < O8; o += 8)
      for (int p = 0; p < p8; p += 8)
        V::transpose8((const float*)(B + o * ldb + 2 * p), ldb / 2, (float*)(Bp + (int64_t)p * ldt + o), ldt);
  }
  for (int p = 0; p < np; ++p) {
    uint32_t* dst = Bp + (int64_t)p * ldt;
    const bool two = 2 * p + 1 < rank;
    for (int64_t o = (p < p8 ? O8 : 0); o < O; ++o) {
      const uint16_t* row = B + o * ldb + 2 * p;
      dst[o] = (uint32_t)row[0] | (two ? (uint32_t)row[1] << 16 : 0u);
    }
  }
}

// Y[tok_i, c] += sum_p <bf16(Hs[slot_i + 2p : + 2]), Bp[p * ldt + c - c0]> for c in [c0, c1): the expand of a
// group with many tokens (see accum_tile). M entries x NV column vectors; H rounded 32 values at a time.
template <int M, int NV, bool PART>
static void accum_pairs_tile(const uint32_t* bp, int64_t ldt, int rank, const float* const* hs, float* const* ys,
                             int64_t c, int nlast) {
  const __mmask16 ml = dp_mask16(nlast);
  __m512 acc[M][NV];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = (PART && v == NV - 1) ? _mm512_maskz_loadu_ps(ml, ys[i] + c + v * 16)
                                        : _mm512_loadu_ps(ys[i] + c + v * 16);
  for (int j0 = 0; j0 < rank; j0 += 32) {
    alignas(64) uint32_t hp[M][16];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) _mm512_store_si512((void*)hp[i], dp_round32(hs[i] + j0, rank - j0));
    const int np = imin(16, (rank - j0 + 1) / 2);
    for (int p = 0; p < np; ++p) {
      const uint32_t* wr = bp + (int64_t)(j0 / 2 + p) * ldt;
      __m512bh s[M];
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) s[i] = dp_bh(_mm512_set1_epi32((int)hp[i][p]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512bh wv = dp_bh((PART && v == NV - 1) ? _mm512_maskz_loadu_epi32(ml, wr + v * 16)
                                                        : _mm512_loadu_si512((const void*)(wr + v * 16)));
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], s[i], wv);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = ys[i] + c + v * 16;
      if (PART && v == NV - 1) _mm512_mask_storeu_ps(p, ml, acc[i][v]);
      else _mm512_storeu_ps(p, acc[i][v]);
    }
}

typedef void (*AccumPairsFn)(const uint32_t*, int64_t, int, const float* const*, float* const*, int64_t, int);

template <int M>
static AccumPairsFn accum_pairs_fn_v(int nv, bool part) {
  switch (nv) {
    case 1: return part ? &accum_pairs_tile<M, 1, true> : &accum_pairs_tile<M, 1, false>;
    case 2: return part ? &accum_pairs_tile<M, 2, true> : &accum_pairs_tile<M, 2, false>;
    case 3: return part ? &accum_pairs_tile<M, 3, true> : &accum_pairs_tile<M, 3, false>;
    default: return part ? &accum_pairs_tile<M, 4, true> : &accum_pairs_tile<M, 4, false>;
  }
}
static AccumPairsFn accum_pairs_fn(int m, int nv, bool part) {
  switch (m) {
    case 1: return accum_pairs_fn_v<1>(nv, part);
    case 2: return accum_pairs_fn_v<2>(nv, part);
    case 3: return accum_pairs_fn_v<3>(nv, part);
    default: return accum_pairs_fn_v<4>(nv, part);
  }
}

static void accum_pairs(const uint32_t* bp, int64_t ldt, int rank, int64_t c0, int64_t c1,
                        const proper_cpu::Entry* ent, const int32_t* idx, int n, const float* Hs, float* Y,
                        int64_t ldy) {
  constexpr int MT = 4, NVT = 4;  // 16 accumulators
  for (int i0 = 0; i0 < n; i0 += MT) {
    const int mi = imin(MT, n - i0);
    const float* hs[MT];
    float* ys[MT];
    for (int i = 0; i < mi; ++i) {
      const proper_cpu::Entry& e = ent[idx[i0 + i]];
      hs[i] = Hs + e.slot;
      ys[i] = Y + (int64_t)e.tok * ldy;
    }
    for (int64_t c = c0; c < c1; c += NVT * 16) {
      const int rem = (int)lmin(c1 - c, NVT * 16);
      const int nv = (rem + 15) / 16;
      const int nlast = rem - (nv - 1) * 16;
      accum_pairs_fn(mi, nv, nlast < 16)(bp + (c - c0), ldt, rank, hs, ys, c, nlast);
    }
  }
}
