"""The whole method on one pipeline: teacher → (student alone | KD | MHGD stage 1 → stage 2).

Every student starts from the same initial weights (same seed), sees the same batches in the
same order and uses the same optimiser recipe, so the methods differ only in their loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .. import balanced_backward, weighted_backward
from .data import BatchLoader, ImageSet, channel_stats, load_cifar, synthetic_dataset
from .distiller import Distiller, KDDistiller, MHGDDistiller
from .distributed import all_gather_columns, all_reduce_grads, init_from_env
from .features import unwrap
from .models import build_model
from . import checkpoint
from .config import LATER_FIELDS, PipelineConfig
from .loop import Phase, RunContext, evaluate, run_phase
from .precision import Precision
from .records import (MetricsCSV, RunLog, TensorBoardLog, format_table, plot_comparison, plot_diagnostics,
                      write_results)

__all__ = ["run_pipeline", "load_datasets", "split_validation", "RunDirMismatch"]

# Config fields that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"progress", "threads", "device", "ddp_timeout", "tensorboard"}


class RunDirMismatch(ValueError):
    """The run folder holds a run with a different configuration."""


def split_validation(train: ImageSet, fraction: float, seed: int):
    """(train, validation): ``fraction`` of ``train`` held out, a fixed function of ``seed``."""
    count = int(round(fraction * len(train)))
    if count == 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 7_919 + 17))
    keep, held = order[count:].sort().values, order[:count].sort().values
    part = lambda idx: ImageSet(train.images[idx], train.labels[idx], train.num_classes)  # noqa: E731
    return part(keep), part(held)


def load_datasets(cfg: PipelineConfig):
    """(train, validation or None, test). The validation split is held out of the training set
    (``cfg.val_split``); the synthetic images and the split follow ``cfg.data_seed`` (default:
    ``cfg.seed``), so runs that differ only in ``seed`` can share one dataset and one teacher."""
    data_seed = cfg.effective_data_seed
    if cfg.dataset == "synthetic":
        train, test = (synthetic_dataset(cfg.synthetic_train, seed=data_seed),
                       synthetic_dataset(cfg.synthetic_test, seed=data_seed + 7919))
    else:
        train, test = load_cifar(cfg.dataset, cfg.data_dir)
    train, val = split_validation(train, cfg.val_split, data_seed)
    return train, val, test


def _sgd(params, cfg: PipelineConfig, lr: float, weight_decay: float):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=weight_decay)


def _multistep(optimizer, cfg: PipelineConfig, epochs: int):
    milestones = sorted({max(1, round(f * epochs)) for f in cfg.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.lr_decay)


def _check_run_dir(cfg: PipelineConfig, main: bool) -> None:
    path = os.path.join(cfg.run_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = {**LATER_FIELDS, **json.load(f)}  # a folder from before a field existed ran with its default
        differs = sorted(k for k in set(saved) | set(cfg.to_dict())
                         if k not in RESUMABLE_CHANGES and saved.get(k) != cfg.to_dict().get(k))
        if differs:
            raise RunDirMismatch(f"{cfg.run_dir!r} holds a run with other settings ({', '.join(differs)}); "
                                 f"pick a new --run-dir or delete that folder")
    elif main:  # written whole, then renamed: another process checking it never reads half a file
        os.makedirs(cfg.run_dir, exist_ok=True)
        write_results(path, cfg.to_dict())  # temp file + rename: a kill mid-write leaves no broken config.json


def run_pipeline(cfg: PipelineConfig, callbacks: Sequence[Callable] = ()) -> dict:
    """Train the teacher (or load it), then each of ``cfg.methods``; write ``results.json`` and
    the plots under ``cfg.run_dir``; resume whatever a previous call with the same config left."""
    cfg.validate()
    wall = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dist_info = init_from_env(device, timeout=cfg.ddp_timeout)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    main = dist_info.rank == 0
    if cfg.tensorboard:
        TensorBoardLog.check_available()  # before anything is trained or written
    _check_run_dir(cfg, main)
    ctx = RunContext(cfg.run_dir, RunLog(os.path.join(cfg.run_dir, "train.log"), echo=main),
                     MetricsCSV(os.path.join(cfg.run_dir, "metrics.csv")), cfg.to_dict(), main=main,
                     progress=cfg.progress, callbacks=callbacks,
                     tensorboard=TensorBoardLog(os.path.join(cfg.run_dir, "tensorboard"))
                     if cfg.tensorboard and main else None)
    ctx.log(f"run {cfg.run_dir}: {cfg.dataset}, teacher {cfg.teacher}, student {cfg.student}, "
            f"methods {cfg.methods}, {dist_info.world} process(es) on {device}"
            + (f", mixed precision {cfg.amp}" if cfg.amp != "off" else ""))
    precision = lambda: Precision(cfg.amp, device)  # noqa: E731  (one loss scaler per phase)
    eval_precision = precision()

    train_set, val_set, test_set = load_datasets(cfg)
    mean, std = channel_stats(train_set.images)
    train_loader = BatchLoader(train_set, cfg.batch_size, train=True, seed=cfg.seed, mean=mean, std=std,
                               rank=dist_info.rank, world=dist_info.world)
    test_loader = BatchLoader(test_set, cfg.eval_batch_size, train=False, mean=mean, std=std)
    val_loaders = None
    if val_set is not None:  # accuracy in eval batches; the stage-1 estimator on training-size graphs
        val_loaders = (BatchLoader(val_set, cfg.eval_batch_size, train=False, mean=mean, std=std),
                       BatchLoader(val_set, cfg.batch_size, train=False, mean=mean, std=std))
    classes = train_set.num_classes

    def to_device(x, y):
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def wrap(model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model) if dist_info.enabled else model

    def supervised_phase(name, model_name, model, distiller, epochs):
        """Teacher, student alone and KD: backward of the summed losses (DDP averages gradients)."""
        optimizer = _sgd(model.parameters(), cfg, cfg.lr, cfg.weight_decay)
        amp = precision()

        def forward(epoch, step, x, y):
            with amp.autocast():
                return distiller(*to_device(x, y))

        def update(epoch, losses):
            optimizer.zero_grad(set_to_none=True)
            amp.backward(sum(losses.values()))
            amp.step(optimizer)

        return Phase(name, model_name, epochs, {"model": model}, optimizer, _multistep(optimizer, cfg, epochs),
                     forward, update, lambda: distiller.train(), lambda: evaluate(model, test_loader, amp.autocast),
                     epoch_metrics=validation(model), precision=amp)

    def validation(model):
        if val_loaders is None:
            return None

        def metrics():
            loss, acc = evaluate(model, val_loaders[0], eval_precision.autocast)
            return {"val_loss": loss, "val_acc": acc}
        return metrics

    results = {}
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher, classes, cfg.teacher_width).to(device)
    if cfg.teacher_checkpoint:
        state = checkpoint.load(cfg.teacher_checkpoint)
        teacher.load_state_dict(state["modules"]["model"] if "modules" in state else state)
        test_loss, test_acc = evaluate(teacher, test_loader, eval_precision.autocast)
        ctx.log(f"[teacher] loaded {cfg.teacher_checkpoint}: test acc {test_acc:.2f}")
        results["teacher"] = {"model": cfg.teacher, "final_test_acc": test_acc, "best_test_acc": test_acc,
                              "epochs": 0, "seconds": 0.0}
    else:
        results["teacher"] = run_phase(supervised_phase("teacher", cfg.teacher, teacher, Distiller(wrap(teacher)),
                                                        cfg.teacher_epochs), train_loader, ctx)
    teacher.eval().requires_grad_(False)

    for method in cfg.methods:
        torch.manual_seed(cfg.seed + 1)  # every method's student starts from the same weights
        student = build_model(cfg.student, classes, cfg.student_width).to(device)
        if method == "student":
            phase = supervised_phase("student", cfg.student, student, Distiller(wrap(student)), cfg.student_epochs)
        elif method == "kd":
            phase = supervised_phase("kd", cfg.student, student,
                                     KDDistiller(wrap(student), teacher, cfg.kd_temperature, cfg.kd_ce_weight,
                                                 cfg.kd_weight), cfg.student_epochs)
        else:
            phase = _mhgd_stages(cfg, student, teacher, wrap, to_device, train_loader, test_loader, val_loaders, ctx,
                                 precision)
            phase.epoch_metrics = validation(student)
        results[method] = run_phase(phase, train_loader, ctx)
        if method == "mhgd":
            stage1 = {k: v for k, v in phase.stage1_summary.items() if not (isinstance(v, float) and math.isnan(v))}
            results[method] = {**results[method], "stage1": stage1,
                               **_diagnostics_summary(ctx.metrics.rows(), phase.name)}

    wall = time.perf_counter() - wall
    table = format_table(results)
    if main and "mhgd" in cfg.methods:
        plot_diagnostics(ctx.metrics.rows(), "mhgd-stage2", os.path.join(cfg.run_dir, "plots", "mhgd-stage2-diagnostics.png"))
    if main:
        plot_comparison({k: v["final_test_acc"] for k, v in results.items()},
                        os.path.join(cfg.run_dir, "plots", "comparison.png"),
                        f"{cfg.dataset}: {cfg.teacher} → {cfg.student}")
        write_results(os.path.join(cfg.run_dir, "results.json"),
                      {"config": cfg.to_dict(), "results": results, "table": table, "wall_seconds": wall,
                       "processes": dist_info.world, "device": str(device), "torch": torch.__version__})
    if ctx.tensorboard is not None:
        ctx.tensorboard.close()
    ctx.log(f"results ({wall:.1f} s this call):\n{table}", echo=False)  # callers print it (the demo does)
    return {"results": results, "table": table, "wall_seconds": wall}


def _diagnostics_summary(rows, phase: str) -> dict:
    """Stage-2 diagnostics of ``metrics.csv`` as means over all epochs and over the last one."""
    rows = [r for r in rows if r["phase"] == phase]
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(("grad_", "clipped_", "kl_", "sat_"))]

    def value(row, key):
        return float(row[key]) if row.get(key) not in ("", None) else float("nan")

    mean, last = {}, {}
    for key in keys:  # keys with no finite value are left out (NaN would break equality and JSON)
        values = [value(r, key) for r in rows if math.isfinite(value(r, key))]
        if values:
            mean[key] = sum(values) / len(values)
        if math.isfinite(value(rows[-1], key)):
            last[key] = value(rows[-1], key)
    return {"diagnostics": mean, "diagnostics_last_epoch": last} if keys else {}


class _EstimatorObjective(nn.Module):
    """Stage 1 as a module whose forward is the loss, so DDP can wrap the graph network."""

    def __init__(self, distiller: MHGDDistiller, weight_decay: float):
        super().__init__()
        self.mhgd = distiller.mhgd
        self.teacher_features = distiller.teacher_features  # a bound method: the teacher is not a submodule here
        self.weight_decay = weight_decay

    def forward(self, images):
        feats = self.teacher_features(images)
        if not bool(torch.isfinite(torch.stack([f.sum(dtype=torch.float32) for f in feats])).all()):
            return feats[0].new_full((), float("nan"))  # the SVD would reject them; the runner stops
        return self.mhgd.estimator_loss(feats, weight_decay=self.weight_decay)


def _mhgd_stages(cfg, student, teacher, wrap, to_device, train_loader, test_loader, val_loaders, ctx,
                 precision) -> Phase:
    """Run stage 1 (§5) to the end; return the stage-2 phase (§6) for the caller to run."""
    student_ddp = wrap(student)
    distiller = MHGDDistiller(student_ddp, teacher, unwrap(student).sensing_points, teacher.sensing_points,
                              heads=cfg.heads, student_vectors=cfg.student_vectors, backend=cfg.backend,
                              squash=None if cfg.squash == "none" else cfg.squash, scale=cfg.scale,
                              gather=all_gather_columns if cfg.global_graph else None)
    mhgd = distiller.mhgd.to(next(student.parameters()).device)
    objective = wrap(_EstimatorObjective(distiller, cfg.weight_decay))
    # the stage-1 loss carries its own 5e-4·Σw² (§5), so the optimiser adds no decay
    opt1 = _sgd(mhgd.parameters(), cfg, cfg.stage1_lr, 0.0)
    amp1 = precision()

    def forward1(epoch, step, x, y):
        with amp1.autocast():  # the teacher's forward; the graph network itself stays float32
            return None, {"estimator": objective(to_device(x, y)[0])}

    def update1(epoch, losses):
        opt1.zero_grad(set_to_none=True)
        amp1.backward(losses["estimator"])
        amp1.step(opt1)

    def heldout_estimator_loss():
        """The stage-1 loss without weight decay on the validation split, in eval mode (running
        BN statistics, no drop-head): how well the graphs generalise beyond the batches seen."""
        was_training = mhgd.training
        mhgd.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, _ in val_loaders[1].batches():
                x = x.to(next(mhgd.parameters()).device)
                with amp1.autocast():
                    feats = distiller.teacher_features(x)
                total += float(mhgd.estimator_loss(feats, weight_decay=0.0)) * len(x)
                count += len(x)
                distiller.teacher_capture.clear()
        mhgd.train(was_training)
        return {"val_estimator_loss": total / count}

    stage1 = Phase("mhgd-stage1", "graph network", cfg.stage1_epochs, {"mhgd": mhgd}, opt1, None,
                   forward1, update1, lambda: mhgd.train(),
                   epoch_metrics=heldout_estimator_loss if val_loaders is not None else None, precision=amp1)
    stage1_summary = run_phase(stage1, train_loader, ctx)
    mhgd.eval().requires_grad_(False)

    opt2 = _sgd(student.parameters(), cfg, cfg.lr, cfg.weight_decay)
    amp2 = precision()
    params = list(student.parameters())
    distributed = isinstance(student_ddp, DistributedDataParallel)
    sample = {"stats": None, "grads": None}  # diagnostics of the current step, when it is sampled

    def reduce_grads(kind, grads):
        # CE is a per-process mean: average; the transfer loss is a sum over processes' rows: sum
        return all_reduce_grads(grads, params, average=(kind == "ce"))

    def forward2(epoch, step, x, y):
        sampled = cfg.diag_every > 0 and step % cfg.diag_every == 0
        sample["stats"] = {} if sampled else None
        # gradients are computed by hand (two backward passes), so DDP must not sync on its own
        separate = cfg.balance or sampled
        sync_off = student_ddp.no_sync() if distributed and separate else contextlib.nullcontext()
        with sync_off, amp2.autocast():  # the graph network inside runs outside autocast (float32)
            return distiller(*to_device(x, y), stats=sample["stats"])

    def update2(epoch, losses):
        opt2.zero_grad(set_to_none=True)
        transfer = losses["transfer"] * cfg.transfer_weight if cfg.transfer_weight != 1 else losses["transfer"]
        reduce = reduce_grads if distributed else None
        # fp16: both losses scaled; the clip and the diagnostics see the unscaled gradients
        ce, transfer, scale = amp2.scale(losses["ce"]), amp2.scale(transfer), amp2.grad_scale()
        if cfg.balance:
            grads = balanced_backward(ce, transfer, params, epoch=cfg.stage1_epochs + epoch,
                                      init_epoch=cfg.stage1_epochs, reduce_grads=reduce, cap=cfg.transfer_cap,
                                      grad_scale=scale)
        elif sample["stats"] is not None:
            grads = weighted_backward(ce, transfer, params, reduce_grads=reduce, grad_scale=scale)
        else:
            (ce + transfer).backward()
            grads = None
        sample["grads"] = grads
        amp2.step(opt2)

    def diagnostics():
        if sample["stats"] is None or sample["grads"] is None:
            return None
        grads = sample["grads"]
        return {"grad_ratio": grads["ratio"], "grad_cosine": grads["cosine"],
                "clipped_share": grads["clipped_share"], **sample["stats"]}

    def train_mode():
        distiller.train()
        mhgd.eval()

    phase = Phase("mhgd-stage2", cfg.student, cfg.student_epochs, {"model": student}, opt2,
                  _multistep(opt2, cfg, cfg.student_epochs), forward2, update2, train_mode,
                  lambda: evaluate(student, test_loader, amp2.autocast), diagnostics=diagnostics, precision=amp2,
                  postfix_keys={"grad_ratio": "g_tr/g_ce", "grad_cosine": "cos", "clipped_share": "clip",
                                "sat_student_p0": "sat"})
    phase.stage1_summary = stage1_summary
    return phase
