// mhgd_fast::topk_singular_vectors on the CPU (docs/method.md §3): the batched GEMMs through ATen
// (topk_singular_vectors_host.h), the per-sample eigen-work here, one sample per task spread over
// the intra-op threads, each sample's matrices kept in that core's cache:
//   forward:  Householder tridiagonalisation of the float64 Gram, the top k+1 eigenvalues by
//             bisection (householder.h, bisection_lanes.h through the CPU kernel table,
//             kernel_table.h) and the top k eigenvectors by inverse iteration on T
//             (tridiagonal.h), mapped back through the reflectors.
//   backward: per column, Qᵀ rhs, one pivoted tridiagonal solve at the shift λ_j, Q back, and the
//             complement correction (tridiagonal.h's complement_entry, as on CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../mhgd_fast.h"
#include "../topk_singular_vectors_host.h"
#include "../tridiagonal.h"
#include "kernel_table.h"

namespace mhgd_fast {
namespace {

using at::Tensor;
namespace tri = tridiagonal;

// The top eigenvalues first..first+m-1 of T, eight at a time (the kernel table's bisect_lanes).
void bisect_top(const cpu::KernelTable& kt, const double* d, const double* e2, int64_t n, const tri::Bounds& b,
                int64_t first, int64_t m, double* out) {
  for (int64_t g = 0; g < m; g += 8)
    kt.bisect_lanes(d, e2, n, b, first + g, static_cast<int>(std::min<int64_t>(8, m - g)), out + g);
}

// Scratch of one sample's tridiagonal work (n entries each); lu: a shifted tridiagonal LU
// (tridiagonal.h's lu_view).
struct Scratch {
  std::vector<double> e2, lu, p, w, vecs;
  Scratch(int64_t n, int64_t cols) : e2(n), lu(tri::kLuDoubles * n), p(n), w(n), vecs(n * cols) {}
};

// `a` holds the sample's float64 Gram, whose diagonal the caller has checked for NaN/Inf.
void decompose_sample(double* a, int64_t n, int64_t kk, double* tri_out, double* basis, double* lam, Scratch& s) {
  double* d = tri_out;
  double* e = tri_out + n;
  double* beta = tri_out + 2 * n;
  const cpu::KernelTable& kt = cpu::kernels();
  kt.tridiagonalize(a, n, d, e, beta, s.p.data(), s.w.data());
  for (int64_t i = 0; i + 1 < n; ++i) s.e2[i] = e[i] * e[i];
  const tri::Bounds bounds = tri::gershgorin(d, e, n);
  const int m = static_cast<int>(std::min(n, kk + 1));
  bisect_top(kt, d, s.e2.data(), n, bounds, 0, m, lam);
  tri::cluster_vectors(d, e, n, bounds.norm, lam, 0, kk, s.vecs.data(), s.lu.data());
  kt.apply_q(a, beta, n, s.vecs.data(), kk, true);
  for (int64_t i = 0; i < kk; ++i)
    for (int64_t r = 0; r < n; ++r) basis[r * kk + i] = s.vecs[i * n + r];
}

// Power steps for k = 1 without saved state: enough for λ_2/λ_1 up to ~0.5 (post-ReLU maps sit
// near 0.05–0.1); a slower sample takes the full route.
constexpr int kMaxPowerSteps = 30;

// The smaller Gram G = P Pᵀ (float64 for kk ≥ 2, topk::gram_rows; P = X rows' side: fm's [C, HW]
// on the XᵀX route, its transpose on the XXᵀ route) as three batched GEMMs, G11, G12 and G22 of
// the 2×2 block split (G21 = G12ᵀ):
// a quarter fewer flops than one full product, ~20 % faster measured. Small Grams in one piece.
struct GramBlocks {
  Tensor g11, g12, g22;
  int64_t n, h;  // h = n: one block
};

GramBlocks gram_blocks(const topk::Features& f, int64_t kk) {
  const Tensor rows = topk::gram_rows(f, kk);  // float64 for kk ≥ 2
  const Tensor p = f.c_route ? rows : rows.transpose(1, 2);
  const int64_t n = p.size(1);
  if (n < 32) return {at::bmm(p, p.transpose(1, 2)).contiguous(), Tensor(), Tensor(), n, n};
  const int64_t h = n / 2;
  const Tensor top = p.narrow(1, 0, h), bottom = p.narrow(1, h, n - h);
  return {at::bmm(top, top.transpose(1, 2)).contiguous(), at::bmm(top, bottom.transpose(1, 2)).contiguous(),
          at::bmm(bottom, bottom.transpose(1, 2)).contiguous(), n, h};
}

// Sample b's Gram into a (float64, both triangles); false when its diagonal holds NaN or ±Inf
// (the diagonal holds Σ x² over each row of X, so NaN or ±Inf anywhere in fm shows there, and
// |G_ij| ≤ sqrt(G_ii G_jj) bounds the rest).
template <typename scalar_t>
bool fill_gram(const scalar_t* g11, const scalar_t* g12, const scalar_t* g22, int64_t n, int64_t h, int64_t b,
               double* a) {
  const int64_t m = n - h;
  const scalar_t* b11 = g11 + b * h * h;
  for (int64_t i = 0; i < h; ++i)
    for (int64_t j = 0; j < h; ++j) a[i * n + j] = static_cast<double>(b11[i * h + j]);
  if (m > 0) {
    const scalar_t* b12 = g12 + b * h * m;
    const scalar_t* b22 = g22 + b * m * m;
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < m; ++j) a[i * n + h + j] = a[(h + j) * n + i] = static_cast<double>(b12[i * m + j]);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) a[(h + i) * n + h + j] = static_cast<double>(b22[i * m + j]);
  }
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(a[i * n + i])) return false;
  return true;
}

