// AVX-512 micro-kernels with AVX512-BF16: the AVX-512 kernels, except that the bf16 shrink (x A^T, both in bf16)
// multiplies with vdpbf16ps instead of widening both operands to fp32 (kernels_impl.h: dot_tile_dp). Selected at
// run time, first, when the CPU also reports avx512_bf16. See isa_avx2.cpp for why nothing else is included.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives inside avx512fintrin.h
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace proper_cpu {
namespace {

#include "avx_shared.h"

#include "avx512_v.h"

#define PK_DPBF16 1
#define PK_ISA_NAME "avx512bf16"
#include "kernels_impl.h"
#undef PK_ISA_NAME
#undef PK_DPBF16

}  // namespace

const KernelTable* kernels_avx512bf16() { return &kTable; }

}  // namespace proper_cpu
#pragma GCC pop_options

#else
namespace proper_cpu {
const KernelTable* kernels_avx512bf16() { return nullptr; }
}  // namespace proper_cpu
#endif
