// CUDA kernels of topk_singular_vectors (docs/method.md §3): one block per sample, the same
// algorithm as the CPU kernel (topk_singular_vectors_host.h), so that no batched eigen-solver
// (which loops one solver call per matrix above n = 32) is needed.
//   topk_decompose:        Householder tridiagonalisation of the float64 Gram, block-parallel,
//                          the product and update vectors in shared memory; the top kk+1
//                          eigenvalues by bisection (one thread each), the top kk eigenvectors by
//                          inverse iteration (one thread, clusters kept orthogonal), mapped back
//                          through the reflectors block-parallel.
//   topk_complement_solve: the backward's y_j = (λ_j I − G)⁺ rhs_j on the complement of the top
//                          kk, with the reference's dropping rule, or the sample's exact-route flag.
// Layouts match the CPU kernel: householder [B, n, n] (row j right of the diagonal: reflector u_j),
// tridiagonal [B, 3, n] (d, e, beta), basis [B, n, kk], eigenvalues [B, nl], nl = min(n, kk+1).
#pragma once

#include <device_common.cuh>

#include "../limits.h"
#include "../tridiagonal.h"

namespace mhgd_fast {
namespace cuda_kernels {

constexpr int kTopkThreads = 128;
// Largest k the kernels take (csrc/limits.h).
constexpr int64_t kTopkMaxK = ::mhgd_fast::limits::kCudaTopkMaxK;
// Pairs beyond the top kk whose couplings are dropped that the fast solve handles (as on the CPU).
constexpr int kTopkMaxDropped = ::mhgd_fast::tridiagonal::kMaxDropped;

// Vectors one apply_q call takes: the top kk and the dropped pairs.
constexpr int64_t kTopkMaxVectors = kTopkMaxK + kTopkMaxDropped;

// Dynamic shared memory of both kernels: two length-n vectors, the reduction scratch and the
// dot products of a batched reflector application or projection.
inline size_t topk_shared_bytes(int64_t n) {
  return static_cast<size_t>(2 * n + 32 + kTopkMaxK * (kTopkMaxVectors + kTopkMaxDropped)) * sizeof(double);
}
// Global scratch per sample (doubles): kk shifted LUs (tridiagonal.h's lu_view, kLuDoubles·n
// each), the top kk and dropped vectors, and the kk solve columns.
__host__ __device__ inline int64_t topk_work_doubles(int64_t n, int64_t kk) {
  return n * (::mhgd_fast::tridiagonal::kLuDoubles * kk + kk + kTopkMaxDropped + kk);
}

// Both kernels: one block of kTopkThreads per sample, topk_shared_bytes(n) of dynamic shared memory.
inline LaunchGeometry topk_launch(int64_t batch, int64_t n) {
  return {batch, kTopkThreads, static_cast<int64_t>(topk_shared_bytes(n))};
}

struct TopkSample {
  double* a;     // [n, n] reflectors
  double* d;     // [n] diagonal, then e [n] and beta [n]
  double* work;  // topk_work_doubles
};

__device__ __forceinline__ TopkSample topk_sample(double* householder, double* tridiagonal, double* work, int64_t n,
                                                  int64_t kk) {
  const int64_t b = blockIdx.x;
  return {householder + b * n * n, tridiagonal + b * 3 * n, work + b * topk_work_doubles(n, kk)};
}

// x_c ← Q x_c (from_q) or Qᵀ x_c for `count` vectors at stride n (count ≤ kTopkMaxVectors):
// per reflector, warp c takes vector c's dot product, then the block updates every vector.
__device__ __forceinline__ void topk_apply_q(const double* a, const double* beta, int64_t n, double* x,
                                             int64_t count, bool from_q, double* dots) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t s = 0; s + 2 < n; ++s) {
    const int64_t j = from_q ? n - 3 - s : s;
    if (beta[j] == 0) continue;
    const double* u = a + j * n;
    for (int64_t c = warp; c < count; c += warps) {  // warp-uniform: the shuffles run converged
      double part = 0;
      for (int64_t i = j + 1 + lane; i < n; i += 32) part += u[i] * x[c * n + i];
      part = warp_reduce(part, SumOp());
      if (lane == 0) dots[c] = beta[j] * part;
    }
    __syncthreads();
    const int64_t m = n - j - 1;
    for (int64_t idx = threadIdx.x; idx < count * m; idx += blockDim.x) {
      const int64_t c = idx / m, i = j + 1 + idx % m;
      x[c * n + i] -= dots[c] * u[i];
    }
    __syncthreads();
  }
}