bool decompose_cpu(const topk::Features& f, Tensor& householder, Tensor& tridiagonal, Tensor& basis, Tensor& lam) {
  const int64_t kk = basis.size(2);
  const GramBlocks g = gram_blocks(f, kk);
  const int64_t batch = basis.size(0), n = g.n, h = g.h, nl = lam.size(1);
  const bool save = householder.defined();
  double* hp = save ? householder.data_ptr<double>() : nullptr;
  double* tp = save ? tridiagonal.data_ptr<double>() : nullptr;
  double* bp = basis.data_ptr<double>();
  double* lp = lam.data_ptr<double>();
  // The residual target of the power steps: float64 results match the exact route to ~1e-12;
  // float32 (and 16-bit) only need |cos| ≥ 0.99999 at relative gaps ≥ 1e-3.
  const double power_tol = f.rows.scalar_type() == at::kDouble ? 1e-13 : 1e-9;
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(g.g11.scalar_type(), "topk_singular_vectors_cpu", [&] {
    const scalar_t* g11 = g.g11.data_ptr<scalar_t>();
    const scalar_t* g12 = h < n ? g.g12.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g22 = h < n ? g.g22.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Scratch s(n, kk);
      std::vector<double> values(kk + 1);
      // Without saved state the factors live in per-thread scratch.
      std::vector<double> local_a(save ? 0 : n * n), local_t(save ? 0 : 3 * n);
      for (int64_t b = begin; b < end && finite.load(std::memory_order_relaxed); ++b) {
        double* a = save ? hp + b * n * n : local_a.data();
        if (!fill_gram(g11, g12, g22, n, h, b, a)) {
          finite = false;
          return;
        }
        if (!save && kk == 1 &&
            cpu::kernels().power_iteration(a, n, power_tol, kMaxPowerSteps, bp + b * n, s.w.data(), &values[0])) {
          for (int64_t i = 0; i < nl; ++i) lp[b * nl + i] = values[0];  // λ_2 is not needed without state
          continue;
        }
        decompose_sample(a, n, kk, save ? tp + b * 3 * n : local_t.data(), bp + b * n * kk, values.data(), s);
        for (int64_t i = 0; i < nl; ++i) lp[b * nl + i] = values[i];
      }
    });
  });
  return finite;
}

