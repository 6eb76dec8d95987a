// Shrink kernels: project a long activation (x over d_in, or dy over d_out) into the small rank space.
// SGMV style: a block works on the tokens of one segment-table block (all of one user), so the user's adapter
// rows are loaded once per token tile; the expert part is shared by every token. CUDA headers only.
#include "kernels.cuh"

namespace proper_cuda {
namespace detail {
namespace {

// -------------------------------------------------------------------------------------------------------------
// shrink_x
//
// Semantics:
//   h_part[s, t, j] = sum_{d in split s} x[t, d] * Acat_u[j, d]          (raw: no gate, no scale)
//   Acat_u = [A_1; ..; A_K; A_u[:r_u]]   rows j < R_e: expert_a[j / r_e, j % r_e, :]
//                                        rows R_e + r, r < r_u: user_a[u, r, :]   (u = the block's user)
//   sum_s h_part[s, t, j] = (A x[t])[j], the reference's einsum("td,krd->tkr") / bmm(a, x) before gating.
// Shapes: x [T, d_in]; expert_a [K, r_e, d_in]; user_a [U, r_max, d_in]; h_part [h_splits, T, R] fp32.
// Grid: (P blocks, ceil(R / 32) row chunks, h_splits d_in splits); block 256 = 8 warps.
//   Warp w of row chunk y owns rows j0 = 32 y + 4 w .. j0 + 3; its lanes stride over the split's d range in
//   vectors of V elements (16-byte loads when VEC), each lane accumulating a [8 tokens x 4 rows] fp32 tile that
//   a butterfly reduction sums across lanes at the end of each token tile.
// Written: h_part[s, t, j] for every token t of the block and every row j < R_e + r_u (rows whose expert no token
// of the tile selects are written as 0 without reading A). Rows j >= R_e + r_u (padded user ranks) are neither
// read nor written: nothing downstream reads them.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, 2) shrink_x_kernel(const KParams p) {
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  constexpr int NR = kShrinkRowsPerWarp;
  constexpr int NT = kShrinkTok;
  const Block blk = load_block(p.blk_user, p.blk_start, p.blk_end, blockIdx.x, p.T, p.U);
  if (blk.user < 0) return;                                   // idle block
  const int u = blk.user < p.U ? blk.user : -1;               // -1: tokens without a user adapter
  const int rows = p.R_e + rank_of(p, u);                     // valid rows of Acat_u
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = blockIdx.y * kShrinkRows + warp * NR;
  if (j0 >= rows) return;                                     // warp-uniform; no barriers in this kernel

  const T* x = static_cast<const T*>(p.x);
  const T* arow[NR];
  int kexp[NR];                                               // expert of the row, -1 for user rows
  bool valid[NR];
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    const int j = j0 + i;
    valid[i] = j < rows;
    kexp[i] = -1;
    arow[i] = x;                                              // any valid pointer; never read when !valid
    if (j < p.R_e) {
      arow[i] = static_cast<const T*>(p.ea) + static_cast<int64_t>(j) * p.d_in;
      kexp[i] = j / p.r_e;
    } else if (valid[i]) {
      arow[i] = static_cast<const T*>(p.ua) + (static_cast<int64_t>(u) * p.r_max + (j - p.R_e)) * p.d_in;
    }
  }
  const int d_lo = blockIdx.z * p.h_chunk;
  const int d_hi = imin(p.d_in, d_lo + p.h_chunk);
  float* hp = p.h_part + static_cast<int64_t>(blockIdx.z) * p.T * p.R;

  for (int s0 = blk.start; s0 < blk.end; s0 += NT) {
    const int nt = imin(NT, blk.end - s0);
    int tok[NT];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) tok[tt] = token_at(p, s0 + imin(tt, nt - 1));
    bool act[NR];
    bool any = false;
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      act[i] = valid[i] && (kexp[i] < 0 || any_selected<NT>(p, tok, nt, kexp[i]));
      any |= act[i];
    }
    float acc[NT][NR];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt)
