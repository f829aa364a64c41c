// The host side of the graph_kl ops, one definition for the CPU and the CUDA kernels: inputs
// prepared in the accumulation dtype, the gradients each pass is asked for, and the three op
// entry points (graph_kl_op, graph_kl_backward_op, graph_kl_fused_op), templates over the
// device's pass (graph_kl_cpu.cpp's CpuPass, graph_kl_cuda.cu's CudaPass).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "mhgd_fast.h"

namespace mhgd_fast {

// Inputs in the accumulation dtype, contiguous, with the options shared by every pass.
struct GraphKL {
  at::Tensor q_s, k_s, q_t, k_t;
  bool squash_tanh;
  double scale;
  bool teacher_student;
  int64_t heads() const { return q_s.size(0); }
  int64_t rows() const { return q_s.size(1); }
  int64_t cols() const { return k_s.size(1); }
};

inline GraphKL prepare(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                bool squash_tanh, double scale, bool teacher_student) {
  check_graph_kl_inputs(q_s, k_s, q_t, k_t);
  // Detached: the kernels' own ATen calls must not be recorded (or refused) by autograd.
  const auto acc = accumulate_type(q_s.scalar_type());
  auto ready = [acc](const at::Tensor& x) { return x.detach().to(acc).contiguous(); };
  return {ready(q_s), ready(k_s), ready(q_t), ready(k_t), squash_tanh, scale, teacher_student};
}

// The backward's row tensors: grad_rows and kl [H, N], and the row statistics [H, N, 2] (per
// row the logits' max and log Σ exp(logit - max), kept apart: their sum, the log-sum-exp, loses
// the log-sum to rounding once |max| ≫ 1/ε, and with it the probabilities).
inline void check_graph_kl_row_tensors(const GraphKL& p, const at::Tensor& grad_rows, const at::Tensor& kl,
                                       const at::Tensor& stats_s, const at::Tensor& stats_t) {
  for (const at::Tensor* rows : {&grad_rows, &kl})
    TORCH_CHECK(rows->sizes() == at::IntArrayRef({p.heads(), p.rows()}),
                "graph_kl_backward: grad_rows and kl must be [H, N], got ", rows->sizes());
  for (const at::Tensor* stats : {&stats_s, &stats_t})
    TORCH_CHECK(stats->sizes() == at::IntArrayRef({p.heads(), p.rows(), 2}),
                "graph_kl_backward: row statistics must be [H, N, 2], got ", stats->sizes());
}

// Which gradients a sweep produces (tensors allocated only for those).
struct Grads {
  at::Tensor dq_s, dk_s, dq_t, dk_t;
  bool q_s, k_s, q_t, k_t;
  bool student() const { return q_s || k_s; }
  bool teacher() const { return q_t || k_t; }
  bool any() const { return student() || teacher(); }
};

// dq is always written whole; dk may be accumulated into, so it starts at zero.
inline Grads make_grads(const GraphKL& p, const std::array<bool, 4>& mask) {
  auto empty_if = [](bool wanted, const at::Tensor& x) { return wanted ? at::empty_like(x) : at::Tensor(); };
  auto zeros_if = [](bool wanted, const at::Tensor& x) { return wanted ? at::zeros_like(x) : at::Tensor(); };
  return {empty_if(mask[0], p.q_s), zeros_if(mask[1], p.k_s), empty_if(mask[2], p.q_t), zeros_if(mask[3], p.k_t),
          mask[0], mask[1], mask[2], mask[3]};
}

// The gradients, zeros where none was asked for: in the inputs' dtypes, or (`accumulation`) in
// the accumulation dtype, which the fused op keeps until the upstream gradient has scaled them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_grads(const Grads& g, const at::Tensor& q_s,
                                                                              const at::Tensor& k_s,
                                                                              const at::Tensor& q_t,
                                                                              const at::Tensor& k_t,
                                                                              bool accumulation = false) {
  auto finish = [accumulation](const at::Tensor& grad, const at::Tensor& x) {
    const auto dtype = accumulation ? accumulate_type(x.scalar_type()) : x.scalar_type();
    return grad.defined() ? grad.to(dtype) : at::zeros(x.sizes(), x.options().dtype(dtype));
  };
  return {finish(g.dq_s, q_s), finish(g.dk_s, k_s), finish(g.dq_t, q_t), finish(g.dk_t, k_t)};
}

