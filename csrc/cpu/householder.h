// Householder tridiagonalisation of a symmetric matrix and the application of its reflectors, per
// sample, for topk_singular_vectors on the CPU (docs/method.md §3). One CPU capability's kernel
// body (kernel_table.h): capability_kernels.h includes it into namespace
// mhgd_fast::cpu::MHGD_CPU_CAPABILITY, after the capability's target is set.
//
// Storage: `a` is n×n row-major; only the upper triangle (k ≥ i) is read or written. After
// tridiagonalize, row j right of the diagonal holds reflector j's vector u_j (entries j+1..n-1)
// and beta[j] its factor: H_j = I − beta_j u_j u_jᵀ, Q = H_0 H_1 ⋯ H_{n−3}, A = Q T Qᵀ.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "householder.h is compiled per CPU capability: include it through capability_kernels.h"
#endif

#include <cmath>
#include <cstdint>

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {

// Reflector for row j: turns a[j][j+1..n) into (e_j, 0, …, 0); stores u_j in place, returns beta.
inline double make_reflector(double* row, int64_t j, int64_t n, double* e_j) {
  const double x0 = row[j + 1];
  double s2 = 0;
#pragma omp simd reduction(+ : s2)
  for (int64_t k = j + 2; k < n; ++k) s2 += row[k] * row[k];
  if (s2 == 0) {  // already tridiagonal in this row: H_j = I
    *e_j = x0;
    return 0.0;
  }
  const double alpha = -std::copysign(std::sqrt(x0 * x0 + s2), x0);
  row[j + 1] = x0 - alpha;
  *e_j = alpha;
  return 2.0 / (row[j + 1] * row[j + 1] + s2);
}

// Row i of the trailing block, in one pass: the rank-2 update of step j (when w is given:
// a −= u wᵀ + w uᵀ) and the symmetric product of step j+1 (when u2 is given: p += A u2, upper
// storage, so each entry feeds p[i] and p[k]).
inline void update_and_multiply(double* row, int64_t i, int64_t n, const double* u, const double* w,
                                const double* u2, double* p) {
  if (w != nullptr && u2 != nullptr) {
    const double ui = u[i], wi = w[i], u2i = u2[i];
    double r = row[i] - 2.0 * ui * wi;
    row[i] = r;
    double t = r * u2i;
#pragma omp simd reduction(+ : t)
    for (int64_t k = i + 1; k < n; ++k) {
      const double v = row[k] - ui * w[k] - wi * u[k];
      row[k] = v;
      t += v * u2[k];
      p[k] += v * u2i;
    }
    p[i] += t;
  } else if (w != nullptr) {
    const double ui = u[i], wi = w[i];
#pragma omp simd
    for (int64_t k = i; k < n; ++k) row[k] -= ui * w[k] + wi * u[k];
  } else if (u2 != nullptr) {
    const double u2i = u2[i];
    double t = row[i] * u2i;
#pragma omp simd reduction(+ : t)
    for (int64_t k = i + 1; k < n; ++k) {
      t += row[k] * u2[k];
      p[k] += row[k] * u2i;
    }
    p[i] += t;
  }
}

// In place: a (upper triangle of a symmetric n×n) → reflectors; d [n], e [n−1], beta [n] (0 past
// n−3). p, w: scratch of n. Each step reads and writes its trailing block once: the update of
// step j and the product of step j+1 share the pass.
inline void tridiagonalize(double* a, int64_t n, double* d, double* e, double* beta, double* p, double* w) {
  for (int64_t j = 0; j < n; ++j) beta[j] = 0;
  if (n <= 2) {
    d[0] = a[0];
    if (n == 2) {
      e[0] = a[1];
      d[1] = a[3];
    }
    return;
  }
  d[0] = a[0];
  beta[0] = make_reflector(a, 0, n, &e[0]);
  for (int64_t i = 1; i < n; ++i) p[i] = 0;
  if (beta[0] != 0)
    for (int64_t i = 1; i < n; ++i) update_and_multiply(a + i * n, i, n, nullptr, nullptr, a, p);
  for (int64_t j = 0; j + 2 < n; ++j) {
    const double* u = a + j * n;  // u_j(i) for i ≥ j+1
    const double bj = beta[j];
    const double* wj = nullptr;
    if (bj != 0) {
      // p = A u; ŵ = beta p − (beta²/2)(uᵀp) u  (so that H A H = A − u ŵᵀ − ŵ uᵀ)
      double up = 0;
#pragma omp simd reduction(+ : up)
      for (int64_t i = j + 1; i < n; ++i) up += u[i] * p[i];
      const double half = 0.5 * bj * bj * up;
      for (int64_t i = j + 1; i < n; ++i) w[i] = bj * p[i] - half * u[i];
      wj = w;
    }
    double* next = a + (j + 1) * n;
    update_and_multiply(next, j + 1, n, u, wj, nullptr, nullptr);
    d[j + 1] = next[j + 1];
    if (j + 3 == n) {  // the last off-diagonal needs no reflector
      e[j + 1] = next[j + 2];
      double* last = a + (j + 2) * n;
      update_and_multiply(last, j + 2, n, u, wj, nullptr, nullptr);
      d[j + 2] = last[j + 2];
      break;
    }
    beta[j + 1] = make_reflector(next, j + 1, n, &e[j + 1]);
    const double* u2 = beta[j + 1] != 0 ? next : nullptr;
    for (int64_t i = j + 2; i < n; ++i) p[i] = 0;
    for (int64_t i = j + 2; i < n; ++i) update_and_multiply(a + i * n, i, n, u, wj, u2, p);
  }
}

// x ← Q x (from_q = true) or x ← Qᵀ x, for `count` vectors of length n at stride n.
inline void apply_q(const double* a, const double* beta, int64_t n, double* x, int64_t count, bool from_q) {
  for (int64_t s = 0; s + 2 < n; ++s) {
    const int64_t j = from_q ? n - 3 - s : s;
    if (beta[j] == 0) continue;
    const double* u = a + j * n;
    for (int64_t c = 0; c < count; ++c) {
      double* xc = x + c * n;
      double dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = j + 1; i < n; ++i) dot += u[i] * xc[i];
      dot *= beta[j];
#pragma omp simd
      for (int64_t i = j + 1; i < n; ++i) xc[i] -= dot * u[i];
    }
  }
}

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
