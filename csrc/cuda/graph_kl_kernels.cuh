// Device code of the fused graph-KL loss (docs/method.md §7). No torch includes (docs/design.md §4).
//
// One warp owns one graph row (forward, dq) or one graph column (dk) and streams over the other
// side, recomputing the logits s = scale q_i.k_j and t likewise; the [H, N, M] graphs never exist.
//  * graph_kl_forward:        per row, online max/sum statistics (FlashAttention's rescaling) held
//                             per lane, merged across the warp: KL_i and each side's max and
//                             log-sum. One launch.
//  * graph_kl_backward_rows:  per row i, dq_i = sum_j dZ_ij k_j (student and/or teacher).
//  * graph_kl_backward_cols:  per column j, dk_j = sum_i dZ_ij q_i. Every dk row is written by one
//                             warp in a fixed order, so the backward is deterministic (no atomics).
// A block holds kGraphKLWarps warps; dynamic shared memory holds, per warp, the owned q (or k)
// vectors of student and teacher and, in the backward, their gradient accumulators.
#pragma once

#include <cstdint>

#include <device_common.cuh>

#include "../graph_kl_math.h"

namespace mhgd_fast {
namespace cuda_kernels {

constexpr int kGraphKLWarps = 4;

template <typename T>
struct GraphKLArgs {
  const T* q_s;  // [H, N, dim], contiguous
  const T* k_s;  // [H, M, dim]
  const T* q_t;
  const T* k_t;
  int64_t heads, rows, cols, dim;
  T scale;
  bool squash_tanh;
  bool teacher_student;  // false: KL(P_s || P_t) (the paper's); true: KL(P_t || P_s)
  T* kl;                 // [H, N]: written by the forward, read by the backward, as are
  T* stats_s;            // [H, N, 2]: per row the (squashed) logits' max and log sum exp(x - max)
  T* stats_t;
  const T* row_grad;  // dL/dKL_i per row, or null: grad_scalar for every row
  T grad_scalar;
};

// Dynamic shared memory per block: each warp holds `vectors` vectors of `dim` values (the forward
// 2: its q rows; the backward 4: its owned vectors and their gradient accumulators).
constexpr int kForwardVectors = 2, kBackwardVectors = 4;
inline int64_t graph_kl_shared_bytes(int64_t dim, int64_t elem_size, int vectors) {
  return kGraphKLWarps * vectors * dim * elem_size;
}

// Every graph_kl kernel: one warp per item (a row or a column of some head), kGraphKLWarps warps a
// block, `vectors` vectors of `dim` values of shared memory per warp.
inline LaunchGeometry graph_kl_launch(int64_t items, int64_t dim, int64_t elem_size, int vectors) {
  return {(items + kGraphKLWarps - 1) / kGraphKLWarps, kGraphKLWarps * 32,
          graph_kl_shared_bytes(dim, elem_size, vectors)};
}

template <typename T>
__device__ __forceinline__ T squash(T x, T scale, bool squash_tanh) {
  return squash_tanh ? dev_tanh(scale * x) : scale * x;
}

// a (shared) . b (global), both of length dim.
template <typename T>
__device__ __forceinline__ T dot(const T* a, const T* __restrict__ b, int64_t dim) {
  T acc = 0;
  for (int64_t k = 0; k < dim; ++k) acc += a[k] * b[k];
  return acc;
}

// The warp's lanes copy `dim` values from global to shared (lane-strided).
template <typename T>
__device__ __forceinline__ void load_vector(T* dst, const T* __restrict__ src, int64_t dim, int lane) {
  for (int64_t k = lane; k < dim; k += 32) dst[k] = src[k];
}

// Online state of one lane over its columns: running maxima, sums of exp(x - max), and the KL's
// cross term sum_j e^{x_j - max_x} ((x_j - max_x) - (y_j - max_y)) with x the KL's first argument
// (s for KL(P_s || P_t)) and y the other, both shifted by their running maxima. The KL is then
// cross / sum_x + log sum_y - log sum_x, whose terms are as small as the KL itself (plus
// log M); the unshifted sum_j P_x (x_j - y_j) + lse_y - lse_x cancels terms of the logits' size.
// The cross term is held scaled by c = 2^-ceil(log2 M) (graph_kl_math.h's cross_scale) and
// divided by c * sum_x at the end.
template <typename T>
struct OnlineStats {
  T max_s, sum_s, max_t, sum_t, cross;
};

// The (c-scaled) cross term moved to raised maxima: each held difference (x - max_x) - (y - max_y)
// shifts by the rise of max_y minus the rise of max_x, each weight (summing to sum_x) scales by
// rescale_x = e^{-rise_x}. Nothing held yet (sum_x = 0, maxima -inf, rises inf): stays 0.
template <typename T>
__device__ __forceinline__ T rebase_cross(T cross, T sum_x, T rescale_x, T rise_x, T rise_y, T c) {
  return sum_x > T(0) ? rescale_x * (cross + ((rise_y - rise_x) * c) * sum_x) : cross;
}

template <typename T>
__device__ __forceinline__ void online_update(OnlineStats<T>& st, T s, T t, bool teacher_student, T c) {
  const T new_max_s = st.max_s > s ? st.max_s : s, new_max_t = st.max_t > t ? st.max_t : t;
  const T rise_s = new_max_s - st.max_s, rise_t = new_max_t - st.max_t;
  const T rescale_s = dev_exp(-rise_s), rescale_t = dev_exp(-rise_t);
  const T a = s - new_max_s, b = t - new_max_t;
  const T es = dev_exp(a), et = dev_exp(b);
  st.cross = (teacher_student ? rebase_cross(st.cross, st.sum_t, rescale_t, rise_t, rise_s, c)
                              : rebase_cross(st.cross, st.sum_s, rescale_s, rise_s, rise_t, c)) +
             graph_kl_math::cross_term(a, b, es, et, c, teacher_student);
  st.sum_s = st.sum_s * rescale_s + es;
  st.sum_t = st.sum_t * rescale_t + et;
  st.max_s = new_max_s;
  st.max_t = new_max_t;
}

template <typename T>
__global__ void graph_kl_forward(const GraphKLArgs<T> a) {
  MHGD_DYNAMIC_SHARED(T, shared);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGraphKLWarps + warp;  // over H * N
  if (row >= a.heads * a.rows) return;  // whole warps leave; no block-wide barrier follows
  const int64_t h = row / a.rows;
  T* qs = shared + warp * kForwardVectors * a.dim;
  T* qt = qs + a.dim;
  load_vector(qs, a.q_s + row * a.dim, a.dim, lane);
  load_vector(qt, a.q_t + row * a.dim, a.dim, lane);
  __syncwarp();
  OnlineStats<T> st{neg_infinity<T>(), T(0), neg_infinity<T>(), T(0), T(0)};
  const T c = graph_kl_math::cross_scale<T>(a.cols);
  for (int64_t j = lane; j < a.cols; j += 32) {
    const int64_t col = (h * a.cols + j) * a.dim;
    const T s = squash(dot(qs, a.k_s + col, a.dim), a.scale, a.squash_tanh);
    const T t = squash(dot(qt, a.k_t + col, a.dim), a.scale, a.squash_tanh);
    online_update(st, s, t, a.teacher_student, c);
  }
  // Merge the lanes: rebase each lane's sums and cross term to the warp's maxima (lanes with no
  // column hold max = -inf and sums 0, and contribute 0).
  const T max_s = warp_reduce(st.max_s, MaxOp()), max_t = warp_reduce(st.max_t, MaxOp());
  const T rise_s = max_s - st.max_s, rise_t = max_t - st.max_t;
  const T rescale_s = dev_exp(-rise_s), rescale_t = dev_exp(-rise_t);
  const T sum_s = warp_reduce(st.sum_s * rescale_s, SumOp()), sum_t = warp_reduce(st.sum_t * rescale_t, SumOp());
  const T cross = warp_reduce(a.teacher_student ? rebase_cross(st.cross, st.sum_t, rescale_t, rise_t, rise_s, c)
                                                : rebase_cross(st.cross, st.sum_s, rescale_s, rise_s, rise_t, c),
                              SumOp());
  if (lane == 0) {
    const T log_sum_s = dev_log(sum_s), log_sum_t = dev_log(sum_t);
    a.stats_s[2 * row] = max_s;
    a.stats_s[2 * row + 1] = log_sum_s;
    a.stats_t[2 * row] = max_t;
    a.stats_t[2 * row + 1] = log_sum_t;
    a.kl[row] = graph_kl_math::row_kl(cross, c, sum_s, sum_t, log_sum_s, log_sum_t, a.teacher_student);
  }
}

// dL/d(q k^T) of student (ds) and teacher (dt) at one element (graph_kl_math.h's element_grads),
// from the squashed logits and the row's statistics (max m, log-sum l per side:
// log P = (x - m) - l); r = dL/dKL_i * scale.
template <typename T>
__device__ __forceinline__ void element_grads(T s, T t, const T* __restrict__ stat_s, const T* __restrict__ stat_t,
                                              T kl, T r, bool squash_tanh, bool teacher_student, T& ds, T& dt) {
  const T log_ps = (s - stat_s[0]) - stat_s[1], log_pt = (t - stat_t[0]) - stat_t[1];
  graph_kl_math::element_grads<T>(s, t, log_ps, log_pt, dev_exp(log_ps), dev_exp(log_pt), kl, r, squash_tanh,
                                  teacher_student, ds, dt);
}

// One warp owns vector `own` (a row i of q, or a column j of k) and streams over the other side
// in chunks of 32 (one element per lane); accumulates grad_own += sum dZ * other_vector.
template <typename T, bool kColumns>
__device__ void backward_sweep(const GraphKLArgs<T>& a, T* __restrict__ grad_s, T* __restrict__ grad_t) {
  MHGD_DYNAMIC_SHARED(T, shared);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t own_count = kColumns ? a.cols : a.rows, other_count = kColumns ? a.rows : a.cols;
  const int64_t own = static_cast<int64_t>(blockIdx.x) * kGraphKLWarps + warp;  // over H * own_count
  if (own >= a.heads * own_count) return;
  const int64_t h = own / own_count;
  const T* own_s = kColumns ? a.k_s : a.q_s;
  const T* own_t = kColumns ? a.k_t : a.q_t;
  const T* other_s = kColumns ? a.q_s : a.k_s;
  const T* other_t = kColumns ? a.q_t : a.k_t;
  T* vs = shared + warp * kBackwardVectors * a.dim;
  T* vt = vs + a.dim;
  T* acc_s = vt + a.dim;
  T* acc_t = acc_s + a.dim;
  load_vector(vs, own_s + own * a.dim, a.dim, lane);
  load_vector(vt, own_t + own * a.dim, a.dim, lane);
  for (int64_t k = lane; k < a.dim; k += 32) acc_s[k] = acc_t[k] = T(0);
  __syncwarp();
  for (int64_t base = 0; base < other_count; base += 32) {
    const int64_t mine = base + lane;  // the other-side index this lane evaluates
    T ds = 0, dt = 0;
    if (mine < other_count) {
      const int64_t other = (h * other_count + mine) * a.dim;
      const T s = squash(dot(vs, other_s + other, a.dim), a.scale, a.squash_tanh);
      const T t = squash(dot(vt, other_t + other, a.dim), a.scale, a.squash_tanh);
      const int64_t stat = kColumns ? h * a.rows + mine : own;  // the graph row of this element
      const T r = (a.row_grad ? a.row_grad[stat] : a.grad_scalar) * a.scale;
      element_grads(s, t, a.stats_s + 2 * stat, a.stats_t + 2 * stat, a.kl[stat], r, a.squash_tanh, a.teacher_student,
                    ds, dt);
    }
    // Broadcast each lane's element in turn; lane l accumulates the features k = l (mod 32).
    const int64_t chunk = other_count - base < 32 ? other_count - base : 32;
    for (int src = 0; src < 32; ++src) {
      const T ds_src = __shfl_sync(kFullMask, ds, src), dt_src = __shfl_sync(kFullMask, dt, src);
      if (src >= chunk) continue;  // uniform across the warp: the shuffles above stay converged
      const int64_t other = (h * other_count + base + src) * a.dim;
      for (int64_t k = lane; k < a.dim; k += 32) {
        acc_s[k] += ds_src * other_s[other + k];
        acc_t[k] += dt_src * other_t[other + k];
      }
    }
  }
  for (int64_t k = lane; k < a.dim; k += 32) {
    if (grad_s) grad_s[own * a.dim + k] = acc_s[k];
    if (grad_t) grad_t[own * a.dim + k] = acc_t[k];
  }
}

// dq_s, dq_t ([H, N, dim]; either may be null).
template <typename T>
__global__ void graph_kl_backward_rows(const GraphKLArgs<T> a, T* dq_s, T* dq_t) {
  backward_sweep<T, false>(a, dq_s, dq_t);
}

// dk_s, dk_t ([H, M, dim]; either may be null).
template <typename T>
__global__ void graph_kl_backward_cols(const GraphKLArgs<T> a, T* dk_s, T* dk_t) {
  backward_sweep<T, true>(a, dk_s, dk_t);
}

}  // namespace cuda_kernels
}  // namespace mhgd_fast
