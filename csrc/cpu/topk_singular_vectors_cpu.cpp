// mhgd_fast::topk_singular_vectors on the CPU (MHGD_SPEC.md §3): the batched GEMMs through ATen
// (topk_singular_vectors_host.h), the per-sample eigen-work here, one sample per task spread over
// the intra-op threads, each sample's matrices kept in that core's cache:
//   forward:  Householder tridiagonalisation of the float64 Gram (householder_impl.h), the top
//             k+1 eigenvalues by bisection and the top k eigenvectors by inverse iteration on T
//             (tridiagonal.h), mapped back through the reflectors.
//   backward: per column, Qᵀ rhs, one pivoted tridiagonal solve at the shift λ_j, Q back, and the
//             top-k directions projected out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "../mhgd_fast.h"
#include "../topk_singular_vectors_host.h"
#include "../tridiagonal.h"

// householder_impl.h twice: for AVX2+FMA (chosen at run time) and for the portable baseline.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define MHGD_HOUSEHOLDER_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mhgd_fast::cpu::householder_avx2 {
#include "householder_impl.h"
}  // namespace mhgd_fast::cpu::householder_avx2
#pragma GCC pop_options
#endif
namespace mhgd_fast::cpu::householder_generic {
#include "householder_impl.h"
}  // namespace mhgd_fast::cpu::householder_generic

