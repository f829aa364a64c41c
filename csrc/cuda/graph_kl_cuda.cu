// CUDA glue of the fused graph-KL ops: launches of graph_kl_kernels.cuh. The forward is one
// launch; the gradients two (rows: dq, columns: dk), deterministic by construction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../graph_kl_host.h"
#include "../mhgd_fast.h"
#include "graph_kl_kernels.cuh"

namespace mhgd_fast {
namespace {

namespace kernels = cuda_kernels;

template <typename T>
kernels::GraphKLArgs<T> make_args(const GraphKL& p, at::Tensor& kl, at::Tensor& stats_s, at::Tensor& stats_t,
                                  const at::Tensor& row_grad, T grad_scalar) {
  return {p.q_s.data_ptr<T>(),
          p.k_s.data_ptr<T>(),
          p.q_t.data_ptr<T>(),
          p.k_t.data_ptr<T>(),
          p.heads(),
          p.rows(),
          p.cols(),
          p.q_s.size(2),
          static_cast<T>(p.scale),
          p.squash_tanh,
          p.teacher_student,
          kl.data_ptr<T>(),
          stats_s.data_ptr<T>(),
          stats_t.data_ptr<T>(),
          row_grad.defined() ? row_grad.data_ptr<T>() : nullptr,
          grad_scalar};
}

// Launches `kernel` with one warp per item (rows or columns of every head).
template <typename Kernel, typename... Args>
void launch_per_warp(Kernel kernel, int64_t items, int64_t dim, int64_t elem_size, int vectors, Args... args) {
  if (items == 0) return;
  const int64_t blocks = (items + kernels::kGraphKLWarps - 1) / kernels::kGraphKLWarps;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "graph_kl: too many graph rows for one launch");
  const int64_t shared = kernels::graph_kl_shared_bytes(dim, elem_size, vectors);
  if (shared > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(shared <= limit, "graph_kl: feature size d=", dim, " needs ", shared,
                " bytes of shared memory per block, more than this GPU's ", limit, "; use backend='reference'");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  kernel<<<static_cast<unsigned>(blocks), kernels::kGraphKLWarps * 32, static_cast<size_t>(shared),
           c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row statistics (and, when `g` asks, the gradients with dL/dKL_i = row_grad or grad_scalar).
template <typename T>
void run(const GraphKL& p, bool forward, at::Tensor& kl, at::Tensor& stats_s, at::Tensor& stats_t,
         const at::Tensor& row_grad, T grad_scalar, Grads& g) {
  const int64_t dim = p.q_s.size(2), size = sizeof(T);
  const auto args = make_args<T>(p, kl, stats_s, stats_t, row_grad, grad_scalar);
  auto ptr = [](bool wanted, at::Tensor& x) { return wanted ? x.data_ptr<T>() : nullptr; };
  if (forward)
    launch_per_warp(kernels::graph_kl_forward<T>, p.heads() * p.rows(), dim, size, kernels::kForwardVectors, args);
  if (g.q_s || g.q_t)
    launch_per_warp(kernels::graph_kl_backward_rows<T>, p.heads() * p.rows(), dim, size, kernels::kBackwardVectors,
                    args, ptr(g.q_s, g.dq_s), ptr(g.q_t, g.dq_t));
  if (g.k_s || g.k_t)
    launch_per_warp(kernels::graph_kl_backward_cols<T>, p.heads() * p.cols(), dim, size, kernels::kBackwardVectors,
                    args, ptr(g.k_s, g.dk_s), ptr(g.k_t, g.dk_t));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_kl_cuda(const at::Tensor& q_s, const at::Tensor& k_s,
                                                             const at::Tensor& q_t, const at::Tensor& k_t,
                                                             bool squash_tanh, double scale, bool teacher_student) {
  const c10::cuda::CUDAGuard guard(q_s.device());
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  at::Tensor kl = at::empty({p.heads(), p.rows()}, p.q_s.options());
  at::Tensor stats_s = at::empty({p.heads(), p.rows(), 2}, p.q_s.options()), stats_t = at::empty_like(stats_s);
  Grads none = make_grads(p, {});
  AT_DISPATCH_FLOATING_TYPES(p.q_s.scalar_type(), "graph_kl_cuda", [&] {
    run<scalar_t>(p, true, kl, stats_s, stats_t, at::Tensor(), scalar_t(0), none);
  });
  return {kl, stats_s, stats_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_kl_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& kl, const at::Tensor& stats_s, const at::Tensor& stats_t,
    bool squash_tanh, double scale, bool teacher_student, std::array<bool, 4> grad_mask) {
  const c10::cuda::CUDAGuard guard(q_s.device());
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  const auto acc = p.q_s.scalar_type();
  check_graph_kl_row_tensors(p, grad_rows, kl, stats_s, stats_t);
  const at::Tensor g_rows = grad_rows.to(acc).contiguous();
  at::Tensor kl_c = kl.to(acc).contiguous(), ss = stats_s.to(acc).contiguous(), st = stats_t.to(acc).contiguous();
  Grads g = make_grads(p, grad_mask);
  AT_DISPATCH_FLOATING_TYPES(acc, "graph_kl_backward_cuda", [&] {
    run<scalar_t>(p, false, kl_c, ss, st, g_rows, scalar_t(0), g);
  });
  return finish_grads(g, q_s, k_s, q_t, k_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_kl_fused_cuda(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, bool squash_tanh,
    double scale, bool teacher_student, bool mean, std::array<bool, 4> grad_mask) {
  const c10::cuda::CUDAGuard guard(q_s.device());
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  const int64_t rows = p.heads() * p.rows();
  TORCH_CHECK(!mean || rows > 0, "graph_kl: reduction='mean' needs at least one graph row");
  at::Tensor kl = at::empty({p.heads(), p.rows()}, p.q_s.options());
  at::Tensor stats_s = at::empty({p.heads(), p.rows(), 2}, p.q_s.options()), stats_t = at::empty_like(stats_s);
  Grads g = make_grads(p, grad_mask);
  AT_DISPATCH_FLOATING_TYPES(p.q_s.scalar_type(), "graph_kl_fused_cuda", [&] {
    const scalar_t grad_scalar = mean ? scalar_t(1) / static_cast<scalar_t>(rows) : scalar_t(1);
    run<scalar_t>(p, true, kl, stats_s, stats_t, at::Tensor(), grad_scalar, g);
  });
  at::Tensor loss = mean ? kl.mean() : kl.sum();
  auto [dq_s, dk_s, dq_t, dk_t] = finish_grads(g, q_s, k_s, q_t, k_t, /*accumulation=*/true);
  return {loss, dq_s, dk_s, dq_t, dk_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CUDA, m) {
  m.impl("graph_kl", &graph_kl_cuda);
  m.impl("graph_kl_backward", &graph_kl_backward_cuda);
  m.impl("graph_kl_fused", &graph_kl_fused_cuda);
}

}  // namespace mhgd_fast
