// Host-side skeleton of mhgd_fast::topk_singular_vectors (docs/method.md §3), shared by the CPU
// and CUDA implementations: the batched GEMMs (smaller-side Gram, v = Xᵀu/σ, the gradient's
// rank-2k products) run through ATen; each device supplies the per-sample work:
//
//   decompose(features, householder, tridiagonal, basis, eigenvalues) -> whether the Gram was finite
//     the smaller Gram (a batched GEMM, gram_of or the device's own split; float64 for kk ≥ 2),
//     its Householder tridiagonalisation Gram = Q T Qᵀ (reflectors kept for the backward), the top
//     kk + 1 eigenvalues of T by bisection (exact, repeated values included) and the top kk
//     eigenvectors by inverse iteration on T, mapped back by Q. O(4/3 n³) per sample instead of
//     the ~9 n³ of a full eigendecomposition with vectors. With save_state false (no gradient
//     wanted) householder and tridiagonal are undefined: the device keeps its own scratch, and may
//     answer k = 1 by power iteration (the teacher's vector, whose σ_1 dominates post-ReLU maps).
//   product(left, right): [B, C, 2k]·[B, 2k, HW], the gradient's last (rank-2k) product
//   complement_solve(householder, tridiagonal, basis, eigenvalues, rhs, thresh, null_floor, sigma_floor2)
//     y_j = (λ_j I − G)⁺ rhs_j on the complement of the top kk eigenvectors: one pivoted
//     tridiagonal solve per column in Q's basis. Returns y and a per-sample flag for samples whose
//     exact derivative drops a coupling (a gap within eps·λ_max, or, on the XXᵀ route, a
//     direction below eps·σ_max that is not numerically zero): those are solved here from a full
//     eigendecomposition of their Gram, with the reference's dropping rule.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "mhgd_fast.h"

