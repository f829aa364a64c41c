"""MHGD as a torchdistill plug-in. List this module under a config's ``dependencies:`` and the
keys below become usable in it (each registered with torchdistill's own decorators):

* model ``mhgd_fast_model``: a network of :func:`mhgd_fast.training.models.build_model` (``name``,
  ``num_classes``, ``width``), optionally loaded from a checkpoint of the pipeline or a state dict;
* auxiliary model wrapper ``Teacher4MHGD``: the frozen teacher (eval mode, no gradient) next to
  the MHGD graph network. With ``trains_heads: True`` (stage 1) the heads learn the estimator loss
  on the teacher's features and are saved to ``heads_ckpt`` after every epoch; with ``False``
  (stage 2) they are loaded from there and frozen: eval mode, no gradient, BN statistics untouched;
* mid-level loss ``MHGDEstimatorLoss``: the stage-1 loss (§5);
* high-level loss ``MHGDLoss``: stage 2, CE + transfer loss (§6). It returns their sum (so
  torchdistill's loops log and check one number) and keeps the two terms apart on it, as
  ``loss.mhgd_terms``, for the balancing;
* post-forward process ``mhgd_balanced_post_forward_process``: :func:`mhgd_fast.balanced_backward`
  on those terms, then the optimiser and scheduler steps exactly as torchdistill's
  ``default_post_forward_process`` does them (gradient accumulation, ``max_grad_norm``,
  step-wise schedulers);
* forward process ``forward_batch_only_no_sync``: ``forward_batch_only`` with DDP's gradient
  synchronisation off, for a DDP-wrapped student in stage 2 (the balancing computes the two
  gradients itself and all-reduces them, as the pipeline does).

The teacher's sensing points are read from the teacher's ``forward_hook`` outputs
(``teacher_model.<point>``), the student's from the student's (``student_paths`` of
``MHGDLoss``). ``examples/torchdistill/`` has the authors' recipe and a tiny config.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, ReduceLROnPlateau

try:
    from torchdistill.common.constant import SELF_MODULE_PATH
    from torchdistill.core.interfaces.registry import register_forward_proc_func, register_post_forward_proc_func
    from torchdistill.losses.registry import register_high_level_loss, register_mid_level_loss
    from torchdistill.models.registry import register_auxiliary_model_wrapper, register_model
    from torchdistill.models.util import load_module_ckpt, save_module_ckpt, wrap_if_distributed
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] != "torchdistill":
        raise
    raise ImportError("mhgd_fast.contrib.torchdistill needs torchdistill, which is not installed: "
                      "pip install .[torchdistill]  (or: pip install 'torchdistill>=1.1')") from exc

from ..balancing import balanced_backward
from ..module import MHGD
from ..training.data import channel_stats, synthetic_dataset
from ..training.distiller import feature_channels
from ..training.distributed import all_reduce_grads, any_rank
from ..training.models import build_model

__all__ = ["mhgd_fast_model", "SyntheticImages", "Teacher4MHGD", "MHGDEstimatorLoss", "MHGDLoss", "MHGDTerms",
           "forward_batch_only_no_sync", "mhgd_balanced_post_forward_process"]


@register_model(key="mhgd_fast_model")
def mhgd_fast_model(name: str, num_classes: int = 100, width: float = 1.0, checkpoint: Optional[str] = None):
    """A CIFAR network of :func:`mhgd_fast.training.models.build_model`. ``checkpoint``: a file of the
    pipeline (``<run>/checkpoints/teacher.pt``; its sha256 is checked), a torchdistill checkpoint
    (``{"model": state}``) or a plain state dict."""
    model = build_model(name, num_classes, width)
    if checkpoint:
        from ..training import checkpoint as pipeline_checkpoint
        state = pipeline_checkpoint.load(os.path.expanduser(checkpoint))
        if "modules" in state:
            state = state["modules"]["model"]
        elif "model" in state:
            state = state["model"]
        model.load_state_dict(state)
    return model


class SyntheticImages(torch.utils.data.Dataset):
    """The built-in synthetic dataset (:func:`mhgd_fast.training.data.synthetic_dataset`) as a torch
    ``Dataset`` of ``(float image [3, 32, 32], int label)``, normalised per channel by ``mean`` /
    ``std`` (default: this set's own statistics). ``transform`` is applied to each image after."""

    def __init__(self, num_images: int, seed: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, transform=None):
        data = synthetic_dataset(num_images, seed)
        own_mean, own_std = channel_stats(data.images)
        mean = own_mean if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = own_std if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.images = (data.images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        self.targets = data.labels.tolist()
        self.classes = list(range(data.num_classes))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class _EstimatorObjective(nn.Module):
    """Stage 1 as a module whose forward is the loss, so DDP can wrap the graph network (as in
    the pipeline): teacher features in, the estimator loss out (NaN on non-finite features, which
    the SVD would reject)."""

    def __init__(self, mhgd: MHGD, weight_decay: float):
        super().__init__()
        self.mhgd, self.weight_decay = mhgd, weight_decay

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        if not bool(torch.isfinite(torch.stack([f.sum(dtype=torch.float32) for f in feats])).all()):
            return feats[0].new_full((), float("nan"))
        return self.mhgd.estimator_loss(feats, weight_decay=self.weight_decay)


@register_auxiliary_model_wrapper
class Teacher4MHGD(AuxiliaryModelWrapper):
    """The frozen teacher and the MHGD graph network (§4–§6).

    Args:
        teacher_model: the trained teacher; kept in eval mode with no gradient in both stages.
        sensing_points: module paths in the teacher; the config's teacher ``forward_hook`` must
            list their outputs as ``teacher_model.<point>``.
        heads_ckpt: file of the graph network's state dict: written after every stage-1 epoch,
            read at the start of stage 2.
        trains_heads: True in stage 1 (heads in train mode: BN batch statistics, drop-head),
            False in stage 2 (loaded and frozen; the file must exist).
        mhgd_kwargs: arguments of :class:`mhgd_fast.MHGD` (heads, student_vectors, squash, scale,
            reduction, backend); the channels are measured on the teacher at the sensing points.
        weight_decay: the stage-1 loss's own ``weight_decay · Σ w²`` (authors: 5e-4; the
            optimiser then adds none).
        io_key: the entry of the teacher's I/O dict where the losses find what this wrapper gives
            them: ``{"estimator_loss"}`` in stage 1, ``{"heads", "features"}`` in stage 2.
        device, device_ids, distributed, find_unused_parameters: torchdistill's; in stage 1 the
            heads are DDP-wrapped (``wrap_if_distributed``) when training is distributed.
    """

    def __init__(self, teacher_model: nn.Module, sensing_points: Sequence[str], heads_ckpt: str,
                 device, device_ids=None, distributed: bool = False, trains_heads: bool = True,
                 mhgd_kwargs: Optional[dict] = None, weight_decay: float = 5e-4, io_key: str = "mhgd",
                 image_size: int = 32, find_unused_parameters=None, **kwargs):
        super().__init__()
        if not sensing_points or isinstance(sensing_points, str):
            raise ValueError(f"sensing_points must list ≥ 2 module paths of the teacher, got {sensing_points!r}")
        if not heads_ckpt:
            raise ValueError("heads_ckpt (the file of the trained heads) is required")
        self.teacher_model = teacher_model.to(device).requires_grad_(False).eval()
        self.sensing_points = list(sensing_points)
        self.io_paths = [f"teacher_model.{p}" for p in self.sensing_points]
        self.heads_ckpt = os.path.expanduser(heads_ckpt)
        self.trains_heads, self.io_key = bool(trains_heads), io_key
        channels = feature_channels(self.teacher_model, self.sensing_points, image_size)
        self.mhgd = MHGD(channels, **(mhgd_kwargs or {})).to(device)
        if self.trains_heads:
            self.estimator = wrap_if_distributed(_EstimatorObjective(self.mhgd, weight_decay), device, device_ids,
                                                 distributed, find_unused_parameters=find_unused_parameters)
        else:
            if not os.path.isfile(self.heads_ckpt):
                raise FileNotFoundError(f"Teacher4MHGD(trains_heads=False) loads the stage-1 heads from "
                                        f"{self.heads_ckpt!r}, which does not exist: run stage 1 first "
                                        f"(Teacher4MHGD with trains_heads: True and the same heads_ckpt)")
            load_module_ckpt(self.mhgd, device, self.heads_ckpt)
            self.mhgd.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_model.eval()
        if not self.trains_heads:
            self.mhgd.eval()
        return self

    def forward(self, *args):
        with torch.no_grad():
            return self.teacher_model(*args)

    def teacher_features(self, io_dict: dict) -> List[torch.Tensor]:
        missing = [p for p in self.io_paths if "output" not in io_dict.get(p, {})]
        if missing:
            raise KeyError(f"Teacher4MHGD: no output recorded for {missing}; list "
                           f"{self.io_paths} under the teacher's forward_hook: output")
        return [io_dict[p]["output"] for p in self.io_paths]

    def secondary_forward(self, io_dict: dict) -> None:
        feats = self.teacher_features(io_dict)
        if self.trains_heads:
            io_dict[self.io_key] = {"estimator_loss": self.estimator(feats)}
        else:
            io_dict[self.io_key] = {"heads": self.mhgd, "features": feats}

    def post_epoch_process(self, *args, **kwargs) -> None:
        if self.trains_heads:
            save_module_ckpt(self.mhgd, self.heads_ckpt)


def _wrapper_entry(teacher_io_dict: dict, io_key: str, field: str, stage: str):
    entry = teacher_io_dict.get(io_key, {})
    if field not in entry:
        raise KeyError(f"{stage}: the teacher's I/O dict has no {io_key!r}/{field!r}; the teacher needs the "
                       f"auxiliary model wrapper Teacher4MHGD (io_key {io_key!r}) with trains_heads: "
                       f"{'True' if field == 'estimator_loss' else 'False'}")
    return entry[field]


@register_mid_level_loss
class MHGDEstimatorLoss(nn.Module):
    """Stage 1 (§5): the estimator loss that :class:`Teacher4MHGD` (``trains_heads: True``)
    computed on this batch's teacher features, weight decay included."""

    def __init__(self, io_key: str = "mhgd", **kwargs):
        super().__init__()
        self.io_key = io_key

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        return _wrapper_entry(teacher_io_dict, self.io_key, "estimator_loss", "MHGDEstimatorLoss")


@dataclass
class MHGDTerms:
    """The stage-2 terms that :class:`MHGDLoss` keeps apart, and the balancing cap."""
    ce: torch.Tensor
    transfer: torch.Tensor
    cap: float = 1.0


@register_high_level_loss
class MHGDLoss(nn.Module):
    """Stage 2 (§6): cross-entropy of the student's output and the transfer loss of the frozen
    heads (:meth:`mhgd_fast.MHGD.forward`) between the student's features at ``student_paths``
    (its ``forward_hook`` outputs) and the teacher's.

    Returns ``ce + transfer`` (``transfer`` times ``transfer_weight``) with the two terms kept on
    it as ``loss.mhgd_terms`` (:class:`MHGDTerms`): ``mhgd_balanced_post_forward_process``
    balances them (§6, ``cap`` as in :func:`mhgd_fast.balanced_backward`); torchdistill's
    default post-forward process back-propagates the plain sum instead.
    """

    def __init__(self, student_paths: Sequence[str], io_key: str = "mhgd", transfer_weight: float = 1.0,
                 cap: float = 1.0, **kwargs):
        super().__init__()
        if not student_paths or isinstance(student_paths, str):
            raise ValueError(f"student_paths must list the student's sensing points, got {student_paths!r}")
        for name, value in (("transfer_weight", transfer_weight), ("cap", cap)):
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        self.student_paths, self.io_key = list(student_paths), io_key
        self.transfer_weight, self.cap = float(transfer_weight), float(cap)

    def forward(self, io_dict, model_loss_dict, targets):
        student_io, teacher_io = io_dict["student"], io_dict["teacher"]
        heads = _wrapper_entry(teacher_io, self.io_key, "heads", "MHGDLoss")
        t_feats = _wrapper_entry(teacher_io, self.io_key, "features", "MHGDLoss")
        missing = [p for p in self.student_paths if "output" not in student_io.get(p, {})]
        if missing:
            raise KeyError(f"MHGDLoss: no output recorded for {missing}; list {self.student_paths} under "
                           f"the student's forward_hook: output")
        s_feats = [student_io[p]["output"] for p in self.student_paths]
        ce = F.cross_entropy(student_io[SELF_MODULE_PATH]["output"], targets)
        sums = torch.stack([f.detach().sum(dtype=torch.float32) for f in (*s_feats, *t_feats)])
        if bool(torch.isfinite(ce)) and bool(torch.isfinite(sums).all()):
            transfer = heads(s_feats, t_feats)
        else:  # the SVD would reject non-finite features; let the loop see a non-finite loss
            transfer = torch.full_like(ce, float("nan"))
        if self.transfer_weight != 1:
            transfer = transfer * self.transfer_weight
        total = ce + transfer
        total.mhgd_terms = MHGDTerms(ce, transfer, self.cap)
        return total

    def __str__(self):
        return (f"MHGDLoss = CE + {self.transfer_weight:g} * transfer (student {self.student_paths}, "
                f"balancing cap {self.cap:g})")


@register_forward_proc_func
def forward_batch_only_no_sync(model, sample_batch, targets=None, supp_dict=None, **kwargs):
    """``forward_batch_only`` with DDP's gradient synchronisation off: the balancing computes the
    CE and transfer gradients by hand and all-reduces them itself."""
    sync_off = model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with sync_off:
        return model(sample_batch)


def balance_epochs(box) -> tuple:
    """``(epoch, init_epoch)`` for the clip factor σ(epoch − init_epoch) of the current step:
    ``init_epoch`` counts the epochs of the stages before this one (in a two-stage config, stage
    1's), ``epoch`` adds the epochs this stage has finished, so the cap starts at σ(0) = ½ as in
    the pipeline. A single-stage box counts this stage's epochs from its steps."""
    if hasattr(box, "stage_number") and hasattr(box, "train_config"):  # MultiStagesDistillationBox
        init = box.stage_end_epoch - box.train_config[f"stage{box.stage_number}"]["num_epochs"]
        return box.current_epoch, init
    return (box.stage_grad_count - 1) // max(len(box.train_data_loader), 1), 0


@register_post_forward_proc_func
def mhgd_balanced_post_forward_process(self, loss, metrics=None, **kwargs):
    """Stage 2's update: :func:`mhgd_fast.balanced_backward` on the terms of :class:`MHGDLoss`
    over the optimiser's parameters, then torchdistill's ``default_post_forward_process`` steps:
    with ``grad_accum_step`` k both terms are divided by k (the clip is scale-free, so each
    micro-batch adds 1/k of its balanced gradient) and the optimiser steps every k-th call, after
    ``max_grad_norm`` clipping; a step-wise scheduler steps as there. Under distributed training
    the CE gradients are averaged and the transfer ones summed over processes before the clip
    (as in the pipeline), so a DDP student needs ``forward_proc: forward_batch_only_no_sync``.
    The balancing diagnostics of the step are kept as ``self.mhgd_grad_stats``.

    A non-finite term stops training (ValueError, on every process) before any gradient is
    applied."""
    terms = getattr(loss, "mhgd_terms", None)
    if not isinstance(terms, MHGDTerms):
        raise TypeError("mhgd_balanced_post_forward_process balances the two terms of the criterion "
                        "'MHGDLoss'; this stage's criterion returned a loss without them")
    if self.accelerator is not None:
        raise ValueError("mhgd_balanced_post_forward_process computes the two gradients with torch.autograd.grad "
                         "and does not support an accelerator; use default_post_forward_process there")
    if isinstance(self.student_model, DistributedDataParallel) and \
            self.student_forward_proc is not forward_batch_only_no_sync:
        raise ValueError("a DDP-wrapped student with gradient balancing needs "
                         "forward_proc: 'forward_batch_only_no_sync' (the balancing all-reduces the gradients)")
    finite = bool(torch.isfinite(terms.ce.detach())) and bool(torch.isfinite(terms.transfer.detach()))
    if any_rank(not finite):
        ce, transfer = float(terms.ce.detach()), float(terms.transfer.detach())
        raise ValueError(f"non-finite stage-2 loss (ce={ce}, transfer={transfer} on this process); "
                         "no gradient was applied")

    self.stage_grad_count += 1
    ce, transfer = terms.ce, terms.transfer
    if self.grad_accum_step > 1:
        ce, transfer = ce / self.grad_accum_step, transfer / self.grad_accum_step

    params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
    reduce = None
    if self.distributed:
        def reduce(kind, grads):
            # CE is a per-process mean: average; the transfer loss sums each process's rows: sum
            return all_reduce_grads(grads, params, average=(kind == "ce"))
    epoch, init_epoch = balance_epochs(self)
    self.mhgd_grad_stats = balanced_backward(ce, transfer, params, epoch=epoch, init_epoch=init_epoch,
                                             reduce_grads=reduce, cap=terms.cap)

    if self.stage_grad_count % self.grad_accum_step == 0:
        if self.max_grad_norm is not None:
            target_params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(target_params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    # Step-wise scheduler step (as torchdistill's default post-forward process)
    if self.lr_scheduler is not None and self.scheduling_step > 0 \
            and self.stage_grad_count % self.scheduling_step == 0 and self.stage_grad_count % self.grad_accum_step == 0:
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            self.lr_scheduler.step(metrics)
        elif isinstance(self.lr_scheduler, CosineAnnealingWarmRestarts):
            self.lr_scheduler.step(int(self.stage_grad_count / self.scheduling_step))
        else:
            self.lr_scheduler.step()
