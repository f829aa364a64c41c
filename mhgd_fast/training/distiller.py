"""Distillers in the mdistiller / torchdistill mould, for use from your own training loop.

A distiller owns a student and a frozen teacher (kept in eval mode whatever ``train()`` says),
lists its extra learnable modules, and returns the logits and a dict of named losses. Losses are
``nn.Module``s called as ``loss(student, teacher)``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_ranks
from .features import FeatureCapture, unwrap
from ..module import MHGD

__all__ = ["KDLoss", "Distiller", "StudentOnly", "KDDistiller", "MHGDDistiller", "feature_channels"]


class KDLoss(nn.Module):
    """Hinton et al. (2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch
    (``reduction="batchmean"``) or summed (``"sum"``)."""

    def __init__(self, temperature: float = 4.0, reduction: str = "batchmean"):
        super().__init__()
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        self.temperature, self.reduction = float(temperature), reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature  # float32 softmaxes when autocast gives float16/bfloat16 logits
        wide = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
        log_p_s = F.log_softmax(wide(student_logits) / t, dim=1)
        log_p_t = F.log_softmax(wide(teacher_logits.detach()) / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction=self.reduction, log_target=True) * t * t


class Distiller(nn.Module):
    """Base: cross-entropy on the student; the teacher (if any) is frozen and stays in eval mode."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.student, self.teacher = student, teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def extra_modules(self) -> List[nn.Module]:
        """Learnable modules besides the student (optimise them along with it)."""
        return []

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, targets)}


StudentOnly = Distiller


class KDDistiller(Distiller):
    """Classic KD: ``ce_weight · CE + kd_weight · KDLoss(T)``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 4.0,
                 ce_weight: float = 1.0, kd_weight: float = 1.0):
        super().__init__(student, teacher)
        self.kd, self.ce_weight, self.kd_weight = KDLoss(temperature), ce_weight, kd_weight

    def forward(self, images, targets):
        logits = self.student(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return logits, {"ce": self.ce_weight * F.cross_entropy(logits, targets),
                        "kd": self.kd_weight * self.kd(logits, teacher_logits)}


def feature_channels(model: nn.Module, paths: Sequence[str], image_size: int = 32) -> List[int]:
    """Channel count at each sensing point, from one dummy forward in eval mode."""
    inner = unwrap(model)
    was_training = inner.training
    param = next(inner.parameters())
    with FeatureCapture(inner, paths) as capture, torch.no_grad():
        inner.eval()
        inner(torch.zeros(2, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        channels = [f.shape[1] for f in capture.features]
    inner.train(was_training)
    return channels


class MHGDDistiller(Distiller):
    """MHGD (Lee & Song 2019) on user models: features are captured by forward hooks at
    ``student_points`` / ``teacher_points`` (module paths, DDP wrappers allowed).

    Stage 1 optimises ``mhgd`` (:meth:`extra_modules`) on :meth:`estimator_loss`; stage 2 trains
    the student on ``forward``'s ``{"ce", "transfer"}`` — combine them with
    :func:`mhgd_fast.balanced_backward` as the authors do, or add them. ``gather`` is passed to
    :meth:`MHGD.forward` (``all_gather_columns`` builds graphs over the global batch).

    The gather is a collective operation, so with one the processes first agree, through
    ``agree`` (default :func:`mhgd_fast.training.distributed.all_ranks`, the default process group), that
    every one of them has finite inputs; when any has not, every process skips the gather and
    returns a NaN transfer loss, and none waits for a gather the others never start.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_points: Sequence[str],
                 teacher_points: Sequence[str], mhgd: Optional[MHGD] = None, *,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 agree: Callable[[bool], bool] = all_ranks, **mhgd_kwargs):
        super().__init__(student, teacher)
        if len(student_points) != len(teacher_points):
            raise ValueError(f"{len(student_points)} student sensing points but {len(teacher_points)} teacher ones")
        s_ch, t_ch = feature_channels(student, student_points), feature_channels(teacher, teacher_points)
        if s_ch != t_ch:
            raise ValueError(f"teacher and student must have the same channels at each sensing point "
                             f"(docs/method.md §2): teacher {t_ch} at {list(teacher_points)}, "
                             f"student {s_ch} at {list(student_points)}")
        self.mhgd = mhgd if mhgd is not None else MHGD(t_ch, **mhgd_kwargs)
        self.gather, self.agree = gather, agree
        self.student_capture = FeatureCapture(student, student_points)
        self.teacher_capture = FeatureCapture(teacher, teacher_points)

    def extra_modules(self) -> List[nn.Module]:
        return [self.mhgd]

    def teacher_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            self.teacher(images)
        return self.teacher_capture.features

    def estimator_loss(self, images: torch.Tensor, weight_decay: float = 5e-4) -> torch.Tensor:
        """Stage 1 (§5): the graph network's loss on the teacher's features of ``images``."""
        feats = self.teacher_features(images)
        loss = self.mhgd.estimator_loss(feats, weight_decay=weight_decay)
        self.teacher_capture.clear()
        return loss

    def forward(self, images, targets, stats: Optional[dict] = None):
        """Stage 2 (§6): student logits and ``{"ce", "transfer"}``; ``stats``, when a dict is
        given, receives :meth:`MHGD.forward`'s diagnostics."""
        t_feats = self.teacher_features(images)
        logits = self.student(images)
        ce = F.cross_entropy(logits, targets)
        s_feats = self.student_capture.features
        finite = torch.isfinite(ce)
        if self.gather is not None:  # every process must take the same branch: agree on all inputs
            # (a sum is finite only if every value is; one pass, ~9x cheaper than isfinite().all())
            sums = torch.stack([f.detach().sum(dtype=torch.float32) for f in (*s_feats, *t_feats)])
            finite = self.agree(bool(finite & torch.isfinite(sums).all()))
        if finite:
            transfer = self.mhgd(s_feats, t_feats, gather=self.gather, stats=stats)
        else:  # the SVD would reject non-finite features; let the caller see a non-finite loss
            transfer = torch.full_like(ce, float("nan"))
        losses = {"ce": ce, "transfer": transfer}
        self.student_capture.clear()
        self.teacher_capture.clear()
        return logits, losses