// Per sample: y_j = (λ_j I − G)⁺ rhs_j on the complement of the valid top-kk vectors, with the
// reference's dropping rule (topk_singular_vectors_host.h), or the flag for the exact route.
std::tuple<Tensor, Tensor> complement_solve_cpu(const Tensor& householder, const Tensor& tridiagonal,
                                                const Tensor& e, const Tensor& eigenvalues, const Tensor& rhs,
                                                const Tensor& thresh, const Tensor& null_floor,
                                                const Tensor& floor2) {
  const int64_t batch = rhs.size(0), n = rhs.size(1), kk = rhs.size(2), nl = eigenvalues.size(1);
  Tensor y = at::zeros_like(rhs);
  Tensor exact = at::zeros({batch}, rhs.options().dtype(at::kBool));
  const Tensor lam_c = eigenvalues.contiguous(), th = thresh.contiguous(), nf = null_floor.contiguous();
  const Tensor f2 = floor2.defined() ? floor2.contiguous() : Tensor();
  const double* hp = householder.data_ptr<double>();
  const double* tp = tridiagonal.data_ptr<double>();
  const double* ep = e.data_ptr<double>();
  const double* lp = lam_c.data_ptr<double>();
  const double* rp = rhs.data_ptr<double>();
  const double* thp = th.data_ptr<double>();
  const double* nfp = nf.data_ptr<double>();
  const double* f2p = f2.defined() ? f2.data_ptr<double>() : nullptr;
  double* yp = y.data_ptr<double>();
  bool* xp = exact.data_ptr<bool>();
  const cpu::KernelTable& kt = cpu::kernels();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    // vecs: the top kk (T's basis), the dropped pairs, then the kk solve columns.
    Scratch s(n, kk + tri::kMaxDropped + kk);
    std::vector<double> dropped_lam(tri::kMaxDropped), values(kk + tri::kMaxDropped);
    // Per column: its dot products with the top kk, and with the dropped vectors and rhs.
    std::vector<double> dot_e(kk), dot_u(tri::kMaxDropped), along(tri::kMaxDropped);
    std::vector<unsigned char> valid(kk), active(kk);
    for (int64_t b = begin; b < end; ++b) {
      const double* a = hp + b * n * n;
      const double* d = tp + b * 3 * n;
      const double* off = d + n;
      const double* beta = d + 2 * n;
      const double* eb = ep + b * n * kk;
      const double* lam = lp + b * nl;
      const double* rb = rp + b * n * kk;
      const double tb = thp[b];
      const int64_t dropped = tri::complement_plan(eb, rb, lam, d, off, n, kk, tb, nfp[b],
                                                   f2p != nullptr ? f2p[b] : -1.0, s.e2.data(), valid.data(),
                                                   active.data(), dropped_lam.data());
      const bool to_exact = dropped < 0;
      if (to_exact) {
        xp[b] = true;
        continue;
      }
      const tri::Bounds bounds = tri::gershgorin(d, off, n);
      double* z = s.vecs.data();  // [kk + dropped][n]
      if (dropped > 0) {
        for (int64_t c = 0; c < kk; ++c)
          for (int64_t r = 0; r < n; ++r) z[c * n + r] = eb[r * kk + c];
        kt.apply_q(a, beta, n, z, kk, false);  // top kk in T's basis, for the clusters' orthogonality
        std::copy(lam, lam + kk, values.begin());
        std::copy(dropped_lam.begin(), dropped_lam.begin() + dropped, values.begin() + kk);
        tri::cluster_vectors(d, off, n, bounds.norm, values.data(), kk, dropped, z, s.lu.data());
        kt.apply_q(a, beta, n, z + kk * n, dropped, true);
      }
      // (T − λ_j I) x_j = −Qᵀ rhs_j, so x_j = Qᵀ y_j up to the near-null directions removed below;
      // the reflectors go over all columns at once.
      double* xs = z + (kk + tri::kMaxDropped) * n;  // [kk][n]
      for (int64_t j = 0; j < kk; ++j)
        for (int64_t r = 0; r < n; ++r) xs[j * n + r] = -rb[r * kk + j];
      kt.apply_q(a, beta, n, xs, kk, false);
      const tri::ShiftedLU lu = tri::lu_view(s.lu.data(), n);
      for (int64_t j = 0; j < kk; ++j) {
        if (!active[j]) continue;
        tri::shifted_lu(d, off, n, lam[j], tri::lu_tiny(bounds.norm), lu);
        tri::shifted_solve(n, lu, xs + j * n);
      }
      kt.apply_q(a, beta, n, xs, kk, true);
      const double* u = z + kk * n;  // the dropped vectors
      for (int64_t j = 0; j < kk; ++j) {
        if (!active[j]) continue;
        const double* x = xs + j * n;
        const int64_t coupled = tri::coupled_pairs(dropped_lam.data(), dropped, lam[j], tb);
        for (int64_t c = 0; c < kk; ++c) {
          double dot = 0;
          for (int64_t r = 0; r < n; ++r) dot += eb[r * kk + c] * x[r];
          dot_e[c] = dot;
        }
        for (int64_t t = 0; t < coupled; ++t) {
          double dot = 0, on_rhs = 0;
          for (int64_t r = 0; r < n; ++r) {
            dot += u[t * n + r] * x[r];
            on_rhs += u[t * n + r] * rb[r * kk + j];
          }
          dot_u[t] = dot;
          along[t] = on_rhs;
        }
        for (int64_t r = 0; r < n; ++r)
          yp[(b * n + r) * kk + j] =
              tri::complement_entry(x[r], eb + r * kk, valid.data(), dot_e.data(), kk, u + r, n, dot_u.data(),
                                    along.data(), dropped_lam.data(), coupled, f2p != nullptr,
                                    f2p != nullptr ? f2p[b] : 0.0);
      }
    }
  });
  return {y, exact};
}

