"""Triton kernels of ``routed_lora``: shrink, expand, per-adapter weight gradients, gate gradients.

Notation shared by every kernel. The rank space of a token is the concatenation of every expert's ranks and
its user's ranks: column j < KR = K*r_e is expert k = j // r_e, rank r = j % r_e; column KR + r is user rank r,
present only for r < r_u (r_u = user_ranks[u], 0 for tokens without a user). ``width = KR + r_u`` bounds every
rank loop, so a padded rank row is never loaded and a rank tile past it is never computed.

Weights arrive as [adapter, rank, D] *views* (any strides): A is [K, r_e, d_in] as stored, B is passed
transposed ([K, r_e, d_out] view of [K, d_out, r_e]). So one shrink serves h = A x and dh = B^T dy, and one
expand serves y = B h and dx = A^T dh.

Gating lives in rank space: c[t, j] = s_e * g[t, k] for expert columns, w[t] * s_u[u] for user columns.
Rank-space activations (h, dh) are fp32 scratch [T, KR + r_max] indexed by token; columns >= width of a
token are never written nor read.

Faults stay where they belong (reference.py's Semantics): a token uses rank column j when its gate for j's
expert is nonzero, or j is a column of its own user within width. Unused terms are dropped with tl.where,
never by multiplying with the zero gate (0 * inf = nan). The GEMMs whose rank-space operand is zero outside
each token's used columns (expand: out = h W; expert weight gradients: sum over tokens) would still spread a
non-finite value of the other operand to every row through 0 * nan inside the dot; so each program checks
its accumulator once at the end and, only if it holds a non-finite value, redoes its loop isolated: the
non-finite entries of the other operand are zeroed and NaN is put into the rank-space entries that really
read one. The normal path pays one finiteness test of the accumulator per program.

Segment kernels (shrink, expand) run one program per (block of a user's tokens, tile): the block table
(layout.block_table) gives each program one user, a range of positions in the by-user token order, or -1
(idle: the grid is sized from shapes alone, so trailing programs exit at once).
"""
import triton
import triton.language as tl

# (no NaN global: triton checks that inner kernels saw equal globals, and nan != nan)
_INF = tl.constexpr(float("inf"))


# --------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; F32 casts the operands to fp32 first (needed by the CPU
    interpreter, whose bf16 dot is wrong; on GPUs 16-bit operands go to the tensor cores as they are).
    Products of fp32 operands (rank-space activations) use exact fp32, not tf32."""
    if F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _finite(v):
    """True where v is finite: |v| < inf is an ordered compare, so false for inf and nan."""
    return tl.abs(v) < _INF


@triton.jit
def _mark(v, bad):
    """v with NaN where `bad` (a token really reads a non-finite value there)."""
    return tl.where(bad, _INF - _INF, v)


@triton.jit
def _any_nonfinite(v):
    """Whether a tile holds a non-finite value (the gate of the isolated redo).  # scalar"""
    return tl.max(tl.where(_finite(v), 0, 1)) > 0


@triton.jit
def _nonfinite_rows(v):
    """Rows of a 2-D tile holding a non-finite value.  # [rows] bool"""
    return tl.max(tl.where(_finite(v), 0, 1), 1) > 0


