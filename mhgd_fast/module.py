"""The MHGD graph network as an ``nn.Module`` (docs/method.md §2, §4–§6).

``MHGD(channels)`` holds one :class:`GraphPair` per pair of consecutive sensing points.
Stage 1 trains it with :meth:`MHGD.estimator_loss` on teacher features; stage 2 calls
:meth:`MHGD.forward` (the transfer loss), which uses the frozen heads with their BN running
statistics and never changes the module.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from ._validation import check_choice, check_float_tensor, check_scale

__all__ = ["MHGD", "GraphPair", "Estimator", "drop_head_mask", "SCALE_RSQRT_D", "SATURATION_LEVEL"]

SCALE_RSQRT_D = "rsqrt-d"   # MHGD(scale=...) option: 1/√d for each pair, d its per-head width
SATURATION_LEVEL = 0.995     # a logit counts as saturated when |tanh S| exceeds this


def _outside_autocast(method):
    """Run ``method(self, feats, ...)`` with autocast off on the features' device: under mixed
    precision the graph network stays float32 (its inputs, the feature maps, may be float16 or
    bfloat16; the graph ops accumulate them in float32)."""
    @functools.wraps(method)
    def wrapper(self, feats, *args, **kwargs):
        device_type = feats[0].device.type if isinstance(feats, (list, tuple)) and feats and \
            isinstance(feats[0], torch.Tensor) else None
        off = (torch.autocast(device_type, enabled=False)
               if device_type is not None and torch.is_autocast_enabled(device_type) else contextlib.nullcontext())
        with off:
            return method(self, feats, *args, **kwargs)
    return wrapper


def _init_linear(linear: nn.Linear) -> None:
    """§4: Kaiming-normal, fan_out, ReLU gain; biases start at 0."""
    nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _embedding(c_in: int, width: int) -> nn.Sequential:
    layers = nn.Sequential(nn.Linear(c_in, width, bias=False), nn.BatchNorm1d(width, eps=1e-5, momentum=0.1))
    _init_linear(layers[0])
    return layers


def _frozen_embedding(embed: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
    """Stage-2 embedding: detached weights, BN running statistics, nothing updated (§6)."""
    linear, bn = embed[0], embed[1]
    z = F.linear(v, linear.weight.detach())
    return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(),
                        training=False, eps=bn.eps)


def drop_head_mask(heads: int, batch: int, *, device=None, dtype=torch.float32,
                   generator: torch.Generator = None) -> torch.Tensor:
    """§5 drop-head: ``[H, N]`` mask; head a of sample i is kept iff its N(0,1) draw exceeds the
    mean of that sample's H draws (about half the heads survive; no rescaling)."""
    draws = torch.randn(heads, batch, device=device, generator=generator)
    return (draws > draws.mean(dim=0, keepdim=True)).to(dtype)


class Estimator(nn.Module):
    """§5: predicts the back vectors from the front vectors through the attention graph."""

    def __init__(self, c_front: int, c_back: int, d: int, heads: int):
        super().__init__()
        self.heads, self.d = heads, d
        self.front = nn.Sequential(nn.Linear(c_front, d, bias=False), nn.BatchNorm1d(d), nn.ReLU())
        self.out = nn.Linear(heads * d, c_back)
        _init_linear(self.front[0])
        _init_linear(self.out)

    def forward(self, graph: torch.Tensor, v_front: torch.Tensor, drop_head: bool) -> torch.Tensor:
        f1 = self.front(v_front)  # [N, d]
        per_head = graph @ f1  # [H, N, d]
        if drop_head:
            mask = drop_head_mask(self.heads, f1.shape[0], device=f1.device, dtype=f1.dtype)
            per_head = per_head * mask.unsqueeze(-1)
        cat = per_head.transpose(0, 1).reshape(f1.shape[0], self.heads * self.d)
        return F.normalize(self.out(cat), dim=-1)


