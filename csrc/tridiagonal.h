// Symmetric tridiagonal eigen-helpers shared by the CPU kernel and the CUDA kernel headers
// (topk_singular_vectors, docs/method.md §3): Gershgorin bounds, the Sturm count, bisection, the
// shifted LU and its scratch view, inverse iteration, the backward's plan and its per-column
// complement correction. Sequential code: on the CPU one thread per sample calls them, on CUDA
// one thread per wanted eigenpair. No torch includes (the host SIMT simulator compiles this file
// too).
//
// T is given by its diagonal d[0..n) and off-diagonal e[0..n-1) (e[i] = T[i][i+1]).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

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

// One pivot of the Sturm sequence (the LDLᵀ of T − x·I): pivot_i = d_i − x − e2_{i−1} / pivot_{i−1}
// (no quotient for i = 0), a pivot smaller than pivmin in size replaced by −pivmin. Each negative
// pivot counts one eigenvalue below x. Every Sturm count (sturm_count, the bisections here and the
// CPU's lane-parallel bisection) takes its steps from here.
MHGD_HD double sturm_pivot(double shifted_diagonal, double pivmin) {
  return dabs(shifted_diagonal) < pivmin ? -pivmin : shifted_diagonal;
}

// Number of eigenvalues of T below x.
MHGD_HD int64_t sturm_count(const double* d, const double* e2, int64_t n, double pivmin, double x) {
  double q = sturm_pivot(d[0] - x, pivmin);
  int64_t below = q < 0;
  for (int64_t i = 1; i < n; ++i) {
    q = sturm_pivot(d[i] - x - e2[i - 1] / q, pivmin);
    below += q < 0;
  }
  return below;
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

// One bisection step: of [lo, hi] keeps the half that holds the eigenvalue of ascending index
// `target`, given `below`, the Sturm count at the midpoint `mid`.
template <typename Count>
MHGD_HD void halve_interval(double& lo, double& hi, double mid, Count below, Count target) {
  if (below > target) {
    hi = mid;
  } else {
    lo = mid;
  }
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
    // sturm_count at every mid[t], the targets interleaved per step of the recurrence.
    double q[kMaxTargets];
    for (int t = 0; t < m; ++t) {
      q[t] = sturm_pivot(d[0] - mid[t], b.pivmin);
      below[t] = q[t] < 0 ? 1 : 0;
    }
    for (int64_t i = 1; i < n; ++i) {
      for (int t = 0; t < m; ++t) {
        q[t] = sturm_pivot(d[i] - mid[t] - e2[i - 1] / q[t], b.pivmin);
        below[t] += q[t] < 0 ? 1 : 0;
      }
    }
    // Ascending index of the wanted value: n - 1 - (first + t).
    for (int t = 0; t < m; ++t) halve_interval(lo[t], hi[t], mid[t], below[t], n - 1 - (first + t));
  }
  for (int t = 0; t < m; ++t) out[t] = 0.5 * (lo[t] + hi[t]);
}

// The factors of a pivoted LU of T − shift·I (LAPACK dlagtf's layout): u0 the diagonal of U,
// u1/u2 its two super-diagonals, l the multipliers, swap[i] whether rows i, i+1 swapped. They live
// in kLuDoubles·n doubles of scratch: u0, u1, u2, l (n doubles each), then n bytes of swap flags.
struct ShiftedLU {
  double* u0;
  double* u1;
  double* u2;
  double* l;
  unsigned char* swap;
};

constexpr int64_t kLuDoubles = 5;

// The factors' view of scratch `lu` (kLuDoubles·n doubles) for a T of order n.
MHGD_HD ShiftedLU lu_view(double* lu, int64_t n) {
  return {lu, lu + n, lu + 2 * n, lu + 3 * n, reinterpret_cast<unsigned char*>(lu + 4 * n)};
}

