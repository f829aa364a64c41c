"""The whole method on one pipeline: teacher → (student alone | KD | MHGD stage 1 → stage 2).

Every student starts from the same initial weights (same seed), sees the same batches in the
same order and uses the same optimiser recipe, so the methods differ only in their loss.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .. import balanced_backward
from ..data import BatchLoader, channel_stats, load_cifar, synthetic_dataset
from ..distiller import Distiller, KDDistiller, MHGDDistiller
from ..distributed import all_gather_columns, all_reduce_grads, init_from_env
from ..features import unwrap
from ..models import build_model
from . import checkpoint
from .config import PipelineConfig
from .loop import Phase, RunContext, evaluate, run_phase
from .records import MetricsCSV, RunLog, format_table, plot_comparison, write_results

__all__ = ["run_pipeline", "load_datasets", "RunDirMismatch"]

# Config fields that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = {"progress", "threads", "device"}


class RunDirMismatch(ValueError):
    """The run folder holds a run with a different configuration."""


def load_datasets(cfg: PipelineConfig):
    if cfg.dataset == "synthetic":
        return synthetic_dataset(cfg.synthetic_train, seed=cfg.seed), synthetic_dataset(cfg.synthetic_test, seed=cfg.seed + 7919)
    return load_cifar(cfg.dataset, cfg.data_dir)


def _sgd(params, cfg: PipelineConfig, lr: float, weight_decay: float):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=weight_decay)


def _multistep(optimizer, cfg: PipelineConfig, epochs: int):
    milestones = sorted({max(1, round(f * epochs)) for f in cfg.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.lr_decay)


def _check_run_dir(cfg: PipelineConfig, main: bool) -> None:
    path = os.path.join(cfg.run_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        differs = sorted(k for k in set(saved) | set(cfg.to_dict())
                         if k not in RESUMABLE_CHANGES and saved.get(k) != cfg.to_dict().get(k))
        if differs:
            raise RunDirMismatch(f"{cfg.run_dir!r} holds a run with other settings ({', '.join(differs)}); "
                                 f"pick a new --run-dir or delete that folder")
    elif main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)


def run_pipeline(cfg: PipelineConfig, callbacks: Sequence[Callable] = ()) -> dict:
    """Train the teacher (or load it), then each of ``cfg.methods``; write ``results.json`` and
    the plots under ``cfg.run_dir``; resume whatever a previous call with the same config left."""
    cfg.validate()
    wall = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    dist_info = init_from_env(device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    main = dist_info.rank == 0
    _check_run_dir(cfg, main)
    ctx = RunContext(cfg.run_dir, RunLog(os.path.join(cfg.run_dir, "train.log"), echo=main),
                     MetricsCSV(os.path.join(cfg.run_dir, "metrics.csv")), cfg.to_dict(), main=main,
                     progress=cfg.progress, callbacks=callbacks)
    ctx.log(f"run {cfg.run_dir}: {cfg.dataset}, teacher {cfg.teacher}, student {cfg.student}, "
            f"methods {cfg.methods}, {dist_info.world} process(es) on {device}")

    train_set, test_set = load_datasets(cfg)
    mean, std = channel_stats(train_set.images)
    train_loader = BatchLoader(train_set, cfg.batch_size, train=True, seed=cfg.seed, mean=mean, std=std,
                               rank=dist_info.rank, world=dist_info.world)
    test_loader = BatchLoader(test_set, cfg.eval_batch_size, train=False, mean=mean, std=std)
    classes = train_set.num_classes

    def to_device(x, y):
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def wrap(model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model) if dist_info.enabled else model

    def supervised_phase(name, model_name, model, distiller, epochs):
        """Teacher, student alone and KD: backward of the summed losses (DDP averages gradients)."""
        optimizer = _sgd(model.parameters(), cfg, cfg.lr, cfg.weight_decay)

        def forward(epoch, x, y):
            return distiller(*to_device(x, y))

        def update(epoch, losses):
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        return Phase(name, model_name, epochs, {"model": model}, optimizer, _multistep(optimizer, cfg, epochs),
                     forward, update, lambda: distiller.train(), lambda: evaluate(model, test_loader))

    results = {}
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher, classes, cfg.teacher_width).to(device)
    if cfg.teacher_checkpoint:
        state = checkpoint.load(cfg.teacher_checkpoint)
        teacher.load_state_dict(state["modules"]["model"] if "modules" in state else state)
        test_loss, test_acc = evaluate(teacher, test_loader)
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
            phase = _mhgd_stages(cfg, student, teacher, wrap, to_device, train_loader, test_loader, ctx)
        results[method] = run_phase(phase, train_loader, ctx)

    wall = time.perf_counter() - wall
    table = format_table(results)
    if main:
        plot_comparison({k: v["final_test_acc"] for k, v in results.items()},
                        os.path.join(cfg.run_dir, "plots", "comparison.png"),
                        f"{cfg.dataset}: {cfg.teacher} → {cfg.student}")
        write_results(os.path.join(cfg.run_dir, "results.json"),
                      {"config": cfg.to_dict(), "results": results, "table": table, "wall_seconds": wall,
                       "processes": dist_info.world, "device": str(device), "torch": torch.__version__})
    ctx.log(f"results ({wall:.1f} s this call):\n{table}")
    return {"results": results, "table": table, "wall_seconds": wall}


class _EstimatorObjective(nn.Module):
    """Stage 1 as a module whose forward is the loss, so DDP can wrap the graph network."""

    def __init__(self, distiller: MHGDDistiller, weight_decay: float):
        super().__init__()
        self.mhgd = distiller.mhgd
        self.teacher_features = distiller.teacher_features  # a bound method: the teacher is not a submodule here
        self.weight_decay = weight_decay

    def forward(self, images):
        return self.mhgd.estimator_loss(self.teacher_features(images), weight_decay=self.weight_decay)


def _mhgd_stages(cfg, student, teacher, wrap, to_device, train_loader, test_loader, ctx) -> Phase:
    """Run stage 1 (§5) to the end; return the stage-2 phase (§6) for the caller to run."""
    student_ddp = wrap(student)
    distiller = MHGDDistiller(student_ddp, teacher, unwrap(student).sensing_points, teacher.sensing_points,
                              heads=cfg.heads, student_vectors=cfg.student_vectors, backend=cfg.backend,
                              gather=all_gather_columns if cfg.global_graph else None)
    mhgd = distiller.mhgd.to(next(student.parameters()).device)
    objective = wrap(_EstimatorObjective(distiller, cfg.weight_decay))
    # the stage-1 loss carries its own 5e-4·Σw² (§5), so the optimiser adds no decay
    opt1 = _sgd(mhgd.parameters(), cfg, cfg.stage1_lr, 0.0)

    def forward1(epoch, x, y):
        return None, {"estimator": objective(to_device(x, y)[0])}

    def update1(epoch, losses):
        opt1.zero_grad(set_to_none=True)
        losses["estimator"].backward()
        opt1.step()

    run_phase(Phase("mhgd-stage1", "graph network", cfg.stage1_epochs, {"mhgd": mhgd}, opt1, None,
                    forward1, update1, lambda: mhgd.train()), train_loader, ctx)
    mhgd.eval().requires_grad_(False)

    opt2 = _sgd(student.parameters(), cfg, cfg.lr, cfg.weight_decay)
    params = list(student.parameters())
    distributed = isinstance(student_ddp, DistributedDataParallel)

    def reduce_grads(kind, grads):
        # CE is a per-process mean: average; the transfer loss is a sum over processes' rows: sum
        return all_reduce_grads(grads, params, average=(kind == "ce"))

    def forward2(epoch, x, y):
        # gradients are computed by hand (two backward passes), so DDP must not sync on its own
        sync_off = student_ddp.no_sync() if distributed and cfg.balance else contextlib.nullcontext()
        with sync_off:
            return distiller(*to_device(x, y))

    def update2(epoch, losses):
        opt2.zero_grad(set_to_none=True)
        if cfg.balance:
            balanced_backward(losses["ce"], losses["transfer"], params, epoch=cfg.stage1_epochs + epoch,
                              init_epoch=cfg.stage1_epochs, reduce_grads=reduce_grads if distributed else None)
        else:
            (losses["ce"] + losses["transfer"]).backward()
        opt2.step()

    def train_mode():
        distiller.train()
        mhgd.eval()

    return Phase("mhgd-stage2", cfg.student, cfg.student_epochs, {"model": student}, opt2,
                 _multistep(opt2, cfg, cfg.student_epochs), forward2, update2, train_mode,
                 lambda: evaluate(student, test_loader))
