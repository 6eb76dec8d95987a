// The CPU backend of routed_lora: forward and backward, OpenMP over token chunks / output tiles, with the
// vectorised micro-kernels chosen at run time (AVX-512, AVX2+FMA or portable; see kernels.h).
//
// Layout. Every (token, group) pair with a term is an Entry (group = expert k < K, or K + user u). A token's
// entries are contiguous (experts by k, then its user) and each owns `rank` fp32 values in rank-space buffers
// (H = A x, Dr = B^T dy). Only selected experts (nonzero gate) and users with rank > 0 get entries, and a
// user's entry spans r_u values, so no padded rank and no unselected expert is ever computed or read.
//
// Forward:  H[e] = coef_e * A_g x[t]          (shrink: per chunk of user-sorted tokens, one task per group)
//           y[t] = sum_e B_g H[e]            (expand: per chunk x block of output columns; a group with many
//                                             tokens packs its block of B_g^T into L1 and shares every load among
//                                             its tokens; one with few tokens reads B_g rows directly; the
//                                             block's terms add up in an fp32 tile in L1/L2, written out once)
//           Users with few tokens (decode: one token each) run as their own tasks, shrink + expand together,
//           streaming A_u and B_u once; the experts of all those tokens still go through the chunks, so each
//           expert's A and B are read once per chunk, not once per token.
// Backward: H[e] = A_g x[t], Dr[e] = B_g^T dy[t], d_gate / d_w = <Dr, H> scaled, DH = coef Dr, HG = coef H
//                                            (per chunk of user-sorted tokens)
//           dx[t] = sum_e A_g^T DH[e]        (per chunk x block of d)
//           dA_g  = sum_{e in g} DH[e] x[t]^T, dB_g = sum_{e in g} dy[t] HG[e]^T
//                                            (per group x block of columns: each output has one owner, so no
//                                             atomics and no partial sums)
// Every output element is one fixed chain of operations whatever the chunking or thread count, so results are
// bitwise independent of the number of threads (see kernels_impl.h).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"

namespace proper_cpu {
namespace {

// ------------------------------------------------------------------------------------- ISA selection
bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx512bf16")
    return kernels_avx512bf16() != nullptr && avx512 && __builtin_cpu_supports("avx512bf16");
  if (isa == "avx512") return kernels_avx512() != nullptr && avx512;
  if (isa == "avx2")
    return kernels_avx2() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "avx512bf16") return kernels_avx512bf16();
  if (isa == "avx512") return kernels_avx512();
  if (isa == "avx2") return kernels_avx2();
  return kernels_generic();
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* n : {"avx512bf16", "avx512", "avx2", "generic"})
    if (cpu_has(n)) out.push_back(n);
  return out;
}

const KernelTable* g_table = nullptr;

const KernelTable* select_isa(const std::string& want) {
  if (want.empty() || want == "auto") return table_for(supported_isas().front());
  TORCH_CHECK(want == "avx512bf16" || want == "avx512" || want == "avx2" || want == "generic",
              "proper_kernels cpu: unknown ISA '", want, "' (expected auto, avx512bf16, avx512, avx2 or generic)");
  TORCH_CHECK(cpu_has(want), "proper_kernels cpu: this CPU cannot run the '", want, "' kernels");
  return table_for(want);
}

const KernelTable* kt() {
  if (g_table == nullptr) {
    const char* env = std::getenv("PROPER_CPU_ISA");
    g_table = select_isa(env ? std::string(env) : std::string("auto"));
  }
  return g_table;
}

// ------------------------------------------------------------------------------------------ the plan
constexpr int64_t kExpandCols = 128;   // output columns per expand item (a group's B block stays in L1)
constexpr int64_t kGradCols = 256;     // d columns per dx item
// d (or o) columns per dA / dB item: long row segments, so the gathered x / dy rows stream from memory
constexpr int64_t kTnCols = 2048;
constexpr int64_t kChunkBytes = 512 * 1024;  // x rows of one chunk (kept in L2 while all its groups run)
constexpr int32_t kPackMin = 8;        // groups with at least this many tokens use packed fp32 weight copies
// Experts pack B^T for their forward expand from fewer tokens: a decode step gives each of K experts ~T top_k / K
// tokens, and without the packed copy every (token, 8 outputs) pays a horizontal reduction; with it every load of
// B^T is shared by the expert's tokens. (A model's expert B is not cache-resident across steps: bound decode calls
// pass a copy packed once per batch, expert_bt, instead of packing per call.)
constexpr int32_t kPackMinExpert = 2;   // measured: 2 beats 4 and 8 in both dtypes at decode shapes

// The layout of cpu_pack_expert_bt: blocks of kExpandCols output columns [o0, o1) one after the other; within a
// block, expert k's B_k^T rows (R rows of o1 - o0 values) one after the other, experts by k. Offset of expert k's
// block [o0, o1), in elements.
int64_t expert_bt_offset(int K, int R, int64_t o0, int64_t o1, int k) {
  return o0 * K * R + (int64_t)k * R * (o1 - o0);
}

// Row stride of a packed fp32 copy: a whole number of 16-float vectors plus one, so that consecutive rows of a
// power-of-two width do not all fall into the same cache sets.
int64_t padded_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }

struct Task {
  int32_t group, start, len;  // entries task_idx[start, start + len) of one group within one chunk
};

struct Plan {
  int dt = kF32;
  int64_t esz = 4;  // bytes per element of x and the weights
  int64_t T = 0, D = 0, O = 0;
  int K = 0, R = 0, U = 0;
  float se = 1.0f;
  std::vector<GroupDesc> groups;           // K experts, then U users
  std::vector<Entry> ent;                  // token-major
  std::vector<int32_t> tok_ptr;            // [T + 1]
  std::vector<int32_t> order;              // tokens sorted by user (no-user tokens last), stable
  int64_t nslots = 0;
  std::vector<int32_t> grp_ptr, grp_idx;   // per group: its entries, ascending token
  int64_t chunk = 1, nchunks = 0;
  std::vector<int32_t> chunk_task_ptr;     // [nchunks + 1]
  std::vector<Task> tasks;
  std::vector<int32_t> task_idx;
};

int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return kF32;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "proper_kernels cpu: float32 or bfloat16 expected, got ",
              t.scalar_type());
  return kBF16;
}

void check_input(const at::Tensor& t, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.device().is_cpu(), "proper_kernels cpu: '", name, "' must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "proper_kernels cpu: '", name, "' must be contiguous");
  TORCH_CHECK(t.scalar_type() == st, "proper_kernels cpu: '", name, "' must have dtype ", st, ", got ",
              t.scalar_type());
}

const char* bytes_of(const at::Tensor& t) { return static_cast<const char*>(t.data_ptr()); }

