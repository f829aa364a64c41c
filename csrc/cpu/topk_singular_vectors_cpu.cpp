// mhgd_fast::topk_singular_vectors and its backward (MHGD_SPEC.md §3, "Facts for the fast path").
//
// Written with ATen ops only (batched GEMMs, small batched QR/eigh), so the same code serves CPU
// and CUDA tensors. On CUDA the k > 1 route's full eigh still runs one solver call per matrix for
// n > 32 (MHGD_SPEC.md §3); a one-block-per-sample CUDA kernel is what replaces it.
//
// Forward: the smaller Gram G (C×C when HW ≥ C, else HW×HW) by one bmm. For k = 1 (the teacher's
// vector, whose σ_1 dominates post-ReLU maps) the top eigenpair comes from power steps per sample
// on the CPU (6–10 on such maps), then, for samples not yet converged, Chebyshev-filtered
// subspace iteration with Rayleigh–Ritz on a 9-column block (the only route on CUDA); converged
// means ‖G q_1 − θ_1 q_1‖ ≤ tol·θ_1. Samples still unconverged after a bounded number of steps
// take the exact eigh. For k > 1 (and small Grams) the full eigendecomposition of
// G, spread over the threads one sample each, is cheaper than the iteration plus the CG backward
// on flat spectra (measured), and it is kept for the backward.
// Backward: only the top-k pairs plus a solve on their complement. Couplings inside the top k are
// explicit; the rest of the exact derivative is (λ_j I − G) y_j = (I − EEᵀ) b_j on the complement
// of the top-k eigenvectors E: from the saved full basis when there is one, else by conjugate
// gradients (positive definite when λ_j > λ_{k+1}) with converged columns frozen; a sample whose
// Ritz gap λ_j − λ_{k+1} is within eps·λ_max, or whose CG does not converge, is solved from its
// Gram's eigendecomposition. Couplings ≤ eps·λ_max are dropped exactly as the reference does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../mhgd_fast.h"

namespace mhgd_fast {
namespace {

using at::Tensor;

// Guard vectors beyond k: the filter separates λ_k from λ_{k+8} and below.
constexpr int64_t kGuardVectors = 8;
// Grams at most this much larger than the block are decomposed exactly (one eigh is cheaper).
constexpr int64_t kDirectMargin = 8;
// Chebyshev degree per Rayleigh–Ritz step: 4 keeps the dynamic range of the filtered block far
// inside float64 even when σ_1 dominates (post-ReLU maps), and converges in 2–7 steps.
constexpr int64_t kFilterDegree = 4;
constexpr int64_t kMaxRitzSteps = 16;
// Power steps per sample for k = 1 on the CPU: enough for λ_2/λ_1 up to ~0.6 (post-ReLU maps sit
// near 0.05–0.1); slower samples go on to the filtered iteration.
constexpr int64_t kMaxPowerSteps = 40;

// Relative residual targets: float64 results match an exact solver to ~1e-12; float32 (and
// 16-bit, computed in float32) only need |cos| ≥ 0.99999 at relative gaps ≥ 1e-3.
double eig_tolerance(bool tight) { return tight ? 1e-13 : 1e-8; }
double cg_tolerance(bool tight) { return tight ? 1e-13 : 1e-7; }

struct Features {
  Tensor rows;  // fm as [B, C, HW] in the accumulation dtype; X_b = rows_bᵀ
  bool c_route;  // HW ≥ C: the Gram is XᵀX (C×C); otherwise XXᵀ (HW×HW)
};

Features features(const Tensor& fm) {
  TORCH_CHECK(fm.dim() >= 2, "topk_singular_vectors: fm must be [B, C, *spatial], got ", fm.sizes());
  TORCH_CHECK(at::isFloatingType(fm.scalar_type()), "topk_singular_vectors: fm must be floating point");
  const int64_t batch = fm.size(0), c = fm.size(1);
  int64_t hw = 1;
  for (int64_t d = 2; d < fm.dim(); ++d) hw *= fm.size(d);
  return {fm.reshape({batch, c, hw}).to(accumulate_type(fm.scalar_type())), hw >= c};
}

// Full eigendecomposition, descending. torch's batched CPU eigh runs its LAPACK calls one after
// another; here the samples are spread over the intra-op threads instead.
std::tuple<Tensor, Tensor> descending_eigh(const Tensor& a) {
  const int64_t batch = a.size(0);
  if (!a.device().is_cpu() || batch < 2 || at::get_num_threads() < 2) {
    auto [lam, vec] = at::linalg_eigh(a);
    return {lam.flip({-1}), vec.flip({-1})};
  }
  Tensor lam = at::empty({batch, a.size(1)}, a.options());
  Tensor vec = at::empty_like(a);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto [l, v] = at::linalg_eigh(a[b]);
      lam[b].copy_(l.flip({-1}));
      vec[b].copy_(v.flip({-1}));
    }
  });
  return {lam, vec};
}