#pragma unroll
      for (int i = 0; i < NR; ++i) acc[tt][i] = 0.0f;

    if (any) {                                                // warp-uniform
      for (int d = d_lo + lane * V; d < d_hi; d += 32 * V) {  // VEC: d_in % V == 0, so d + V <= d_hi
        float a[NR][V];
#pragma unroll
        for (int i = 0; i < NR; ++i) {
          if (act[i]) {
            load_vec<T, V>(arow[i] + d, a[i]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) a[i][v] = 0.0f;
          }
        }
#pragma unroll
        for (int tt = 0; tt < NT; ++tt) {
          if (tt < nt) {
            float xv[V];
            load_vec<T, V>(x + static_cast<int64_t>(tok[tt]) * p.d_in + d, xv);
#pragma unroll
            for (int i = 0; i < NR; ++i)
#pragma unroll
              for (int v = 0; v < V; ++v) acc[tt][i] += xv[v] * a[i][v];
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < NT; ++tt)
#pragma unroll
        for (int i = 0; i < NR; ++i) acc[tt][i] = warp_sum(acc[tt][i]);
    }
    // every lane holds every sum: lane (tt * NR + i) % 32 writes element (tt, i)
#pragma unroll
    for (int tt = 0; tt < NT; ++tt)
#pragma unroll
      for (int i = 0; i < NR; ++i)
        if (((tt * NR + i) & 31) == lane && tt < nt && valid[i])
          hp[static_cast<int64_t>(tok[tt]) * p.R + j0 + i] = acc[tt][i];
  }
}

// -------------------------------------------------------------------------------------------------------------
// shrink_dy
//
// Semantics:
//   g_part[s, t, j] = sum_{o in split s} dy[t, o] * Bcat_u[o, j]          (raw: no gate, no scale)
//   Bcat_u = [B_1 | .. | B_K | B_u[:, :r_u]]   columns j < R_e: expert_b[j / r_e, :, j % r_e]
//                                              columns R_e + r, r < r_u: user_b[u, :, r]
//   sum_s g_part[s, t, :] = the reference's dy @ b_cat (dhg) and bmm(b^T, dy) (dhc), before gating.
// Shapes: dy [T, d_out]; expert_b [K, d_out, r_e]; user_b [U, d_out, r_max]; g_part [g_splits, T, R] fp32.
// Grid: (P blocks, ceil(tiles / 8), g_splits d_out splits); block 256 = 8 warps; warp = one column tile.
//   Column tiles: ceil(R_e / 8) tiles of 8 expert columns (they may straddle experts when r_e % 8 != 0), then
//   ceil(r_max / 8) tiles of 8 user ranks (tiles at or past r_u exit at once). Lanes stride over o; a lane reads
//   the tile's 8 contiguous entries of row o of B (one 16-byte load when r % 8 == 0 and aligned) and dy[t, o]
//   of 8 tokens, accumulating an [8 tokens x 8 columns] fp32 tile reduced across lanes per token tile.
// Written: g_part[s, t, j] for every token of the block and every column j < R_e + r_u (columns whose expert no
// token of the tile selects are written as 0 without reading B).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) shrink_dy_kernel(const KParams p) {
  constexpr int NC = kDyCols;
  constexpr int NT = kDyTok;
  const Block blk = load_block(p.blk_user, p.blk_start, p.blk_end, blockIdx.x, p.T, p.U);
  if (blk.user < 0) return;
  const int u = blk.user < p.U ? blk.user : -1;
  const int r_u = rank_of(p, u);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = blockIdx.y * kWarps + warp;
  const int n_exp_tiles = static_cast<int>((p.R_e + NC - 1) / NC);

  const T* colp[NC];       // &B[0, column c of the tile]; entry (o, c) is colp[c][o * ld]
  int kcol[NC];            // expert of column c (-1: user column or past the tile's width)
  int col0, width, ld;
  bool vec;
  if (tile < n_exp_tiles) {
    const int j0 = tile * NC;
    width = imin(NC, p.R_e - j0);
    col0 = j0;
    ld = p.r_e;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int j = j0 + imin(c, width - 1);
      const int k = j / p.r_e, r = j % p.r_e;
      colp[c] = static_cast<const T*>(p.eb) + static_cast<int64_t>(k) * p.d_out * p.r_e + r;
      kcol[c] = c < width ? k : -1;
    }
    vec = width == NC && p.vec_eb;   // r_e % 8 == 0: the 8 columns are one expert's contiguous ranks
  } else {
    const int r0 = (tile - n_exp_tiles) * NC;
    width = imin(NC, r_u - r0);
    if (u < 0 || width <= 0) return;                  // warp-uniform: padded ranks, or no user
    col0 = p.R_e + r0;
    ld = p.r_max;
    const T* base = static_cast<const T*>(p.ub) + static_cast<int64_t>(u) * p.d_out * p.r_max + r0;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      colp[c] = base + imin(c, width - 1);
      kcol[c] = -1;
    }
    vec = width == NC && p.vec_ub;
  }
  const int o_lo = blockIdx.z * p.g_chunk;
  const int o_hi = imin(p.d_out, o_lo + p.g_chunk);
  const T* dy = static_cast<const T*>(p.dy);
  float* gp = p.g_part + static_cast<int64_t>(blockIdx.z) * p.T * p.R;

  for (int s0 = blk.start; s0 < blk.end; s0 += NT) {
    const int nt = imin(NT, blk.end - s0);
    int tok[NT];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) tok[tt] = token_at(p, s0 + imin(tt, nt - 1));
    bool act[NC];
    bool any = false;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      act[c] = c < width && (kcol[c] < 0 || any_selected<NT>(p, tok, nt, kcol[c]));
      any |= act[c];
    }
    float acc[NT][NC];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt)
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[tt][c] = 0.0f;

    if (any) {                                         // warp-uniform
      for (int o = o_lo + lane; o < o_hi; o += 32) {
        float b[NC];
        if (vec) {
          load_vec<T, NC>(colp[0] + static_cast<int64_t>(o) * ld, b);
        } else {
#pragma unroll
          for (int c = 0; c < NC; ++c) b[c] = act[c] ? to_f<T>(colp[c][static_cast<int64_t>(o) * ld]) : 0.0f;
        }
#pragma unroll
        for (int tt = 0; tt < NT; ++tt) {
          if (tt < nt) {
            const float dv = to_f<T>(dy[static_cast<int64_t>(tok[tt]) * p.d_out + o]);
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[tt][c] += dv * b[c];
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < NT; ++tt)
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[tt][c] = warp_sum(acc[tt][c]);
    }
#pragma unroll
    for (int tt = 0; tt < NT; ++tt)
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (((tt * NC + c) & 31) == lane && tt < nt && c < width)
          gp[static_cast<int64_t>(tok[tt]) * p.R + col0 + c] = acc[tt][c];
  }
}