// In place: a (full symmetric n×n) → reflectors in the upper rows; d, e, beta as on the CPU.
// p, w: shared vectors of n. Six barriers per step.
__device__ __forceinline__ void topk_tridiagonalize(double* a, int64_t n, double* d, double* e, double* beta,
                                                    double* p, double* w, double* scratch) {
  const int lane = threadIdx.x & 31;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) beta[j] = 0;
  for (int64_t j = 0; j + 2 < n; ++j) {
    double* u = a + j * n;  // u_j(i), i ≥ j+1, replaces row j right of the diagonal
    if (threadIdx.x < 32) {  // warp 0 builds the reflector
      double part = 0;
      for (int64_t i = j + 2 + lane; i < n; i += 32) part += u[i] * u[i];
      const double s2 = warp_reduce(part, SumOp());
      if (lane == 0) {
        const double x0 = u[j + 1];
        d[j] = a[j * n + j];
        if (s2 == 0) {  // H_j = I
          e[j] = x0;
          beta[j] = 0;
        } else {
          const double alpha = -copysign(sqrt(x0 * x0 + s2), x0);
          u[j + 1] = x0 - alpha;
          e[j] = alpha;
          beta[j] = 2.0 / (u[j + 1] * u[j + 1] + s2);
        }
      }
    }
    __syncthreads();
    const double bj = beta[j];  // written once per step, so no later step can overwrite it early
    if (bj == 0) continue;
    // p = A u over the trailing block (full storage: row i holds the whole row), and uᵀp.
    double part = 0;
    for (int64_t i = j + 1 + threadIdx.x; i < n; i += blockDim.x) {
      const double* row = a + i * n;
      double t = 0;
      for (int64_t k = j + 1; k < n; ++k) t += row[k] * u[k];
      p[i] = t;
      part += u[i] * t;
    }
    const double half = 0.5 * bj * bj * block_reduce(part, SumOp(), 0.0, scratch);
    for (int64_t i = j + 1 + threadIdx.x; i < n; i += blockDim.x) w[i] = bj * p[i] - half * u[i];
    __syncthreads();
    // A ← A − u wᵀ − w uᵀ on the trailing block (both triangles).
    const int64_t m = n - j - 1;
    for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) {
      const int64_t i = j + 1 + idx / m, k = j + 1 + idx % m;
      a[i * n + k] -= u[i] * w[k] + w[i] * u[k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (n >= 2) {
      d[n - 2] = a[(n - 2) * n + n - 2];
      e[n - 2] = a[(n - 2) * n + n - 1];
    }
    d[n - 1] = a[(n - 1) * n + n - 1];
  }
  __syncthreads();
}

template <typename T>
struct TopkDecomposeArgs {
  const T* gram;  // [B, n, n]
  int64_t n, kk, nl;
  double* householder;
  double* tridiagonal;
  double* basis;        // [B, n, kk]
  double* eigenvalues;  // [B, nl]
  double* work;         // [B, topk_work_doubles]
  int* nonfinite;       // set to 1 when a Gram holds NaN/Inf
};

