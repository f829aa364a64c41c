// Sturm-count bisection of up to eight eigenvalues of a symmetric tridiagonal T in SIMD lanes, for
// topk_singular_vectors on the CPU. One CPU capability's kernel body (kernel_table.h):
// capability_kernels.h includes it into namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "bisection_lanes.h is compiled per CPU capability: include it through capability_kernels.h"
#endif

#include <cstdint>

#include "../tridiagonal.h"

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {

// Descending eigenvalues first..first+m-1 (m ≤ 8) of the tridiagonal (d, e2 = off²) by Sturm-count
// bisection, the eight intervals in SIMD lanes (two independent AVX2 registers) so that their
// division chains overlap: the count's dependent divisions are the cost. The recurrence is
// tridiagonal::sturm_pivot's, the step tridiagonal::halve_interval, the stopping rule that of
// tridiagonal::bisect_descending.
inline void bisect_lanes(const double* d, const double* e2, int64_t n, const ::mhgd_fast::tridiagonal::Bounds& b,
                    int64_t first, int m, double* out) {
  constexpr int kLanes = 8;
  alignas(64) double lo[kLanes], hi[kLanes], mid[kLanes], q[kLanes], below[kLanes], target[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    lo[t] = b.lo;
    hi[t] = b.hi;
    target[t] = static_cast<double>(n - 1 - (first + (t < m ? t : m - 1)));  // ascending index
  }
  for (int iter = 0; iter < 128; ++iter) {
    bool open = false;
    for (int t = 0; t < kLanes; ++t) {
      mid[t] = 0.5 * (lo[t] + hi[t]);
      open = open || (t < m && ::mhgd_fast::tridiagonal::interval_open(b, lo[t], hi[t]));
    }
    if (!open) break;
#pragma omp simd
    for (int t = 0; t < kLanes; ++t) {
      const double v = ::mhgd_fast::tridiagonal::sturm_pivot(d[0] - mid[t], b.pivmin);
      q[t] = v;
      below[t] = v < 0 ? 1.0 : 0.0;
    }
    for (int64_t i = 1; i < n; ++i) {
      const double di = d[i], ei = e2[i - 1];
#pragma omp simd
      for (int t = 0; t < kLanes; ++t) {
        const double v = ::mhgd_fast::tridiagonal::sturm_pivot(di - mid[t] - ei / q[t], b.pivmin);
        q[t] = v;
        below[t] += v < 0 ? 1.0 : 0.0;
      }
    }
    for (int t = 0; t < kLanes; ++t)
      ::mhgd_fast::tridiagonal::halve_interval(lo[t], hi[t], mid[t], below[t], target[t]);
  }
  for (int t = 0; t < m; ++t) out[t] = 0.5 * (lo[t] + hi[t]);
}

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
