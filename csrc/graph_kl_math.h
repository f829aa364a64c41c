// The graph-KL loss's scalar formulas (docs/method.md §7), written once for the CPU row kernels
// (csrc/cpu/graph_kl_rows.h: its scalar tails, and its at::vec lanes, which instantiate the same
// templates with at::vec::Vectorized), the CUDA kernels (csrc/cuda/graph_kl_kernels.cuh) and the
// host SIMT simulator. Torch-free; no transcendental functions (each caller brings its exp/log).
//
// Every formula works on the shifted logits a = s − max_s and b = t − max_t, which the
// exponentials need anyway: KL(P_s || P_t) = Σ_j P_s,j (a_j − b_j) + log Σ e^b − log Σ e^a. Each
// term is at most |KL| + log(cols) in size, so the rounding stays relative to the KL and not to the
// logits (the unshifted cross/sum + lse_t − lse_s cancels terms of the logits' size).
#pragma once

#include <cstdint>

#include "host_device.h"

// The CPU compiles these once per capability (graph_kl_rows.h instantiates them with that
// capability's at::vec::Vectorized, whose registers a call between functions of different targets
// would pass wrongly), so each capability's copy is its own inline namespace: no function compiled
// for AVX2 is merged at link time with, or called as, the baseline one. CUDA and the simulator get
// the namespace `portable`.
#ifdef MHGD_CPU_CAPABILITY
#define MHGD_GRAPH_KL_MATH_ABI MHGD_CPU_CAPABILITY
#else
#define MHGD_GRAPH_KL_MATH_ABI portable
#endif

namespace mhgd_fast {
namespace graph_kl_math {
inline namespace MHGD_GRAPH_KL_MATH_ABI {

// c = 2^-ceil(log2 cols): the cross term is accumulated scaled by c and divided by c·sum at the
// end. Unscaled, cols terms of the logits' range overflow (float32 logits of 1e37 in 800 columns
// gave inf where the KL is finite); c·sum ≤ 1, and a power of two is exact short of subnormals.
template <typename T>
MHGD_HD T cross_scale(int64_t cols) {
  T c = 1;
  for (int64_t m = 1; m < cols; m <<= 1) c *= T(0.5);
  return c;
}

// One column's (c-scaled) cross term from its shifted logits a, b and exponentials e^a, e^b:
// e^a (a − b) for KL(P_s || P_t), e^b (b − a) for KL(P_t || P_s) (teacher_student).
template <typename T>
MHGD_HD T cross_term(T a, T b, T exp_a, T exp_b, T c, bool teacher_student) {
  return teacher_student ? exp_b * ((b - a) * c) : exp_a * ((a - b) * c);
}

// The row's KL from the c-scaled cross term, the sums Σ e^a, Σ e^b and their logarithms. One
// column gives a = b = 0 and a KL of exactly 0.
template <typename T>
MHGD_HD T row_kl(T cross, T c, T sum_s, T sum_t, T log_sum_s, T log_sum_t, bool teacher_student) {
  return teacher_student ? cross / (c * sum_t) + (log_sum_s - log_sum_t)
                         : cross / (c * sum_s) + (log_sum_t - log_sum_s);
}

// dL/d(q k^T) of student (ds) and teacher (dt) at one element, §7: for KL(P_s||P_t),
// dS = P_s (l − KL), dT = P_t − P_s with l = log P_s − log P_t; for KL(P_t||P_s), dS = P_s − P_t,
// dT = P_t (−l − KL); then the tanh chain (squash_tanh: s, t are the squashed logits) and
// r = dL/dKL_i · scale. log P = (x − max) − log Σ, the max subtracted first so that P is exact at
// any logit size; ps, pt = exp(log_ps), exp(log_pt) (or the forward's stored probabilities).
// V: a floating type, or an at::vec::Vectorized of one (the CPU's vector lanes; by reference, so
// that no vector register crosses a call by value).
template <typename V>
MHGD_HD void element_grads(const V& s, const V& t, const V& log_ps, const V& log_pt, const V& ps, const V& pt,
                           const V& kl, const V& r, bool squash_tanh, bool teacher_student, V& ds, V& dt) {
  const V ell = log_ps - log_pt, zero(0), one(1);
  ds = teacher_student ? ps - pt : ps * (ell - kl);
  dt = teacher_student ? pt * (zero - ell - kl) : pt - ps;
  if (squash_tanh) {
    ds = ds * (one - s * s);
    dt = dt * (one - t * t);
  }
  ds = ds * r;
  dt = dt * r;
}

}  // inline namespace MHGD_GRAPH_KL_MATH_ABI
}  // namespace graph_kl_math
}  // namespace mhgd_fast
