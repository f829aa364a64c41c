// Declarations shared between the extension's translation units.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mhgd_fast {

// Result dtype of accumulation: 16-bit floats accumulate in float32 (README.md, "The ops on their own").
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Checks shared by every device's attention_graph kernels (Python validates first; these guard
// direct torch.ops calls).
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 3, "attention_graph: q must be 3-D [H, N, d], got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "attention_graph: k must be 3-D [H, M, d], got ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "attention_graph: q ", q.sizes(), " and k ", k.sizes(), " disagree on H or d");
  TORCH_CHECK(k.size(1) > 0, "attention_graph: k has no columns (M = 0)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "attention_graph: q and k dtypes differ");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "attention_graph: q must be floating point");
  TORCH_CHECK(q.device() == k.device(), "attention_graph: q and k are on different devices");
}

// Checks of the graph_kl kernels (Python validates first; these guard direct torch.ops calls).
inline void check_graph_kl_inputs(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                  const at::Tensor& k_t) {
  for (const at::Tensor* x : {&q_s, &k_s, &q_t, &k_t}) {
    TORCH_CHECK(x->dim() == 3, "graph_kl: inputs must be 3-D [H, N|M, d], got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == q_s.scalar_type() && x->device() == q_s.device(),
                "graph_kl: inputs must share dtype and device");
  }
  TORCH_CHECK(at::isFloatingType(q_s.scalar_type()), "graph_kl: inputs must be floating point");
  TORCH_CHECK(q_t.sizes() == q_s.sizes() && k_t.sizes() == k_s.sizes(),
              "graph_kl: teacher shapes ", q_t.sizes(), k_t.sizes(), " differ from the student's ", q_s.sizes(),
              k_s.sizes());
  TORCH_CHECK(k_s.size(0) == q_s.size(0) && k_s.size(2) == q_s.size(2), "graph_kl: q ", q_s.sizes(), " and k ",
              k_s.sizes(), " disagree on H or d");
  TORCH_CHECK(k_s.size(1) > 0, "graph_kl: k has no columns (M = 0)");
}

// attention_graph forward skeleton shared by the devices: s = q k^T in the accumulation dtype,
// then the device's row pass turns s into the graph in place.
template <typename RowPass>
at::Tensor attention_forward_with(const at::Tensor& q, const at::Tensor& k, RowPass row_pass) {
  check_attention_inputs(q, k);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls here are not recorded
  const auto acc = accumulate_type(q.scalar_type());
  at::Tensor s = at::bmm(q.to(acc), k.to(acc).transpose(1, 2)).contiguous();
  if (s.numel() > 0) row_pass(s);
  return s.to(q.scalar_type());
}

// Backward skeleton: the row pass turns the recomputed s = q k^T into dL/d(q k^T) given
// dL/dP (`dp`, contiguous, accumulation dtype); then dq = dZ k and dk = dZ^T q.
template <typename RowPass>
std::tuple<at::Tensor, at::Tensor> attention_backward_with(const at::Tensor& grad, const at::Tensor& q,
                                                           const at::Tensor& k, RowPass row_pass) {
  check_attention_inputs(q, k);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == q.size(0) && grad.size(1) == q.size(1) &&
                  grad.size(2) == k.size(1),
              "attention_graph_backward: grad must be [H, N, M], got ", grad.sizes());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = accumulate_type(q.scalar_type());
  const at::Tensor qa = q.to(acc), ka = k.to(acc);
  at::Tensor s = at::bmm(qa, ka.transpose(1, 2)).contiguous();
  const at::Tensor dp = grad.to(acc).contiguous();
  if (s.numel() > 0) row_pass(s, dp);
  return {at::bmm(s, ka).to(q.scalar_type()), at::bmm(s.transpose(1, 2), qa).to(k.scalar_type())};
}

#ifdef WITH_CUDA
long compiled_cuda_runtime_version();
#endif

}  // namespace mhgd_fast
