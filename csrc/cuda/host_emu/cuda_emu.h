// Host emulation of the small CUDA subset the kernels of csrc/cuda use -- tests only, never part of a build
// that has a GPU. The .cu files are compiled as C++ with `-include cuda_emu.h -DPROPER_CUDA_EMULATE`; every
// CUDA thread of a block becomes a cooperative fiber (ucontext), so __syncthreads and warp shuffles have their
// real semantics, and blocks run one after another (in reverse order, to flush out any order assumption).
//
// Emulated: threadIdx / blockIdx / blockDim / gridDim, __shared__ (one instance per kernel, fine because blocks
// run sequentially), dynamic shared memory (filled with 0xFF -- NaN for floats -- before each block, so reading
// smem that was never written shows up), __syncthreads, __shfl_xor_sync / __shfl_sync (full warps only),
// atomicAdd(float), and the runtime calls the launchers make (cudaGetDevice, cudaDeviceGetAttribute with an
// H100-like device: 132 SMs, 227 KiB opt-in smem; cudaFuncSetAttribute; cudaMemsetAsync; cudaGetLastError;
// cudaGetErrorString). A deadlock (a barrier some threads never reach) aborts with a message.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

namespace proper_emu {

extern uint3 g_threadIdx;
extern uint3 g_blockIdx;
extern dim3 g_blockDim;
extern dim3 g_gridDim;

void syncthreads();
// Deposit this lane's 64-bit payload and return the 32 payloads of the warp (after all lanes deposited).
const uint64_t* warp_exchange(uint64_t payload);
float* dynamic_smem();
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  return run_grid(grid, block, smem, [&]() { kernel(args...); });
}

inline unsigned lane_id() { return g_threadIdx.x % 32; }

template <typename T>
T shfl_impl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle payloads are at most 8 bytes");
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  const uint64_t* all = warp_exchange(raw);
  T out;
  std::memcpy(&out, &all[src & 31], sizeof(T));
  return out;
}

}  // namespace proper_emu

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::proper_emu::g_threadIdx)
#define blockIdx (::proper_emu::g_blockIdx)
#define blockDim (::proper_emu::g_blockDim)
#define gridDim (::proper_emu::g_gridDim)

inline void __syncthreads() { ::proper_emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  (void)mask;
  (void)width;
  return ::proper_emu::shfl_impl(v, static_cast<int>(::proper_emu::lane_id()) ^ lane_mask);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  (void)mask;
  (void)width;
  return ::proper_emu::shfl_impl(v, src_lane);
}

inline float atomicAdd(float* p, float v) {   // one OS thread runs every fiber: a plain add is atomic
  const float old = *p;
  *p = old + v;
  return old;
}
