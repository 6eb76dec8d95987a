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

#include "avx_shared.h"

#include "avx512_v.h"

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
