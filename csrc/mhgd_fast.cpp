// Op schemas (one TORCH_LIBRARY block for every op) and the module-level build helpers.
// Each device registers its kernels in its own file with TORCH_LIBRARY_IMPL; Python adds the
// fake (meta) kernels and autograd formulas beside each wrapper in mhgd_fast/ops.py.
#include <torch/extension.h>

#include "cpu/kernel_table.h"
#include "limits.h"
#include "mhgd_fast.h"

TORCH_LIBRARY(mhgd_fast, m) {
  // docs/method.md §4: softmax_j(squash(scale * q k^T)) per head; q [H, N, d], k [H, M, d].
  m.def("attention_graph(Tensor q, Tensor k, bool squash_tanh, float scale) -> Tensor");
  // Gradients of attention_graph w.r.t. q and k; recomputes the graph from q and k.
  m.def(
      "attention_graph_backward(Tensor grad, Tensor q, Tensor k, bool squash_tanh, float scale)"
      " -> (Tensor, Tensor)");
  // docs/method.md §7, streamed: per graph row (h, i) the KL divergence of the direction
  // (teacher_student=false: KL(P_s || P_t)), [H, N], and each side's row statistics, [H, N, 2]:
  // the (squashed) logits' max and log sum_j exp(logit_j - max), apart so that the backward
  // rebuilds the probabilities exactly at any logit size. All in the accumulation dtype. The
  // [H, N, M] graphs are never stored.
  m.def(
      "graph_kl(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, bool squash_tanh, float scale,"
      " bool teacher_student) -> (Tensor kl, Tensor stats_s, Tensor stats_t)");
  // Gradients of sum_rows(grad_rows * KL_rows) w.r.t. (q_s, k_s, q_t, k_t), from the saved row
  // statistics; zeros where grad_mask is false.
  m.def(
      "graph_kl_backward(Tensor grad_rows, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor kl,"
      " Tensor stats_s, Tensor stats_t, bool squash_tanh, float scale, bool teacher_student, bool[4] grad_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // Loss (sum, or mean over H*N rows) and its gradients in the same pass: four GEMMs per head
  // instead of six when the loss is a scalar. Gradients in the accumulation dtype (float32 for
  // 16-bit inputs) so that the upstream gradient scales them before any rounding to 16 bits.
  m.def(
      "graph_kl_fused(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, bool squash_tanh, float scale,"
      " bool teacher_student, bool mean, bool[4] grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // docs/method.md §3: top-k right singular vectors of X_b = fm_b.reshape(C, -1)^T, [B, k, C], plus
  // what the backward needs, all float64, n = min(HW, C) the smaller Gram's size, kk = min(k, n):
  // the Householder reflectors of Gram = Q T Q^T ([B, n, n], upper triangle), T's diagonal,
  // off-diagonal and the reflectors' factors ([B, 3, n]), the Gram's top-kk eigenvectors
  // ([B, n, kk]) and its top min(n, kk + 1) eigenvalues ([B, min(n, kk + 1)]), descending.
  // save_state=False (no gradient wanted): the four are empty ([0]), and k = 1 may be answered by
  // power iteration.
  m.def(
      "topk_singular_vectors(Tensor fm, int k, float eps, bool save_state=True)"
      " -> (Tensor vectors, Tensor householder, Tensor tridiagonal, Tensor gram_vectors, Tensor eigenvalues)");
  // Gradient of topk_singular_vectors w.r.t. fm from the grad of `vectors` and the saved outputs.
  m.def(
      "topk_singular_vectors_backward(Tensor grad, Tensor fm, Tensor householder, Tensor tridiagonal,"
      " Tensor gram_vectors, Tensor eigenvalues, int k, float eps) -> Tensor");
}

namespace {

pybind11::dict compile_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["cxx_compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["cxx_compiler"] = std::string("gcc ") + __VERSION__;
#endif
  info["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = pybind11::none();
#endif
#ifdef WITH_CUDA
  info["cuda_runtime_compiled"] = mhgd_fast::compiled_cuda_runtime_version();
#else
  info["cuda_runtime_compiled"] = pybind11::none();
#endif
  return info;
}

pybind11::dict size_limits() {
  pybind11::dict info;
  info["cuda_topk_max_k"] = mhgd_fast::limits::kCudaTopkMaxK;
  info["cuda_topk_max_n"] = mhgd_fast::limits::kCudaTopkMaxN;
  return info;
}

// The CPU kernel tables compiled in, and the one this process uses (kernel_table.cpp: chosen
// once from the CPU's features and MHGD_FAST_CPU_CAPABILITY).
pybind11::dict cpu_capability() {
  pybind11::dict info;
  pybind11::list compiled;
  compiled.append(mhgd_fast::cpu::generic::table.capability);
#ifdef MHGD_HAVE_AVX2
  compiled.append(mhgd_fast::cpu::avx2::table.capability);
#endif
  info["cpu_capabilities_compiled"] = compiled;
  info["cpu_capability"] = mhgd_fast::cpu::kernels().capability;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mhgd_fast compiled kernels (ops are registered under torch.ops.mhgd_fast)";
  m.def("compile_info", &compile_info, "Facts fixed when the extension was compiled");
  m.def("limits", &size_limits, "The kernels' size limits (csrc/limits.h)");
  m.def("cpu_capability", &cpu_capability, "The CPU kernel tables compiled in and the one in use");
}