Plan make_plan(const at::Tensor& x, const c10::optional<at::Tensor>& ea, const c10::optional<at::Tensor>& eb,
               const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& ua,
               const c10::optional<at::Tensor>& ub, const c10::optional<at::Tensor>& ids,
               const c10::optional<at::Tensor>& ranks, double expert_scale, const c10::optional<at::Tensor>& us,
               const c10::optional<at::Tensor>& w, int64_t d_out, int nthreads) {
  Plan p;
  TORCH_CHECK(x.dim() == 2, "proper_kernels cpu: x must be [T, d_in]");
  p.dt = dtype_code(x);
  const at::ScalarType st = x.scalar_type();
  check_input(x, "x", st);
  p.T = x.size(0);
  p.D = x.size(1);
  p.O = d_out;
  TORCH_CHECK(p.T < (int64_t(1) << 30), "proper_kernels cpu: too many tokens");
  const int64_t esz = x.element_size();
  p.esz = esz;

  const bool has_e = ea.has_value();
  const bool has_u = ua.has_value();
  if (has_e) {
    check_input(*ea, "expert_a", st);
    check_input(*eb, "expert_b", st);
    check_input(*gates, "gates", at::kFloat);
    p.K = (int)ea->size(0);
    p.R = (int)ea->size(1);
    TORCH_CHECK(ea->size(2) == p.D && eb->size(0) == p.K && eb->size(1) == p.O && eb->size(2) == p.R &&
                    gates->size(0) == p.T && gates->size(1) == p.K,
                "proper_kernels cpu: expert shapes do not match");
  }
  p.se = (float)expert_scale;
  int64_t rmax = 0;
  const int64_t* rk = nullptr;
  const int64_t* uid = nullptr;
  const float* usp = nullptr;
  const float* wp = nullptr;
  if (has_u) {
    check_input(*ua, "user_a", st);
    check_input(*ub, "user_b", st);
    check_input(*ids, "user_ids", at::kLong);
    p.U = (int)ua->size(0);
    rmax = ua->size(1);
    TORCH_CHECK(ua->size(2) == p.D && ub->size(0) == p.U && ub->size(1) == p.O && ub->size(2) == rmax &&
                    ids->size(0) == p.T,
                "proper_kernels cpu: user shapes do not match");
    uid = ids->data_ptr<int64_t>();
    if (ranks.has_value()) {
      check_input(*ranks, "user_ranks", at::kLong);
      TORCH_CHECK(ranks->size(0) == p.U, "proper_kernels cpu: user_ranks must be [U]");
      rk = ranks->data_ptr<int64_t>();
    }
    if (us.has_value()) {
      check_input(*us, "user_scale", at::kFloat);
      usp = us->data_ptr<float>();
    }
    if (w.has_value()) {
      check_input(*w, "user_weight", at::kFloat);
      wp = w->data_ptr<float>();
    }
  }

  // groups
  p.groups.resize((size_t)p.K + p.U);
  for (int k = 0; k < p.K; ++k) {
    p.groups[k] = GroupDesc{bytes_of(*ea) + (int64_t)k * p.R * p.D * esz, bytes_of(*eb) + (int64_t)k * p.O * p.R * esz,
                            p.R, p.R};
  }
  for (int u = 0; u < p.U; ++u) {
    int64_t r = rk ? rk[u] : rmax;
    TORCH_CHECK(r >= 0 && r <= rmax, "proper_kernels cpu: user rank out of range");
    p.groups[(size_t)p.K + u] = GroupDesc{bytes_of(*ua) + (int64_t)u * rmax * p.D * esz,
                                          bytes_of(*ub) + (int64_t)u * p.O * rmax * esz, rmax, (int)r};
  }

  // entries, token-major
  const float* g = has_e ? gates->data_ptr<float>() : nullptr;
  p.tok_ptr.resize(p.T + 1);
  p.ent.reserve((size_t)p.T * 3);
  int64_t slot = 0;
  for (int64_t t = 0; t < p.T; ++t) {
    p.tok_ptr[t] = (int32_t)p.ent.size();
    for (int k = 0; k < p.K; ++k) {
      const float gv = g[t * p.K + k];
      if (gv != 0.0f) {  // zero gates are structural: no term
        p.ent.push_back(Entry{(int32_t)t, k, slot, gv * p.se});
        slot += p.R;
      }
    }
    if (has_u) {
      const int64_t u = uid[t];
      TORCH_CHECK(u >= -1 && u < p.U, "proper_kernels cpu: user id out of range");
      if (u >= 0 && p.groups[(size_t)p.K + u].rank > 0) {
        const float c = (usp ? usp[u] : 1.0f) * (wp ? wp[t] : 1.0f);
        p.ent.push_back(Entry{(int32_t)t, (int32_t)(p.K + u), slot, c});
        slot += p.groups[(size_t)p.K + u].rank;
      }
    }
  }
  TORCH_CHECK(p.ent.size() < (size_t(1) << 31), "proper_kernels cpu: too many (token, adapter) pairs");
  p.tok_ptr[p.T] = (int32_t)p.ent.size();
  p.nslots = slot;

  // tokens sorted by user (counting sort, stable; no-user tokens last)
  p.order.resize(p.T);
  if (has_u) {
    std::vector<int32_t> cnt((size_t)p.U + 2, 0);
    for (int64_t t = 0; t < p.T; ++t) cnt[(uid[t] < 0 ? p.U : uid[t]) + 1]++;
    for (int u = 0; u <= p.U; ++u) cnt[u + 1] += cnt[u];
    for (int64_t t = 0; t < p.T; ++t) p.order[cnt[uid[t] < 0 ? p.U : uid[t]]++] = (int32_t)t;
  } else {
    for (int64_t t = 0; t < p.T; ++t) p.order[t] = (int32_t)t;
  }

  // per-group entry lists (ascending token)
  const size_t G = p.groups.size();
  p.grp_ptr.assign(G + 1, 0);
  for (const Entry& e : p.ent) p.grp_ptr[e.group + 1]++;
  for (size_t i = 0; i < G; ++i) p.grp_ptr[i + 1] += p.grp_ptr[i];
  p.grp_idx.resize(p.ent.size());
  {
    std::vector<int32_t> fill(p.grp_ptr.begin(), p.grp_ptr.end() - 1);
    for (size_t i = 0; i < p.ent.size(); ++i) p.grp_idx[fill[p.ent[i].group]++] = (int32_t)i;
  }

  // chunks of the user-sorted tokens and, per chunk, one task per group present (experts by k, then users).
  // A chunk's x rows stay in L2 while each of its groups runs; enough chunks to keep every thread busy. When most
  // tokens belong to users with few tokens (decode), those users run as their own tasks and the chunks only
  // carry the experts: then a few large chunks read each expert's weights fewest times.
  int64_t ch = std::max<int64_t>(4, std::min<int64_t>(64, kChunkBytes / std::max<int64_t>(1, p.D * esz)));
  int64_t late_users = 0, late_tokens = 0;
  for (int u = 0; u < p.U; ++u) {
    const int32_t c = p.grp_ptr[p.K + u + 1] - p.grp_ptr[p.K + u];
    if (c > 0 && c < kPackMin) late_users++, late_tokens += c;
  }
  if (2 * late_tokens >= p.T && late_users >= 2 * nthreads) {
    ch = std::max<int64_t>(ch, std::min<int64_t>(p.T, 128));
  } else {
    const int64_t per_thread = (p.T + 2 * (int64_t)nthreads - 1) / (2 * (int64_t)nthreads);
    ch = std::max<int64_t>(1, std::min(ch, per_thread));
  }
  p.chunk = ch;
  p.nchunks = (p.T + ch - 1) / ch;
  p.chunk_task_ptr.assign(p.nchunks + 1, 0);
  p.task_idx.reserve(p.ent.size());
  std::vector<int32_t> kcount(p.K + 1);
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t s = c * ch, e = std::min(p.T, s + ch);
    // experts: bucket the chunk's expert entries by k, in chunk order
    if (p.K > 0) {
      std::fill(kcount.begin(), kcount.end(), 0);
      for (int64_t i = s; i < e; ++i) {
        const int32_t t = p.order[i];
        for (int32_t q = p.tok_ptr[t]; q < p.tok_ptr[t + 1]; ++q)
          if (p.ent[q].group < p.K) kcount[p.ent[q].group + 1]++;
      }
      for (int k = 0; k < p.K; ++k) kcount[k + 1] += kcount[k];
      const int32_t base = (int32_t)p.task_idx.size();
      p.task_idx.resize(p.task_idx.size() + kcount[p.K]);
      std::vector<int32_t> fill(kcount.begin(), kcount.end() - 1);
      for (int64_t i = s; i < e; ++i) {
        const int32_t t = p.order[i];
        for (int32_t q = p.tok_ptr[t]; q < p.tok_ptr[t + 1]; ++q)
          if (p.ent[q].group < p.K) p.task_idx[base + fill[p.ent[q].group]++] = q;
      }
      for (int k = 0; k < p.K; ++k)
        if (kcount[k + 1] > kcount[k]) p.tasks.push_back(Task{k, base + kcount[k], kcount[k + 1] - kcount[k]});
    }
    // users: the chunk's tokens are sorted by user, so each user's entries form one run
    for (int64_t i = s; i < e; ++i) {
      const int32_t t = p.order[i];
      const int32_t last = p.tok_ptr[t + 1] - 1;
      if (last < p.tok_ptr[t] || p.ent[last].group < p.K) continue;
      const int32_t grp = p.ent[last].group;
      if (!p.tasks.empty() && p.tasks.back().group == grp &&
          (int64_t)p.tasks.size() > p.chunk_task_ptr[c] &&
          p.tasks.back().start + p.tasks.back().len == (int32_t)p.task_idx.size()) {
        p.tasks.back().len++;
      } else {
        p.tasks.push_back(Task{grp, (int32_t)p.task_idx.size(), 1});
      }
      p.task_idx.push_back(last);
    }
    p.chunk_task_ptr[c + 1] = (int32_t)p.tasks.size();
  }
  return p;
}

