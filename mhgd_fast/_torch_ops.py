"""Python side of the compiled ops: fake (meta) kernels and autograd formulas.

With these, ``torch.ops.mhgd_fast.*`` work under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``. Nothing is registered when the extension is not built.
"""
import math

import torch

from ._extension import _C
from .reference import compute_dtype

if _C is not None:

    @torch.library.register_fake("mhgd_fast::attention_graph")
    def _attention_graph_fake(q, k, squash_tanh, scale):
        return q.new_empty(q.shape[0], q.shape[1], k.shape[1])

    @torch.library.register_fake("mhgd_fast::attention_graph_backward")
    def _attention_graph_backward_fake(grad, q, k, squash_tanh, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _attention_graph_setup(ctx, inputs, output):
        q, k, squash_tanh, scale = inputs
        ctx.save_for_backward(q, k)
        ctx.squash_tanh, ctx.scale = squash_tanh, scale

    def _attention_graph_backward(ctx, grad):
        q, k = ctx.saved_tensors
        dq, dk = torch.ops.mhgd_fast.attention_graph_backward(grad, q, k, ctx.squash_tanh, ctx.scale)
        return dq, dk, None, None

    torch.library.register_autograd("mhgd_fast::attention_graph", _attention_graph_backward,
                                    setup_context=_attention_graph_setup)

    # ------------------------------------------------------------------------------ graph_kl

    def _rows_like(q_s, *trailing):
        return q_s.new_empty(*q_s.shape[:2], *trailing, dtype=compute_dtype(q_s.dtype))

    @torch.library.register_fake("mhgd_fast::graph_kl")
    def _graph_kl_fake(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student):
        # kl [H, N]; per side [H, N, 2]: each row's logit max and log Σ exp(logit − max).
        return _rows_like(q_s), _rows_like(q_s, 2), _rows_like(q_s, 2)

    @torch.library.register_fake("mhgd_fast::graph_kl_backward")
    def _graph_kl_backward_fake(grad_rows, q_s, k_s, q_t, k_t, kl, stats_s, stats_t, squash_tanh, scale,
                                teacher_student, grad_mask):
        return tuple(x.new_empty(x.shape) for x in (q_s, k_s, q_t, k_t))

    @torch.library.register_fake("mhgd_fast::graph_kl_fused")
    def _graph_kl_fused_fake(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student, mean, grad_mask):
        loss = q_s.new_empty((), dtype=compute_dtype(q_s.dtype))
        return (loss,) + tuple(x.new_empty(x.shape, dtype=compute_dtype(x.dtype)) for x in (q_s, k_s, q_t, k_t))

    def _graph_kl_setup(ctx, inputs, output):
        q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student = inputs
        kl, stats_s, stats_t = output
        ctx.mark_non_differentiable(stats_s, stats_t)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, kl, stats_s, stats_t)
        ctx.options = (squash_tanh, scale, teacher_student)

    def _graph_kl_backward(ctx, grad_kl, grad_stats_s, grad_stats_t):
        mask = list(ctx.needs_input_grad[:4])
        grads = torch.ops.mhgd_fast.graph_kl_backward(grad_kl, *ctx.saved_tensors, *ctx.options, mask)
        return tuple(g if needed else None for g, needed in zip(grads, mask)) + (None,) * 3

    torch.library.register_autograd("mhgd_fast::graph_kl", _graph_kl_backward, setup_context=_graph_kl_setup)

    def _graph_kl_fused_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])
        ctx.grad_mask = inputs[-1]
        ctx.dtypes = [t.dtype for t in inputs[:4]]

    def _graph_kl_fused_backward(ctx, grad_loss, *unused):
        if torch.is_grad_enabled():
            # The saved gradients are constants: a second derivative through them would be wrong.
            raise RuntimeError("mhgd_fast graph_kl (fused CPU/CUDA kernel) does not support double "
                               "backward; use backend='reference' for higher-order gradients")
        # Scaled in the accumulation dtype, then rounded to the input's (AMP's loss scale included).
        grads = tuple((grad_loss * g).to(dtype) if needed else None
                      for g, needed, dtype in zip(ctx.saved_tensors, ctx.grad_mask, ctx.dtypes))
        return grads + (None,) * 5

    torch.library.register_autograd("mhgd_fast::graph_kl_fused", _graph_kl_fused_backward,
                                    setup_context=_graph_kl_fused_setup)

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors")
    def _topk_singular_vectors_fake(fm, k, eps, save_state=True):
        batch, c = fm.shape[0], fm.shape[1]
        n = torch.sym_min(math.prod(fm.shape[2:]), c)
        kk = torch.sym_min(k, n)
        f64 = dict(dtype=torch.float64)
        if not save_state:
            return (fm.new_empty(batch, k, c),) + tuple(fm.new_empty(0, **f64) for _ in range(4))
        return (fm.new_empty(batch, k, c), fm.new_empty(batch, n, n, **f64), fm.new_empty(batch, 3, n, **f64),
                fm.new_empty(batch, n, kk, **f64), fm.new_empty(batch, torch.sym_min(n, kk + 1), **f64))

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors_backward")
    def _topk_singular_vectors_backward_fake(grad, fm, householder, tridiagonal, gram_vectors, eigenvalues, k, eps):
        return torch.empty_like(fm)

    def _topk_singular_vectors_setup(ctx, inputs, output):
        fm, k, eps = inputs[:3]
        ctx.mark_non_differentiable(*output[1:])
        # No zero gradients for the saved state (the Householder factors alone are B·n²·8 bytes).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(fm, *output[1:])
        ctx.k, ctx.eps = k, eps

    def _topk_singular_vectors_backward(ctx, grad, *_saved_state_grads):
        # Only `vectors` is an output of the public op; the others are saved state.
        if grad is None:
            return None, None, None, None
        grad_fm = torch.ops.mhgd_fast.topk_singular_vectors_backward(grad, *ctx.saved_tensors, ctx.k, ctx.eps)
        return grad_fm, None, None, None

    torch.library.register_autograd("mhgd_fast::topk_singular_vectors", _topk_singular_vectors_backward,
                                    setup_context=_topk_singular_vectors_setup)
