// CUDA glue of mhgd_fast::attention_graph: cuBLAS batched GEMM for q k^T (through ATen), then
// (c10 stream headers only: ATen/cuda/CUDAContext.h needs cuSPARSE headers the toolkit may lack)
// one launch of the row kernel in attention_graph_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "../mhgd_fast.h"
#include "attention_graph_kernels.cuh"

namespace mhgd_fast {

long compiled_cuda_runtime_version() { return CUDART_VERSION; }

namespace {

// attention_graph_kernels.cuh's attention_row_launch for the logits s [H, N, M].
cuda_kernels::LaunchGeometry row_launch(const at::Tensor& s) {
  const auto geometry = cuda_kernels::attention_row_launch(s.size(0) * s.size(1), s.size(2));
  TORCH_CHECK(geometry.grid < (int64_t{1} << 31), "attention_graph: too many rows (", geometry.grid,
              ") for one launch");
  return geometry;
}

at::Tensor attention_graph_cuda(const at::Tensor& q, const at::Tensor& k, bool squash_tanh, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_forward_with(q, k, [&](at::Tensor& s) {
    const int64_t cols = s.size(2);
    const auto geometry = row_launch(s);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_graph_cuda", [&] {
      cuda_kernels::attention_softmax_forward<scalar_t>
          <<<static_cast<unsigned>(geometry.grid), geometry.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
              s.data_ptr<scalar_t>(), cols, static_cast<scalar_t>(scale), squash_tanh);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> attention_graph_backward_cuda(const at::Tensor& grad, const at::Tensor& q,
                                                                 const at::Tensor& k, bool squash_tanh,
                                                                 double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_backward_with(grad, q, k, [&](at::Tensor& s, const at::Tensor& dp) {
    const int64_t cols = s.size(2);
    const auto geometry = row_launch(s);
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "attention_graph_backward_cuda", [&] {
      cuda_kernels::attention_softmax_backward<scalar_t>
          <<<static_cast<unsigned>(geometry.grid), geometry.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
              s.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), cols, static_cast<scalar_t>(scale), squash_tanh);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CUDA, m) {
  m.impl("attention_graph", &attention_graph_cuda);
  m.impl("attention_graph_backward", &attention_graph_backward_cuda);
}

}  // namespace mhgd_fast