class GraphPair(nn.Module):
    """Attention heads and estimator linking sensing point m (front) to m+1 (back), §4."""

    def __init__(self, c_front: int, c_back: int, heads: int):
        super().__init__()
        self.heads = heads
        self.d = (c_front + c_back) // 2
        width = heads * self.d
        self.embed_back = _embedding(c_back, width)
        self.embed_front = _embedding(c_front, width)
        self.estimator = Estimator(c_front, c_back, self.d, heads)

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, H·d] -> [H, N, d]``; head a owns the contiguous features ``[a·d, (a+1)·d)``."""
        return z.view(z.shape[0], self.heads, self.d).transpose(0, 1)

    def queries_keys(self, v_front: torch.Tensor, v_back: torch.Tensor, frozen: bool):
        """Rows from the back vectors (θ), columns from the front vectors (ϕ)."""
        if frozen:
            theta = _frozen_embedding(self.embed_back, v_back)
            phi = _frozen_embedding(self.embed_front, v_front)
        else:
            theta, phi = self.embed_back(v_back), self.embed_front(v_front)
        return self.split_heads(theta), self.split_heads(phi)


class MHGD(nn.Module):
    """Multi-head attention graph distillation over ``len(channels)`` sensing points.

    Args:
        channels: channel count at each sensing point (teacher and student must agree).
        heads: attention heads per pair (§4, default 8).
        student_vectors: singular vectors kept per student map before alignment (§3).
        squash: stage-2 logit squashing, ``"tanh"`` (paper) or ``None`` (also ``"none"``).
        scale: logit scale, in both stages: a number (paper: 1) or ``"rsqrt-d"`` for
            ``1/√d`` per pair (``d`` the pair's per-head width, as in scaled dot-product attention).
        reduction: how :meth:`forward` reduces each pair's KL rows: ``"sum"`` (paper) or
            ``"mean"``; pairs are summed.
        backend: backend for every op (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``).
    """

    def __init__(self, channels: Sequence[int], *, heads: int = 8, student_vectors: int = 4,
                 squash="tanh", scale: Union[float, str] = 1.0, reduction: str = "sum", backend: str = "auto"):
        super().__init__()
        channels = list(channels)
        if len(channels) < 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must list ≥ 2 positive ints (one per sensing point), got {channels}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not isinstance(student_vectors, int) or student_vectors < 1:
            raise ValueError(f"student_vectors must be a positive int, got {student_vectors!r}")
        squash = None if squash == "none" else squash
        check_choice("squash", squash, ops.SQUASHES)
        check_choice("reduction", reduction, ("sum", "mean"))
        if scale != SCALE_RSQRT_D:
            if isinstance(scale, str):
                raise ValueError(f"scale must be a number or {SCALE_RSQRT_D!r}, got {scale!r}")
            scale = check_scale(scale)
        self.channels, self.heads, self.student_vectors = channels, heads, student_vectors
        self.squash, self.scale, self.reduction, self.backend = squash, scale, reduction, backend
        self.pairs = nn.ModuleList(GraphPair(channels[m], channels[m + 1], heads)
                                   for m in range(len(channels) - 1))

    def pair_scale(self, m: int) -> float:
        """The logit scale of pair ``m``: ``scale``, or ``1/√d`` of that pair for ``"rsqrt-d"``."""
        return 1.0 / math.sqrt(self.pairs[m].d) if self.scale == SCALE_RSQRT_D else self.scale

    def _check_feats(self, name: str, feats) -> None:
        if not isinstance(feats, (list, tuple)) or len(feats) != len(self.channels):
            got = len(feats) if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"{name} must be a list of {len(self.channels)} feature maps, got {got}")
        for m, fm in enumerate(feats):
            check_float_tensor(f"{name}[{m}]", fm, min_ndim=2, layout="[B, C, *spatial]")
            if fm.shape[1] != self.channels[m]:
                raise ValueError(f"{name}[{m}] has {fm.shape[1]} channels but sensing point {m} "
                                 f"expects {self.channels[m]} (channels={self.channels})")
            if fm.shape[0] != feats[0].shape[0]:
                raise ValueError(f"{name}[{m}] has batch size {fm.shape[0]}, {name}[0] has {feats[0].shape[0]}")
        if feats[0].shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")

    def teacher_vectors(self, teacher_feats) -> List[torch.Tensor]:
        """Top singular vector of each teacher map, ``[B, C_m]``, as constants."""
        with torch.no_grad():
            return [ops.topk_singular_vectors(fm.detach(), 1, backend=self.backend)[:, 0]
                    for fm in teacher_feats]

    def student_vectors_aligned(self, student_feats, v_teacher) -> List[torch.Tensor]:
        """Top ``student_vectors`` of each student map, aligned to the teacher's vector (§3)."""
        out = []
        for fm, v_t in zip(student_feats, v_teacher):
            k = min(self.student_vectors, fm.shape[1])
            v_s = ops.topk_singular_vectors(fm, k, backend=self.backend)  # the maps' dtype (fp16/bf16 too)
            out.append(ops.align_singular_vectors(v_s, v_t.to(v_s.dtype)))  # only signs are taken from v_t
        return out

    @_outside_autocast
    def estimator_loss(self, teacher_feats, weight_decay: float = 5e-4) -> torch.Tensor:
        """Stage-1 loss (§5) on teacher features: Σ_pairs mean_i (1 − ⟨V̂_B[i], V_B[i]⟩) plus
        ``weight_decay · Σ w²`` over every graph-network parameter. In training mode BN uses and
        updates batch statistics and drop-head is applied; in eval mode neither."""
        self._check_feats("teacher_feats", teacher_feats)
        if self.training and teacher_feats[0].shape[0] < 2:
            raise ValueError("estimator_loss in training mode needs a batch of at least 2 (BatchNorm)")
        vecs = [v.to(next(self.parameters()).dtype) for v in self.teacher_vectors(teacher_feats)]
        loss = vecs[0].new_zeros(())
        for m, pair in enumerate(self.pairs):
            v_front, v_back = vecs[m], vecs[m + 1]
            q, k = pair.queries_keys(v_front, v_back, frozen=False)
            graph = ops.attention_graph(q, k, squash=None, scale=self.pair_scale(m), backend=self.backend)
            v_hat = pair.estimator(graph, v_front, drop_head=self.training)
            loss = loss + (1 - (v_hat * v_back).sum(-1)).mean()
        if weight_decay:
            loss = loss + weight_decay * sum(p.pow(2).sum() for p in self.parameters())
        return loss

    @_outside_autocast
    def forward(self, student_feats, teacher_feats, *,
                gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                stats: Optional[dict] = None) -> torch.Tensor:
        """Stage-2 transfer loss (§6): Σ_pairs graph_kl(student ‖ teacher) through the frozen
        heads. Gradients reach ``student_feats`` only; the module's parameters and BN statistics
        are neither trained nor updated.

        ``gather`` maps the local column keys ``[H, N, d]`` to the keys of every column of the
        graph ``[H, M, d]`` (e.g. :func:`mhgd_fast.training.distributed.all_gather_columns` for a graph
        over the global batch); rows stay local, so each process sums the KL of its own rows.

        ``stats``, when a dict is given, receives diagnostics (floats, nothing is differentiated):
        ``kl_row_p{m}``, the mean KL per graph row of pair m; ``sat_student_p{m}`` and
        ``sat_teacher_p{m}``, the share of the pair's logits with ``|tanh S| > 0.995`` (saturated
        whether or not the loss squashes them); and, when ``squash`` is None and a compiled backend
        runs, ``kl_check_p{m}``, the relative difference of the loss to the reference backend's."""
        self._check_feats("student_feats", student_feats)
        self._check_feats("teacher_feats", teacher_feats)
        if student_feats[0].shape[0] != teacher_feats[0].shape[0]:
            raise ValueError(f"student batch {student_feats[0].shape[0]} != teacher batch "
                             f"{teacher_feats[0].shape[0]}")
        dtype = next(self.parameters()).dtype
        v_t = [v.to(dtype) for v in self.teacher_vectors(teacher_feats)]
        v_s = [v.to(dtype) for v in self.student_vectors_aligned(student_feats, v_t)]
        loss = v_s[0].new_zeros(())
        for m, pair in enumerate(self.pairs):
            q_s, k_s = pair.queries_keys(v_s[m], v_s[m + 1], frozen=True)
            with torch.no_grad():
                q_t, k_t = pair.queries_keys(v_t[m], v_t[m + 1], frozen=True)
            if gather is not None:
                k_s, k_t = gather(k_s), gather(k_t)
            scale = self.pair_scale(m)
            term = ops.graph_kl(q_s, k_s, q_t, k_t, squash=self.squash, scale=scale,
                                direction="student_teacher", reduction=self.reduction, backend=self.backend)
            if stats is not None:
                stats.update(self._pair_stats(m, term, q_s, k_s, q_t, k_t, scale))
            loss = loss + term
        return loss

    def _pair_stats(self, m, term, q_s, k_s, q_t, k_t, scale) -> dict:
        with torch.no_grad():
            rows = q_s.shape[0] * q_s.shape[1]
            total = float(term) * (rows if self.reduction == "mean" else 1)
            out = {f"kl_row_p{m}": total / max(rows, 1)}
            threshold = math.atanh(SATURATION_LEVEL)
            for side, q, k in (("student", q_s, k_s), ("teacher", q_t, k_t)):
                logits = scale * (q.float() @ k.float().transpose(-1, -2))
                out[f"sat_{side}_p{m}"] = float((logits.abs() > threshold).float().mean())
            if self.squash is None and self.backend != "reference":
                exact = float(reference.graph_kl(*(t.detach().double() for t in (q_s, k_s, q_t, k_t)),
                                                 None, scale, "student_teacher", "sum"))
                out[f"kl_check_p{m}"] = abs(total - exact) / max(abs(exact), 1e-12)
        return out
