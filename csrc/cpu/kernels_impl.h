// ISA-generic micro-kernels of the routed multi-LoRA op, written against a small SIMD abstraction `V`.
//
// This file is included by each ISA translation unit (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp) INSIDE an
// anonymous namespace, after that unit has defined:
//   struct V   { static constexpr int W;  typedef ... R;  zero, set1, load(float*|uint16*), load_n(ptr, n),
//                fma(a, b, c) = a*b + c, add, store, store_n, hsum,
//                reduce_rows(const R[W]) -> R: lane i = the sum of the lanes of a[i] };
//   struct Cfg { tile sizes, see below };
// It includes nothing (see kernels.h for why) and must only use plain C types.
//
// Determinism: every output element is produced by one fixed sequence of operations (a dot product over d in
// steps of W, the same tail handling, the same final reduction), whatever tile, task or thread computes it, so
// the results do not depend on the number of threads or on how tokens are chunked.
//
// NaN padding: columns j >= rank of B and rows j >= rank of A are never loaded (masked loads, loops to rank).

typedef V::R VR;

static inline float ld1(const float* p) { return *p; }
static inline float ld1(const uint16_t* p) {
  uint32_t u = (uint32_t)(*p) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

// Loads a full vector, or the first `n` lanes (the rest zero, never read) when PART.
template <bool PART, class TI>
static inline VR vload(const TI* p, int n) {
  if (PART) return V::load_n(p, n);
  return V::load(p);
}
template <bool PART>
static inline void vstore(float* p, VR v, int n) {
  if (PART) V::store_n(p, v, n);
  else V::store(p, v);
}

// ----------------------------------------------------------------------------------------------- shrink
// res[i * N + j] = <xr[i][0:D], wr[j][0:D]>: M tokens x N rows, vector accumulators over d, one hsum at the end.
// (A blocked variant that parks the accumulators between blocks of d, so that a tile's rows stay in L1, measured
// no faster here: the rows stream from L2 well enough.)

#ifdef PK_DPBF16
template <int M, int N, bool PF>
static void dot_tile_dp(const uint16_t* const* xr, const uint16_t* const* wr, int64_t D, float* res);
#endif

template <int M, int N, class TI, bool PF>
static void dot_tile(const TI* const* xr, const TI* const* wr, int64_t D, float* res) {
#ifdef PK_DPBF16
  if (sizeof(TI) == 2) {  // TI = uint16_t: bf16 bits
    dot_tile_dp<M, N, PF>((const uint16_t* const*)xr, (const uint16_t* const*)wr, D, res);
    return;
  }
#endif
  VR acc[M][N];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) acc[i][j] = V::zero();
  int64_t d = 0;
  constexpr int64_t kLine = 64 / (int64_t)sizeof(TI);  // elements per cache line
  for (; d + V::W <= D; d += V::W) {
    if (PF && (d % kLine) == 0) {  // the rows come from memory (first tile): fetch ahead, across pages
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) __builtin_prefetch(wr[j] + d + 32 * kLine);
    }
    VR xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = V::load(xr[i] + d);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const VR wv = V::load(wr[j] + d);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
    }
  }
  if (d < D) {
    const int n = (int)(D - d);
    VR xv[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) xv[i] = V::load_n(xr[i] + d, n);
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const VR wv = V::load_n(wr[j] + d, n);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) res[i * N + j] = V::hsum(acc[i][j]);
}

template <class TI>
using DotFn = void (*)(const TI* const*, const TI* const*, int64_t, float*);