// Ask for the first lines of a group's A rows and of its B: the next late user's weights start arriving while
// this one streams (the hardware prefetchers only pick a stream up after its first misses).
void prefetch_head(const GroupDesc& g, int64_t D, int64_t esz) {
  const char* a = static_cast<const char*>(g.a);
  for (int j = 0; j < std::min(g.rank, 4); ++j)
    for (int64_t off = 0; off < 1024; off += 64) __builtin_prefetch(a + j * D * esz + off);
  const char* b = static_cast<const char*>(g.b);
  for (int64_t off = 0; off < 2048; off += 64) __builtin_prefetch(b + off);
}

// f(item, thread) for item < n, dynamically scheduled over `nthreads` OpenMP threads (thread < nthreads).
template <class F>
void parallel_items(int64_t n, int nthreads, const F& f) {
  if (n <= 0) return;
  if (nthreads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) f(i, tid);
  }
}

at::Tensor maybe_to(const at::Tensor& t, at::ScalarType st) { return t.scalar_type() == st ? t : t.to(st); }

// ---------------------------------------------------------------------------------------------- forward
// The forward; with `saved` non-null it also returns there the unscaled rank-space vectors H = A x of every entry
// ([nslots] fp32, the layout the backward's plan gives them), which the backward then reads instead of recomputing.
at::Tensor forward_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& ea, const c10::optional<at::Tensor>& eb,
                        const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& ua,
                        const c10::optional<at::Tensor>& ub, const c10::optional<at::Tensor>& ids,
                        const c10::optional<at::Tensor>& ranks, double expert_scale,
                        const c10::optional<at::Tensor>& us, const c10::optional<at::Tensor>& w, int64_t d_out,
                        const c10::optional<at::Tensor>& out, at::Tensor* saved,
                        const c10::optional<at::Tensor>& ebt_in = c10::nullopt) {
  const int nt = std::max(1, at::get_num_threads());
  const KernelTable* K = kt();
  // x [..., d_in] and out [..., d_out] may carry leading dims (a layer's [B, S, d]): viewed as [T, d] here, in
  // C++, so a decode step pays for no Python-level reshape
  TORCH_CHECK(x_in.dim() >= 1, "proper_kernels cpu: x must be [T, d_in]");
  const at::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});
  Plan p = make_plan(x, ea, eb, gates, ua, ub, ids, ranks, expert_scale, us, w, d_out, nt);
  // With `out` (fp32, contiguous [T, d_out]) the delta is added into it here (the decode step's output is the
  // base layer's own y), with no Python-level add; as a separate fp32 add of the finished delta, so the result
  // is bitwise the one of routed_lora(...) + out (the traced custom op path). Without it: a fresh delta.
  const bool acc = out.has_value();
  if (acc) {
    TORCH_CHECK(out->scalar_type() == at::kFloat && out->is_contiguous() && out->dim() >= 1 &&
                    out->numel() == p.T * p.O && out->size(-1) == p.O && out->device().is_cpu(),
                "proper_kernels cpu: 'out' must be a contiguous fp32 CPU tensor [T, d_out]");
  }
  // expert_bt (cpu_pack_expert_bt(expert_b)): B_k^T of every expert, packed per expand block. The experts' expand
  // reads it as it is instead of packing a block of B_k^T in every expand item: a decode step gives each expert a
  // few tokens and would re-pack every expert's B in every layer (78 MB of expert B per SmolLM2 step); packed once
  // per batch, an expand item streams one contiguous block of all the experts. The packed values are the same and
  // go through the same accum, so results are bitwise the same with or without it.
  const char* ebt = nullptr;
  if (ebt_in.has_value() && p.K > 0) {
    check_input(*ebt_in, "expert_bt", x.scalar_type());
    TORCH_CHECK(ebt_in->dim() == 1 && ebt_in->numel() == (int64_t)p.K * p.R * p.O,
                "proper_kernels cpu: 'expert_bt' must be cpu_pack_expert_bt(expert_b) of this expert_b");
    ebt = bytes_of(*ebt_in);
  }
  if (saved) *saved = at::empty({p.nslots}, x.options().dtype(at::kFloat));
  if (p.T == 0) return acc ? *out : at::empty({0, p.O}, x.options());
  std::vector<float> H((size_t)std::max<int64_t>(1, p.nslots));
  const void* xp = x.data_ptr();
  float* hs = saved ? saved->data_ptr<float>() : nullptr;
  // H = coef * (A x) per entry; when saving, A x is kept unscaled and then scaled with the same fp32 multiply the
  // kernel's scale flag does, so the expand sees bitwise the same H either way
  auto shrink = [&](const GroupDesc& g, const int32_t* idx, int n) {
    K->shrink(p.dt, xp, p.D, g.a, g.rank, p.ent.data(), idx, n, hs ? 0 : 1, H.data());
    if (hs)
      for (int q = 0; q < n; ++q) {
        const Entry& en = p.ent[idx[q]];
        float* h = H.data() + en.slot;
        for (int j = 0; j < g.rank; ++j) hs[en.slot + j] = h[j], h[j] *= en.coef;
      }
  };

  // Groups with many tokens expand through B^T: each expand item packs the block of B^T it needs (fp32, in L1)
  std::vector<char> use_bt(p.groups.size(), 0);
  for (size_t gi = 0; gi < p.groups.size(); ++gi)
    use_bt[gi] = p.grp_ptr[gi + 1] - p.grp_ptr[gi] >= ((int)gi < p.K ? kPackMinExpert : kPackMin) &&
                 p.groups[gi].rank > 0;
  int64_t rank_cap = 1;
  for (const GroupDesc& g : p.groups) rank_cap = std::max<int64_t>(rank_cap, g.rank);
  const int64_t ldt = padded_ld(kExpandCols);
  // bf16 delta returned in bf16: the vdpbf16ps expands, which round H to bf16 as the torch reference does (with an
  // fp32 `out` the delta keeps fp32 accuracy: the widening expands). The pairs fit in the fp32 scratch.
  const bool pairs = p.dt == kBF16 && !acc && K->accum_pairs != nullptr;
  const auto rowdot = pairs ? K->rowdot_bf16h : K->rowdot;
  std::vector<std::vector<float>> scratch(nt);

  // Users with few tokens (decode) are "late": their shrink and expand run together, reading A_u and B_u once,
  // front to back, and their term is the first one added to the token's output. Everything else (experts, and
  // users with enough tokens to pack B^T) is added afterwards in entry order. Both orders are fixed by the
  // problem alone, so the result does not depend on the thread count.
  std::vector<int32_t> late;
  std::vector<char> tok_late(p.T, 0);
  for (int32_t q = 0; q < (int32_t)p.tasks.size(); ++q) {
    const Task& tk = p.tasks[q];
    if (tk.group < p.K || use_bt[tk.group]) continue;
    late.push_back(q);
    for (int32_t i = 0; i < tk.len; ++i) tok_late[p.ent[p.task_idx[tk.start + i]].tok] = 1;
  }
  // The expand adds every term of a block (a chunk's tokens x kExpandCols columns) into an fp32 tile of per-thread
  // scratch, which stays in L1/L2, and the epilogue writes the finished block once: rounded to bf16, added into
  // `out`, or copied into the fp32 delta. A whole fp32 delta y [T, d_out] exists only where it is the result
  // (fp32, no `out`) or where late users wrote their terms first: a chunk with late tokens adds into y itself, as
  // before. A bf16 prefill used to zero, accumulate and re-read all of y (16 MB at T = 2048, d_out = 2048) just
  // to round it (prefill-cold bf16, 2 threads, glibc keeping freed memory: 6.3 -> 4.3 ms).
  at::Tensor y;
  float* yp = nullptr;
  if ((!acc && x.scalar_type() == at::kFloat) || !late.empty()) {
    y = at::empty({p.T, p.O}, x.options().dtype(at::kFloat));
    yp = y.data_ptr<float>();
  }
  // A bf16 delta is rounded in the expand's epilogue, block by block while the block is still in cache (as
  // torch's .to(bfloat16) rounds: nearest even).
  at::Tensor yb;
  uint16_t* ybp = nullptr;
  if (!acc && x.scalar_type() == at::kBFloat16) {
    yb = at::empty({p.T, p.O}, x.options());
    ybp = reinterpret_cast<uint16_t*>(yb.data_ptr());
  }
  // The expand's entries address the tile: `tok` is the token's row in its chunk's tile (the shrink's entries keep
  // the token's row of x).
  // (built only when some chunk uses the tile: a decode step's chunks all hold late users)
  std::vector<char> chunk_late(p.nchunks, 0);
  for (int64_t q = 0; q < p.T; ++q) chunk_late[q / p.chunk] |= tok_late[p.order[q]];
  std::vector<Entry> tile_ent;
  if (std::find(chunk_late.begin(), chunk_late.end(), 0) != chunk_late.end()) {
    tile_ent = p.ent;
    std::vector<int32_t> row_in_chunk(p.T);
    for (int64_t q = 0; q < p.T; ++q) row_in_chunk[p.order[q]] = (int32_t)(q % p.chunk);
    for (Entry& en : tile_ent) en.tok = row_in_chunk[en.tok];
  }

  // 1) shrink per chunk (experts, users with many tokens), and the late users (shrink + expand). With fewer chunks
  // than two per thread (a decode step: one chunk of all tokens), each of the chunks' shrink tasks is its own item,
  // so the experts' shrinks spread over the threads instead of running on whichever thread takes the chunk last;
  // they come first, the late users (equal-sized items) after, which the dynamic schedule balances at the end.
  std::vector<int32_t> shrink_items;  // per-task items: task indices; else empty and the items are the chunks
  if (p.nchunks < 2 * (int64_t)nt)
    for (int32_t q = 0; q < (int32_t)p.tasks.size(); ++q)
      if (p.tasks[q].group < p.K || use_bt[p.tasks[q].group]) shrink_items.push_back(q);
  const int64_t n_shr = shrink_items.empty() ? p.nchunks : (int64_t)shrink_items.size();
  const int64_t n1 = n_shr + (int64_t)late.size();
  parallel_items(n1, nt, [&](int64_t i, int) {
    if (i >= n_shr) {
      i -= n_shr;
      const Task& tk = p.tasks[late[i]];
      const GroupDesc& g = p.groups[tk.group];
      const int32_t* idx = p.task_idx.data() + tk.start;
      if (i + 1 < (int64_t)late.size()) prefetch_head(p.groups[p.tasks[late[i + 1]].group], p.D, p.esz);
      shrink(g, idx, tk.len);
      for (int32_t q = 0; q < tk.len; ++q) std::memset(yp + (int64_t)p.ent[idx[q]].tok * p.O, 0, p.O * sizeof(float));
      rowdot(p.dt, g.b, g.ldb, g.rank, 0, p.O, p.ent.data(), idx, tk.len, H.data(), yp, p.O);
      return;
    }
    if (!shrink_items.empty()) {
      const Task& tk = p.tasks[shrink_items[i]];
      shrink(p.groups[tk.group], p.task_idx.data() + tk.start, tk.len);
      return;
    }
    for (int32_t q = p.chunk_task_ptr[i]; q < p.chunk_task_ptr[i + 1]; ++q) {
      const Task& tk = p.tasks[q];
      if (tk.group >= p.K && !use_bt[tk.group]) continue;  // a late user
      const GroupDesc& g = p.groups[tk.group];
      shrink(g, p.task_idx.data() + tk.start, tk.len);
    }
  });

  // 2) expand per (chunk, block of output columns): experts and packed users, added in entry order
  float* op = acc ? out->data_ptr<float>() : nullptr;
  const int64_t nob = (p.O + kExpandCols - 1) / kExpandCols;
  // bf16 pairs of the experts' B^T, packed once per call (layout of expert_bt_offset, pairs for values) when several
  // chunks would each pack them again
  std::vector<uint32_t> ebp;
  const int np_e = (p.R + 1) / 2;
  if (pairs && p.nchunks > 1 && p.K > 0) {
    ebp.resize((size_t)p.K * np_e * p.O);
    parallel_items((int64_t)p.K * nob, nt, [&](int64_t i, int) {
      const int k = (int)(i / nob);
      const int64_t o0 = (i % nob) * kExpandCols, o1 = std::min(p.O, o0 + kExpandCols);
      const GroupDesc& g = p.groups[k];
      if (use_bt[k])
        K->pack_bt_pairs((const char*)g.b + o0 * g.ldb * p.esz, g.ldb, g.rank, o1 - o0,
                         ebp.data() + expert_bt_offset(p.K, np_e, o0, o1, k), o1 - o0);
    });
  }
  std::vector<std::vector<float>> tiles(nt);
  parallel_items(p.nchunks * nob, nt, [&](int64_t i, int tid) {
    std::vector<float>& bt = scratch[tid];
    if (bt.empty()) bt.resize((size_t)(rank_cap * ldt));
    std::vector<float>& tile = tiles[tid];
    const int64_t c = i / nob, ob = i % nob;
    const int64_t s = c * p.chunk, e = std::min(p.T, s + p.chunk);
    const int64_t o0 = ob * kExpandCols, o1 = std::min(p.O, o0 + kExpandCols), w = o1 - o0;
    // where the terms go: Y[tok * ldy + o] for the entries te, o in [o0, o1); the tile seen that way has rows
    // kExpandCols apart and its base before the tile (computed through uintptr_t)
    const bool direct = chunk_late[c];
    if (!direct && tile.empty()) tile.resize((size_t)(p.chunk * kExpandCols));
    float* yt = direct ? yp : reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(tile.data()) -
                                                       (uintptr_t)o0 * sizeof(float));
    const int64_t ldy = direct ? p.O : kExpandCols;
    const Entry* te = direct ? p.ent.data() : tile_ent.data();
    auto row_of = [&](int64_t q) {
      return direct ? yp + (int64_t)p.order[q] * p.O + o0 : tile.data() + (q - s) * ldy;
    };
    for (int64_t q = s; q < e; ++q)
      if (!tok_late[p.order[q]]) std::memset(row_of(q), 0, w * sizeof(float));
    for (int32_t q = p.chunk_task_ptr[c]; q < p.chunk_task_ptr[c + 1]; ++q) {
      const Task& tk = p.tasks[q];
      const GroupDesc& g = p.groups[tk.group];
      const int32_t* idx = p.task_idx.data() + tk.start;
      if (use_bt[tk.group] && pairs && !ebp.empty() && tk.group < p.K) {  // experts' pairs packed above
        K->accum_pairs(ebp.data() + expert_bt_offset(p.K, np_e, o0, o1, tk.group), w, g.rank, o0, o1, te, idx,
                       tk.len, H.data(), yt, ldy);
      } else if (use_bt[tk.group] && pairs) {  // bf16 B^T as bf16 pairs (half the bytes; vdpbf16ps)
        uint32_t* bp = reinterpret_cast<uint32_t*>(bt.data());
        K->pack_bt_pairs((const char*)g.b + o0 * g.ldb * p.esz, g.ldb, g.rank, w, bp, ldt);
        K->accum_pairs(bp, ldt, g.rank, o0, o1, te, idx, tk.len, H.data(), yt, ldy);
      } else if (use_bt[tk.group] && ebt && tk.group < p.K) {  // B_k^T packed once per batch
        K->accum(p.dt, ebt + expert_bt_offset(p.K, p.R, o0, o1, tk.group) * p.esz, w, g.rank, o0, o1, te, idx,
                 tk.len, H.data(), yt, ldy);
      } else if (use_bt[tk.group]) {
        K->pack_bt(p.dt, (const char*)g.b + o0 * g.ldb * p.esz, g.ldb, g.rank, w, bt.data(), ldt);
        K->accum(kF32, bt.data(), ldt, g.rank, o0, o1, te, idx, tk.len, H.data(), yt, ldy);
      }
      else if (tk.group < p.K)
        rowdot(p.dt, g.b, g.ldb, g.rank, o0, o1, te, idx, tk.len, H.data(), yt, ldy);
    }
    // every term of these rows' columns [o0, o1) is in: round them into the bf16 delta, or add them into out (the
    // fp32 add of the finished delta, as add_ does), or store them into the fp32 delta
    for (int64_t q = s; q < e; ++q) {
      const float* src = row_of(q);
      const int64_t off = (int64_t)p.order[q] * p.O + o0;
      if (ybp) K->to_bf16(src, w, ybp + off);
      else if (op) {
        float* dst = op + off;
        for (int64_t o = 0; o < w; ++o) dst[o] += src[o];
      } else if (!direct) std::memcpy(yp + off, src, w * sizeof(float));
    }
  });
  if (acc) return *out;
  return ybp ? yb : y;
}

