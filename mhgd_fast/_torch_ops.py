"""Python side of the compiled ops: fake (meta) kernels and autograd formulas.

With these, ``torch.ops.mhgd_fast.*`` work under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``. Nothing is registered when the extension is not built.
"""
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