// Whether the forward keeps the Gram's full eigendecomposition instead of iterating: for k > 1
// the iteration (≈ 30 block products of width k+8 on flat post-ReLU spectra) and the backward's
// CG cost more than one eigh at these sizes, and the full basis makes the backward a few GEMMs.
// Small Grams are decomposed exactly too. The fake kernel (mhgd_fast/_torch_ops.py) mirrors this.
bool keeps_full_basis(int64_t n, int64_t kk) { return kk > 1 || n <= kk + kGuardVectors + kDirectMargin; }

// A fixed, well-spread start block (no global RNG: the op is deterministic).
Tensor start_block(int64_t n, int64_t p, const at::TensorOptions& options) {
  std::vector<double> values(static_cast<size_t>(n * p));
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (auto& v : values) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<double>(state >> 11) / 9007199254740992.0 - 0.5;
  }
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).view({n, p}).to(options);
}

// Scaled Chebyshev recurrence (Zhou & Saad 2007) of degree kFilterDegree: damps the interval
// [0, cut] (G is positive semi-definite) and is 1 at `top`; cut, top: [B, 1, 1], 0 < cut ≤ top.
Tensor chebyshev_filter(const Tensor& g, const Tensor& q, const Tensor& cut, const Tensor& top) {
  const Tensor half = cut / 2;  // both the half-width and the centre of [0, cut]
  Tensor sigma = half / (top - half);
  const Tensor sigma1 = sigma;
  Tensor prev = q;
  Tensor cur = (at::bmm(g, q) - half * q) * (sigma1 / half);
  for (int64_t d = 2; d <= kFilterDegree; ++d) {
    const Tensor sigma_next = 1.0 / (2.0 / sigma1 - sigma);
    Tensor next = (at::bmm(g, cur) - half * cur) * (2.0 * sigma_next / half) - (sigma * sigma_next) * prev;
    prev = cur;
    cur = next;
    sigma = sigma_next;
  }
  return cur;
}