at::Tensor cpu_forward(const at::Tensor& x, const c10::optional<at::Tensor>& ea, const c10::optional<at::Tensor>& eb,
                       const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& ua,
                       const c10::optional<at::Tensor>& ub, const c10::optional<at::Tensor>& ids,
                       const c10::optional<at::Tensor>& ranks, double expert_scale,
                       const c10::optional<at::Tensor>& us, const c10::optional<at::Tensor>& w, int64_t d_out,
                       const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& ebt) {
  return forward_impl(x, ea, eb, gates, ua, ub, ids, ranks, expert_scale, us, w, d_out, out, nullptr, ebt);
}

// expert_b [K, O, R] packed for the forward's expand (see expert_bt_offset), same dtype, flat. Typed copies (an
// element-sized memcpy per value measured 88 ms for SmolLM2's 210 layers), experts over the threads.
template <class T>
void pack_expert_bt_t(const T* src, int K, int R, int64_t O, T* dst) {
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t o0 = 0; o0 < O; o0 += kExpandCols) {
        const int64_t o1 = std::min(O, o0 + kExpandCols), w = o1 - o0;
        T* d = dst + expert_bt_offset(K, R, o0, o1, (int)k);
        for (int64_t o = o0; o < o1; ++o) {
          const T* row = src + (k * O + o) * R;
          for (int j = 0; j < R; ++j) d[j * w + (o - o0)] = row[j];
        }
      }
  });
}