@triton.jit
def _block(pid, blk_user_ptr, blk_start_ptr, blk_end_ptr, ranks_ptr, U, RMAX, HAS_RANKS: tl.constexpr):
    """One block-table row: (u, start, end, has_user, u clamped to a valid row as int64, r_u).
    u = -1: idle program; u = U: the tokens without a user (expert term only)."""
    u = tl.load(blk_user_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    end = tl.load(blk_end_ptr + pid)
    has_user = (u >= 0) & (u < U)
    uc = tl.where(has_user, u, 0).to(tl.int64)
    if HAS_RANKS:
        r_u = tl.load(ranks_ptr + uc, mask=has_user, other=0)
    else:
        r_u = tl.where(has_user, RMAX, 0)
    return u, start, end, has_user, uc, r_u


@triton.jit
def _rank_columns(j, KR, RE, width):
    """Split concatenated rank columns j into (is_expert, is_user, expert k, expert rank r, user rank ru)."""
    is_e = j < KR
    is_u = (j >= KR) & (j < width)
    k = j // RE
    r = j - k * RE
    ru = j - KR
    return is_e, is_u, k, r, ru


@triton.jit
def _user_coef(tok, tmask, has_user, uc, uscale_ptr, uweight_ptr, s_w_t,
               HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """w[t] * s_u[u] for the tokens of one block (0 without a user).  # [BLOCK_T] fp32"""
    # scalar and vector masks are never and-ed: the CPU interpreter rejects that mask (triton 3.9)
    c = tl.where(tmask, 1.0, 0.0) * tl.where(has_user, 1.0, 0.0)
    if HAS_SCALE:
        c = c * tl.load(uscale_ptr + uc, mask=has_user, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        c = c * tl.load(uweight_ptr + tok * s_w_t, mask=tmask, other=0.0).to(tl.float32)
    return c


@triton.jit
def _gate_tile(tok, tmask, is_e, k, gates_ptr, s_g_t, s_g_k):
    """g[t, k] on expert columns, 0 elsewhere.  # [BT, BR] fp32"""
    return tl.load(gates_ptr + tok[:, None] * s_g_t + k[None, :] * s_g_k,
                   mask=tmask[:, None] & is_e[None, :], other=0.0).to(tl.float32)


@triton.jit
def _uses(g, is_u):
    """Rank columns each token uses: its experts with a nonzero gate (a zero gate is a structural zero), its
    user's columns within width. g is _gate_tile's (0 off expert columns and on masked tokens, whose rows are
    never stored).  # [BT, BR] bool"""
    return (g != 0) | is_u[None, :]


@triton.jit
def _coef(g, ws, is_e, is_u, s_e):
    """Rank-space gate c[t, j]: s_e * g[t, k] on expert columns, ws[t] = w[t] s_u[u] on user columns, 0 past
    width. Its zeros never drop a term by multiplying (0 * inf = nan): tl.where does (_uses).  # [BT, BR]"""
    return tl.where(is_e[None, :], g * s_e, tl.where(is_u[None, :], ws[:, None], 0.0))


# ---------------------------------------------------------------------------------------------- shrink
@triton.jit
def shrink_kernel(
    src_ptr,        # [T, D] x (or dy)
    ea_ptr,         # [K, r_e, D] view: expert A (or B^T)
    ua_ptr,         # [U, r_max, D] view: user A (or B^T)
    out_ptr,        # [T, KR + r_max] fp32 rank-space activations, by token
    order_ptr, blk_user_ptr, blk_start_ptr, blk_end_ptr,
    ranks_ptr, gates_ptr, uscale_ptr, uweight_ptr,
    D, KR, RE, RMAX, U, s_e,
    s_src_t, s_src_d, s_ea_k, s_ea_r, s_ea_d, s_ua_u, s_ua_r, s_ua_d, s_out_t, s_g_t, s_g_k, s_w_t,
    HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, GATE: tl.constexpr,
    F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One wide shrink over [A_1..A_K | A_u] for one block of one user's tokens and one rank tile.

    Semantics: for t in the block (user u), j in the tile, j < width = K*r_e + r_u:
        out[t, j] = c[t, j] * sum_d src[t, d] * W[j, d],   W = [A_1; ..; A_K; A_u[:r_u]]
    with c the rank-space gate when GATE (s_e g[t,k] / w[t] s_u[u], and exactly 0 in the columns of experts
    whose gate is 0, whatever the sum) and 1 otherwise. fp32 accumulation. Column j of the dot reads only W's
    row j and row t only src[t]: no fault crosses columns or tokens here.
    Grid: (blocks, cdiv(KR + r_max, BLOCK_R)); a tile at or past width exits before loading anything.
    """
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    u, start, end, has_user, uc, r_u = _block(pid_b, blk_user_ptr, blk_start_ptr, blk_end_ptr, ranks_ptr, U,
                                              RMAX, HAS_RANKS)
    width = KR + r_u
    j0 = pid_r * BLOCK_R
    if (u < 0) | (j0 >= width):
        return
    pos = start + tl.arange(0, BLOCK_T)
    tmask = pos < end
    tok = tl.load(order_ptr + pos, mask=tmask, other=0)                                  # [BT] int64
    j = j0 + tl.arange(0, BLOCK_R)
    is_e, is_u, k, r, ru = _rank_columns(j, KR, RE, width)
    e_row = k.to(tl.int64) * s_ea_k + r * s_ea_r                                         # [BR]
    u_row = uc * s_ua_u + ru * s_ua_r                                                    # [BR]

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        xs = tl.load(src_ptr + tok[:, None] * s_src_t + d[None, :] * s_src_d,
                     mask=tmask[:, None] & dmask[None, :], other=0.0)                    # [BT, BD]
        # expert and user columns are disjoint masks: one [BD, BR] tile of the concatenated W^T
        w = tl.load(ea_ptr + e_row[None, :] + d[:, None] * s_ea_d, mask=dmask[:, None] & is_e[None, :],
                    other=0.0)
        w += tl.load(ua_ptr + u_row[None, :] + d[:, None] * s_ua_d, mask=dmask[:, None] & is_u[None, :],
                     other=0.0)                                                          # [BD, BR]
        acc = _dot(xs, w, acc, F32)
    if GATE:
        ws = _user_coef(tok, tmask, has_user, uc, uscale_ptr, uweight_ptr, s_w_t, HAS_SCALE, HAS_WEIGHT)
        g = _gate_tile(tok, tmask, is_e, k, gates_ptr, s_g_t, s_g_k)
        acc = tl.where(_uses(g, is_u), acc * _coef(g, ws, is_e, is_u, s_e), 0.0)
    tl.store(out_ptr + tok[:, None] * s_out_t + j[None, :], acc,
             mask=tmask[:, None] & (j < width)[None, :])


# ---------------------------------------------------------------------------------------------- expand
@triton.jit
def _expand_acc(h_ptr, eb_ptr, ub_ptr, gates_ptr, tok, tmask, uc, n, nmask, width, ws, KR, RE, s_e,
                s_h_t, s_eb_k, s_eb_r, s_eb_n, s_ub_u, s_ub_r, s_ub_n, s_g_t, s_g_k,
                GATE: tl.constexpr, ISOLATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The rank loop of expand_kernel.  # [BT, BN] fp32

    ISOLATE: the non-finite entries W[j, n] of a tile are zeroed and h[t, j] of the tokens that use column j
    is set to NaN, so a fault reaches only the rows of its users (their whole output tile turns NaN)."""
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, width, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        is_e, is_u, k, r, ru = _rank_columns(j, KR, RE, width)
        h = tl.load(h_ptr + tok[:, None] * s_h_t + j[None, :], mask=tmask[:, None] & (j < width)[None, :],
                    other=0.0)                                                           # [BT, BR] fp32
        if GATE | ISOLATE:
            g = _gate_tile(tok, tmask, is_e, k, gates_ptr, s_g_t, s_g_k)
        if GATE:  # d(x) only: where c = 0 its term is exactly 0 (or non-finite in this token's own row)
            c = _coef(g, ws, is_e, is_u, s_e)
            h = tl.where(c != 0, h * c, 0.0)
        e_row = k.to(tl.int64) * s_eb_k + r * s_eb_r
        u_row = uc * s_ub_u + ru * s_ub_r
        w = tl.load(eb_ptr + e_row[:, None] + n[None, :] * s_eb_n, mask=is_e[:, None] & nmask[None, :],
                    other=0.0).to(tl.float32)
        w += tl.load(ub_ptr + u_row[:, None] + n[None, :] * s_ub_n, mask=is_u[:, None] & nmask[None, :],
                     other=0.0).to(tl.float32)                                           # [BR, BN]
        if ISOLATE:
            h = _mark(h, _uses(g, is_u) & _nonfinite_rows(w)[None, :])
            w = tl.where(_finite(w), w, 0.0)
        acc = _dot(h, w, acc, False)
    return acc


@triton.jit
def expand_kernel(
    h_ptr,          # [T, KR + r_max] fp32 rank-space activations, by token
    eb_ptr,         # [K, r_e, N] view: expert B^T (or A)
    ub_ptr,         # [U, r_max, N] view: user B^T (or A)
    out_ptr,        # [T, N] y (or dx), the input dtype
    order_ptr, blk_user_ptr, blk_start_ptr, blk_end_ptr,
    ranks_ptr, gates_ptr, uscale_ptr, uweight_ptr,
    N, KR, RE, RMAX, U, s_e,
    s_h_t, s_eb_k, s_eb_r, s_eb_n, s_ub_u, s_ub_r, s_ub_n, s_out_t, s_out_n, s_g_t, s_g_k, s_w_t,
    HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One expand through [B_1..B_K | B_u] for one block of one user's tokens and one output tile.

    Semantics: for t in the block (user u), n in the tile:
        out[t, n] = sum_{j < K*r_e + r_u, c[t, j] != 0} c[t, j] * h[t, j] * W[j, n]
    with W = [B_1 .. B_K | B_u[:, :r_u]]^T and c the rank-space gate when GATE, else 1 (h is gated already:
    zero in the columns a token does not use); the rank loop stops at the user's width. fp32 throughout (h
    stays fp32, W is upcast); the result is stored in out's dtype. Every active block writes its rows, so out
    needs no zero fill. A non-finite accumulator (rare: a fault in h or W) redoes the loop isolated
    (_expand_acc). Grid: (blocks, cdiv(N, BLOCK_N)).
    """
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    u, start, end, has_user, uc, r_u = _block(pid_b, blk_user_ptr, blk_start_ptr, blk_end_ptr, ranks_ptr, U,
                                              RMAX, HAS_RANKS)
    if u < 0:
        return
    width = KR + r_u
    pos = start + tl.arange(0, BLOCK_T)
    tmask = pos < end
    tok = tl.load(order_ptr + pos, mask=tmask, other=0)                                  # [BT] int64
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    if GATE:
        ws = _user_coef(tok, tmask, has_user, uc, uscale_ptr, uweight_ptr, s_w_t, HAS_SCALE, HAS_WEIGHT)
    else:
        ws = tl.zeros((BLOCK_T,), dtype=tl.float32)                                      # unused
    acc = _expand_acc(h_ptr, eb_ptr, ub_ptr, gates_ptr, tok, tmask, uc, n, nmask, width, ws, KR, RE, s_e,
                      s_h_t, s_eb_k, s_eb_r, s_eb_n, s_ub_u, s_ub_r, s_ub_n, s_g_t, s_g_k,
                      GATE, False, BLOCK_T, BLOCK_R, BLOCK_N)
    if _any_nonfinite(acc):
        acc = _expand_acc(h_ptr, eb_ptr, ub_ptr, gates_ptr, tok, tmask, uc, n, nmask, width, ws, KR, RE, s_e,
                          s_h_t, s_eb_k, s_eb_r, s_eb_n, s_ub_u, s_ub_r, s_ub_n, s_g_t, s_g_k,
                          GATE, True, BLOCK_T, BLOCK_R, BLOCK_N)
    tl.store(out_ptr + tok[:, None] * s_out_t + n[None, :] * s_out_n, acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------- weight gradients
@triton.jit
def _wgrad_acc(g_ptr, m_ptr, order_ptr, gates_ptr, uweight_ptr, start, n_tok, col, k, rmask, c, cmask,
               s_g_t, s_m_t, s_m_c, s_gt_t, s_gt_k, s_w_t,
               USER: tl.constexpr, HAS_WEIGHT: tl.constexpr, ISOLATE: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The token loop of wgrad_kernel.  # [BR, BC] fp32

    ISOLATE (experts only): the non-finite entries of M are zeroed and G[t, j] of the columns token t uses is
    set to NaN where M[t] holds one (in this tile), so a token's fault reaches only its own experts' rows."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, n_tok, BLOCK_T):
        i = t0 + tl.arange(0, BLOCK_T)
        tmask = i < n_tok
        if USER:
            tok = tl.load(order_ptr + start + i, mask=tmask, other=0)                    # [BT] int64
        else:
            tok = (start + i).to(tl.int64)
        gm = tmask[:, None] & rmask[None, :]
        g = tl.load(g_ptr + tok[:, None] * s_g_t + col[None, :], mask=gm, other=0.0)     # [BT, BR] fp32
        if USER:
            if HAS_WEIGHT:
                g = g * tl.load(uweight_ptr + tok * s_w_t, mask=tmask, other=0.0).to(tl.float32)[:, None]
        else:
            gate = tl.load(gates_ptr + tok[:, None] * s_gt_t + k[None, :] * s_gt_k, mask=gm,
                           other=0.0).to(tl.float32)
            used = gate != 0                                                             # masked: gate 0
            g = tl.where(used, g * gate, 0.0)
        m = tl.load(m_ptr + tok[:, None] * s_m_t + c[None, :] * s_m_c, mask=tmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)                                            # [BT, BC]
        if ISOLATE:
            g = _mark(g, used & _nonfinite_rows(m)[:, None])
            m = tl.where(_finite(m), m, 0.0)
        acc = _dot(tl.trans(g), m, acc, False)
    return acc


@triton.jit
def wgrad_kernel(
    g_ptr,          # [T, KR + r_max] fp32 rank-space activations (h or dh), ungated, by token
    m_ptr,          # [T, C] dy (or x)
    out_ptr,        # [K, r_e, C] or [U, r_max, C] view of the weight gradient (dB^T or dA); experts split
                    # over token chunks: [S, K, r_e, C] fp32 partial sums (s_o_s = its split stride)
    order_ptr, seg_start_ptr, seg_len_ptr, active_ptr,
    ranks_ptr, gates_ptr, uscale_ptr, uweight_ptr,
    T, C, KR, RE, RMAX, s_e, chunk,
    s_g_t, s_m_t, s_m_c, s_o_s, s_o_a, s_o_r, s_o_c, s_gt_t, s_gt_k, s_w_t,
    USER: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Weight gradient of the experts (USER=False) or of each user with tokens (USER=True).

    Semantics (G = h for dB, dh for dA; M = dy for dB, x for dA):
        experts: out[k, r, c] = s_e * sum_{t with g[t, k] != 0} g[t, k] * G[t, k*r_e + r] * M[t, c]
        users:   out[u, r, c] = s_u[u] * sum_{t of user u} w[t] * G[t, K*r_e + r] * M[t, c],   r < r_u
    A plain reduction over the tokens inside one program: deterministic, no atomics; for experts a
    non-finite accumulator redoes it isolated (_wgrad_acc). Grid: experts
    (cdiv(KR, BLOCK_R), cdiv(C, BLOCK_C), S): split s sums tokens [s*chunk, (s+1)*chunk) into its own partial
    (the launcher adds the S partials), so long batches still fill the GPU; users (active users,
    cdiv(r_max, BLOCK_R), cdiv(C, BLOCK_C)) where padding rows of `active`, empty users and rank tiles past r_u
    exit at once (out is zero-filled).
    """
    if USER:
        pid_r = tl.program_id(1)
        pid_c = tl.program_id(2)
        u = tl.load(active_ptr + tl.program_id(0))
        uc = tl.where(u >= 0, u, 0).to(tl.int64)
        if HAS_RANKS:
            r_u = tl.load(ranks_ptr + uc, mask=u >= 0, other=0)
        else:
            r_u = tl.where(u >= 0, RMAX, 0)
        if (u < 0) | (pid_r * BLOCK_R >= r_u):
            return
        start = tl.load(seg_start_ptr + uc)
        n_tok = tl.load(seg_len_ptr + uc)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = r < r_u
        col = KR + r                                                                     # [BR]
        k = r                                                                            # unused: no gates
    else:
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        start = pid_s * chunk
        n_tok = tl.minimum(T - start, chunk)
        out_ptr += pid_s.to(tl.int64) * s_o_s
        j = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = j < KR
        col = j
        k = j // RE
        r = j - k * RE
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C

    acc = _wgrad_acc(g_ptr, m_ptr, order_ptr, gates_ptr, uweight_ptr, start, n_tok, col, k, rmask, c, cmask,
                     s_g_t, s_m_t, s_m_c, s_gt_t, s_gt_k, s_w_t, USER, HAS_WEIGHT, False,
                     BLOCK_T, BLOCK_R, BLOCK_C)
    if not USER:  # a user's gradient reads only that user's tokens: all of them may carry its faults
        if _any_nonfinite(acc):
            acc = _wgrad_acc(g_ptr, m_ptr, order_ptr, gates_ptr, uweight_ptr, start, n_tok, col, k, rmask, c,
                             cmask, s_g_t, s_m_t, s_m_c, s_gt_t, s_gt_k, s_w_t, USER, HAS_WEIGHT, True,
                             BLOCK_T, BLOCK_R, BLOCK_C)
    if USER:
        if HAS_SCALE:
            acc = acc * tl.load(uscale_ptr + uc).to(tl.float32)
        row = uc * s_o_a + r * s_o_r
    else:
        acc = acc * s_e
        row = k.to(tl.int64) * s_o_a + r * s_o_r
    tl.store(out_ptr + row[:, None] + c[None, :] * s_o_c, acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------- gate gradients
@triton.jit
def gate_grad_kernel(
    h_ptr, dh_ptr,  # [T, KR + r_max] fp32: h = [A_e; A_u] x and dh = [B_e | B_u]^T dy, ungated, by token
    gates_ptr,      # [T, K]
    dg_ptr,         # [T, K] d(gates), gates' dtype
    ids_ptr,        # [T] user ids (-1: none)
    ranks_ptr, uscale_ptr,
    dw_ptr,         # [T] d(user_weight), its dtype
    T, K, RE, KR, RMAX, s_e,
    s_h_t, s_gt_t, s_gt_k, s_dg_t, s_dg_k, s_ids, s_dw,
    NEED_G: tl.constexpr, NEED_W: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_RE: tl.constexpr, BLOCK_RU: tl.constexpr,
):
    """Router gradients, per token.

    Semantics:
        dg[t, k] = [g[t, k] != 0] * s_e * sum_{r < r_e} dh[t, k*r_e + r] * h[t, k*r_e + r]
        dw[t]    = [u >= 0] * s_u[u] * sum_{r < r_u} dh[t, K*r_e + r] * h[t, K*r_e + r]
    Grid: (cdiv(T, BLOCK_T),) over tokens in their own order; the user rank loop stops at the block's
    largest r_u.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    t64 = t.to(tl.int64)
    if NEED_G:
        r = tl.arange(0, BLOCK_RE)
        m = tmask[:, None] & (r < RE)[None, :]
        for k in range(0, K):
            off = t64[:, None] * s_h_t + (k * RE + r)[None, :]
            s = tl.sum(tl.load(h_ptr + off, mask=m, other=0.0) * tl.load(dh_ptr + off, mask=m, other=0.0), 1)
            g = tl.load(gates_ptr + t64 * s_gt_t + k * s_gt_k, mask=tmask, other=0.0).to(tl.float32)
            dg = tl.where(g != 0, s * s_e, 0.0)                                          # structural zeros
            tl.store(dg_ptr + t64 * s_dg_t + k * s_dg_k, dg.to(dg_ptr.dtype.element_ty), mask=tmask)
    if NEED_W:
        u = tl.load(ids_ptr + t64 * s_ids, mask=tmask, other=-1).to(tl.int64)
        valid = tmask & (u >= 0)
        uc = tl.where(valid, u, 0)
        if HAS_RANKS:
            r_u = tl.load(ranks_ptr + uc, mask=valid, other=0)
        else:
            r_u = tl.where(valid, RMAX, 0)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for r0 in range(0, tl.max(r_u, 0), BLOCK_RU):
            ru = r0 + tl.arange(0, BLOCK_RU)
            mu = valid[:, None] & (ru[None, :] < r_u[:, None])
            off_u = t64[:, None] * s_h_t + (KR + ru)[None, :]
            acc += tl.sum(tl.load(h_ptr + off_u, mask=mu, other=0.0) * tl.load(dh_ptr + off_u, mask=mu, other=0.0),
                          1)
        if HAS_SCALE:
            acc = acc * tl.load(uscale_ptr + uc, mask=valid, other=0.0)
        dw = tl.where(valid, acc, 0.0)
        tl.store(dw_ptr + t64 * s_dw, dw.to(dw_ptr.dtype.element_ty), mask=tmask)
