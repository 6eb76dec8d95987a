// Fiber scheduler and CUDA runtime stand-ins of the host emulator (see cuda_emu.h). Tests only.
#include "cuda_emu.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace proper_emu {

uint3 g_threadIdx;
uint3 g_blockIdx;
dim3 g_blockDim;
dim3 g_gridDim;

namespace {

enum Wait { kRunnable = 0, kBlockBarrier = 1, kWarpBarrier = 2 };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  unsigned tid = 0;
  bool done = false;
  Wait wait = kRunnable;
  uint64_t wait_gen = 0;
};

struct WarpState {
  uint64_t gen = 0;
  int arrived = 0;
  uint64_t slots[2][32] = {};
};

constexpr size_t kStackBytes = 256 * 1024;

ucontext_t g_sched;
std::vector<Fiber> g_fibers;
Fiber* g_cur = nullptr;
const std::function<void()>* g_body = nullptr;
uint64_t g_block_gen = 0;
int g_block_arrived = 0;
int g_live = 0;
std::vector<WarpState> g_warps;
std::vector<float> g_smem;
bool g_running = false;

void fiber_main() {
  (*g_body)();
  g_cur->done = true;   // returning switches to g_sched through uc_link
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "proper_emu: %s (block %u,%u,%u)\n", what, g_blockIdx.x, g_blockIdx.y, g_blockIdx.z);
  std::abort();
}

void set_thread(unsigned tid) {
  g_threadIdx.x = tid % g_blockDim.x;
  g_threadIdx.y = (tid / g_blockDim.x) % g_blockDim.y;
  g_threadIdx.z = tid / (g_blockDim.x * g_blockDim.y);
}

void run_block(unsigned nthreads) {
  if (g_fibers.size() < nthreads) g_fibers.resize(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = g_fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.tid = i;
    f.done = false;
    f.wait = kRunnable;
    f.wait_gen = 0;
    if (getcontext(&f.ctx) != 0) fail("getcontext failed");
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  g_block_gen = 0;
  g_block_arrived = 0;
  g_live = static_cast<int>(nthreads);
  g_warps.assign((nthreads + 31) / 32, WarpState());
  for (;;) {
    bool progress = false, all_done = true;
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = g_fibers[i];
      if (f.done) continue;
      all_done = false;
      if (f.wait == kBlockBarrier && f.wait_gen == g_block_gen) continue;
      if (f.wait == kWarpBarrier && f.wait_gen == g_warps[i / 32].gen) continue;
      f.wait = kRunnable;
      g_cur = &f;
      set_thread(i);
      if (swapcontext(&g_sched, &f.ctx) != 0) fail("swapcontext failed");
      progress = true;
      if (f.done) {
        --g_live;
        if (g_warps[i / 32].arrived > 0) fail("a thread exited while its warp waits in a shuffle");
        if (g_block_arrived > 0 && g_block_arrived == g_live) {   // the rest of the block waits at a barrier
          ++g_block_gen;
          g_block_arrived = 0;
        }
      }
    }
    if (all_done) break;
    if (!progress) fail("deadlock: threads wait at a barrier that the others never reach");
  }
}

}  // namespace

void syncthreads() {
  Fiber* f = g_cur;
  const uint64_t gen = g_block_gen;
  if (++g_block_arrived == g_live) {   // last one in: release everybody and go on
    ++g_block_gen;
    g_block_arrived = 0;
    return;
  }
  f->wait = kBlockBarrier;
  f->wait_gen = gen;
  if (swapcontext(&f->ctx, &g_sched) != 0) fail("swapcontext failed");
}

const uint64_t* warp_exchange(uint64_t payload) {
  Fiber* f = g_cur;
  if (g_blockDim.x * g_blockDim.y * g_blockDim.z % 32 != 0) fail("warp shuffle in a block of partial warps");
  WarpState& w = g_warps[f->tid / 32];
  const uint64_t gen = w.gen;
  const int parity = static_cast<int>(gen & 1);
  w.slots[parity][f->tid % 32] = payload;
  if (++w.arrived == 32) {
    ++w.gen;
    w.arrived = 0;
  } else {
    f->wait = kWarpBarrier;
    f->wait_gen = gen;
    if (swapcontext(&f->ctx, &g_sched) != 0) fail("swapcontext failed");
  }
  // slots[parity] is rewritten only at exchange gen + 2, which no lane reaches before every lane has read it
  return w.slots[parity];
}

float* dynamic_smem() { return g_smem.data(); }

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (g_running) fail("nested launch");
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) return cudaErrorInvalidConfiguration;
  if (smem > 227 * 1024) return cudaErrorInvalidValue;
  g_running = true;
  g_gridDim = grid;
  g_blockDim = block;
  g_body = &body;
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t b = nblocks; b-- > 0;) {   // reverse order: no kernel may depend on block order
    g_blockIdx.x = static_cast<unsigned>(b % grid.x);
    g_blockIdx.y = static_cast<unsigned>((b / grid.x) % grid.y);
    g_blockIdx.z = static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y));
    g_smem.assign(smem / sizeof(float) + 4, 0.0f);
    std::memset(g_smem.data(), 0xFF, g_smem.size() * sizeof(float));   // NaN: unwritten smem is visible
    run_block(nthreads);
  }
  g_running = false;
  return cudaSuccess;
}

}  // namespace proper_emu

// ------------------------------------------------------------------------------------ runtime stand-ins
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    default: *value = 0; return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  (void)func;
  (void)attr;
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  (void)stream;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "cuda error (emulated)";
  }
}

}  // extern "C"
