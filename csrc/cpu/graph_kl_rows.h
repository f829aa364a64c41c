// Row math of the fused graph-KL loss (docs/method.md §7) on a block of graph rows held in cache:
// `s` and `t` are [rows, cols] row-major strips of the student's and the teacher's logits.
// Vectorised with at::vec; the scalar formulas are csrc/graph_kl_math.h's, shared with CUDA.
// One CPU capability's kernel body (kernel_table.h): capability_kernels.h includes it into
// namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY, after the capability's target is set.
#pragma once

#ifndef MHGD_CPU_CAPABILITY
#error "graph_kl_rows.h is compiled per CPU capability: include it through capability_kernels.h"
#endif

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../graph_kl_math.h"

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {
namespace graph_kl_rows_detail {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
T horizontal_max(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  return *std::max_element(lanes, lanes + Vec<T>::size());
}

template <typename T>
T horizontal_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (int l = 0; l < Vec<T>::size(); ++l) sum += lanes[l];
  return sum;
}

}  // namespace graph_kl_rows_detail

// In place: x <- squash(scale * x) for both strips.
template <typename T>
void squash_rows(T* s, T* t, int64_t rows, int64_t cols, T scale, bool squash_tanh) {
  using Vec = graph_kl_rows_detail::Vec<T>;
  const int64_t n = rows * cols, vec_end = n - n % Vec::size();
  const Vec vscale(scale);
  for (T* x : {s, t}) {
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      Vec v = Vec::loadu(x + j) * vscale;
      (squash_tanh ? v.tanh() : v).store(x + j);
    }
    for (; j < n; ++j) x[j] = squash_tanh ? std::tanh(scale * x[j]) : scale * x[j];
  }
}

// Per row of the squashed strips: the KL divergence of the direction and each side's row
// statistics stats_x[2 i] = max_j x_ij, stats_x[2 i + 1] = log sum_j exp(x_ij - max); with p_s/p_t
// (else null), also the rows' probabilities, for kl_grad_rows.
template <typename T>
void kl_rows(const T* s, const T* t, int64_t rows, int64_t cols, bool teacher_student, T* kl, T* stats_s,
             T* stats_t, T* p_s, T* p_t) {
  namespace math = ::mhgd_fast::graph_kl_math;
  using graph_kl_rows_detail::horizontal_max;
  using graph_kl_rows_detail::horizontal_sum;
  using Vec = graph_kl_rows_detail::Vec<T>;
  const int64_t vec_end = cols - cols % Vec::size();
  const T c = math::cross_scale<T>(cols);
  const Vec vc(c);
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * cols;
    const T* ti = t + i * cols;
    Vec vmax_s(-std::numeric_limits<T>::infinity()), vmax_t = vmax_s;
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      vmax_s = at::vec::maximum(vmax_s, Vec::loadu(si + j));
      vmax_t = at::vec::maximum(vmax_t, Vec::loadu(ti + j));
    }
    T max_s = horizontal_max(vmax_s), max_t = horizontal_max(vmax_t);
    for (; j < cols; ++j) {
      max_s = std::max(max_s, si[j]);
      max_t = std::max(max_t, ti[j]);
    }
    // sum_s = Σ e^a, sum_t = Σ e^b and the c-scaled cross term (graph_kl_math.h).
    const Vec vms(max_s), vmt(max_t);
    Vec vsum_s(0), vsum_t(0), vcross(0);
    for (j = 0; j < vec_end; j += Vec::size()) {
      const Vec va = Vec::loadu(si + j) - vms, vb = Vec::loadu(ti + j) - vmt;
      const Vec es = va.exp(), et = vb.exp();
      if (p_s) {
        es.store(p_s + i * cols + j);
        et.store(p_t + i * cols + j);
      }
      vsum_s = vsum_s + es;
      vsum_t = vsum_t + et;
      // cross_term, fused: e^b (b - a) c or e^a (a - b) c
      vcross = teacher_student ? at::vec::fmadd(et, (vb - va) * vc, vcross) : at::vec::fmadd(es, (va - vb) * vc, vcross);
    }
    T sum_s = horizontal_sum(vsum_s), sum_t = horizontal_sum(vsum_t), cross = horizontal_sum(vcross);
    for (; j < cols; ++j) {
      const T a = si[j] - max_s, b = ti[j] - max_t;
      const T es = std::exp(a), et = std::exp(b);
      if (p_s) {
        p_s[i * cols + j] = es;
        p_t[i * cols + j] = et;
      }
      sum_s += es;
      sum_t += et;
      cross += math::cross_term(a, b, es, et, c, teacher_student);
    }
    if (p_s) {  // normalise the stored exponentials into the rows' probabilities
      const T inv_s = T(1) / sum_s, inv_t = T(1) / sum_t;
      for (int64_t j = 0; j < cols; ++j) {
        p_s[i * cols + j] *= inv_s;
        p_t[i * cols + j] *= inv_t;
      }
    }
    const T log_sum_s = std::log(sum_s), log_sum_t = std::log(sum_t);
    stats_s[2 * i] = max_s;
    stats_s[2 * i + 1] = log_sum_s;
    stats_t[2 * i] = max_t;
    stats_t[2 * i + 1] = log_sum_t;
    kl[i] = math::row_kl(cross, c, sum_s, sum_t, log_sum_s, log_sum_t, teacher_student);
  }
}

