// The gradient's rank-2k product of topk_singular_vectors on the CPU. One CPU capability's kernel
// body (kernel_table.h): capability_kernels.h includes it into namespace
// mhgd_fast::cpu::MHGD_CPU_CAPABILITY.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "low_rank_product.h is compiled per CPU capability: include it through capability_kernels.h"
#endif

#include <cstdint>

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {

// out [c, hw] = left [c, r] · right [r, hw] for a small r (the gradient's rank-2k product): each
// output row is built in cache by r vectorised axpys. Batched GEMM libraries run this shape
// (inner size 2k ≤ 16) far below their usual rate.
template <typename T>
inline void low_rank_product(const T* left, const T* right, int64_t c, int64_t r, int64_t hw, T* out) {
  for (int64_t i = 0; i < c; ++i) {
    T* o = out + i * hw;
    const T* li = left + i * r;
    const T l0 = li[0];
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) o[j] = l0 * right[j];
    for (int64_t t = 1; t < r; ++t) {
      const T lt = li[t];
      const T* rt = right + t * hw;
#pragma omp simd
      for (int64_t j = 0; j < hw; ++j) o[j] += lt * rt[j];
    }
  }
}

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