template <typename T>
__global__ void __launch_bounds__(kTopkThreads, 1) topk_decompose(TopkDecomposeArgs<T> args) {
  namespace tri = ::mhgd_fast::tridiagonal;
  MHGD_DYNAMIC_SHARED(double, shared);
  const int64_t n = args.n, kk = args.kk;
  double* p = shared;
  double* w = shared + n;
  double* scratch = shared + 2 * n;
  double* dots = scratch + 32;
  const TopkSample s = topk_sample(args.householder, args.tridiagonal, args.work, n, kk);
  const T* g = args.gram + static_cast<int64_t>(blockIdx.x) * n * n;
  // The diagonal holds Σ x² over a row of X: any NaN/Inf of fm shows there.
  int bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = static_cast<double>(g[i * n + i]);
    bad |= !(v - v == 0.0);  // NaN for ±Inf and NaN
  }
  if (block_reduce(bad, MaxOp(), 0, reinterpret_cast<int*>(scratch)) != 0) {
    if (threadIdx.x == 0) *args.nonfinite = 1;
    return;
  }
  for (int64_t i = threadIdx.x; i < n * n; i += blockDim.x) s.a[i] = static_cast<double>(g[i]);
  __syncthreads();
  double* d = s.d;
  double* e = s.d + n;
  double* beta = s.d + 2 * n;
  topk_tridiagonalize(s.a, n, d, e, beta, p, w, scratch);
  // e² in w; each of the nl wanted eigenvalues bisected by its own thread.
  for (int64_t i = threadIdx.x; i + 1 < n; i += blockDim.x) w[i] = e[i] * e[i];
  __syncthreads();
  const tri::Bounds bounds = tri::gershgorin(d, e, n);
  double* lam = args.eigenvalues + static_cast<int64_t>(blockIdx.x) * args.nl;
  if (threadIdx.x < args.nl) tri::bisect_descending(d, w, n, bounds, threadIdx.x, 1, lam + threadIdx.x);
  __syncthreads();
  double* z = s.work + tri::kLuDoubles * n;  // [kk][n], after one LU's scratch
  if (threadIdx.x == 0) tri::cluster_vectors(d, e, n, bounds.norm, lam, 0, kk, z, s.work);
  __syncthreads();
  topk_apply_q(s.a, beta, n, z, kk, true, dots);
  double* basis = args.basis + static_cast<int64_t>(blockIdx.x) * n * kk;
  for (int64_t idx = threadIdx.x; idx < n * kk; idx += blockDim.x) basis[idx] = z[(idx % kk) * n + idx / kk];
}

struct TopkSolveArgs {
  const double* householder;
  const double* tridiagonal;
  const double* e;            // [B, n, kk] valid top-kk eigenvectors (zero columns: invalid)
  const double* eigenvalues;  // [B, nl]
  const double* rhs;          // [B, n, kk]
  const double* thresh;       // [B] eps·λ_max
  const double* null_floor;   // [B]
  const double* floor2;       // [B] (eps·σ_max)², or null on the XᵀX route
  int64_t n, kk, nl;
  double* y;           // [B, n, kk], zero on entry
  bool* exact;         // [B], false on entry
  double* work;        // [B, topk_work_doubles]
};

