"""Python side of the compiled ops: fake (meta) kernels and autograd formulas.

With these, ``torch.ops.mhgd_fast.*`` work under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``. Nothing is registered when the extension is not built.
"""
import math

import torch

from ._extension import _C

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

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors")
    def _topk_singular_vectors_fake(fm, k, eps):
        batch, c = fm.shape[0], fm.shape[1]
        n = torch.sym_min(math.prod(fm.shape[2:]), c)
        kk = torch.sym_min(k, n)
        # Mirrors keeps_full_basis() in csrc/cpu/topk_singular_vectors_cpu.cpp.
        full = k > 1 or n <= k + 16
        acc = torch.float32 if fm.dtype in (torch.float16, torch.bfloat16) else fm.dtype
        f64 = dict(dtype=torch.float64)
        return (fm.new_empty(batch, k, c), fm.new_empty(batch, n, n, dtype=acc),
                fm.new_empty(batch, n, n if full else kk, **f64),
                fm.new_empty(batch, n if full else torch.sym_min(n, kk + 1), **f64))

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors_backward")
    def _topk_singular_vectors_backward_fake(grad, fm, gram, gram_vectors, eigenvalues, k, eps):
        return torch.empty_like(fm)

    def _topk_singular_vectors_setup(ctx, inputs, output):
        fm, k, eps = inputs
        _, gram, gram_vectors, eigenvalues = output
        ctx.save_for_backward(fm, gram, gram_vectors, eigenvalues)
        ctx.k, ctx.eps = k, eps

    def _topk_singular_vectors_backward(ctx, grad, _grad_gram, _grad_vectors, _grad_values):
        # Only `vectors` is an output of the public op; the others are saved state.
        fm, gram, gram_vectors, eigenvalues = ctx.saved_tensors
        if grad is None:
            return None, None, None
        grad_fm = torch.ops.mhgd_fast.topk_singular_vectors_backward(
            grad, fm, gram, gram_vectors, eigenvalues, ctx.k, ctx.eps)
        return grad_fm, None, None

    torch.library.register_autograd("mhgd_fast::topk_singular_vectors", _topk_singular_vectors_backward,
                                    setup_context=_topk_singular_vectors_setup)
