"""Gradient balancing of the authors' stage-2 optimiser (MHGD_SPEC.md §6).

For every student parameter tensor separately::

    g = g_wd + g_ce + clip_by_norm(g_transfer, ‖g_ce‖₂ · σ(epoch − init_epoch))

:func:`balanced_backward` writes ``g_ce + clip(g_transfer)`` into ``.grad``; ``g_wd`` is the
optimiser's own ``weight_decay`` (SGD adds ``wd·w`` before momentum, as the authors do).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

__all__ = ["transfer_clip_factor", "clip_by_norm", "balanced_backward"]


def transfer_clip_factor(epoch: float, init_epoch: float) -> float:
    """σ(epoch − init_epoch), taken as exactly 1 once above 1 − 1e-8.

    ``epoch`` counts from the start of stage 1; ``init_epoch`` is the stage-1 length, so stage 2
    starts at 0.5 and the cap on the transfer gradient grows to ‖g_ce‖ over a few epochs.
    """
    z = float(epoch) - float(init_epoch)
    s = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return 1.0 if s > 1.0 - 1e-8 else s


def clip_by_norm(t: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """``t`` rescaled to L2 norm ``max_norm`` when it is longer (TensorFlow's clip_by_norm).
    A zero ``max_norm`` gives zeros."""
    norm = t.norm()
    return t * (max_norm / torch.maximum(norm, max_norm).clamp_min(torch.finfo(t.dtype).tiny))


def balanced_backward(ce_loss: torch.Tensor, transfer_loss: torch.Tensor,
                      params: Iterable[torch.nn.Parameter], epoch: float, init_epoch: float,
                      retain_graph: Optional[bool] = None,
                      reduce_grads: Optional[Callable] = None) -> dict:
    """Accumulate the balanced gradient of ``ce_loss`` and ``transfer_loss`` into ``p.grad``.

    Two backward passes over the shared graph give the CE and transfer gradients separately; each
    parameter's transfer gradient is clipped to ``‖g_ce‖ · σ(epoch − init_epoch)``. Parameters
    the CE loss does not reach get no transfer gradient either (their cap is 0). Returns the summed
    norms ``{"ce": …, "transfer": …, "transfer_clipped": …, "factor": …}`` for logging.

    ``reduce_grads(kind, grads)`` (``kind`` is ``"ce"`` or ``"transfer"``), when given, replaces
    each gradient list before clipping; data-parallel training passes a cross-process all-reduce
    so the clip compares the global CE and transfer gradients.
    """
    params = [p for p in params if p.requires_grad]
    factor = transfer_clip_factor(epoch, init_epoch)
    g_ce = torch.autograd.grad(ce_loss, params, retain_graph=True, allow_unused=True)
    if transfer_loss.requires_grad:
        g_tr = torch.autograd.grad(transfer_loss, params, retain_graph=retain_graph, allow_unused=True)
    else:
        g_tr = (None,) * len(params)
    if reduce_grads is not None:
        g_ce = reduce_grads("ce", g_ce)
        g_tr = reduce_grads("transfer", g_tr)
    sq = {"ce": [], "transfer": [], "transfer_clipped": []}  # squared norms, summed once at the end
    for p, gc, gt in zip(params, g_ce, g_tr):
        gc = torch.zeros_like(p) if gc is None else gc
        grad = gc
        if gt is not None:
            clipped = clip_by_norm(gt, gc.norm() * factor)
            grad = gc + clipped
            sq["transfer"].append(gt.detach().pow(2).sum())
            sq["transfer_clipped"].append(clipped.detach().pow(2).sum())
        sq["ce"].append(gc.detach().pow(2).sum())
        p.grad = grad.detach() if p.grad is None else p.grad + grad.detach()
    stats = {key: float(torch.stack(v).sum().sqrt()) if v else 0.0 for key, v in sq.items()}
    stats["factor"] = factor
    return stats