at::Tensor cpu_pack_expert_bt(const at::Tensor& eb) {
  TORCH_CHECK(eb.dim() == 3 && eb.device().is_cpu(), "proper_kernels cpu: 'expert_b' must be a CPU tensor [K, d_out, R]");
  const int dt = dtype_code(eb);
  const at::Tensor b = eb.contiguous();
  const int K = (int)b.size(0), R = (int)b.size(2);
  const int64_t O = b.size(1);
  at::Tensor out = at::empty({(int64_t)K * R * O}, b.options());
  if (dt == kF32)
    pack_expert_bt_t(b.data_ptr<float>(), K, R, O, out.data_ptr<float>());
  else  // bf16: moved as raw 16-bit values
    pack_expert_bt_t(reinterpret_cast<const uint16_t*>(b.data_ptr()), K, R, O,
                     reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// (delta, saved): the forward of a training step, keeping A x for cpu_backward's `saved`.
std::tuple<at::Tensor, at::Tensor> cpu_forward_saving(
    const at::Tensor& x, const c10::optional<at::Tensor>& ea, const c10::optional<at::Tensor>& eb,
    const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& ua, const c10::optional<at::Tensor>& ub,
    const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& ranks, double expert_scale,
    const c10::optional<at::Tensor>& us, const c10::optional<at::Tensor>& w, int64_t d_out) {
  TORCH_CHECK(x.dim() == 2, "proper_kernels cpu: x must be [T, d_in]");
  at::Tensor saved;
  at::Tensor y = forward_impl(x, ea, eb, gates, ua, ub, ids, ranks, expert_scale, us, w, d_out, c10::nullopt, &saved);
  return {y, saved};
}

// --------------------------------------------------------------------------------------------- backward
std::vector<c10::optional<at::Tensor>> cpu_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const c10::optional<at::Tensor>& ea,
    const c10::optional<at::Tensor>& eb, const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& ua,
    const c10::optional<at::Tensor>& ub, const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& ranks,
    double expert_scale, const c10::optional<at::Tensor>& us, const c10::optional<at::Tensor>& w, int64_t d_out,
    std::vector<bool> needs, const c10::optional<at::Tensor>& saved) {
  TORCH_CHECK(needs.size() == 7, "proper_kernels cpu: needs must have 7 flags");
  const int nt = std::max(1, at::get_num_threads());
  const KernelTable* K = kt();
  Plan p = make_plan(x, ea, eb, gates, ua, ub, ids, ranks, expert_scale, us, w, d_out, nt);
  check_input(dy_in, "grad_out", x.scalar_type());
  TORCH_CHECK(dy_in.size(0) == p.T && dy_in.size(1) == p.O, "proper_kernels cpu: grad_out must be [T, d_out]");
  const bool has_e = p.K > 0 && ea.has_value(), has_u = ua.has_value();
  const bool n_dx = needs[0], n_ea = needs[1] && has_e, n_eb = needs[2] && has_e, n_g = needs[3] && has_e;
  const bool n_ua = needs[4] && has_u, n_ub = needs[5] && has_u, n_w = needs[6] && has_u;
  const bool need_dr = n_dx || n_ea || n_ua || n_g || n_w;  // DH (or the gate / weight dots) needed
  const bool need_h = n_eb || n_ub || n_g || n_w;           // HG (or the dots) needed
  // which groups need their (token, group) vectors at all
  const bool run_e = has_e && (n_dx || n_ea || n_eb || n_g);
  const bool run_u = has_u && (n_dx || n_ua || n_ub || n_w);

  const auto f32 = x.options().dtype(at::kFloat);
  const at::ScalarType st = x.scalar_type();
  at::Tensor dx, dea, deb, dg, dua, dub, dw;
  if (n_dx) dx = at::empty({p.T, p.D}, f32);
  // Gradients are computed in fp32 (for bf16 inputs converted at the end). The weight gradients are written in
  // full by their items, plus "zero" items for what none writes (groups without tokens, users' padded ranks), so
  // the large user gradients are not written twice.
  if (n_ea) dea = at::empty(ea->sizes(), f32);
  if (n_eb) deb = at::empty(eb->sizes(), f32);
  if (n_g) dg = at::zeros({p.T, p.K}, f32);
  if (n_ua) dua = at::empty(ua->sizes(), f32);
  if (n_ub) dub = at::empty(ub->sizes(), f32);
  if (n_w) dw = at::zeros({p.T}, f32);

  std::vector<float> H(need_h ? (size_t)std::max<int64_t>(1, p.nslots) : 1);
  std::vector<float> Dr(need_dr ? (size_t)std::max<int64_t>(1, p.nslots) : 1);
  // A x from the forward (cpu_forward_saving on the same inputs, hence the same plan and slots): no shrink here
  const bool have_h = need_h && saved.has_value();
  if (have_h) {
    TORCH_CHECK(saved->scalar_type() == at::kFloat && saved->is_contiguous() && saved->numel() == p.nslots,
                "proper_kernels cpu: 'saved' must be the [", p.nslots, "] fp32 tensor cpu_forward_saving returned "
                "for these inputs, got ", saved->numel(), " elements");
    if (p.nslots) std::memcpy(H.data(), saved->data_ptr<float>(), (size_t)p.nslots * sizeof(float));
  }
  const void* xp = x.data_ptr();
  const void* dyp = dy_in.data_ptr();

  // 1) per chunk of user-sorted tokens: H = A x and Dr = B^T dy for every entry of its tokens, then the gate /
  //    user-weight gradients <Dr, H> and the scaling into DH = coef * Dr, HG = coef * H
  float* dgp = n_g ? dg.data_ptr<float>() : nullptr;
  float* dwp = n_w ? dw.data_ptr<float>() : nullptr;
  const float* usp = (has_u && us.has_value()) ? us->data_ptr<float>() : nullptr;
  const int64_t* uid = has_u ? ids->data_ptr<int64_t>() : nullptr;
  // fp32 copies of A (padded rows) for the dx of groups with many tokens
  std::vector<int32_t> packed;
  std::vector<int64_t> ap_off(p.groups.size(), -1);
  const int64_t lda = padded_ld(p.D);
  int64_t ap_size = 0;
  if (n_dx)
    for (size_t gi = 0; gi < p.groups.size(); ++gi)
      if (p.grp_ptr[gi + 1] - p.grp_ptr[gi] >= kPackMin && p.groups[gi].rank > 0) {
        packed.push_back((int32_t)gi);
        ap_off[gi] = ap_size;
        ap_size += (int64_t)p.groups[gi].rank * lda;
      }
  std::vector<float> Ap((size_t)std::max<int64_t>(1, ap_size));
  if (p.T > 0 && (run_e || run_u)) {
    parallel_items(p.nchunks + (int64_t)packed.size(), nt, [&](int64_t c, int) {
      if (c >= p.nchunks) {
        const int32_t gi = packed[c - p.nchunks];
        const GroupDesc& g = p.groups[gi];
        K->pack_rows(p.dt, g.a, p.D, g.rank, p.D, Ap.data() + ap_off[gi], lda);
        return;
      }
      for (int32_t q = p.chunk_task_ptr[c]; q < p.chunk_task_ptr[c + 1]; ++q) {
        const Task& tk = p.tasks[q];
        if (tk.group < p.K ? !run_e : !run_u) continue;
        const GroupDesc& g = p.groups[tk.group];
        const int32_t* idx = p.task_idx.data() + tk.start;
        if (need_h && !have_h) K->shrink(p.dt, xp, p.D, g.a, g.rank, p.ent.data(), idx, tk.len, 0, H.data());
        if (need_dr) K->bshrink(p.dt, dyp, p.O, g.b, g.ldb, g.rank, p.ent.data(), idx, tk.len, Dr.data());
      }
      const int64_t s = c * p.chunk, e = std::min(p.T, s + p.chunk);
      for (int64_t pos = s; pos < e; ++pos) {
        const int32_t t = p.order[pos];
        for (int32_t q = p.tok_ptr[t]; q < p.tok_ptr[t + 1]; ++q) {
          const Entry& en = p.ent[q];
          const bool is_e = en.group < p.K;
          if (is_e ? !run_e : !run_u) continue;
          const int rank = p.groups[en.group].rank;
          float* h = H.data() + en.slot;
          float* r = Dr.data() + en.slot;
          if ((is_e && n_g) || (!is_e && n_w)) {
            float dot = 0.0f;
            for (int j = 0; j < rank; ++j) dot += r[j] * h[j];
            if (is_e) dgp[(int64_t)t * p.K + en.group] = p.se * dot;
            else dwp[t] = (usp ? usp[uid[t]] : 1.0f) * dot;
          }
          if (need_dr)
            for (int j = 0; j < rank; ++j) r[j] *= en.coef;
          if (need_h)
            for (int j = 0; j < rank; ++j) h[j] *= en.coef;
        }
      }
    });
  }

  // 3) dx, dA, dB: independent outputs, one list of items
  struct Item {
    int8_t kind;  // 0 dx(chunk, d block), 1 dA(group, d block), 2 dB(group, o block), 3 zero(group)
    int32_t a;
    int64_t b;
  };
  std::vector<Item> items;
  const int64_t ndb = (p.D + kTnCols - 1) / kTnCols, nob = (p.O + kTnCols - 1) / kTnCols;
  const int64_t nxb = (p.D + kGradCols - 1) / kGradCols;
  const size_t G = p.groups.size();
  // column-block-major, so that the groups sharing a token read its x / dy block while it is still in cache
  for (int64_t b = 0; b < std::max(ndb, nob); ++b)
    for (size_t gi = 0; gi < G; ++gi) {
      const bool is_e = (int)gi < p.K;
      if (p.grp_ptr[gi + 1] == p.grp_ptr[gi]) continue;  // no tokens: zero gradient (already zeroed)
      if ((is_e ? n_ea : n_ua) && b < ndb) items.push_back(Item{1, (int32_t)gi, b});
      if ((is_e ? n_eb : n_ub) && b < nob) items.push_back(Item{2, (int32_t)gi, b});
    }
  if (n_dx)
    for (int64_t c = 0; c < p.nchunks; ++c)
      for (int64_t b = 0; b < nxb; ++b) items.push_back(Item{0, (int32_t)c, b});
  // groups without tokens (all of their gradient) and users of rank < r_max (the padded rows / columns)
  for (size_t gi = 0; gi < G; ++gi) {
    const bool is_e = (int)gi < p.K;
    const bool empty = p.grp_ptr[gi + 1] == p.grp_ptr[gi];
    const bool padded = !is_e && p.groups[gi].rank < (has_u ? ua->size(1) : 0);
    if ((empty || padded) && (is_e ? (n_ea || n_eb) : (n_ua || n_ub))) items.push_back(Item{3, (int32_t)gi, 0});
  }

  float* dxp = n_dx ? dx.data_ptr<float>() : nullptr;
  float* deap = n_ea ? dea.data_ptr<float>() : nullptr;
  float* debp = n_eb ? deb.data_ptr<float>() : nullptr;
  float* duap = n_ua ? dua.data_ptr<float>() : nullptr;
  float* dubp = n_ub ? dub.data_ptr<float>() : nullptr;
  const int64_t rmax = has_u ? ua->size(1) : 0;
  // dx must see DH of every group; entries of groups that were not run hold garbage, so run_e / run_u
  // are true whenever dx is needed (see above).
  int64_t rank_cap = 1;
  for (const GroupDesc& g : p.groups) rank_cap = std::max<int64_t>(rank_cap, g.rank);
  const size_t scratch_floats = (size_t)(kTnTokens * ((kTnCols + 15) / 16 * 16 + 16) + rank_cap * kTnCols);
  std::vector<std::vector<float>> scratch(nt);
  parallel_items((int64_t)items.size(), nt, [&](int64_t i, int tid) {
    const Item it = items[i];
    if (it.kind == 0) {  // dx rows of one chunk, one block of d: zero, then each group's A^T DH in group order
      const int64_t s = it.a * p.chunk, e = std::min(p.T, s + p.chunk);
      const int64_t d0 = it.b * kGradCols, d1 = std::min(p.D, d0 + kGradCols);
      for (int64_t q = s; q < e; ++q) std::memset(dxp + (int64_t)p.order[q] * p.D + d0, 0, (d1 - d0) * sizeof(float));
      for (int32_t q = p.chunk_task_ptr[it.a]; q < p.chunk_task_ptr[it.a + 1]; ++q) {
        const Task& tk = p.tasks[q];
        const GroupDesc& g = p.groups[tk.group];
        const int32_t* idx = p.task_idx.data() + tk.start;
        if (ap_off[tk.group] >= 0)
          K->accum(kF32, Ap.data() + ap_off[tk.group] + d0, lda, g.rank, d0, d1, p.ent.data(), idx, tk.len,
                   Dr.data(), dxp, p.D);
        else
          K->accum(p.dt, (const char*)g.a + d0 * p.esz, p.D, g.rank, d0, d1, p.ent.data(), idx, tk.len, Dr.data(),
                   dxp, p.D);
      }
      return;
    }
    if (it.kind == 3) {  // zero what no dA / dB item writes for this group
      const int gi = it.a;
      const bool is_e = gi < p.K;
      const int64_t rows = is_e ? p.R : rmax;  // rank capacity of the group's tensors
      const int64_t r0 = p.grp_ptr[gi + 1] == p.grp_ptr[gi] ? 0 : p.groups[gi].rank;
      float* a = is_e ? (n_ea ? deap + (int64_t)gi * p.R * p.D : nullptr)
                      : (n_ua ? duap + (int64_t)(gi - p.K) * rmax * p.D : nullptr);
      float* b = is_e ? (n_eb ? debp + (int64_t)gi * p.O * p.R : nullptr)
                      : (n_ub ? dubp + (int64_t)(gi - p.K) * p.O * rmax : nullptr);
      if (a) std::memset(a + r0 * p.D, 0, (rows - r0) * p.D * sizeof(float));
      if (b)
        for (int64_t o = 0; o < p.O; ++o) std::memset(b + o * rows + r0, 0, (rows - r0) * sizeof(float));
      return;
    }
    std::vector<float>& scr = scratch[tid];
    if (scr.size() < scratch_floats) scr.resize(scratch_floats);
    const int gi = it.a;
    const GroupDesc& g = p.groups[gi];
    const int32_t* idx = p.grp_idx.data() + p.grp_ptr[gi];
    const int n = p.grp_ptr[gi + 1] - p.grp_ptr[gi];
    const bool is_e = gi < p.K;
    if (it.kind == 1) {  // dA[:, d block] = DH^T x over the group's tokens
      const int64_t d0 = it.b * kTnCols, d1 = std::min(p.D, d0 + kTnCols);
      float* out = is_e ? deap + (int64_t)gi * p.R * p.D : duap + (int64_t)(gi - p.K) * rmax * p.D;
      K->tn(p.dt, xp, p.D, d0, d1, g.rank, p.ent.data(), idx, n, Dr.data(), out, p.D, 0, scr.data());
    } else {  // dB[o block, :] = (HG^T dy)^T over the group's tokens
      const int64_t o0 = it.b * kTnCols, o1 = std::min(p.O, o0 + kTnCols);
      float* out = is_e ? debp + (int64_t)gi * p.O * p.R : dubp + (int64_t)(gi - p.K) * p.O * rmax;
      K->tn(p.dt, dyp, p.O, o0, o1, g.rank, p.ent.data(), idx, n, H.data(), out, g.ldb, 1, scr.data());
    }
  });

  std::vector<c10::optional<at::Tensor>> out(7);
  if (n_dx) out[0] = maybe_to(dx, st);
  if (n_ea) out[1] = maybe_to(dea, st);
  if (n_eb) out[2] = maybe_to(deb, st);
  if (n_g) out[3] = dg;
  if (n_ua) out[4] = maybe_to(dua, st);
  if (n_ub) out[5] = maybe_to(dub, st);
  if (n_w) out[6] = dw;
  return out;
}

std::string cpu_isa() { return kt()->name; }

std::string cpu_set_isa(const std::string& name) {
  g_table = select_isa(name);
  return g_table->name;
}

}  // namespace
}  // namespace proper_cpu