// LU factorisation with partial pivoting of T − shift·I into f. A pivot below `tiny` is replaced
// by ±tiny (inverse iteration at an exact eigenvalue).
MHGD_HD void shifted_lu(const double* d, const double* e, int64_t n, double shift, double tiny, const ShiftedLU& f) {
  double* u0 = f.u0;
  double* u1 = f.u1;
  double* u2 = f.u2;
  double* l = f.l;
  unsigned char* swap = f.swap;
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
MHGD_HD void shifted_solve(int64_t n, const ShiftedLU& f, double* x) {
  const double* u0 = f.u0;
  const double* u1 = f.u1;
  const double* u2 = f.u2;
  const double* l = f.l;
  const unsigned char* swap = f.swap;
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

// The pivot floor of shifted_lu for a T of norm `norm`.
MHGD_HD double lu_tiny(double norm) { return dmax(kDoubleEps * norm, kSafeMin); }

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
// norm); f: the LU's scratch.
MHGD_HD void inverse_iteration(const double* d, const double* e, int64_t n, double lambda, double norm, int seed,
                               const double* prior, int prior_count, double* x, const ShiftedLU& f) {
  shifted_lu(d, e, n, lambda, lu_tiny(norm), f);
  for (int64_t i = 0; i < n; ++i) x[i] = start_component(i, seed);
  // Three solves that keep something after the orthogonalisation (at most three restarts).
  for (int iter = 0, kept = 0; iter < 6 && kept < 3; ++iter) {
    shifted_solve(n, f, x);
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
// lu: scratch of kLuDoubles·n doubles.
MHGD_HD void cluster_vectors(const double* d, const double* e, int64_t n, double norm, const double* values,
                             int64_t first, int64_t count, double* z, double* lu) {
  const ShiftedLU f = lu_view(lu, n);
  for (int64_t i = first; i < first + count; ++i) {
    int64_t start = i;
    while (start > 0 && same_cluster(values[start - 1], values[i], norm)) --start;
    inverse_iteration(d, e, n, values[i], norm, static_cast<int>(i), z + start * n, static_cast<int>(i - start),
                      z + i * n, f);
  }
}

// Number of eigenvalues of T in [a, b), a < b (Sturm counts).
MHGD_HD int64_t count_in(const double* d, const double* e2, int64_t n, double pivmin, double a, double b) {
  return sturm_count(d, e2, n, pivmin, b) - sturm_count(d, e2, n, pivmin, a);
}

// Pairs beyond the top kk whose coupling the reference drops (|λ_j − λ_l| ≤ eps·λ_max) that the
// fast backward computes; a sample with more takes the exact route.
constexpr int kMaxDropped = 8;

// The backward's plan for one sample (docs/method.md §3's dropping rule), shared by the CPU and CUDA
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

// How many of the dropped pairs (descending values) stay coupled to column j: those within
// thresh of λ_j, a leading run.
MHGD_HD int64_t coupled_pairs(const double* dropped_lam, int64_t dropped, double lam_j, double thresh) {
  int64_t t = 0;
  while (t < dropped && dropped_lam[t] >= lam_j - thresh) ++t;
  return t;
}

// The complement solve's per-column correction (CPU and CUDA), entry r of y_j from x_j (the
// shifted solve mapped back to G's basis) and its dot products computed beforehand: the valid
// top-kk directions projected out, and for each of the `coupled` pairs its component replaced by
// keep_t: 0 (a dropped coupling has no component along u_t), or, on the XXᵀ route
// (push_through) for u_t in range (λ_t > floor2), −(u_tᵀ rhs_j)/λ_t, which cancels that
// direction in w_j = (r + Xᵀy_j)/λ_j.
//   e_row: row r of E [n, kk]; valid[c]; dot_e[c] = E_c·x_j;
//   u_r: entry r of the first dropped vector (the vectors at stride n);
//   dot_u[t] = u_t·x_j, along[t] = u_t·rhs_j, dropped_lam[t] = λ_t.
MHGD_HD double complement_entry(double x_r, const double* e_row, const unsigned char* valid, const double* dot_e,
                                int64_t kk, const double* u_r, int64_t n, const double* dot_u, const double* along,
                                const double* dropped_lam, int64_t coupled, bool push_through, double floor2) {
  double v = x_r;
  for (int64_t c = 0; c < kk; ++c)
    if (valid[c]) v -= dot_e[c] * e_row[c];
  for (int64_t t = 0; t < coupled; ++t) {
    const double keep = (push_through && dropped_lam[t] > floor2) ? -along[t] / dropped_lam[t] : 0.0;
    v += (keep - dot_u[t]) * u_r[t * n];
  }
  return v;
}

}  // namespace tridiagonal
}  // namespace mhgd_fast