// In place: the squashed strips become dL/d(q k^T) of student (s) and teacher (t), given the row
// statistics and row_scale[i] = dL/dKL_i * scale. A strip not wanted is left as it is.
// p_s/p_t: kl_rows' probabilities, or null to recompute them from the statistics.
template <typename T>
void kl_grad_rows(T* s, T* t, int64_t rows, int64_t cols, bool squash_tanh, bool teacher_student, const T* kl,
                  const T* stats_s, const T* stats_t, const T* row_scale, bool want_s, bool want_t, const T* p_s,
                  const T* p_t) {
  namespace math = ::mhgd_fast::graph_kl_math;
  using Vec = graph_kl_rows_detail::Vec<T>;
  const int64_t vec_end = cols - cols % Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * cols;
    T* ti = t + i * cols;
    const T ms = stats_s[2 * i], ls = stats_s[2 * i + 1], mt = stats_t[2 * i], lt = stats_t[2 * i + 1];
    const T k = kl[i], r = row_scale[i];
    const Vec vms(ms), vls(ls), vmt(mt), vlt(lt), vk(k), vr(r);
    int64_t j = 0;
    for (; j < vec_end; j += Vec::size()) {
      const Vec vs = Vec::loadu(si + j), vt = Vec::loadu(ti + j);
      const Vec log_ps = (vs - vms) - vls, log_pt = (vt - vmt) - vlt;
      const Vec ps = p_s ? Vec::loadu(p_s + i * cols + j) : log_ps.exp();
      const Vec pt = p_t ? Vec::loadu(p_t + i * cols + j) : log_pt.exp();
      Vec ds, dt;
      math::element_grads<Vec>(vs, vt, log_ps, log_pt, ps, pt, vk, vr, squash_tanh, teacher_student, ds, dt);
      if (want_s) ds.store(si + j);
      if (want_t) dt.store(ti + j);
    }
    for (; j < cols; ++j) {
      const T vs = si[j], vt = ti[j];
      const T log_ps = (vs - ms) - ls, log_pt = (vt - mt) - lt;
      const T ps = p_s ? p_s[i * cols + j] : std::exp(log_ps), pt = p_t ? p_t[i * cols + j] : std::exp(log_pt);
      T ds, dt;
      math::element_grads<T>(vs, vt, log_ps, log_pt, ps, pt, k, r, squash_tanh, teacher_student, ds, dt);
      if (want_s) si[j] = ds;
      if (want_t) ti[j] = dt;
    }
  }
}

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