// Top eigenpairs of the float64 Grams g [B, n, n]: (λ [B, min(n, kk+1)], E [B, n, kk]),
// descending. The top kk are converged to the residual tolerance or exact; the (kk+1)-th value is
// a Ritz estimate (≤ λ_{kk+1}) used by the backward's gap test.
std::tuple<Tensor, Tensor> top_eigenpairs(const Tensor& g, int64_t kk, bool tight) {
  const int64_t batch = g.size(0), n = g.size(1);
  const int64_t p = std::min(n, kk + kGuardVectors), nlam = std::min(n, kk + 1);
  const double tol = eig_tolerance(tight);
  Tensor lam = at::zeros({batch, p}, g.options());
  Tensor vec = at::zeros({batch, n, p}, g.options());
  Tensor active = at::arange(batch, g.options().dtype(at::kLong));
  Tensor ga = g;
  Tensor y = at::matmul(g, start_block(n, p, g.options()));
  for (int64_t step = 0; step < kMaxRitzSteps; ++step) {
    Tensor q = std::get<0>(at::linalg_qr(y));
    Tensor z = at::bmm(ga, q);
    auto [theta, s] = descending_eigh(at::bmm(q.transpose(1, 2), z));
    q = at::bmm(q, s);
    z = at::bmm(z, s);
    const Tensor top = theta.narrow(1, 0, 1);
    const Tensor resid = (z.narrow(2, 0, kk) - q.narrow(2, 0, kk) * theta.narrow(1, 0, kk).unsqueeze(1))
                             .norm(2, {1})
                             .amax({1});
    const Tensor done = at::logical_or(resid <= tol * top.squeeze(1), top.squeeze(1) <= 0);
    const Tensor done_idx = done.nonzero().squeeze(1);
    if (done_idx.numel() > 0) {
      const Tensor rows = active.index_select(0, done_idx);
      lam.index_copy_(0, rows, theta.index_select(0, done_idx));
      vec.index_copy_(0, rows, q.index_select(0, done_idx));
    }
    if (done_idx.numel() == active.numel()) {
      active = active.narrow(0, 0, 0);
      break;
    }
    const Tensor keep = at::logical_not(done).nonzero().squeeze(1);
    active = active.index_select(0, keep);
    ga = ga.index_select(0, keep);
    if (step + 1 == kMaxRitzSteps) break;
    q = q.index_select(0, keep);
    theta = theta.index_select(0, keep);
    const Tensor top_kept = theta.narrow(1, 0, 1).unsqueeze(2);
    // A cut at 0 (rank < p) would divide by zero; any small positive cut damps the null space.
    const Tensor cut = at::maximum(theta.narrow(1, p - 1, 1).unsqueeze(2), top_kept * 1e-6);
    y = chebyshev_filter(ga, q, cut, top_kept);
  }
  if (active.numel() > 0) {  // not converged in kMaxRitzSteps: exact route for these samples
    auto [l, v] = descending_eigh(ga);
    lam.index_copy_(0, active, l.narrow(1, 0, p));
    vec.index_copy_(0, active, v.narrow(2, 0, p));
  }
  return {lam.narrow(1, 0, nlam), vec.narrow(2, 0, kk)};
}

// k = 1 on the CPU: power iteration per sample on its Gram (kept in cache), one thread per sample,
// no ATen op per step. Fills lam [B, 2] (θ_1 and the estimate θ_1·ρ of λ_2, ρ the residual's
// contraction rate) and vec [B, n, 1] where ‖G v − θ_1 v‖ ≤ tol·θ_1; returns that mask.
Tensor power_iteration_cpu(const Tensor& gram, Tensor& lam, Tensor& vec, double tol) {
  const int64_t batch = gram.size(0), n = gram.size(1);
  const Tensor g = gram.contiguous();
  Tensor converged = at::zeros({batch}, g.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "power_iteration_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    double* lp = lam.data_ptr<double>();
    double* vp = vec.data_ptr<double>();
    bool* ok = converged.data_ptr<bool>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> v(n), w(n);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* a = gp + b * n * n;
        double trace = 0;
        for (int64_t i = 0; i < n; ++i) trace += a[i * n + i];
        // Positive start (the Perron vector of a post-ReLU Gram is non-negative), slightly spread.
        double norm = 0;
        for (int64_t i = 0; i < n; ++i) {
          v[i] = 1.0 + 0.25 * std::sin(1.0 + 2.3 * static_cast<double>(i));
          norm += v[i] * v[i];
        }
        for (auto& x : v) x /= std::sqrt(norm);
        double theta = 0, prev_resid = -1, rate = 1;
        for (int64_t step = 0; step < kMaxPowerSteps; ++step) {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* row = a + i * n;
            double sum = 0;
            for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(row[j]) * v[j];
            w[i] = sum;
          }
          theta = 0;
          for (int64_t i = 0; i < n; ++i) theta += v[i] * w[i];
          double resid = 0, wnorm = 0;
          for (int64_t i = 0; i < n; ++i) {
            resid += (w[i] - theta * v[i]) * (w[i] - theta * v[i]);
            wnorm += w[i] * w[i];
          }
          resid = std::sqrt(resid);
          if (trace <= 0 || (theta > 0 && resid <= tol * theta)) {  // trace 0: G = 0 (PSD)
            ok[b] = true;
            break;
          }
          if (wnorm <= 0) break;  // start orthogonal to the range: leave it to the iteration
          if (prev_resid > 0) rate = std::min(1.0, resid / prev_resid);
          prev_resid = resid;
          wnorm = std::sqrt(wnorm);
          for (int64_t i = 0; i < n; ++i) v[i] = w[i] / wnorm;
        }
        if (!ok[b]) continue;
        lp[b * 2] = theta;
        lp[b * 2 + 1] = theta * rate;
        for (int64_t i = 0; i < n; ++i) vp[b * n + i] = v[i];
      }
    });
  });
  return converged;
}