namespace mhgd_fast {
namespace topk {

using at::Tensor;

struct Features {
  Tensor rows;   // fm as [B, C, HW] in the accumulation dtype; X_b = rows_bᵀ
  bool c_route;  // HW ≥ C: the Gram is XᵀX (C×C); otherwise XXᵀ (HW×HW)
  int64_t n() const { return c_route ? rows.size(1) : rows.size(2); }
};

inline Features features(const Tensor& fm) {
  TORCH_CHECK(fm.dim() >= 2, "topk_singular_vectors: fm must be [B, C, *spatial], got ", fm.sizes());
  TORCH_CHECK(at::isFloatingType(fm.scalar_type()), "topk_singular_vectors: fm must be floating point");
  const int64_t batch = fm.size(0), c = fm.size(1);
  int64_t hw = 1;
  for (int64_t d = 2; d < fm.dim(); ++d) hw *= fm.size(d);
  return {fm.detach().reshape({batch, c, hw}).to(accumulate_type(fm.scalar_type())), hw >= c};
}

// The Gram's operand (rows or its transpose) for kk wanted pairs. With kk ≥ 2 the Gram is formed
// in float64 whatever fm's dtype, as the reference forms it: the eigenvalues compared against eps
// (σ ≤ eps·σ_max) then carry float64's rounding, far below the default eps of every dtype
// (mhgd_fast.reference.default_eps), not float32's (≈ √ε·σ_max on a rank-deficient map, float32's
// default eps itself, so a zero tail was zero or not by chance). With kk = 1 the only decision
// is σ_1 > eps·σ_1, i.e. a nonzero map, whatever the Gram's precision: the Gram keeps the
// accumulation dtype (the teacher's k = 1 forward is Gram-bound; float64 costs 2-7× on the CPU).
inline Tensor gram_rows(const Features& f, int64_t kk) { return kk > 1 ? f.rows.to(at::kDouble) : f.rows; }

inline Tensor gram_of(const Features& f, int64_t kk) {
  const Tensor rows = gram_rows(f, kk);
  return f.c_route ? at::bmm(rows, rows.transpose(1, 2)) : at::bmm(rows.transpose(1, 2), rows);
}

inline int64_t kept_pairs(const Features& f, int64_t k) { return std::min(k, f.n()); }

// Eigenvalues below null_noise·λ_max are numerically zero: for float64 maps the float64 Gram's
// rounding (16·n·ε₆₄, mhgd_fast.reference.null_floor, which the default eps keeps a margin
// above), for float32 and 16-bit maps the same count of float32's ε, the precision of the data.
// The backward sends a sample with such eigenvalues beyond the top kk to its exact route.
inline double null_noise(const Features& f) {
  const double unit = f.rows.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                          : std::numeric_limits<float>::epsilon();
  return 16.0 * unit * static_cast<double>(f.n());
}

struct RightVectors {
  Tensor v;      // [B, C, kk] float64 unit right singular vectors, zero where σ_i ≤ eps·σ_max
  Tensor e;      // [B, n, kk] the Gram's eigenvectors, masked the same way
  Tensor valid;  // [B, kk] bool
  Tensor scale;  // [B, kk] canonical sign (component sum ≥ 0) times valid
};

inline RightVectors right_vectors(const Features& f, const Tensor& e, const Tensor& lam, double eps) {
  const int64_t kk = e.size(2);
  const Tensor sigma = lam.narrow(1, 0, kk).clamp_min(0).sqrt();
  const Tensor valid = sigma > eps * sigma.narrow(1, 0, 1);
  const Tensor mask = valid.unsqueeze(1).to(at::kDouble);
  Tensor v;
  if (f.c_route) {
    v = e * mask;
  } else {  // v = Xᵀu/σ with Xᵀ = rows
    const Tensor xtu = at::bmm(f.rows, e.to(f.rows.scalar_type())).to(at::kDouble);
    v = xtu / at::where(valid, sigma, 1.0).unsqueeze(1) * mask;
  }
  const Tensor sign = at::where(v.sum(1) < 0, -1.0, 1.0);
  return {v, e * mask, valid, sign * valid.to(at::kDouble)};
}

template <typename Decompose>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(const Tensor& fm, int64_t k, double eps, bool save_state,
                                                           Decompose decompose) {
  TORCH_CHECK(k >= 1, "topk_singular_vectors: k must be >= 1, got ", k);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Features f = features(fm);
  const int64_t batch = f.rows.size(0), c = f.rows.size(1), n = f.n(), kk = kept_pairs(f, k);
  const auto f64 = fm.options().dtype(at::kDouble);
  Tensor out = at::zeros({batch, k, c}, fm.options());
  // Every entry is written by decompose (the Gram is copied in whole before the reduction).
  Tensor householder = save_state ? at::empty({batch, n, n}, f64) : Tensor();
  Tensor tridiagonal = save_state ? at::zeros({batch, 3, n}, f64) : Tensor();
  Tensor basis = at::zeros({batch, n, kk}, f64);
  Tensor lam = at::zeros({batch, std::min(n, kk + 1)}, f64);
  if (batch == 0 || kk == 0) {
    if (householder.defined()) householder.zero_();
  } else {
    // NaN/Inf anywhere in fm reach the Gram (its diagonal holds every squared entry); the device
    // kernel reports them instead of a separate pass over fm.
    const bool finite = decompose(f, householder, tridiagonal, basis, lam);
    TORCH_CHECK_VALUE(finite, "fm contains NaN or Inf");
    const RightVectors rv = right_vectors(f, basis, lam, eps);
    out.narrow(1, 0, kk).copy_((rv.v * rv.scale.unsqueeze(1)).transpose(1, 2));
  }
  if (!save_state) {
    auto none = [&] { return at::empty({0}, f64); };  // four tensors: outputs must not alias
    return {out, none(), none(), none(), none()};
  }
  return {out, householder, tridiagonal, basis, lam};
}

inline Tensor project_out(const Tensor& basis, const Tensor& t) {
  return t - at::bmm(basis, at::bmm(basis.transpose(1, 2), t));
}

// The exact route: y_j = Σ_l u_l (u_lᵀ rhs_j) c_jl over the full eigenbasis (l, u) of G, then
// kept orthogonal to E. Complete basis (G = XᵀX; sigma_floor undefined): c_jl = 1/(λ_j − λ_l),
// couplings with |λ_j − λ_l| ≤ eps·λ_max dropped (the reference's rule).
// Push-through (G = XXᵀ, rhs = X r; sigma_floor = eps·σ_max, [B]): the caller forms
// w_j = (r + Xᵀy_j)/λ_j, whose component along v_l is r_l (1 + λ_l c_jl)/λ_j. The reference's value
// is r_l/(λ_j − λ_l) (c_jl = 1/(λ_j − λ_l)), or 0 for a dropped coupling (c_jl = −1/λ_l, which
// cancels r_l), or, for l with σ_l ≤ eps·σ_max (a null-space direction there), r_l/λ_j (c_jl = 0).
inline Tensor spectral_solve(const Tensor& gram, const Tensor& lam, const Tensor& rhs, const Tensor& thresh,
                             const Tensor& e, const Tensor& sigma_floor) {
  auto [l, u] = at::linalg_eigh(gram.to(at::kDouble));
  const Tensor diff = lam.unsqueeze(1) - l.unsqueeze(2);  // [B, n, kk]
  const Tensor kept = at::abs(diff) > thresh.view({-1, 1, 1});
  const Tensor inverse = 1.0 / at::where(diff == 0, 1.0, diff);
  Tensor coupling;
  if (!sigma_floor.defined()) {
    coupling = at::where(kept, inverse, 0.0);
  } else {
    const Tensor in_range = (l.clamp_min(0).sqrt() > sigma_floor.view({-1, 1})).unsqueeze(2);  // [B, n, 1]
    const Tensor cancel = -1.0 / at::where(in_range, l.unsqueeze(2), 1.0);
    coupling = at::where(in_range, at::where(kept, inverse, cancel), 0.0);
  }
  return project_out(e, at::bmm(u, at::bmm(u.transpose(1, 2), rhs) * coupling));
}

// The backward's last product on devices without a kernel of their own for it.
inline Tensor batched_product(const Tensor& left, const Tensor& right) { return at::bmm(left, right); }

template <typename ComplementSolve, typename Product>
Tensor backward(const Tensor& grad, const Tensor& fm, const Tensor& householder, const Tensor& tridiagonal,
                const Tensor& basis, const Tensor& eigenvalues, int64_t k, double eps,
                ComplementSolve complement_solve, Product product) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Features f = features(fm);
  const int64_t batch = f.rows.size(0), c = f.rows.size(1), n = f.n();
  const int64_t kk = kept_pairs(f, k);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == batch && grad.size(1) == k && grad.size(2) == c,
              "topk_singular_vectors_backward: grad must be [B, k, C] = [", batch, ", ", k, ", ", c, "], got ",
              grad.sizes());
  TORCH_CHECK(householder.dim() == 3, "topk_singular_vectors_backward: no saved state (the forward ran with "
              "save_state=False)");
  TORCH_CHECK(householder.size(0) == batch && householder.size(1) == n && householder.size(2) == n &&
                  tridiagonal.dim() == 3 && tridiagonal.size(0) == batch && tridiagonal.size(1) == 3 &&
                  tridiagonal.size(2) == n && basis.dim() == 3 && basis.size(0) == batch && basis.size(1) == n &&
                  basis.size(2) == kk && eigenvalues.dim() == 2 && eigenvalues.size(0) == batch &&
                  eigenvalues.size(1) == std::min(n, kk + 1) && householder.scalar_type() == at::kDouble &&
                  tridiagonal.scalar_type() == at::kDouble && basis.scalar_type() == at::kDouble &&
                  eigenvalues.scalar_type() == at::kDouble,
              "topk_singular_vectors_backward: saved tensors do not match fm ", fm.sizes(), " and k = ", k);
  if (batch == 0 || kk == 0) return at::zeros_like(fm);
  const Tensor lam = eigenvalues.narrow(1, 0, kk);
  const Tensor lam_max = eigenvalues.narrow(1, 0, 1).squeeze(1);
  const Tensor thresh = eps * lam_max;  // eps·λ_max, [B]
  const RightVectors rv = right_vectors(f, basis, eigenvalues, eps);
  // eps·σ_max (as right_vectors computes it) for the push-through form; undefined for XᵀX.
  const Tensor sigma_floor = f.c_route ? Tensor() : eps * lam_max.clamp_min(0).sqrt();
  auto solve = [&](const Tensor& rhs) {
    const Tensor floor2 = f.c_route ? Tensor() : sigma_floor * sigma_floor;
    auto [y, exact] = complement_solve(householder, tridiagonal, rv.e, eigenvalues, rhs.contiguous(), thresh,
                                       null_noise(f) * lam_max, floor2);
    const Tensor idx = exact.nonzero().squeeze(1);
    if (idx.numel() > 0) {
      const Tensor gram = gram_of({f.rows.index_select(0, idx), f.c_route}, kk);
      y.index_copy_(0, idx, spectral_solve(gram, lam.index_select(0, idx), rhs.index_select(0, idx),
                                           thresh.index_select(0, idx), rv.e.index_select(0, idx),
                                           sigma_floor.defined() ? sigma_floor.index_select(0, idx) : Tensor()));
    }
    return y;
  };
  const Tensor vmask = rv.valid.to(at::kDouble);
  // Gradient w.r.t. the unsigned vectors (sign and mask are constants).
  const Tensor g = grad.narrow(1, 0, kk).transpose(1, 2).to(at::kDouble) * rv.scale.unsqueeze(1);
  // Inside the top k: w_i += Σ_j v_j (v_jᵀ g_i)/(λ_i − λ_j), |λ_i − λ_j| ≤ eps·λ_max dropped.
  const Tensor diff = lam.unsqueeze(1) - lam.unsqueeze(2);  // [B, j, i] = λ_i − λ_j
  const Tensor pair = at::logical_and(at::abs(diff) > thresh.view({-1, 1, 1}),
                                      (vmask.unsqueeze(2) * vmask.unsqueeze(1)) > 0);
  const Tensor coupling = at::where(pair, 1.0 / at::where(diff == 0, 1.0, diff), 0.0);
  const Tensor proj = at::bmm(rv.v.transpose(1, 2), g);
  Tensor w = at::bmm(rv.v, coupling * proj);
  const Tensor resid = g - at::bmm(rv.v, proj);  // (I − VVᵀ) g
  const auto acc = f.rows.scalar_type();
  if (f.c_route) {
    w = w + solve(resid);
  } else {
    // Push-through: (λI − XᵀX)⁺ = (1/λ)[I + Xᵀ(λI − XXᵀ)⁺X] on the complement, so the solve runs
    // on the HW×HW Gram with right-hand side X(I − VVᵀ)g. When λ_i ≤ eps·λ_max every term beyond
    // the top k is dropped (λ_l ≤ λ_i for those l), the null-space one r/λ_i included.
    Tensor rhs = at::bmm(resid.transpose(1, 2).to(acc), f.rows).transpose(1, 2).to(at::kDouble);
    rhs = project_out(rv.e, rhs);
    const Tensor y = solve(rhs);
    const Tensor xty = at::bmm(f.rows, y.to(acc)).to(at::kDouble);
    const Tensor beyond = at::logical_and(rv.valid, lam > thresh.view({-1, 1})).to(at::kDouble);
    w = w + (resid + xty) / at::where(rv.valid, lam, 1.0).unsqueeze(1) * beyond.unsqueeze(1);
  }
  // ∂L/∂X = X(W + Wᵀ), W = Σ_i w_i v_iᵀ; in fm's layout (Xᵀ = rows): [V, w] (rowsᵀ[w, V])ᵀ.
  // (rowsᵀ as the right operand keeps the GEMMs in their fast layouts.)
  const Tensor left = at::cat({rv.v, w}, 2).to(acc);
  const Tensor right_t = at::bmm(at::cat({w, rv.v}, 2).transpose(1, 2).to(acc), f.rows);
  return product(left.contiguous(), right_t.contiguous()).view(fm.sizes()).to(fm.scalar_type());
}

}  // namespace topk
}  // namespace mhgd_fast