// [B, C, r]·[B, r, HW] for small r, one sample per task (the kernel table's low_rank_product).
Tensor low_rank_product_cpu(const Tensor& left, const Tensor& right) {
  const int64_t batch = left.size(0), c = left.size(1), r = left.size(2), hw = right.size(2);
  Tensor out = at::empty({batch, c, hw}, left.options());
  AT_DISPATCH_FLOATING_TYPES(left.scalar_type(), "topk_singular_vectors_backward_cpu", [&] {
    const scalar_t* lp = left.data_ptr<scalar_t>();
    const scalar_t* rp = right.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto product = cpu::kernels().typed<scalar_t>().low_rank_product;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) product(lp + b * c * r, rp + b * r * hw, c, r, hw, op + b * c * hw);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_singular_vectors_cpu(const Tensor& fm, int64_t k,
                                                                              double eps, bool save_state) {
  return topk::forward(fm, k, eps, save_state, decompose_cpu);
}

Tensor topk_singular_vectors_backward_cpu(const Tensor& grad, const Tensor& fm, const Tensor& householder,
                                          const Tensor& tridiagonal, const Tensor& basis, const Tensor& eigenvalues,
                                          int64_t k, double eps) {
  return topk::backward(grad, fm, householder.contiguous(), tridiagonal.contiguous(), basis.contiguous(),
                        eigenvalues, k, eps, complement_solve_cpu, low_rank_product_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CPU, m) {
  m.impl("topk_singular_vectors", &topk_singular_vectors_cpu);
  m.impl("topk_singular_vectors_backward", &topk_singular_vectors_backward_cpu);
}

}  // namespace mhgd_fast