template <typename T>
cudaError_t shrink_x_typed(const KParams& p, bool vec, cudaStream_t stream) {
  const dim3 grid(p.P, static_cast<unsigned>(ceil_div(p.R, kShrinkRows)), p.h_splits);
  if (vec) return launch_kernel(shrink_x_kernel<T, true>, grid, dim3(kThreads), 0, stream, p);
  return launch_kernel(shrink_x_kernel<T, false>, grid, dim3(kThreads), 0, stream, p);
}

template <typename T>
cudaError_t shrink_dy_typed(const KParams& p, cudaStream_t stream) {
  const int64_t tiles = ceil_div(p.R_e, kDyCols) + ceil_div(p.r_max, kDyCols);
  const dim3 grid(p.P, static_cast<unsigned>(ceil_div(tiles, kWarps)), p.g_splits);
  return launch_kernel(shrink_dy_kernel<T>, grid, dim3(kThreads), 0, stream, p);
}

}  // namespace

cudaError_t launch_shrink_x(const KParams& p, DType dt, bool vec, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return shrink_x_typed<float>(p, vec, stream);
    case DType::kFloat16: return shrink_x_typed<__half>(p, vec, stream);
    case DType::kBFloat16: return shrink_x_typed<__nv_bfloat16>(p, vec, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_shrink_dy(const KParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return shrink_dy_typed<float>(p, stream);
    case DType::kFloat16: return shrink_dy_typed<__half>(p, stream);
    case DType::kBFloat16: return shrink_dy_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace proper_cuda