void register_cpu(pybind11::module& m) {
  using namespace proper_cpu;
  m.def("cpu_forward", &cpu_forward, "routed_lora forward on CPU (fp32 / bf16, fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("expert_a"), pybind11::arg("expert_b"), pybind11::arg("gates"),
        pybind11::arg("user_a"), pybind11::arg("user_b"), pybind11::arg("user_ids"), pybind11::arg("user_ranks"),
        pybind11::arg("expert_scale"), pybind11::arg("user_scale"), pybind11::arg("user_weight"),
        pybind11::arg("d_out"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("expert_bt") = pybind11::none());
  m.def("cpu_pack_expert_bt", &cpu_pack_expert_bt,
        "expert_b [K, d_out, R] packed for cpu_forward's expert_bt (B_k^T per expand block; flat, same dtype)",
        pybind11::arg("expert_b"));
  m.def("cpu_forward_saving", &cpu_forward_saving,
        "routed_lora forward on CPU that also returns A x ([nslots] fp32) for cpu_backward's `saved`",
        pybind11::arg("x"), pybind11::arg("expert_a"), pybind11::arg("expert_b"), pybind11::arg("gates"),
        pybind11::arg("user_a"), pybind11::arg("user_b"), pybind11::arg("user_ids"), pybind11::arg("user_ranks"),
        pybind11::arg("expert_scale"), pybind11::arg("user_scale"), pybind11::arg("user_weight"),
        pybind11::arg("d_out"));
  m.def("cpu_backward", &cpu_backward,
        "routed_lora backward on CPU: [dx, d_expert_a, d_expert_b, d_gates, d_user_a, d_user_b, d_user_weight]",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("expert_a"), pybind11::arg("expert_b"),
        pybind11::arg("gates"), pybind11::arg("user_a"), pybind11::arg("user_b"), pybind11::arg("user_ids"),
        pybind11::arg("user_ranks"), pybind11::arg("expert_scale"), pybind11::arg("user_scale"),
        pybind11::arg("user_weight"), pybind11::arg("d_out"), pybind11::arg("needs"),
        pybind11::arg("saved") = pybind11::none());
  m.def("cpu_isa", &cpu_isa, "the micro-kernel ISA in use: avx512bf16, avx512, avx2 or generic");
  m.def("cpu_set_isa", &cpu_set_isa,
        "select the micro-kernel ISA (auto, avx512bf16, avx512, avx2, generic); returns it",
        pybind11::arg("name"));
  m.def("cpu_supported_isas", &supported_isas, "ISAs this CPU can run, best first");
}
