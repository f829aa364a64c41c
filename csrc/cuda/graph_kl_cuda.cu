// CUDA glue of the fused graph-KL ops: the device pass of graph_kl_host.h's op entry points,
// launches of graph_kl_kernels.cuh. The forward is one launch; the gradients two (rows: dq,
// columns: dk), deterministic by construction.
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

// Launches `kernel` with one warp per item (rows or columns of every head), in the geometry of
// graph_kl_kernels.cuh's graph_kl_launch.
template <typename Kernel, typename... Args>
void launch_per_warp(Kernel kernel, int64_t items, int64_t dim, int64_t elem_size, int vectors, Args... args) {
  if (items == 0) return;
  const kernels::LaunchGeometry geometry = kernels::graph_kl_launch(items, dim, elem_size, vectors);
  TORCH_CHECK(geometry.grid < (int64_t{1} << 31), "graph_kl: too many graph rows for one launch");
  const int64_t shared = geometry.shared_bytes;
  if (shared > 48 * 1024) {
    int device = 0, limit = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(shared <= limit, "graph_kl: feature size d=", dim, " needs ", shared,
                " bytes of shared memory per block, more than this GPU's ", limit, "; use backend='reference'");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  kernel<<<static_cast<unsigned>(geometry.grid), geometry.block, static_cast<size_t>(shared),
           c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA pass for graph_kl_host.h's op entry points: the forward is one launch, the gradients
// two (rows: dq, columns: dk).
struct CudaPass {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& x) : guard(x.device()) {}
  };
  static constexpr const char* kName = "graph_kl_cuda";
  template <typename T>
  static void run(const GraphKL& p, bool forward, at::Tensor& kl, at::Tensor& stats_s, at::Tensor& stats_t,
                  const at::Tensor& row_grad, T grad_scalar, Grads& g) {
    const int64_t dim = p.q_s.size(2), size = sizeof(T);
    const auto args = make_args<T>(p, kl, stats_s, stats_t, row_grad, grad_scalar);
    auto ptr = [](bool wanted, at::Tensor& x) { return wanted ? x.data_ptr<T>() : nullptr; };
    if (forward)
      launch_per_warp(kernels::graph_kl_forward<T>, p.heads() * p.rows(), dim, size, kernels::kForwardVectors, args);
    if (g.q_s || g.q_t)
      launch_per_warp(kernels::graph_kl_backward_rows<T>, p.heads() * p.rows(), dim, size,
                      kernels::kBackwardVectors, args, ptr(g.q_s, g.dq_s), ptr(g.q_t, g.dq_t));
    if (g.k_s || g.k_t)
      launch_per_warp(kernels::graph_kl_backward_cols<T>, p.heads() * p.cols(), dim, size,
                      kernels::kBackwardVectors, args, ptr(g.k_s, g.dk_s), ptr(g.k_t, g.dk_t));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CUDA, m) { register_graph_kl<CudaPass>(m); }

}  // namespace mhgd_fast