// The op entry points. `Device` provides:
//   Device::Guard     constructed from an input tensor, keeps its device current for the call;
//   Device::kName     the name the dtype dispatch reports;
//   Device::run<T>(p, forward, kl, stats_s, stats_t, row_grad, grad_scalar, g)
//                     one pass over every graph row: with `forward`, writes kl [H, N] and the row
//                     statistics [H, N, 2], else reads them; then the gradients `g` asks for, with
//                     dL/dKL_i = row_grad[i] (row_grad defined) or grad_scalar for every row.
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_kl_op(const at::Tensor& q_s, const at::Tensor& k_s,
                                                           const at::Tensor& q_t, const at::Tensor& k_t,
                                                           bool squash_tanh, double scale, bool teacher_student) {
  const typename Device::Guard guard(q_s);
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  at::Tensor kl = at::empty({p.heads(), p.rows()}, p.q_s.options());
  at::Tensor stats_s = at::empty({p.heads(), p.rows(), 2}, p.q_s.options()), stats_t = at::empty_like(stats_s);
  Grads none = make_grads(p, {});
  AT_DISPATCH_FLOATING_TYPES(p.q_s.scalar_type(), Device::kName, [&] {
    Device::template run<scalar_t>(p, true, kl, stats_s, stats_t, at::Tensor(), scalar_t(0), none);
  });
  return {kl, stats_s, stats_t};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_kl_backward_op(
    const at::Tensor& grad_rows, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
    const at::Tensor& k_t, const at::Tensor& kl, const at::Tensor& stats_s, const at::Tensor& stats_t,
    bool squash_tanh, double scale, bool teacher_student, std::array<bool, 4> grad_mask) {
  const typename Device::Guard guard(q_s);
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  const auto acc = p.q_s.scalar_type();
  check_graph_kl_row_tensors(p, grad_rows, kl, stats_s, stats_t);
  const at::Tensor g_rows = grad_rows.to(acc).contiguous();
  at::Tensor kl_c = kl.to(acc).contiguous(), ss = stats_s.to(acc).contiguous(), st = stats_t.to(acc).contiguous();
  Grads g = make_grads(p, grad_mask);
  AT_DISPATCH_FLOATING_TYPES(acc, Device::kName, [&] {
    Device::template run<scalar_t>(p, false, kl_c, ss, st, g_rows, scalar_t(0), g);
  });
  return finish_grads(g, q_s, k_s, q_t, k_t);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_kl_fused_op(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t, bool squash_tanh,
    double scale, bool teacher_student, bool mean, std::array<bool, 4> grad_mask) {
  const typename Device::Guard guard(q_s);
  const GraphKL p = prepare(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student);
  const int64_t rows = p.heads() * p.rows();
  TORCH_CHECK(!mean || rows > 0, "graph_kl: reduction='mean' needs at least one graph row");
  at::Tensor kl = at::empty({p.heads(), p.rows()}, p.q_s.options());
  at::Tensor stats_s = at::empty({p.heads(), p.rows(), 2}, p.q_s.options()), stats_t = at::empty_like(stats_s);
  Grads g = make_grads(p, grad_mask);
  AT_DISPATCH_FLOATING_TYPES(p.q_s.scalar_type(), Device::kName, [&] {
    const scalar_t grad_scalar = mean ? scalar_t(1) / static_cast<scalar_t>(rows) : scalar_t(1);
    Device::template run<scalar_t>(p, true, kl, stats_s, stats_t, at::Tensor(), grad_scalar, g);
  });
  at::Tensor loss = mean ? kl.mean() : kl.sum();
  auto [dq_s, dk_s, dq_t, dk_t] = finish_grads(g, q_s, k_s, q_t, k_t, /*accumulation=*/true);
  return {loss, dq_s, dk_s, dq_t, dk_t};
}

// Registers the three graph_kl ops of `Device` with a TORCH_LIBRARY_IMPL's `m`.
template <typename Device>
void register_graph_kl(torch::Library& m) {
  m.impl("graph_kl", &graph_kl_op<Device>);
  m.impl("graph_kl_backward", &graph_kl_backward_op<Device>);
  m.impl("graph_kl_fused", &graph_kl_fused_op<Device>);
}

}  // namespace mhgd_fast
