"""Gradient balancing of the authors' stage-2 optimiser (docs/method.md §6).

For every student parameter tensor separately::

    g = g_wd + g_ce + clip_by_norm(g_transfer, cap · ‖g_ce‖₂ · σ(epoch − init_epoch))

with ``cap = 1`` in the authors' recipe. :func:`balanced_backward` writes ``g_ce +
clip(g_transfer)`` into ``.grad``; ``g_wd`` is the optimiser's own ``weight_decay`` (SGD adds
``wd·w`` before momentum, as the authors do). :func:`weighted_backward` is the unbalanced
alternative, ``g_ce + weight · g_transfer``, with the same diagnostics.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

__all__ = ["transfer_clip_factor", "clip_by_norm", "balanced_backward", "weighted_backward"]


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


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return value


def _stats(sq: dict, dot: list, clipped: int, tensors: int, factor: float) -> dict:
    """Summed norms, the cosine between the two gradients over all tensors, the clipped share."""
    stats = {key: float(torch.stack(v).sum().sqrt()) if v else 0.0 for key, v in sq.items()}
    norm_product = stats["ce"] * stats["transfer"]
    stats["cosine"] = float(torch.stack(dot).sum()) / norm_product if dot and norm_product > 0 else float("nan")
    stats["ratio"] = stats["transfer"] / stats["ce"] if stats["ce"] > 0 else float("nan")
    stats["clipped_share"] = clipped / tensors if tensors else float("nan")
    stats["factor"] = factor
    return stats


def _two_gradients(ce_loss, transfer_loss, params, retain_graph, reduce_grads):
    g_ce = torch.autograd.grad(ce_loss, params, retain_graph=True, allow_unused=True)
    if transfer_loss.requires_grad:
        g_tr = torch.autograd.grad(transfer_loss, params, retain_graph=retain_graph, allow_unused=True)
    else:
        g_tr = (None,) * len(params)
    if reduce_grads is not None:
        g_ce = reduce_grads("ce", g_ce)
        g_tr = reduce_grads("transfer", g_tr)
    return g_ce, g_tr


def _check_grad_scale(grad_scale: Optional[float]) -> Optional[float]:
    if grad_scale is None:
        return None
    value = float(grad_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")
    return value


def _unscaled(g_ce, g_tr, grad_scale):
    """The gradients of losses multiplied by ``grad_scale`` divided by it, and the function that
    multiplies a result by it again (both identities when ``grad_scale`` is None)."""
    if grad_scale is None:
        return g_ce, g_tr, lambda g: g
    inverse = 1.0 / grad_scale
    unscale = lambda grads: tuple(None if g is None else g * inverse for g in grads)  # noqa: E731
    return unscale(g_ce), unscale(g_tr), lambda g: g * grad_scale


def balanced_backward(ce_loss: torch.Tensor, transfer_loss: torch.Tensor,
                      params: Iterable[torch.nn.Parameter], epoch: float, init_epoch: float,
                      retain_graph: Optional[bool] = None,
                      reduce_grads: Optional[Callable] = None, cap: float = 1.0,
                      grad_scale: Optional[float] = None) -> dict:
    """Accumulate the balanced gradient of ``ce_loss`` and ``transfer_loss`` into ``p.grad``.

    Two backward passes over the shared graph give the CE and transfer gradients separately; each
    parameter's transfer gradient is clipped to ``cap · ‖g_ce‖ · σ(epoch − init_epoch)`` (the
    authors' rule is ``cap = 1``; ``cap = 0`` drops the transfer gradient). Parameters the CE loss
    does not reach get no transfer gradient either (their cap is 0).

    Returns diagnostics over all tensors: the norms ``"ce"``, ``"transfer"`` (before clipping) and
    ``"transfer_clipped"``; ``"ratio"`` = ‖g_transfer‖/‖g_ce‖; ``"cosine"`` between the CE and
    the (unclipped) transfer gradient; ``"clipped_share"``, the share of tensors whose transfer
    gradient was shortened; and the clip ``"factor"`` σ(·).

    ``reduce_grads(kind, grads)`` (``kind`` is ``"ce"`` or ``"transfer"``), when given, replaces
    each gradient list before clipping; data-parallel training passes a cross-process all-reduce
    so the clip compares the global CE and transfer gradients.

    ``grad_scale``, when given, is a loss scale (float16 training with ``torch.amp.GradScaler``):
    both losses come multiplied by it. Their gradients are divided by it before the norms and the
    clip, so the clip and the diagnostics are exactly those of the unscaled losses, and the sum is
    multiplied by it again into ``.grad``, where ``GradScaler.step`` unscales it and skips the step
    when it is inf/NaN. (The scale is a power of two: dividing and multiplying are exact.)
    """
    cap = _check_nonnegative("cap", cap)
    grad_scale = _check_grad_scale(grad_scale)
    params = [p for p in params if p.requires_grad]
    factor = transfer_clip_factor(epoch, init_epoch)
    g_ce, g_tr = _two_gradients(ce_loss, transfer_loss, params, retain_graph, reduce_grads)
    g_ce, g_tr, rescale = _unscaled(g_ce, g_tr, grad_scale)
    sq = {"ce": [], "transfer": [], "transfer_clipped": []}  # squared norms, summed once at the end
    dot, clipped, tensors = [], 0, 0
    for p, gc, gt in zip(params, g_ce, g_tr):
        gc = torch.zeros_like(p) if gc is None else gc
        grad = gc
        if gt is not None:
            gc_norm, gt_norm = gc.norm(), gt.norm()
            max_norm = gc_norm * (cap * factor)
            shortened = clip_by_norm(gt, max_norm)
            grad = gc + shortened
            sq["transfer"].append(gt_norm.detach().pow(2))
            sq["transfer_clipped"].append(shortened.detach().pow(2).sum())
            dot.append((gc.detach() * gt.detach()).sum())
            clipped += int(gt_norm > max_norm)
            tensors += 1
        sq["ce"].append(gc.detach().pow(2).sum())
        grad = rescale(grad.detach())
        p.grad = grad if p.grad is None else p.grad + grad
    return _stats(sq, dot, clipped, tensors, factor)


def weighted_backward(ce_loss: torch.Tensor, transfer_loss: torch.Tensor,
                      params: Iterable[torch.nn.Parameter], weight: float = 1.0,
                      retain_graph: Optional[bool] = None, reduce_grads: Optional[Callable] = None,
                      grad_scale: Optional[float] = None) -> dict:
    """Accumulate the gradient of ``ce_loss + weight · transfer_loss`` into ``p.grad`` (no
    balancing), with the same diagnostics as :func:`balanced_backward` (``"transfer"`` is the norm
    of the weighted transfer gradient; nothing is clipped). Two backward passes: use a plain
    ``backward()`` on the sum when no diagnostics are wanted. ``grad_scale``: as in
    :func:`balanced_backward` (the diagnostics are those of the unscaled gradients)."""
    weight = _check_nonnegative("weight", weight)
    grad_scale = _check_grad_scale(grad_scale)
    params = [p for p in params if p.requires_grad]
    g_ce, g_tr = _two_gradients(ce_loss, transfer_loss, params, retain_graph, reduce_grads)
    g_ce, g_tr, rescale = _unscaled(g_ce, g_tr, grad_scale)
    sq = {"ce": [], "transfer": [], "transfer_clipped": []}
    dot, tensors = [], 0
    for p, gc, gt in zip(params, g_ce, g_tr):
        if gc is None and gt is None:
            continue
        gc = torch.zeros_like(p) if gc is None else gc
        grad = gc
        if gt is not None:
            gt = gt * weight
            grad = gc + gt
            sq["transfer"].append(gt.detach().pow(2).sum())
            sq["transfer_clipped"].append(sq["transfer"][-1])
            dot.append((gc.detach() * gt.detach()).sum())
            tensors += 1
        sq["ce"].append(gc.detach().pow(2).sum())
        grad = rescale(grad.detach())
        p.grad = grad if p.grad is None else p.grad + grad
    return _stats(sq, dot, 0, tensors, 1.0)
