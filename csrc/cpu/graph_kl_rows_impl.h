// Definitions of graph_kl_rows.h, vectorised with at::vec; included once per CPU capability by a
// translation unit that defines MHGD_CPU_CAPABILITY (and, for AVX2, enables it first).
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "graph_kl_rows.h"

namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY {
namespace {

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

// 2^-ceil(log2 cols): scaling each cross term by it keeps the sum of cols terms, each at most the
// logits' range, within the range itself, and is exact (a power of two) short of subnormals.
template <typename T>
T cross_scale(int64_t cols) {
  int e = 0;
  while ((int64_t{1} << e) < cols) ++e;
  return std::ldexp(T(1), -e);
}

template <typename T>
T squash_scalar(T x, T scale, bool squash_tanh) {
  return squash_tanh ? std::tanh(scale * x) : scale * x;
}

}  // namespace

template <typename T>
void squash_rows(T* s, T* t, int64_t rows, int64_t cols, T scale, bool squash_tanh) {
  const int64_t n = rows * cols, vec_end = n - n % Vec<T>::size();
  const Vec<T> vscale(scale);
  for (T* x : {s, t}) {
    int64_t j = 0;
    for (; j < vec_end; j += Vec<T>::size()) {
      Vec<T> v = Vec<T>::loadu(x + j) * vscale;
      (squash_tanh ? v.tanh() : v).store(x + j);
    }
    for (; j < n; ++j) x[j] = squash_scalar(x[j], scale, squash_tanh);
  }
}

// Every formula works on the shifted logits a = s - max_s and b = t - max_t, which the
// exponentials need anyway: KL(P_s || P_t) = sum_j P_s,j (a_j - b_j) + log sum e^b - log sum e^a.
// Each term is at most |KL| + log(cols) in size, so the rounding stays relative to the KL itself
// and not to the logits (the unshifted cross/sum + lse_t - lse_s cancels terms of the size of
// the logits). One column gives a = b = 0 and a KL of exactly 0.
template <typename T>
void kl_rows(const T* s, const T* t, int64_t rows, int64_t cols, bool teacher_student, T* kl, T* stats_s,
             T* stats_t, T* p_s, T* p_t) {
  const int64_t vec_end = cols - cols % Vec<T>::size();
  // The cross term is accumulated scaled by c = 2^-ceil(log2 cols) and divided by c * sum at the
  // end: unscaled, cols terms of the logits' range overflow (float32 logits of 1e37 in 800
  // columns gave inf where the KL is finite); c * sum <= 1 and the division is unchanged.
  const T c = cross_scale<T>(cols);
  const Vec<T> vc(c);
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * cols;
    const T* ti = t + i * cols;
    Vec<T> vmax_s(-std::numeric_limits<T>::infinity()), vmax_t = vmax_s;
    int64_t j = 0;
    for (; j < vec_end; j += Vec<T>::size()) {
      vmax_s = at::vec::maximum(vmax_s, Vec<T>::loadu(si + j));
      vmax_t = at::vec::maximum(vmax_t, Vec<T>::loadu(ti + j));
    }
    T max_s = horizontal_max(vmax_s), max_t = horizontal_max(vmax_t);
    for (; j < cols; ++j) {
      max_s = std::max(max_s, si[j]);
      max_t = std::max(max_t, ti[j]);
    }
    // sum_s = Σ e^a, sum_t = Σ e^b; cross = c Σ e^a (a - b) (or c Σ e^b (b - a) for teacher_student).
    const Vec<T> vms(max_s), vmt(max_t);
    Vec<T> vsum_s(0), vsum_t(0), vcross(0);
    for (j = 0; j < vec_end; j += Vec<T>::size()) {
      const Vec<T> va = Vec<T>::loadu(si + j) - vms, vb = Vec<T>::loadu(ti + j) - vmt;
      const Vec<T> es = va.exp(), et = vb.exp();
      if (p_s) {
        es.store(p_s + i * cols + j);
        et.store(p_t + i * cols + j);
      }
      vsum_s = vsum_s + es;
      vsum_t = vsum_t + et;
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
      cross += teacher_student ? et * ((b - a) * c) : es * ((a - b) * c);
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
    kl[i] = teacher_student ? cross / (c * sum_t) + (log_sum_s - log_sum_t)
                            : cross / (c * sum_s) + (log_sum_t - log_sum_s);
  }
}

template <typename T>
void kl_grad_rows(T* s, T* t, int64_t rows, int64_t cols, bool squash_tanh, bool teacher_student, const T* kl,
                  const T* stats_s, const T* stats_t, const T* row_scale, bool want_s, bool want_t, const T* p_s,
                  const T* p_t) {
  const int64_t vec_end = cols - cols % Vec<T>::size();
  const Vec<T> one(1);
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * cols;
    T* ti = t + i * cols;
    const T ms = stats_s[2 * i], ls = stats_s[2 * i + 1], mt = stats_t[2 * i], lt = stats_t[2 * i + 1];
    const T k = kl[i], r = row_scale[i];
    // §7: for KL(P_s||P_t), dS = P_s (l - KL), dT = P_t - P_s with l = log P_s - log P_t;
    // for KL(P_t||P_s), dS = P_s - P_t, dT = P_t (-l - KL). Then the tanh chain and row_scale.
    // log P = (x - max) - log Σ: the max is subtracted first, so P is exact at any logit size.
    const Vec<T> vms(ms), vls(ls), vmt(mt), vlt(lt), vk(k), vr(r);
    int64_t j = 0;
    for (; j < vec_end; j += Vec<T>::size()) {
      const Vec<T> vs = Vec<T>::loadu(si + j), vt = Vec<T>::loadu(ti + j);
      const Vec<T> log_ps = (vs - vms) - vls, log_pt = (vt - vmt) - vlt;
      const Vec<T> ps = p_s ? Vec<T>::loadu(p_s + i * cols + j) : log_ps.exp();
      const Vec<T> pt = p_t ? Vec<T>::loadu(p_t + i * cols + j) : log_pt.exp();
      const Vec<T> ell = log_ps - log_pt;
      Vec<T> ds = teacher_student ? ps - pt : ps * (ell - vk);
      Vec<T> dt = teacher_student ? pt * (Vec<T>(0) - ell - vk) : pt - ps;
      if (squash_tanh) {
        ds = ds * (one - vs * vs);
        dt = dt * (one - vt * vt);
      }
      if (want_s) (ds * vr).store(si + j);
      if (want_t) (dt * vr).store(ti + j);
    }
    for (; j < cols; ++j) {
      const T vs = si[j], vt = ti[j];
      const T log_ps = (vs - ms) - ls, log_pt = (vt - mt) - lt;
      const T ps = p_s ? p_s[i * cols + j] : std::exp(log_ps), pt = p_t ? p_t[i * cols + j] : std::exp(log_pt);
      const T ell = log_ps - log_pt;
      T ds = teacher_student ? ps - pt : ps * (ell - k);
      T dt = teacher_student ? pt * (-ell - k) : pt - ps;
      if (squash_tanh) {
        ds *= T(1) - vs * vs;
        dt *= T(1) - vt * vt;
      }
      if (want_s) si[j] = ds * r;
      if (want_t) ti[j] = dt * r;
    }
  }
}

#define MHGD_INSTANTIATE_GRAPH_KL_ROWS(T)                                                              \
  template void squash_rows<T>(T*, T*, int64_t, int64_t, T, bool);                                     \
  template void kl_rows<T>(const T*, const T*, int64_t, int64_t, bool, T*, T*, T*, T*, T*);            \
  template void kl_grad_rows<T>(T*, T*, int64_t, int64_t, bool, bool, const T*, const T*, const T*,   \
                                const T*, bool, bool, const T*, const T*);
MHGD_INSTANTIATE_GRAPH_KL_ROWS(float)
MHGD_INSTANTIATE_GRAPH_KL_ROWS(double)
#undef MHGD_INSTANTIATE_GRAPH_KL_ROWS

}  // namespace mhgd_fast::cpu::MHGD_CPU_CAPABILITY
