// CUDA glue of mhgd_fast::topk_singular_vectors: the batched GEMMs through ATen (cuBLAS), as the
// CPU kernel does (topk_singular_vectors_host.h), and one block per sample for the eigen-work
// (topk_singular_vectors_kernels.cuh). The Python op sends k > 8 or min(C, HW) > 2048 to the
// reference instead (kTopkMaxK, kTopkMaxN).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "../mhgd_fast.h"
#include "../topk_singular_vectors_host.h"
#include "topk_singular_vectors_kernels.cuh"

namespace mhgd_fast {
namespace {

using at::Tensor;
constexpr int64_t kTopkMaxN = limits::kCudaTopkMaxN;

void check_size(int64_t batch, int64_t n, int64_t kk) {
  TORCH_CHECK(kk <= cuda_kernels::kTopkMaxK && n <= kTopkMaxN, "topk_singular_vectors (CUDA): k ≤ ", cuda_kernels::kTopkMaxK,
              " and min(C, HW) ≤ ", kTopkMaxN, " only (got k = ", kk, ", n = ", n,
              "); mhgd_fast.ops.topk_singular_vectors routes larger cases to the reference");
  TORCH_CHECK(batch < (int64_t{1} << 31), "topk_singular_vectors (CUDA): batch too large for one launch");
}

bool decompose_cuda(const topk::Features& f, Tensor& householder, Tensor& tridiagonal, Tensor& basis, Tensor& lam) {
  const int64_t kk = basis.size(2);
  const Tensor gram = topk::gram_of(f, kk).contiguous();  // float64 for kk ≥ 2
  const int64_t batch = gram.size(0), n = gram.size(1), nl = lam.size(1);
  check_size(batch, n, kk);
  // Without saved state (no gradient wanted) the factors go to temporaries.
  Tensor a = householder.defined() ? householder : at::empty({batch, n, n}, basis.options());
  Tensor t = tridiagonal.defined() ? tridiagonal : at::zeros({batch, 3, n}, basis.options());
  Tensor work = at::empty({batch, cuda_kernels::topk_work_doubles(n, kk)}, basis.options());
  Tensor nonfinite = at::zeros({1}, gram.options().dtype(at::kInt));
  const cuda_kernels::LaunchGeometry geometry = cuda_kernels::topk_launch(batch, n);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "topk_singular_vectors_cuda", [&] {
    const cuda_kernels::TopkDecomposeArgs<scalar_t> args{
        gram.data_ptr<scalar_t>(), n, kk, nl, a.data_ptr<double>(), t.data_ptr<double>(),
        basis.data_ptr<double>(), lam.data_ptr<double>(), work.data_ptr<double>(), nonfinite.data_ptr<int>()};
    cuda_kernels::topk_decompose<scalar_t>
        <<<static_cast<unsigned>(geometry.grid), geometry.block, static_cast<size_t>(geometry.shared_bytes),
           c10::cuda::getCurrentCUDAStream()>>>(args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return nonfinite.item<int>() == 0;  // the one host sync: NaN/Inf must raise here
}

std::tuple<Tensor, Tensor> complement_solve_cuda(const Tensor& householder, const Tensor& tridiagonal,
                                                 const Tensor& e, const Tensor& eigenvalues, const Tensor& rhs,
                                                 const Tensor& thresh, const Tensor& null_floor,
                                                 const Tensor& floor2) {
  const int64_t batch = rhs.size(0), n = rhs.size(1), kk = rhs.size(2);
  check_size(batch, n, kk);
  Tensor y = at::zeros_like(rhs);
  Tensor exact = at::zeros({batch}, rhs.options().dtype(at::kBool));
  Tensor work = at::empty({batch, cuda_kernels::topk_work_doubles(n, kk)}, rhs.options());
  const Tensor lam = eigenvalues.contiguous(), th = thresh.contiguous(), nf = null_floor.contiguous();
  const Tensor f2 = floor2.defined() ? floor2.contiguous() : Tensor();
  const cuda_kernels::TopkSolveArgs args{householder.data_ptr<double>(), tridiagonal.data_ptr<double>(),
                                         e.data_ptr<double>(), lam.data_ptr<double>(), rhs.data_ptr<double>(),
                                         th.data_ptr<double>(), nf.data_ptr<double>(),
                                         f2.defined() ? f2.data_ptr<double>() : nullptr, n, kk, lam.size(1),
                                         y.data_ptr<double>(), exact.data_ptr<bool>(), work.data_ptr<double>()};
  const cuda_kernels::LaunchGeometry geometry = cuda_kernels::topk_launch(batch, n);
  cuda_kernels::topk_complement_solve<<<static_cast<unsigned>(geometry.grid), geometry.block,
                                        static_cast<size_t>(geometry.shared_bytes),
                                        c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, exact};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_singular_vectors_cuda(const Tensor& fm, int64_t k,
                                                                               double eps, bool save_state) {
  const c10::cuda::CUDAGuard guard(fm.device());
  return topk::forward(fm, k, eps, save_state, decompose_cuda);
}

Tensor topk_singular_vectors_backward_cuda(const Tensor& grad, const Tensor& fm, const Tensor& householder,
                                           const Tensor& tridiagonal, const Tensor& basis,
                                           const Tensor& eigenvalues, int64_t k, double eps) {
  const c10::cuda::CUDAGuard guard(fm.device());
  return topk::backward(grad, fm, householder.contiguous(), tridiagonal.contiguous(), basis.contiguous(),
                        eigenvalues, k, eps, complement_solve_cuda, topk::batched_product);
}

}  // namespace

TORCH_LIBRARY_IMPL(mhgd_fast, CUDA, m) {
  m.impl("topk_singular_vectors", &topk_singular_vectors_cuda);
  m.impl("topk_singular_vectors_backward", &topk_singular_vectors_backward_cuda);
}

}  // namespace mhgd_fast
