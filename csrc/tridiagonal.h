// Symmetric tridiagonal eigen-helpers shared by the CPU kernel and the CUDA kernel headers
// (topk_singular_vectors, MHGD_SPEC.md §3). Sequential code: on the CPU one thread per sample
// calls them, on CUDA one thread per wanted eigenpair. No torch includes (the host SIMT simulator
// compiles this file too).
//
// T is given by its diagonal d[0..n) and off-diagonal e[0..n-1) (e[i] = T[i][i+1]).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MHGD_HD __host__ __device__ __forceinline__
#else
#define MHGD_HD inline
#endif

namespace mhgd_fast {
namespace tridiagonal {

constexpr double kDoubleEps = 2.220446049250313e-16;
constexpr double kSafeMin = 2.2250738585072014e-308;
// Eigenpairs bisected together on one thread (k + 1 ≤ 9 for k ≤ 8).
constexpr int kMaxTargets = 9;

MHGD_HD double dabs(double x) { return x < 0 ? -x : x; }
MHGD_HD double dmax(double a, double b) { return a > b ? a : b; }
MHGD_HD double dmin(double a, double b) { return a < b ? a : b; }

// Gershgorin interval [lo, hi] that holds every eigenvalue, the pivot floor of the Sturm counts
// (LAPACK's pivmin: a zero pivot is replaced by -pivmin) and the bisection's absolute tolerance.
struct Bounds {
  double lo, hi, norm, pivmin, tol;
};

// Whether a bisection interval [lo, hi] is still wider than the tolerance at its midpoint.
MHGD_HD bool interval_open(const Bounds& b, double lo, double hi) {
  return hi - lo > b.tol + 2.0 * kDoubleEps * dabs(0.5 * (lo + hi));
}

MHGD_HD Bounds gershgorin(const double* d, const double* e, int64_t n) {
  Bounds b{d[0], d[0], 0.0, 0.0, 0.0};
  double emax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = (i > 0 ? dabs(e[i - 1]) : 0.0) + (i + 1 < n ? dabs(e[i]) : 0.0);
    b.lo = dmin(b.lo, d[i] - r);
    b.hi = dmax(b.hi, d[i] + r);
    if (i + 1 < n) emax = dmax(emax, e[i] * e[i]);
  }
  b.norm = dmax(dabs(b.lo), dabs(b.hi));
  b.pivmin = dmax(kSafeMin, kSafeMin * emax);
  // Widen a little so that rounding in the counts cannot push an eigenvalue outside.
  const double pad = 2.0 * kDoubleEps * b.norm * static_cast<double>(n) + 2.0 * b.pivmin;
  b.lo -= pad;
  b.hi += pad;
  b.tol = 2.0 * kDoubleEps * b.norm + 4.0 * b.pivmin;
  return b;
}

// Descending eigenvalues number first..first+m-1 of T (m ≤ kMaxTargets) by bisection on Sturm
// counts, all m intervals refined in the same sweep over T so that their divisions overlap.
// Exact for repeated eigenvalues: each index gets its own value. e2[i] = e[i]^2.
MHGD_HD void bisect_descending(const double* d, const double* e2, int64_t n, const Bounds& b, int64_t first, int m,
                               double* out) {
  double lo[kMaxTargets], hi[kMaxTargets], mid[kMaxTargets];
  int64_t below[kMaxTargets];
  for (int t = 0; t < m; ++t) {
    lo[t] = b.lo;
    hi[t] = b.hi;
  }
  for (int iter = 0; iter < 128; ++iter) {
    bool open = false;
    for (int t = 0; t < m; ++t) {
      mid[t] = 0.5 * (lo[t] + hi[t]);
      open = open || interval_open(b, lo[t], hi[t]);
    }
    if (!open) break;
    // Number of eigenvalues below mid[t]: negative pivots of the LDLᵀ of T − mid·I.
    double q[kMaxTargets];
    for (int t = 0; t < m; ++t) {
      q[t] = d[0] - mid[t];
      if (dabs(q[t]) < b.pivmin) q[t] = -b.pivmin;
      below[t] = q[t] < 0 ? 1 : 0;
    }
    for (int64_t i = 1; i < n; ++i) {
      for (int t = 0; t < m; ++t) {
        double v = d[i] - mid[t] - e2[i - 1] / q[t];
        if (dabs(v) < b.pivmin) v = -b.pivmin;
        q[t] = v;
        below[t] += v < 0 ? 1 : 0;
      }
    }
    for (int t = 0; t < m; ++t) {
      // Ascending index of the wanted value: n - 1 - (first + t).
      if (below[t] > n - 1 - (first + t)) {
        hi[t] = mid[t];
      } else {
        lo[t] = mid[t];
      }
    }
  }
  for (int t = 0; t < m; ++t) out[t] = 0.5 * (lo[t] + hi[t]);
}

// LU factorisation with partial pivoting of T − shift·I (LAPACK dlagtf's layout): u0 the diagonal
// of U, u1/u2 its two super-diagonals, l the multipliers, swap[i] whether rows i, i+1 swapped.
// A pivot below `tiny` is replaced by ±tiny (inverse iteration at an exact eigenvalue).
MHGD_HD void shifted_lu(const double* d, const double* e, int64_t n, double shift, double tiny, double* u0, double* u1,
                        double* u2, double* l, unsigned char* swap) {
  double diag = d[0] - shift;
  double sup = n > 1 ? e[0] : 0.0;
  for (int64_t i = 0; i + 1 < n; ++i) {
    const double sub = e[i];
    const double next_diag = d[i + 1] - shift;
    const double next_sup = i + 2 < n ? e[i + 1] : 0.0;
    if (dabs(diag) >= dabs(sub)) {
      if (dabs(diag) < tiny) diag = diag < 0 ? -tiny : tiny;
      const double mult = sub / diag;
      u0[i] = diag;
      u1[i] = sup;
      u2[i] = 0.0;
      l[i] = mult;
      swap[i] = 0;
      diag = next_diag - mult * sup;
      sup = next_sup;
    } else {  // |sub| > |diag|: the pivot is sub, floored as in the other branch
      const double mult = diag / sub;
      u0[i] = dabs(sub) < tiny ? (sub < 0 ? -tiny : tiny) : sub;
      u1[i] = next_diag;
      u2[i] = next_sup;
      l[i] = mult;
      swap[i] = 1;
      diag = sup - mult * next_diag;
      sup = -mult * next_sup;
    }
  }
  if (dabs(diag) < tiny) diag = diag < 0 ? -tiny : tiny;
  u0[n - 1] = diag;
  if (n > 1) u1[n - 1] = 0.0;
}

// Solves (T − shift·I) x = b in place (x = b on entry) with the factors of shifted_lu.
MHGD_HD void shifted_solve(int64_t n, const double* u0, const double* u1, const double* u2, const double* l,
                           const unsigned char* swap, double* x) {
  for (int64_t i = 0; i + 1 < n; ++i) {
    if (swap[i]) {
      const double t = x[i];
      x[i] = x[i + 1];
      x[i + 1] = t - l[i] * x[i];
    } else {
      x[i + 1] -= l[i] * x[i];
    }
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    double v = x[i];
    if (i + 1 < n) v -= u1[i] * x[i + 1];
    if (i + 2 < n) v -= u2[i] * x[i + 2];
    x[i] = v / u0[i];
  }
}

// A fixed, well-spread start vector for inverse iteration number `seed` (no RNG: deterministic).
MHGD_HD double start_component(int64_t i, int seed) {
  uint64_t s = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(seed + 1) * 0xBF58476D1CE4E5B9ull;
  s ^= s >> 31;
  s *= 0x94D049BB133111EBull;
  s ^= s >> 29;
  return static_cast<double>(s >> 11) / 9007199254740992.0 - 0.5;
}

// Whether eigenvalues a and b of T belong to one cluster, whose inverse-iteration vectors are
// kept orthogonal to each other (LAPACK dstein's rule: closer than 1e-3·‖T‖).
MHGD_HD bool same_cluster(double a, double b, double norm) { return dabs(a - b) <= 1e-3 * norm; }

// Eigenvector of T for the eigenvalue `lambda` (accurate to rounding) by inverse iteration,
// orthogonalised against the `prior` vectors (stride n) of its cluster. `x` receives it (unit
// norm); u0..swap are scratch of n entries each.
MHGD_HD void inverse_iteration(const double* d, const double* e, int64_t n, double lambda, double norm, int seed,
                               const double* prior, int prior_count, double* x, double* u0, double* u1, double* u2,
                               double* l, unsigned char* swap) {
  const double tiny = dmax(kDoubleEps * norm, kSafeMin);
  shifted_lu(d, e, n, lambda, tiny, u0, u1, u2, l, swap);
  for (int64_t i = 0; i < n; ++i) x[i] = start_component(i, seed);
  // Three solves that keep something after the orthogonalisation (at most three restarts).
  for (int iter = 0, kept = 0; iter < 6 && kept < 3; ++iter) {
    shifted_solve(n, u0, u1, u2, l, swap, x);
    // Twice: when the solve lands almost on the prior vectors (a repeated eigenvalue of a T that
    // splits into blocks, as on a rank-deficient map), one pass leaves a remainder whose rounding
    // along them is not small against it (pairs off by 5e-3 from orthogonal were seen).
    for (int pass = 0; pass < (prior_count > 0 ? 2 : 0); ++pass) {
      for (int p = 0; p < prior_count; ++p) {
        const double* z = prior + static_cast<int64_t>(p) * n;
        double dot = 0;
        for (int64_t i = 0; i < n; ++i) dot += z[i] * x[i];
        for (int64_t i = 0; i < n; ++i) x[i] -= dot * z[i];
      }
    }
    double nrm = 0, big = 0;
    for (int64_t i = 0; i < n; ++i) big = dmax(big, dabs(x[i]));
    if (big == 0) {  // start vector lost entirely to the orthogonalisation: restart elsewhere
      for (int64_t i = 0; i < n; ++i) x[i] = start_component(i, seed + 101 * (iter + 1));
      continue;
    }
    for (int64_t i = 0; i < n; ++i) {
      x[i] /= big;
      nrm += x[i] * x[i];
    }
    nrm = sqrt(nrm);
    for (int64_t i = 0; i < n; ++i) x[i] /= nrm;
    ++kept;
  }
}

// Eigenvectors number first..first+count-1 of T (values[i], descending, for i < first+count) by
// inverse iteration, into z (stride n; vectors before `first` already there). Each is kept
// orthogonal to the earlier vectors of its cluster, a contiguous run since the values descend.
// lu: scratch of 5n doubles.
MHGD_HD void cluster_vectors(const double* d, const double* e, int64_t n, double norm, const double* values,
                             int64_t first, int64_t count, double* z, double* lu) {
  unsigned char* swap = reinterpret_cast<unsigned char*>(lu + 4 * n);
  for (int64_t i = first; i < first + count; ++i) {
    int64_t start = i;
    while (start > 0 && same_cluster(values[start - 1], values[i], norm)) --start;
    inverse_iteration(d, e, n, values[i], norm, static_cast<int>(i), z + start * n, static_cast<int>(i - start),
                      z + i * n, lu, lu + n, lu + 2 * n, lu + 3 * n, swap);
  }
}

// Number of eigenvalues of T in [a, b), a < b (Sturm counts).
MHGD_HD int64_t count_in(const double* d, const double* e2, int64_t n, double pivmin, double a, double b) {
  int64_t below[2] = {0, 0};
  const double x[2] = {a, b};
  for (int t = 0; t < 2; ++t) {
    double q = d[0] - x[t];
    if (dabs(q) < pivmin) q = -pivmin;
    below[t] = q < 0;
    for (int64_t i = 1; i < n; ++i) {
      q = d[i] - x[t] - e2[i - 1] / q;
      if (dabs(q) < pivmin) q = -pivmin;
      below[t] += q < 0;
    }
  }
  return below[1] - below[0];
}

// Pairs beyond the top kk whose coupling the reference drops (|λ_j − λ_l| ≤ eps·λ_max) that the
// fast backward computes; a sample with more takes the exact route.
constexpr int kMaxDropped = 8;

// The backward's plan for one sample (MHGD_SPEC.md §3's dropping rule), shared by the CPU and CUDA
// kernels. e: [n, kk] the valid top-kk eigenvectors (zero columns: invalid); rhs: [n, kk];
// lam: λ_1..λ_min(n,kk+1); d, off: T; thresh = eps·λ_max; floor2 = (eps·σ_max)² on the XXᵀ route,
// else negative; null_floor: eigenvalues below it are rounding noise. Fills valid/active per
// column, the dropped pairs' values (descending) and e2 = off²; returns their number, or −1 when
// the sample must take the exact route (a dropped coupling to an invalid top-kk direction, a
// direction below eps·σ_max that is not numerically zero on the XXᵀ route, a numerical null space
// beyond the top kk, or more than kMaxDropped dropped pairs).
MHGD_HD int64_t complement_plan(const double* e, const double* rhs, const double* lam, const double* d,
                                const double* off, int64_t n, int64_t kk, double thresh, double null_floor,
                                double floor2, double* e2, unsigned char* valid, unsigned char* active,
                                double* dropped_lam) {
  bool any = false;
  double lowest = INFINITY;  // the smallest λ_j with a nonzero right-hand side
  for (int64_t j = 0; j < kk; ++j) {
    double nrm = 0;
    bool nonzero = false;
    for (int64_t r = 0; r < n; ++r) {
      nrm += e[r * kk + j] * e[r * kk + j];
      nonzero = nonzero || rhs[r * kk + j] != 0;
    }
    valid[j] = nrm > 0;
    active[j] = nonzero;
    if (nonzero) {
      any = true;
      lowest = dmin(lowest, lam[j]);
    }
  }
  if (!any) return 0;
  for (int64_t j = 0; j < kk; ++j)
    for (int64_t c = 0; c < kk; ++c)
      if (active[j] && (!valid[j] || (!valid[c] && dabs(lam[j] - lam[c]) <= thresh))) return -1;
  for (int64_t i = 0; i + 1 < n; ++i) e2[i] = off[i] * off[i];
  const Bounds bounds = gershgorin(d, off, n);
  if (floor2 > null_floor && count_in(d, e2, n, bounds.pivmin, null_floor, floor2) > 0) return -1;
  // A numerical null space (eigenvalues below the Gram's rounding floor: a rank-deficient map, dead
  // channels) costs the shifted solves their accuracy (gradients off by up to a few % against the
  // exact derivative, seen on rank-2 float64 maps): such a sample takes the exact route.
  const double beneath = dmin(bounds.lo, null_floor) - dabs(bounds.lo) - 1.0;
  if (n > kk && count_in(d, e2, n, bounds.pivmin, beneath, null_floor) > 0) return -1;
  if (n <= kk) return 0;
  int64_t dropped = count_in(d, e2, n, bounds.pivmin, lowest - thresh, bounds.hi) - kk;
  dropped = dropped < 0 ? 0 : (dropped > n - kk ? n - kk : dropped);
  if (dropped > kMaxDropped) return -1;
  if (dropped > 0) bisect_descending(d, e2, n, bounds, kk, static_cast<int>(dropped), dropped_lam);
  return dropped;
}

}  // namespace tridiagonal
}  // namespace mhgd_fast