// Columns are solved together: Qᵀ on all of them, one thread per column for its tridiagonal solve,
// Q back, then every projection's dot product at once.
__global__ void __launch_bounds__(kTopkThreads, 1) topk_complement_solve(TopkSolveArgs args) {
  namespace tri = ::mhgd_fast::tridiagonal;
  MHGD_DYNAMIC_SHARED(double, shared);
  __shared__ long long plan;
  __shared__ double dropped_lam[kTopkMaxDropped];
  __shared__ unsigned char flags[2 * kTopkMaxK];
  const int64_t b = blockIdx.x, n = args.n, kk = args.kk;
  double* e2 = shared;
  double* dots = shared + 2 * n + 32;  // [kk][kk + dropped] and [kk][dropped]
  TopkSample s = topk_sample(const_cast<double*>(args.householder), const_cast<double*>(args.tridiagonal), args.work,
                             n, kk);
  const double* d = s.d;
  const double* off = s.d + n;
  const double* beta = s.d + 2 * n;
  const double* eb = args.e + b * n * kk;
  const double* rb = args.rhs + b * n * kk;
  const double* lam = args.eigenvalues + b * args.nl;
  const double tb = args.thresh[b];
  double* z = s.work + tri::kLuDoubles * n * kk;  // [kk + dropped][n]: top kk (T basis), dropped (G basis)
  double* x = z + (kk + kTopkMaxDropped) * n;  // [kk][n] solve columns
  if (threadIdx.x == 0) {
    plan = tri::complement_plan(eb, rb, lam, d, off, n, kk, tb, args.null_floor[b],
                                args.floor2 != nullptr ? args.floor2[b] : -1.0, e2, flags, flags + kk, dropped_lam);
  }
  __syncthreads();
  const int64_t dropped = plan;
  if (dropped < 0) {
    if (threadIdx.x == 0) args.exact[b] = true;
    return;
  }
  const unsigned char* valid = flags;
  const unsigned char* active = flags + kk;
  const tri::Bounds bounds = tri::gershgorin(d, off, n);
  if (dropped > 0) {
    for (int64_t idx = threadIdx.x; idx < n * kk; idx += blockDim.x) z[(idx % kk) * n + idx / kk] = eb[idx];
    __syncthreads();
    topk_apply_q(s.a, beta, n, z, kk, false, dots);
    if (threadIdx.x == 0) {
      double values[kTopkMaxK + kTopkMaxDropped];
      for (int64_t i = 0; i < kk; ++i) values[i] = lam[i];
      for (int64_t t = 0; t < dropped; ++t) values[kk + t] = dropped_lam[t];
      tri::cluster_vectors(d, off, n, bounds.norm, values, kk, dropped, z, s.work);
    }
    __syncthreads();
    topk_apply_q(s.a, beta, n, z + kk * n, dropped, true, dots);
  }
  // (T − λ_j I) x_j = −Qᵀ rhs_j, so x_j = Qᵀ y_j up to the near-null directions removed below.
  for (int64_t idx = threadIdx.x; idx < n * kk; idx += blockDim.x) x[(idx % kk) * n + idx / kk] = -rb[idx];
  __syncthreads();
  topk_apply_q(s.a, beta, n, x, kk, false, dots);
  if (threadIdx.x < kk && active[threadIdx.x]) {
    const int64_t j = threadIdx.x;
    const tri::ShiftedLU lu = tri::lu_view(s.work + tri::kLuDoubles * n * j, n);
    tri::shifted_lu(d, off, n, lam[j], tri::lu_tiny(bounds.norm), lu);
    tri::shifted_solve(n, lu, x + j * n);
  }
  __syncthreads();
  topk_apply_q(s.a, beta, n, x, kk, true, dots);
  // dots[j][c]: E_c · x_j (c < kk) and u_t · x_j (c = kk + t); along[j][t] = u_t · rhs_j.
  const int64_t width = kk + dropped;
  double* along = dots + kk * width;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t pair = warp; pair < kk * (width + dropped); pair += warps) {  // warp-uniform
    const int64_t j = pair / (width + dropped), c = pair % (width + dropped);
    double part = 0;
    for (int64_t r = lane; r < n; r += 32) {
      if (c < kk) {
        part += eb[r * kk + c] * x[j * n + r];
      } else if (c < width) {
        part += z[(c) * n + r] * x[j * n + r];
      } else {
        part += z[(c - dropped) * n + r] * rb[r * kk + j];
      }
    }
    part = warp_reduce(part, SumOp());
    if (lane == 0) {
      if (c < width) {
        dots[j * width + c] = part;
      } else {
        along[j * dropped + (c - width)] = part;
      }
    }
  }
  __syncthreads();
  const bool push_through = args.floor2 != nullptr;
  double* yb = args.y + b * n * kk;
  for (int64_t idx = threadIdx.x; idx < n * kk; idx += blockDim.x) {
    const int64_t r = idx / kk, j = idx % kk;
    if (!active[j]) continue;
    const int64_t coupled = tri::coupled_pairs(dropped_lam, dropped, lam[j], tb);
    yb[idx] = tri::complement_entry(x[j * n + r], eb + r * kk, valid, dots + j * width, kk, z + kk * n + r, n,
                                    dots + j * width + kk, along + j * dropped, dropped_lam, coupled, push_through,
                                    push_through ? args.floor2[b] : 0.0);
  }
}

}  // namespace cuda_kernels
}  // namespace mhgd_fast
