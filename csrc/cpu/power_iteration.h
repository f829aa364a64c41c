// The top eigenpair of a symmetric matrix by power steps (topk_singular_vectors for k = 1 without
// saved state, on the CPU). One CPU capability's kernel body (kernel_table.h):
// capability_kernels.h includes it into namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "power_iteration.h is compiled per CPU capability: include it through capability_kernels.h"
#endif

#include <cmath>
#include <cstdint>

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {

// Top eigenpair of the symmetric n×n `gram` (float64, both triangles) by at most max_steps power
// steps; false when ‖G v − θ v‖ ≤ tol·θ was not reached (or the Gram is zero, which the full
// route handles exactly). v, w: n entries; v receives the unit vector, theta its eigenvalue.
inline bool power_iteration(const double* gram, int64_t n, double tol, int max_steps, double* v, double* w,
                            double* theta_out) {
  double norm = 0;
  for (int64_t i = 0; i < n; ++i) {  // positive start: a post-ReLU Gram's Perron vector is non-negative
    v[i] = 1.0 + 0.25 * std::sin(1.0 + 2.3 * static_cast<double>(i));
    norm += v[i] * v[i];
  }
  norm = std::sqrt(norm);
  for (int64_t i = 0; i < n; ++i) v[i] /= norm;
  for (int step = 0; step < max_steps; ++step) {
    for (int64_t i = 0; i < n; ++i) {
      const double* row = gram + i * n;
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += row[j] * v[j];
      w[i] = sum;
    }
    double theta = 0, resid = 0, wnorm = 0;
#pragma omp simd reduction(+ : theta)
    for (int64_t i = 0; i < n; ++i) theta += v[i] * w[i];
#pragma omp simd reduction(+ : resid, wnorm)
    for (int64_t i = 0; i < n; ++i) {
      resid += (w[i] - theta * v[i]) * (w[i] - theta * v[i]);
      wnorm += w[i] * w[i];
    }
    if (!(theta > 0) || wnorm == 0) return false;
    if (std::sqrt(resid) <= tol * theta) {
      *theta_out = theta;
      return true;
    }
    wnorm = std::sqrt(wnorm);
    for (int64_t i = 0; i < n; ++i) v[i] = w[i] / wnorm;
  }
  return false;
}
}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