template <int M, class TI, bool PF>
static DotFn<TI> dot_fn_n(int n) {
  static_assert(Cfg::SHRINK_N <= 4, "");
  switch (n) {
    case 1: return &dot_tile<M, 1, TI, PF>;
    case 2: return &dot_tile<M, (2 <= Cfg::SHRINK_N ? 2 : 1), TI, PF>;
    case 3: return &dot_tile<M, (3 <= Cfg::SHRINK_N ? 3 : 1), TI, PF>;
    default: return &dot_tile<M, (4 <= Cfg::SHRINK_N ? 4 : 1), TI, PF>;
  }
}
template <class TI, bool PF>
static DotFn<TI> dot_fn_m(int m, int n) {
  static_assert(Cfg::SHRINK_M <= 4, "");
  switch (m) {
    case 1: return dot_fn_n<1, TI, PF>(n);
    case 2: return dot_fn_n<(2 <= Cfg::SHRINK_M ? 2 : 1), TI, PF>(n);
    case 3: return dot_fn_n<(3 <= Cfg::SHRINK_M ? 3 : 1), TI, PF>(n);
    default: return dot_fn_n<(4 <= Cfg::SHRINK_M ? 4 : 1), TI, PF>(n);
  }
}
template <class TI>
static DotFn<TI> dot_fn(int m, int n, bool pf) {
  return pf ? dot_fn_m<TI, true>(m, n) : dot_fn_m<TI, false>(m, n);
}