namespace mhgd_fast {
namespace {

using at::Tensor;
namespace tri = tridiagonal;

// MHGD_FAST_CPU_CAPABILITY=generic forces the portable path (as for graph_kl).
bool use_avx2() {
#ifdef MHGD_HOUSEHOLDER_AVX2
  static const bool avx2 = [] {
    const char* forced = std::getenv("MHGD_FAST_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

void tridiagonalize(double* a, int64_t n, double* d, double* e, double* beta, double* p, double* w) {
#ifdef MHGD_HOUSEHOLDER_AVX2
  if (use_avx2()) return cpu::householder_avx2::tridiagonalize(a, n, d, e, beta, p, w);
#endif
  cpu::householder_generic::tridiagonalize(a, n, d, e, beta, p, w);
}

void apply_q(const double* a, const double* beta, int64_t n, double* x, int64_t count, bool from_q) {
#ifdef MHGD_HOUSEHOLDER_AVX2
  if (use_avx2()) return cpu::householder_avx2::apply_q(a, beta, n, x, count, from_q);
#endif
  cpu::householder_generic::apply_q(a, beta, n, x, count, from_q);
}

// Scratch of one sample's tridiagonal work (n entries each).
struct Scratch {
  std::vector<double> e2, u0, u1, u2, l, p, w, vecs;
  std::vector<unsigned char> swap;
  Scratch(int64_t n, int64_t cols)
      : e2(n), u0(n), u1(n), u2(n), l(n), p(n), w(n), vecs(n * cols), swap(n) {}
};

template <typename scalar_t>
void decompose_sample(const scalar_t* gram, int64_t n, int64_t kk, double* a, double* tri_out, double* basis,
                      double* lam, Scratch& s) {
  for (int64_t i = 0; i < n * n; ++i) a[i] = static_cast<double>(gram[i]);
  double* d = tri_out;
  double* e = tri_out + n;
  double* beta = tri_out + 2 * n;
  tridiagonalize(a, n, d, e, beta, s.p.data(), s.w.data());
  for (int64_t i = 0; i + 1 < n; ++i) s.e2[i] = e[i] * e[i];
  const tri::Bounds bounds = tri::gershgorin(d, e, n);
  const int m = static_cast<int>(std::min(n, kk + 1));
  tri::bisect_descending(d, s.e2.data(), n, bounds, 0, m, lam);
  for (int64_t i = 0; i < kk; ++i) {
    // Earlier vectors of the same cluster: a contiguous run just before i (values descend).
    int64_t first = i;
    while (first > 0 && tri::same_cluster(lam[first - 1], lam[i], bounds.norm)) --first;
    tri::inverse_iteration(d, e, n, lam[i], bounds.norm, static_cast<int>(i), s.vecs.data() + first * n,
                           static_cast<int>(i - first), s.vecs.data() + i * n, s.u0.data(), s.u1.data(),
                           s.u2.data(), s.l.data(), s.swap.data());
  }
  apply_q(a, beta, n, s.vecs.data(), kk, true);
  for (int64_t i = 0; i < kk; ++i)
    for (int64_t r = 0; r < n; ++r) basis[r * kk + i] = s.vecs[i * n + r];
}

void decompose_cpu(const Tensor& gram, Tensor& householder, Tensor& tridiagonal, Tensor& basis, Tensor& lam) {
  const int64_t batch = gram.size(0), n = gram.size(1), kk = basis.size(2), nl = lam.size(1);
  double* hp = householder.data_ptr<double>();
  double* tp = tridiagonal.data_ptr<double>();
  double* bp = basis.data_ptr<double>();
  double* lp = lam.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "topk_singular_vectors_cpu", [&] {
    const scalar_t* gp = gram.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Scratch s(n, kk);
      std::vector<double> values(kk + 1);
      for (int64_t b = begin; b < end; ++b) {
        decompose_sample(gp + b * n * n, n, kk, hp + b * n * n, tp + b * 3 * n, bp + b * n * kk, values.data(), s);
        for (int64_t i = 0; i < nl; ++i) lp[b * nl + i] = values[i];
      }
    });
  });
}

// Per sample: whether the fast solve reproduces the exact derivative (no coupling beyond the top
// kk is dropped), and if so y = (λ_j I − G)⁺ rhs_j on the complement of the valid top-kk vectors.
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
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    Scratch s(n, 1);
    for (int64_t b = begin; b < end; ++b) {
      const double* a = hp + b * n * n;
      const double* d = tp + b * 3 * n;
      const double* off = d + n;
      const double* beta = d + 2 * n;
      const double* eb = ep + b * n * kk;
      const double* lam = lp + b * nl;
      for (int64_t i = 0; i + 1 < n; ++i) s.e2[i] = off[i] * off[i];
      // The largest eigenvalue left in the solve: λ_{kk+1}, or an invalid (masked) top-kk one.
      std::vector<bool> valid(kk);
      double other = nl > kk ? lam[kk] : -INFINITY;
      for (int64_t j = 0; j < kk; ++j) {
        double nrm = 0;
        for (int64_t r = 0; r < n; ++r) nrm += eb[r * kk + j] * eb[r * kk + j];
        valid[j] = nrm > 0;
        if (!valid[j]) other = std::max(other, lam[j]);
      }
      std::vector<bool> active(kk);
      bool any = false;
      for (int64_t j = 0; j < kk; ++j) {
        bool nonzero = false;
        for (int64_t r = 0; r < n && !nonzero; ++r) nonzero = rp[(b * n + r) * kk + j] != 0;
        active[j] = nonzero;
        any = any || nonzero;
        if (nonzero && (!valid[j] || lam[j] - other <= thp[b])) xp[b] = true;
      }
      if (!any) continue;
      const tri::Bounds bounds = tri::gershgorin(d, off, n);
      if (!xp[b] && f2p != nullptr && f2p[b] > nfp[b] &&
          tri::count_in(d, s.e2.data(), n, bounds.pivmin, nfp[b], f2p[b]) > 0)
        xp[b] = true;  // a small but nonzero direction the reference treats as null space
      if (xp[b]) continue;
      const double tiny = std::max(tri::kDoubleEps * bounds.norm, tri::kSafeMin);
      double* x = s.vecs.data();
      for (int64_t j = 0; j < kk; ++j) {
        if (!active[j]) continue;
        for (int64_t r = 0; r < n; ++r) x[r] = rp[(b * n + r) * kk + j];
        apply_q(a, beta, n, x, 1, false);
        tri::shifted_lu(d, off, n, lam[j], tiny, s.u0.data(), s.u1.data(), s.u2.data(), s.l.data(), s.swap.data());
        tri::shifted_solve(n, s.u0.data(), s.u1.data(), s.u2.data(), s.l.data(), s.swap.data(), x);
        apply_q(a, beta, n, x, 1, true);
        // (T − λ_j I) x = Qᵀ rhs gives −y; the near-null directions of the top kk go with E.
        for (int64_t c = 0; c < kk; ++c) {
          if (!valid[c]) continue;
          double dot = 0;
          for (int64_t r = 0; r < n; ++r) dot += eb[r * kk + c] * x[r];
          for (int64_t r = 0; r < n; ++r) x[r] -= dot * eb[r * kk + c];
        }
        for (int64_t r = 0; r < n; ++r) yp[(b * n + r) * kk + j] = -x[r];
      }
    }
  });
  return {y, exact};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_singular_vectors_cpu(const Tensor& fm, int64_t k,
                                                                              double eps) {
  return topk::forward(fm, k, eps, decompose_cpu);
}

Tensor topk_singular_vectors_backward_cpu(const Tensor& grad, const Tensor& fm, const Tensor& householder,
                                          const Tensor& tridiagonal, const Tensor& basis, const Tensor& eigenvalues,
                                          int64_t k, double eps) {
  return topk::backward(grad, fm, householder.contiguous(), tridiagonal.contiguous(), basis.contiguous(),
                        eigenvalues, k, eps, complement_solve_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CPU, m) {
  m.impl("topk_singular_vectors", &topk_singular_vectors_cpu);
  m.impl("topk_singular_vectors_backward", &topk_singular_vectors_backward_cpu);
}

}  // namespace mhgd_fast