struct RightVectors {
  Tensor v;      // [B, C, kk] float64 unit right singular vectors, zero where σ_i ≤ eps·σ_max
  Tensor e;      // [B, n, kk] the Gram's eigenvectors, masked the same way
  Tensor valid;  // [B, kk] bool
  Tensor scale;  // [B, kk] canonical sign (component sum ≥ 0) times valid
};

RightVectors right_vectors(const Features& f, const Tensor& e, const Tensor& lam, double eps) {
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

int64_t kept_pairs(const Features& f, int64_t k) {
  return std::min(k, std::min(f.rows.size(1), f.rows.size(2)));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_singular_vectors_impl(const Tensor& fm, int64_t k, double eps) {
  TORCH_CHECK(k >= 1, "topk_singular_vectors: k must be >= 1, got ", k);
  const Features f = features(fm);
  const int64_t batch = f.rows.size(0), c = f.rows.size(1), hw = f.rows.size(2);
  const int64_t n = f.c_route ? c : hw, kk = kept_pairs(f, k);
  Tensor out = at::zeros({batch, k, c}, fm.options());
  const auto f64 = fm.options().dtype(at::kDouble);
  const bool full = keeps_full_basis(n, kk);
  if (batch == 0 || kk == 0) {
    return {out, at::zeros({batch, n, n}, f.rows.options()), at::zeros({batch, n, full ? n : kk}, f64),
            at::zeros({batch, full ? n : std::min(n, kk + 1)}, f64)};
  }
  const Tensor gram = f.c_route ? at::bmm(f.rows, f.rows.transpose(1, 2)) : at::bmm(f.rows.transpose(1, 2), f.rows);
  Tensor lam, basis;
  if (full) {  // in the accumulation dtype, as the reference does
    std::tie(lam, basis) = descending_eigh(gram);
    lam = lam.to(at::kDouble);
    basis = basis.to(at::kDouble);
  } else if (gram.device().is_cpu()) {  // kk = 1
    const bool tight = f.rows.scalar_type() == at::kDouble;
    lam = at::zeros({batch, 2}, f64);
    basis = at::zeros({batch, n, 1}, f64);
    const Tensor slow = at::logical_not(power_iteration_cpu(gram, lam, basis, eig_tolerance(tight))).nonzero().squeeze(1);
    if (slow.numel() > 0) {
      auto [l, v] = top_eigenpairs(gram.index_select(0, slow).to(at::kDouble), kk, tight);
      lam.index_copy_(0, slow, l);
      basis.index_copy_(0, slow, v);
    }
  } else {
    std::tie(lam, basis) = top_eigenpairs(gram.to(at::kDouble), kk, f.rows.scalar_type() == at::kDouble);
  }
  const RightVectors rv = right_vectors(f, basis.narrow(2, 0, kk), lam, eps);
  out.narrow(1, 0, kk).copy_((rv.v * rv.scale.unsqueeze(1)).transpose(1, 2));
  return {out, gram, basis.contiguous(), lam.contiguous()};
}

Tensor project_out(const Tensor& basis, const Tensor& t) {
  return t - at::bmm(basis, at::bmm(basis.transpose(1, 2), t));
}

// y_j = Σ_l u_l (u_lᵀ rhs_j) c_jl over the full eigenbasis (l, u) of G, then kept orthogonal to E.
// Complete basis (G = XᵀX; sigma_floor undefined): c_jl = 1/(λ_j − λ_l), couplings with
// |λ_j − λ_l| ≤ eps·λ_max dropped (the reference's rule).
// Push-through (G = XXᵀ, rhs = X r; sigma_floor = eps·σ_max, [B]): the caller forms
// w_j = (r + Xᵀy_j)/λ_j, whose component along v_l is r_l (1 + λ_l c_jl)/λ_j. The reference's value
// is r_l/(λ_j − λ_l) (c_jl = 1/(λ_j − λ_l)), or 0 for a dropped coupling (c_jl = −1/λ_l, which
// cancels r_l), or, for l with σ_l ≤ eps·σ_max (a null-space direction there), r_l/λ_j (c_jl = 0).
// The caller zeroes the whole term when λ_j ≤ eps·λ_max (every coupling beyond the top k is then
// dropped, and so is the reference's null-space block).
Tensor spectral_solve(const Tensor& l, const Tensor& u, const Tensor& lam, const Tensor& rhs, const Tensor& thresh,
                      const Tensor& e, const Tensor& sigma_floor) {
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

// Solves (λ_j I − G) y_j = rhs_j with y_j ⊥ E for every sample and column j (rhs ⊥ E). Samples
// taken by spectral_solve get its dropping rule (sigma_floor: see there). CG keeps every coupling
// beyond the top k, which is what the reference's rule gives when no gap is within eps·λ_max,
// except in the push-through form for directions with σ_l ≤ eps·σ_max: there CG's factor
// λ_j/(λ_j − λ_l) against the reference's 1 differs by λ_l/λ_j ≤ eps² (kk = 1: λ_j = λ_max).
Tensor complement_solve(const Tensor& g, const Tensor& e, const Tensor& lam_all, const Tensor& rhs,
                        const Tensor& thresh, const Tensor& sigma_floor, bool tight) {
  const int64_t kk = e.size(2), n = g.size(1);
  const Tensor lam = lam_all.narrow(1, 0, kk);
  // A gap to λ_{k+1} (Ritz estimate) within eps·λ_max: the reference drops that coupling, CG can't.
  Tensor spectral = at::zeros({g.size(0)}, lam.options().dtype(at::kBool));
  if (lam_all.size(1) > kk) {
    const Tensor gap = lam - lam_all.narrow(1, kk, 1);
    spectral = at::logical_and(gap <= thresh.view({-1, 1}), at::abs(rhs).amax({1}) > 0).any(1);
  }
  Tensor y = at::zeros_like(rhs);
  Tensor r = rhs.clone();
  Tensor dir = r.clone();
  Tensor rr = (r * r).sum(1);
  const double tol = cg_tolerance(tight);
  const Tensor stop = rr * (tol * tol);
  Tensor done = at::logical_or(rr <= stop, spectral.unsqueeze(1));
  const int64_t max_steps = std::min<int64_t>(n, 300) + 10;
  for (int64_t step = 0; step < max_steps && !done.all().item<bool>(); ++step) {
    const Tensor adir = project_out(e, lam.unsqueeze(1) * dir - at::bmm(g, dir));
    const Tensor curv = (dir * adir).sum(1);
    const Tensor broken = at::logical_and(at::logical_not(done), curv <= 0);  // not positive definite
    spectral = at::logical_or(spectral, broken.any(1));
    const Tensor frozen = at::logical_or(done, broken);
    const Tensor alpha = at::where(frozen, 0.0, rr / at::where(curv == 0, 1.0, curv)).unsqueeze(1);
    y = y + alpha * dir;
    r = r - alpha * adir;
    const Tensor rr_next = (r * r).sum(1);
    const Tensor beta = at::where(frozen, 0.0, rr_next / at::where(rr == 0, 1.0, rr)).unsqueeze(1);
    dir = r + beta * dir;
    rr = at::where(frozen, rr, rr_next);
    done = at::logical_or(frozen, rr <= stop);
  }
  spectral = at::logical_or(spectral, at::logical_not(done.all(1)));
  const Tensor idx = spectral.nonzero().squeeze(1);
  if (idx.numel() > 0) {
    auto [l, u] = descending_eigh(g.index_select(0, idx));
    y.index_copy_(0, idx, spectral_solve(l, u, lam.index_select(0, idx), rhs.index_select(0, idx),
                                         thresh.index_select(0, idx), e.index_select(0, idx),
                                         sigma_floor.defined() ? sigma_floor.index_select(0, idx) : Tensor()));
  }
  return y;
}

Tensor topk_singular_vectors_backward_impl(const Tensor& grad, const Tensor& fm, const Tensor& gram,
                                           const Tensor& gram_vectors, const Tensor& eigenvalues, int64_t k,
                                           double eps) {
  const Features f = features(fm);
  const int64_t batch = f.rows.size(0), c = f.rows.size(1), n = gram.size(1);
  const int64_t kk = kept_pairs(f, k);
  const bool full = gram_vectors.size(2) == n;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == batch && grad.size(1) == k && grad.size(2) == c,
              "topk_singular_vectors_backward: grad must be [B, k, C] = [", batch, ", ", k, ", ", c, "], got ",
              grad.sizes());
  if (batch == 0 || kk == 0) return at::zeros_like(fm);
  const bool tight = f.rows.scalar_type() == at::kDouble;
  const Tensor lam = eigenvalues.narrow(1, 0, kk);
  const Tensor thresh = eps * eigenvalues.narrow(1, 0, 1).squeeze(1);  // eps·λ_max, [B]
  const RightVectors rv = right_vectors(f, gram_vectors.narrow(2, 0, kk), eigenvalues, eps);
  // eps·σ_max (as right_vectors computes it) for the push-through form; undefined for XᵀX.
  const Tensor sigma_floor =
      f.c_route ? Tensor() : eps * eigenvalues.narrow(1, 0, 1).squeeze(1).clamp_min(0).sqrt();
  // Solves (λ_j I − G) y_j = rhs_j on the complement of the top-k eigenvectors.
  auto solve = [&](const Tensor& rhs) {
    if (full) return spectral_solve(eigenvalues, gram_vectors, lam, rhs, thresh, rv.e, sigma_floor);
    return complement_solve(gram.to(at::kDouble), rv.e, eigenvalues, rhs, thresh, sigma_floor, tight);
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
    // on the HW×HW Gram with right-hand side X(I − VVᵀ)g. Dropped couplings and the null-space
    // block follow the reference (see spectral_solve): when λ_i ≤ eps·λ_max every term beyond the
    // top k is dropped (λ_l ≤ λ_i for those l), the null-space one r/λ_i included.
    Tensor rhs = at::bmm(f.rows.transpose(1, 2), resid.to(acc)).to(at::kDouble);
    rhs = rhs - at::bmm(rv.e, at::bmm(rv.e.transpose(1, 2), rhs));
    const Tensor y = solve(rhs);
    const Tensor xty = at::bmm(f.rows, y.to(acc)).to(at::kDouble);
    const Tensor beyond = at::logical_and(rv.valid, lam > thresh.view({-1, 1})).to(at::kDouble);
    w = w + (resid + xty) / at::where(rv.valid, lam, 1.0).unsqueeze(1) * beyond.unsqueeze(1);
  }
  // ∂L/∂X = X(W + Wᵀ), W = Σ_i w_i v_iᵀ; in fm's layout (Xᵀ = rows): [V, w] (rowsᵀ[w, V])ᵀ.
  const Tensor left = at::cat({rv.v, w}, 2).to(acc);
  const Tensor right = at::bmm(f.rows.transpose(1, 2), at::cat({w, rv.v}, 2).to(acc));
  return at::bmm(left, right.transpose(1, 2)).view(fm.sizes()).to(fm.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CPU, m) {
  m.impl("topk_singular_vectors", &topk_singular_vectors_impl);
  m.impl("topk_singular_vectors_backward", &topk_singular_vectors_backward_impl);
}

#ifdef WITH_CUDA
// Same ATen code on CUDA tensors: batched GEMMs and batched small eigh (p ≤ 16), no per-matrix
// solver calls except for the per-sample exact fallback.
TORCH_LIBRARY_IMPL(mhgd_fast, CUDA, m) {
  m.impl("topk_singular_vectors", &topk_singular_vectors_impl);
  m.impl("topk_singular_vectors_backward", &topk_singular_vectors_backward_impl);
}
#endif

}  // namespace mhgd_fast