template <class TI>
static void shrink_t(const TI* x, int64_t D, const TI* a, int rows, const proper_cpu::Entry* ent,
                     const int32_t* idx, int n, int scale, float* H) {
  constexpr int MT = Cfg::SHRINK_M, NT = Cfg::SHRINK_N;
  for (int i0 = 0; i0 < n; i0 += MT) {
    const int mi = imin(MT, n - i0);
    const TI* xr[MT];
    for (int i = 0; i < mi; ++i) xr[i] = x + (int64_t)ent[idx[i0 + i]].tok * D;
    for (int j0 = 0; j0 < rows; j0 += NT) {
      const int nj = imin(NT, rows - j0);
      const TI* wr[NT];
      for (int j = 0; j < nj; ++j) wr[j] = a + (int64_t)(j0 + j) * D;
      float res[MT * NT];
      dot_fn<TI>(mi, nj, i0 == 0)(xr, wr, D, res);  // the first token tile brings the rows from memory
      for (int i = 0; i < mi; ++i) {
        const proper_cpu::Entry& e = ent[idx[i0 + i]];
        float* h = H + e.slot + j0;
        for (int j = 0; j < nj; ++j) h[j] = scale ? e.coef * res[i * nj + j] : res[i * nj + j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- bshrink
// Dr[i][j0 + c] = sum_o dy_i[o] * B[o, j0 + c]: M tokens x NV column vectors (the last one partial if PART),
// outer products along o (dy broadcast, B rows loaded), so each B row is read once for M tokens.
template <int M, int NV, bool PART, class TI>
static void bshrink_tile(const TI* const* dyr, int64_t O, const TI* b, int64_t ldb, int j0, int nlast,
                         float* const* outs) {
  VR acc[M][NV];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
  const TI* bo = b + j0;
  for (int64_t o = 0; o < O; ++o, bo += ldb) {
    VR bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (v == NV - 1) ? vload<PART>(bo + v * V::W, nlast) : V::load(bo + v * V::W);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const VR s = V::set1(ld1(dyr[i] + o));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(s, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = outs[i] + j0 + v * V::W;
      if (v == NV - 1) vstore<PART>(p, acc[i][v], nlast);
      else V::store(p, acc[i][v]);
    }
}

template <class TI>
using BshrinkFn = void (*)(const TI* const*, int64_t, const TI*, int64_t, int, int, float* const*);

template <int M, class TI>
static BshrinkFn<TI> bshrink_fn_v(int nv, bool part) {
  static_assert(Cfg::BSHRINK_NV <= 2, "");
  if (nv >= 2 && Cfg::BSHRINK_NV >= 2) {
    constexpr int N2 = Cfg::BSHRINK_NV >= 2 ? 2 : 1;
    return part ? &bshrink_tile<M, N2, true, TI> : &bshrink_tile<M, N2, false, TI>;
  }
  return part ? &bshrink_tile<M, 1, true, TI> : &bshrink_tile<M, 1, false, TI>;
}
template <class TI>
static BshrinkFn<TI> bshrink_fn(int m, int nv, bool part) {
  static_assert(Cfg::BSHRINK_M <= 8, "");
#define PK_M(k) ((k) <= Cfg::BSHRINK_M ? (k) : 1)
  switch (m) {
    case 1: return bshrink_fn_v<1, TI>(nv, part);
    case 2: return bshrink_fn_v<PK_M(2), TI>(nv, part);
    case 3: return bshrink_fn_v<PK_M(3), TI>(nv, part);
    case 4: return bshrink_fn_v<PK_M(4), TI>(nv, part);
    case 5: return bshrink_fn_v<PK_M(5), TI>(nv, part);
    case 6: return bshrink_fn_v<PK_M(6), TI>(nv, part);
    case 7: return bshrink_fn_v<PK_M(7), TI>(nv, part);
    default: return bshrink_fn_v<PK_M(8), TI>(nv, part);
  }
#undef PK_M
}

template <class TI>
static void bshrink_t(const TI* dy, int64_t O, const TI* b, int64_t ldb, int rank, const proper_cpu::Entry* ent,
                      const int32_t* idx, int n, float* Dr) {
  constexpr int MT = Cfg::BSHRINK_M, NVT = Cfg::BSHRINK_NV;
  for (int i0 = 0; i0 < n; i0 += MT) {
    const int mi = imin(MT, n - i0);
    const TI* dyr[MT];
    float* outs[MT];
    for (int i = 0; i < mi; ++i) {
      const proper_cpu::Entry& e = ent[idx[i0 + i]];
      dyr[i] = dy + (int64_t)e.tok * O;
      outs[i] = Dr + e.slot;
    }
    for (int j0 = 0; j0 < rank; j0 += NVT * V::W) {
      const int rem = imin(rank - j0, NVT * V::W);
      const int nv = (rem + V::W - 1) / V::W;
      const int nlast = rem - (nv - 1) * V::W;
      bshrink_fn<TI>(mi, nv, nlast < V::W)(dyr, O, b, ldb, j0, nlast, outs);
    }
  }
}


// ---------------------------------------------------------------------------------------------- row-dot
// Y[tok_i, o] += <B[o, 0:rank], H[slot_i : slot_i + rank]> for o in [o0, o1): the expand of a group with few
// tokens (no packing). W output rows at a time, vectorised along the rank; one transposing reduction turns the W
// row accumulators into one vector of W outputs, added into Y with one vector add (a decode step's expand is
// all rows of rank <= 16, one vector each, and a horizontal sum and scalar add per row cost more than the row's
// load and FMA). Rows past o1 are clamped (computed twice, stored once) so every output goes through the same
// code.
constexpr int64_t kRowdotAhead = 64;  // rows of B prefetched ahead (4 KiB for rank-16 fp32 rows)

// y[0 : nv) += s[0 : nv) (nv <= W), the vector add of a row block's outputs
static inline void add_rows(float* y, VR s, int nv) {
  if (nv == V::W) V::store(y, V::add(V::load(y), s));
  else V::store_n(y, V::add(V::load_n(y, nv), s), nv);
}

// One block of W output rows [o, o + W) starting at row pointer b0; FULL: all W rows are in [o0, o1), else the
// rows past nv repeat row nv - 1 (computed, not stored). A full block walks its rows with one pointer (each row
// one add, one load, one FMA per rank chunk) instead of W clamped row pointers, which spilled.
template <bool FULL, class TI>
static inline void rowdot_block(const TI* b0, int64_t ld, int rank, int nv, const proper_cpu::Entry* ent,
                                const int32_t* idx, int n, const float* H, float* Y, int64_t ldy, int64_t o) {
  constexpr int W = V::W;
  for (int q = 0; q < n; ++q) {
    const proper_cpu::Entry& e = ent[idx[q]];
    const float* h = H + e.slot;
    VR acc[W];
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) acc[i] = V::zero();
    int j = 0;
    for (; j + W <= rank; j += W) {
      const VR hv = V::load(h + j);
      const TI* p = b0 + j;
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) {
        acc[i] = V::fma(V::load(p), hv, acc[i]);
        if (FULL || i + 1 < nv) p += ld;
      }
    }
    if (j < rank) {
      const int nn = rank - j;
      const VR hv = V::load_n(h + j, nn);
      const TI* p = b0 + j;
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) {
        acc[i] = V::fma(V::load_n(p, nn), hv, acc[i]);
        if (FULL || i + 1 < nv) p += ld;
      }
    }
    add_rows(Y + (int64_t)e.tok * ldy + o, V::reduce_rows(acc), nv);
  }
}

template <class TI>
static void rowdot_t(const TI* B, int64_t ld, int rank, int64_t o0, int64_t o1, const proper_cpu::Entry* ent,
                     const int32_t* idx, int n, const float* H, float* Y, int64_t ldy) {
  constexpr int W = V::W;
  int64_t o = o0;
  for (; o + W <= o1; o += W) {
    if (o + W + kRowdotAhead < o1) {  // one sequential stream through B: ask for it well ahead
      const char* pf = (const char*)(B + (o + kRowdotAhead) * ld);
      for (int64_t off = 0; off < W * ld * (int64_t)sizeof(TI); off += 64) __builtin_prefetch(pf + off);
    }
    rowdot_block<true, TI>(B + o * ld, ld, rank, W, ent, idx, n, H, Y, ldy, o);
  }
  if (o < o1) rowdot_block<false, TI>(B + o * ld, ld, rank, (int)(o1 - o), ent, idx, n, H, Y, ldy, o);
}

#ifdef PK_DPBF16
#include "kernels_dpbf16.h"  // the vdpbf16ps kernels (isa_avx512bf16.cpp only)
#endif

// ------------------------------------------------------------------------------------------------ accum
// Y[tok_i, c] += sum_{j < rank} Hs[slot_i + j] * w[j * ldw + c - c0] for c in [c0, c1): rank-space vectors times
// the rows of a row-major block (row stride ldw, first column c0). The expand with B packed as B^T, and dx with Wm = A. M entries x NV
// column vectors per tile; each Wm load is shared by the M entries (all of one group), the running sum of each
// output stays in a register across the whole rank.
template <int M, int NV, bool PART, class TW>
static void accum_tile(const TW* w, int64_t ldw, int rank, const float* const* hs, float* const* ys, int64_t c,
                       int nlast) {
  VR acc[M][NV];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = (v == NV - 1) ? vload<PART>(ys[i] + c + v * V::W, nlast) : V::load(ys[i] + c + v * V::W);
  for (int j = 0; j < rank; ++j) {
    const TW* wr = w + (int64_t)j * ldw;
    VR s[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) s[i] = V::set1(hs[i][j]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const VR wv = (v == NV - 1) ? vload<PART>(wr + v * V::W, nlast) : V::load(wr + v * V::W);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][v] = V::fma(s[i], wv, acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = ys[i] + c + v * V::W;
      if (v == NV - 1) vstore<PART>(p, acc[i][v], nlast);
      else V::store(p, acc[i][v]);
    }
}

template <class TW>
using AccumFn = void (*)(const TW*, int64_t, int, const float* const*, float* const*, int64_t, int);

template <int M, class TW>
static AccumFn<TW> accum_fn_v(int nv, bool part) {
  static_assert(Cfg::ACCUM_NV <= 4, "");
#define PK_N(k) ((k) <= Cfg::ACCUM_NV ? (k) : 1)
  switch (nv) {
    case 1: return part ? &accum_tile<M, 1, true, TW> : &accum_tile<M, 1, false, TW>;
    case 2: return part ? &accum_tile<M, PK_N(2), true, TW> : &accum_tile<M, PK_N(2), false, TW>;
    case 3: return part ? &accum_tile<M, PK_N(3), true, TW> : &accum_tile<M, PK_N(3), false, TW>;
    default: return part ? &accum_tile<M, PK_N(4), true, TW> : &accum_tile<M, PK_N(4), false, TW>;
  }
#undef PK_N
}
template <class TW>
static AccumFn<TW> accum_fn(int m, int nv, bool part) {
  static_assert(Cfg::ACCUM_M <= 6, "");
#define PK_M(k) ((k) <= Cfg::ACCUM_M ? (k) : 1)
  switch (m) {
    case 1: return accum_fn_v<1, TW>(nv, part);
    case 2: return accum_fn_v<PK_M(2), TW>(nv, part);
    case 3: return accum_fn_v<PK_M(3), TW>(nv, part);
    case 4: return accum_fn_v<PK_M(4), TW>(nv, part);
    case 5: return accum_fn_v<PK_M(5), TW>(nv, part);
    default: return accum_fn_v<PK_M(6), TW>(nv, part);
  }
#undef PK_M
}

template <class TW>
static void accum_t(const TW* w, int64_t ldw, int rank, int64_t c0, int64_t c1, const proper_cpu::Entry* ent,
                    const int32_t* idx, int n, const float* Hs, float* Y, int64_t ldy) {
  constexpr int MT = Cfg::ACCUM_M, NVT = Cfg::ACCUM_NV;
  for (int i0 = 0; i0 < n; i0 += MT) {
    const int mi = imin(MT, n - i0);
    const float* hs[MT];
    float* ys[MT];
    for (int i = 0; i < mi; ++i) {
      const proper_cpu::Entry& e = ent[idx[i0 + i]];
      hs[i] = Hs + e.slot;
      ys[i] = Y + (int64_t)e.tok * ldy;
    }
    for (int64_t c = c0; c < c1; c += NVT * V::W) {
      const int rem = (int)lmin(c1 - c, NVT * V::W);
      const int nv = (rem + V::W - 1) / V::W;
      const int nlast = rem - (nv - 1) * V::W;
      accum_fn<TW>(mi, nv, nlast < V::W)(w + (c - c0), ldw, rank, hs, ys, c, nlast);
    }
  }
}

// dst[0 : round_up(n, W)] = src[0 : n] widened to fp32, zero-padded to a whole vector.
template <class TI>
static inline void copy_row(const TI* src, int64_t n, float* dst) {
  int64_t c = 0;
  for (; c + V::W <= n; c += V::W) V::store(dst + c, V::load(src + c));
  if (c < n) V::store(dst + c, V::load_n(src + c, (int)(n - c)));
}

// --------------------------------------------------------------------------------------------------- tn
// C[j, c] = sum_i P[slot_i + j] * Q[tok_i, q0 + c] (j < rank, c < q1 - q0): the weight gradients, reduced over a
// group's tokens. Tokens go in blocks of TN_TB whose Q segments are first copied (and widened to fp32) into a
// contiguous buffer, so the tile loop streams memory instead of hopping between rows that share cache sets.
// A tile's running sums are kept in C between token blocks; every output is one fixed chain over the tokens.
template <int MJ, int NV, bool PART>
static void tn_tile(const float* xp, int64_t ldp, int nb, const float* const* ps, int j0, float* c, int64_t ldc,
                    bool first, int nlast) {
  VR acc[MJ][NV];
#pragma GCC unroll 8
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const float* q = c + (int64_t)j * ldc + v * V::W;
      acc[j][v] = first ? V::zero() : ((v == NV - 1) ? vload<PART>(q, nlast) : V::load(q));
    }
  for (int i = 0; i < nb; ++i, xp += ldp) {
    VR xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = V::load(xp + v * V::W);  // the packed buffer is padded: full loads
    const float* p = ps[i] + j0;
#pragma GCC unroll 8
    for (int j = 0; j < MJ; ++j) {
      const VR s = V::set1(p[j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[j][v] = V::fma(s, xv[v], acc[j][v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < MJ; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* q = c + (int64_t)j * ldc + v * V::W;
      if (v == NV - 1) vstore<PART>(q, acc[j][v], nlast);
      else V::store(q, acc[j][v]);
    }
}

using TnFn = void (*)(const float*, int64_t, int, const float* const*, int, float*, int64_t, bool, int);

template <int MJ>
static TnFn tn_fn_v(int nv, bool part) {
  static_assert(Cfg::TN_NV <= 4, "");
#define PK_N(k) ((k) <= Cfg::TN_NV ? (k) : 1)
  switch (nv) {
    case 1: return part ? &tn_tile<MJ, 1, true> : &tn_tile<MJ, 1, false>;
    case 2: return part ? &tn_tile<MJ, PK_N(2), true> : &tn_tile<MJ, PK_N(2), false>;
    case 3: return part ? &tn_tile<MJ, PK_N(3), true> : &tn_tile<MJ, PK_N(3), false>;
    default: return part ? &tn_tile<MJ, PK_N(4), true> : &tn_tile<MJ, PK_N(4), false>;
  }
#undef PK_N
}
static TnFn tn_fn(int mj, int nv, bool part) {
  static_assert(Cfg::TN_MJ <= 6, "");
#define PK_M(k) ((k) <= Cfg::TN_MJ ? (k) : 1)
  switch (mj) {
    case 1: return tn_fn_v<1>(nv, part);
    case 2: return tn_fn_v<PK_M(2)>(nv, part);
    case 3: return tn_fn_v<PK_M(3)>(nv, part);
    case 4: return tn_fn_v<PK_M(4)>(nv, part);
    case 5: return tn_fn_v<PK_M(5)>(nv, part);
    default: return tn_fn_v<PK_M(6)>(nv, part);
  }
#undef PK_M
}

template <class TI>
static void tn_t(const TI* Q, int64_t ldq, int64_t q0, int64_t q1, int rank, const proper_cpu::Entry* ent,
                 const int32_t* idx, int n, const float* P, float* C, int64_t ldc, int trans, float* scratch) {
  constexpr int TB = proper_cpu::kTnTokens, MJ = Cfg::TN_MJ, NVT = Cfg::TN_NV;
  const int cb = (int)(q1 - q0);
  // rows of the packed block: zeros past cb, and one extra vector so rows do not share cache sets
  const int ldp = (cb + V::W - 1) / V::W * V::W + V::W;
  float* xp = scratch;
  float* ct = scratch + (int64_t)TB * ldp;   // [rank, cb] when the output is transposed
  float* cout = trans ? ct : C + q0;
  const int64_t ldo = trans ? cb : ldc;
  const float* ps[TB];
  for (int b0 = 0; b0 < n; b0 += TB) {
    const int nb = imin(TB, n - b0);
    for (int i = 0; i < nb; ++i) {
      const proper_cpu::Entry& e = ent[idx[b0 + i]];
      if (b0 + i + 2 < n) {  // the rows are far apart: fetch the segment two tokens ahead
        const char* nx = (const char*)(Q + (int64_t)ent[idx[b0 + i + 2]].tok * ldq + q0);
        for (int64_t off = 0; off < (int64_t)cb * (int64_t)sizeof(TI); off += 64) __builtin_prefetch(nx + off);
      }
      copy_row(Q + (int64_t)e.tok * ldq + q0, cb, xp + (int64_t)i * ldp);
      ps[i] = P + e.slot;
    }
    for (int c = 0; c < cb; c += NVT * V::W) {  // a column strip of the block stays in L1 for every rank tile
      const int rem = imin(cb - c, NVT * V::W);
      const int nv = (rem + V::W - 1) / V::W;
      const int nlast = rem - (nv - 1) * V::W;
      for (int j0 = 0; j0 < rank; j0 += MJ) {
        const int mj = imin(MJ, rank - j0);
        tn_fn(mj, nv, nlast < V::W)(xp + c, ldp, nb, ps, j0, cout + (int64_t)j0 * ldo + c, ldo, b0 == 0, nlast);
      }
    }
  }
  if (trans && n > 0) {  // C[q0 + c, j] = ct[j, c]: 8 x 8 register transposes, the edges one by one
    const int c8 = cb / 8 * 8, r8 = rank / 8 * 8;
    for (int c = 0; c < c8; c += 8)
      for (int j = 0; j < r8; j += 8) V::transpose8(ct + (int64_t)j * cb + c, cb, C + (q0 + c) * ldc + j, ldc);
    for (int j = 0; j < rank; ++j)
      for (int c = (j < r8 ? c8 : 0); c < cb; ++c) C[(q0 + c) * ldc + j] = ct[(int64_t)j * cb + c];
  }
}

// ----------------------------------------------------------------------------------------------- packing
// Bt[j * ldt + o] = B[o * ldb + j] in fp32, j < rank, o < O: B^T of a group with many tokens, for the expand.
template <class TI>
static void pack_bt_t(const TI* B, int64_t ldb, int rank, int64_t O, float* Bt, int64_t ldt) {
  for (int64_t o0 = 0; o0 < O; o0 += 64) {
    const int64_t o1 = lmin(O, o0 + 64);
    for (int j = 0; j < rank; ++j) {
      float* dst = Bt + (int64_t)j * ldt;
      for (int64_t o = o0; o < o1; ++o) dst[o] = ld1(B + o * ldb + j);
    }
  }
}
// fp32: whole 8 x 8 blocks through the register transpose, the edges one by one.
template <>
void pack_bt_t<float>(const float* B, int64_t ldb, int rank, int64_t O, float* Bt, int64_t ldt) {
  const int64_t O8 = O / 8 * 8;
  const int r8 = rank / 8 * 8;
  for (int64_t o = 0; o < O8; o += 8)
    for (int j = 0; j < r8; j += 8) V::transpose8(B + o * ldb + j, ldb, Bt + (int64_t)j * ldt + o, ldt);
  for (int j = 0; j < rank; ++j) {
    float* dst = Bt + (int64_t)j * ldt;
    for (int64_t o = (j < r8 ? O8 : 0); o < O; ++o) dst[o] = B[o * ldb + j];
  }
}
// bf16: each 8 x 8 block widened to fp32 (vector loads) into a small buffer, then the same register transpose.
template <>
void pack_bt_t<uint16_t>(const uint16_t* B, int64_t ldb, int rank, int64_t O, float* Bt, int64_t ldt) {
  const int64_t O8 = O / 8 * 8;
  const int r8 = rank / 8 * 8;
  float tmp[8 * 16];  // 8 rows of 8 values; copy_row writes a whole vector (<= 16 floats) per row
  for (int64_t o = 0; o < O8; o += 8)
    for (int j = 0; j < r8; j += 8) {
      for (int i = 0; i < 8; ++i) copy_row(B + (o + i) * ldb + j, 8, tmp + i * 16);
      V::transpose8(tmp, 16, Bt + (int64_t)j * ldt + o, ldt);
    }
  for (int j = 0; j < rank; ++j) {
    float* dst = Bt + (int64_t)j * ldt;
    for (int64_t o = (j < r8 ? O8 : 0); o < O; ++o) dst[o] = ld1(B + o * ldb + j);
  }
}
// dst[r * ldd + c] = src[r * lds + c] in fp32, r < rows, c < cols (zero-padded to a whole vector).
template <class TI>
static void pack_rows_t(const TI* src, int64_t lds, int rows, int64_t cols, float* dst, int64_t ldd) {
  for (int r = 0; r < rows; ++r) copy_row(src + (int64_t)r * lds, cols, dst + (int64_t)r * ldd);
}

// dst[i] = bf16(src[i]): nearest even, NaN -> 0x7FC0, as c10::BFloat16 rounds (a loop the compiler vectorises).
static void to_bf16_k(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    __builtin_memcpy(&u, src + i, 4);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = nan ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// ------------------------------------------------------------------------------------- dtype dispatch
#define PK_T(dt) ((dt) == proper_cpu::kBF16)
static void shrink_k(int dt, const void* x, int64_t D, const void* a, int rows, const proper_cpu::Entry* ent,
                     const int32_t* idx, int n, int scale, float* H) {
  if (PK_T(dt)) shrink_t<uint16_t>((const uint16_t*)x, D, (const uint16_t*)a, rows, ent, idx, n, scale, H);
  else shrink_t<float>((const float*)x, D, (const float*)a, rows, ent, idx, n, scale, H);
}
static void bshrink_k(int dt, const void* dy, int64_t O, const void* b, int64_t ldb, int rank,
                      const proper_cpu::Entry* ent, const int32_t* idx, int n, float* Dr) {
  if (PK_T(dt)) bshrink_t<uint16_t>((const uint16_t*)dy, O, (const uint16_t*)b, ldb, rank, ent, idx, n, Dr);
  else bshrink_t<float>((const float*)dy, O, (const float*)b, ldb, rank, ent, idx, n, Dr);
}
static void rowdot_k(int dt, const void* b, int64_t ldb, int rank, int64_t o0, int64_t o1,
                     const proper_cpu::Entry* ent, const int32_t* idx, int n, const float* H, float* Y, int64_t ldy) {
  if (PK_T(dt)) rowdot_t<uint16_t>((const uint16_t*)b, ldb, rank, o0, o1, ent, idx, n, H, Y, ldy);
  else rowdot_t<float>((const float*)b, ldb, rank, o0, o1, ent, idx, n, H, Y, ldy);
}
static void accum_k(int dt, const void* w, int64_t ldw, int rank, int64_t c0, int64_t c1,
                    const proper_cpu::Entry* ent, const int32_t* idx, int n, const float* Hs, float* Y, int64_t ldy) {
  if (PK_T(dt)) accum_t<uint16_t>((const uint16_t*)w, ldw, rank, c0, c1, ent, idx, n, Hs, Y, ldy);
  else accum_t<float>((const float*)w, ldw, rank, c0, c1, ent, idx, n, Hs, Y, ldy);
}
static void tn_k(int dt, const void* q, int64_t ldq, int64_t q0, int64_t q1, int rank, const proper_cpu::Entry* ent,
                 const int32_t* idx, int n, const float* P, float* C, int64_t ldc, int trans, float* scratch) {
  if (PK_T(dt)) tn_t<uint16_t>((const uint16_t*)q, ldq, q0, q1, rank, ent, idx, n, P, C, ldc, trans, scratch);
  else tn_t<float>((const float*)q, ldq, q0, q1, rank, ent, idx, n, P, C, ldc, trans, scratch);
}
static void pack_bt_k(int dt, const void* b, int64_t ldb, int rank, int64_t O, float* Bt, int64_t ldt) {
  if (PK_T(dt)) pack_bt_t<uint16_t>((const uint16_t*)b, ldb, rank, O, Bt, ldt);
  else pack_bt_t<float>((const float*)b, ldb, rank, O, Bt, ldt);
}
static void pack_rows_k(int dt, const void* src, int64_t lds, int rows, int64_t cols, float* dst, int64_t ldd) {
  if (PK_T(dt)) pack_rows_t<uint16_t>((const uint16_t*)src, lds, rows, cols, dst, ldd);
  else pack_rows_t<float>((const float*)src, lds, rows, cols, dst, ldd);
}
#undef PK_T

#ifdef PK_DPBF16
static const proper_cpu::KernelTable kTable = {
    PK_ISA_NAME, &shrink_k, &bshrink_k, &rowdot_k, &accum_k, &tn_k, &pack_bt_k, &pack_rows_k, &to_bf16_k,
    &rowdot_bf16h, &pack_bt_pairs, &accum_pairs,
};
#else
static const proper_cpu::KernelTable kTable = {
    PK_ISA_NAME, &shrink_k, &bshrink_k, &rowdot_k, &accum_k, &tn_k, &pack_bt_k, &pack_rows_k, &to_bf16_k,
    nullptr, nullptr, nullptr,
};
#endif
