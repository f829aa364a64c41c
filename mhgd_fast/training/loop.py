"""One training phase, run like real training software: progress bar, metrics, a checkpoint
every epoch that resumes exactly, Ctrl-C that stops at a step boundary with a resumable
checkpoint, and a clear stop on a NaN/Inf loss (the last good checkpoint is kept). Under DDP the
processes agree on every stop at the same step, and a process that dies or hangs makes the
others stop with an error (:class:`DistributedFailure`) instead of waiting for ever."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from .data import BatchLoader
from .distributed import any_rank, broadcast_buffers, collective_failure
from . import checkpoint
from .faults import Faults
from .precision import Precision
from .records import MetricsCSV, RunLog, TensorBoardLog, plot_curves

__all__ = ["Phase", "RunContext", "run_phase", "evaluate", "NonFiniteLossError", "TrainingInterrupted",
           "DistributedFailure"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the run stopped before applying that step."""


class DistributedFailure(RuntimeError):
    """Under DDP, a collective operation failed: another process exited, crashed or hung."""


class TrainingInterrupted(Exception):
    """Ctrl-C: the run stopped at a step boundary after writing a resumable checkpoint."""


@dataclass
class Phase:
    """What a phase trains and how one step goes.

    ``forward(epoch, step, x, y) -> (logits or None, {name: loss})``: the runner checks every
    loss is finite, then calls ``update(epoch, losses)`` (backward + optimiser step).

    ``diagnostics()``, when given, is called after each update and returns the values sampled at
    that step (a dict of floats) or None; the runner averages them per epoch into ``metrics.csv``
    and shows the latest in the progress bar. ``epoch_metrics()`` returns extra columns for the
    epoch's row (e.g. validation accuracy, the held-out estimator loss); a ``"val_acc"`` among them
    is tracked like the test accuracy.

    ``precision``, when given, is the phase's :class:`~.precision.Precision`: its loss scaler's
    state is checkpointed, and with float16 the epoch's row counts the steps it skipped
    (``amp_skipped_steps``: inf/NaN gradients, not a failure).
    """
    name: str
    model_name: str
    epochs: int
    modules: Dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    forward: Callable
    update: Callable
    train_mode: Callable[[], None]
    evaluate: Optional[Callable[[], Tuple[float, float]]] = None
    epoch_metrics: Optional[Callable[[], dict]] = None
    diagnostics: Optional[Callable[[], Optional[dict]]] = None
    postfix_keys: Dict[str, str] = field(default_factory=dict)  # diagnostics shown in the bar: key -> label
    precision: Optional[Precision] = None


@dataclass
class RunContext:
    run_dir: str
    log: RunLog
    metrics: MetricsCSV
    config: dict
    main: bool = True
    progress: bool = True
    callbacks: Sequence[Callable] = field(default_factory=tuple)  # on_step(phase, epoch, step)
    tensorboard: Optional[TensorBoardLog] = None  # mirrors metrics.csv (main process only)

    def checkpoint_path(self, phase: str) -> str:
        return os.path.join(self.run_dir, "checkpoints", f"{phase}.pt")


def evaluate(model: nn.Module, loader: BatchLoader, autocast: Optional[Callable] = None) -> Tuple[float, float]:
    """(mean cross-entropy, top-1 %) of ``model`` in eval mode over the whole of ``loader``;
    ``autocast()``, when given, is the context of each forward (mixed precision)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in loader.batches():
            x, y = x.to(device), y.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logits = model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += y.numel()
    model.train(was_training)
    return loss_sum / count, 100.0 * correct / count


def _nonfinite_report(bad: dict) -> str:
    """The non-finite losses, by process under DDP: the same text on every process."""
    describe = lambda losses: ", ".join(f"{k}={v}" for k, v in losses.items())  # noqa: E731
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return describe(bad)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, bad)
    return "; ".join(f"rank {r}: {describe(losses)}" for r, losses in enumerate(every) if losses)


class _StopOnSigint:
    """First Ctrl-C: ask the loop to stop after the current step. Second: abort at once."""

    def __init__(self, log: RunLog):
        self.requested, self.log, self._previous = False, log, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again aborts at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _save(ctx: RunContext, phase: Phase, position: dict, finished: bool = False) -> None:
    if ctx.main:
        state = {"phase": phase.name, "finished": finished, "config": ctx.config, **position,
                 "modules": {k: m.state_dict() for k, m in phase.modules.items()},
                 "optimizer": phase.optimizer.state_dict(),
                 "scheduler": phase.scheduler.state_dict() if phase.scheduler else None,
                 "rng": checkpoint.rng_state()}
        if phase.precision is not None and phase.precision.scaler is not None:
            state["amp_scaler"] = phase.precision.state_dict()
        checkpoint.save_atomic(state, ctx.checkpoint_path(phase.name))
    if dist.is_initialized():
        dist.barrier()


def _restore(phase: Phase, state: dict) -> None:
    for key, module in phase.modules.items():
        module.load_state_dict(state["modules"][key])
    phase.optimizer.load_state_dict(state["optimizer"])
    if phase.scheduler is not None:
        phase.scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    if phase.precision is not None:
        phase.precision.load_state_dict(state.get("amp_scaler"))


def _fresh_totals() -> dict:
    return {"loss": 0.0, "transfer": 0.0, "correct": 0, "count": 0, "steps": 0, "seconds": 0.0, "diag": {}}


def _format_value(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "nan"


def _update_summary(summary: dict, row: dict) -> None:
    """Final and best accuracies; with a validation split also the test accuracy at the epoch of
    the best validation accuracy (the honest pick: chosen without looking at the test split)."""
    if "test_acc" in row:
        summary["final_test_acc"] = row["test_acc"]
        best = summary["best_test_acc"]
        summary["best_test_acc"] = row["test_acc"] if math.isnan(best) else max(best, row["test_acc"])
    if "val_estimator_loss" in row:
        summary["final_val_estimator_loss"] = row["val_estimator_loss"]
    if "val_acc" in row:
        summary["final_val_acc"] = row["val_acc"]
        if row["val_acc"] > summary.get("best_val_acc", -math.inf):
            summary["best_val_acc"] = row["val_acc"]
            if "test_acc" in row:
                summary["test_acc_at_best_val"] = row["test_acc"]


def run_phase(phase: Phase, loader: BatchLoader, ctx: RunContext) -> dict:
    """Train ``phase`` to the end (resuming from its checkpoint if there is one; a damaged latest
    checkpoint falls back to the previous one, see :func:`checkpoint.load_resumable`); return its summary.
    Under DDP a collective that fails (another process exited or hung past ``ddp_timeout``)
    raises :class:`DistributedFailure` naming the phase, the position and the last checkpoint."""
    where = {"epoch": None, "step": None}
    try:
        return _run_phase(phase, loader, ctx, where)
    except RuntimeError as exc:
        reason = collective_failure(exc, ctx.config.get("ddp_timeout"))
        if reason is None or isinstance(exc, (DistributedFailure, NonFiniteLossError)):
            raise
        rank = dist.get_rank()
        at = f"epoch {where['epoch'] + 1}, step {where['step']}" if where["epoch"] is not None else "its start"
        path = ctx.checkpoint_path(phase.name)
        kept = _kept_checkpoint(path)
        raise DistributedFailure(
            f"[{phase.name}] rank {rank} stopped at {at}: {reason}. The last good checkpoint is {kept}; "
            f"once every process has stopped, run the same command again to resume. ({exc})") from exc


def _kept_checkpoint(path: str) -> str:
    """The newest checkpoint file of a phase on disk (for the messages of a stopped run)."""
    return next((p for p in (path, checkpoint.previous_path(path)) if os.path.exists(p)),
                "none (failed in the first epoch)")


def _run_phase(phase: Phase, loader: BatchLoader, ctx: RunContext, where: dict) -> dict:
    path = ctx.checkpoint_path(phase.name)
    epoch, step, totals, summary = 0, 0, _fresh_totals(), {"best_test_acc": float("nan"), "seconds": 0.0}
    found = checkpoint.load_resumable(path, ctx.log, move_bad=ctx.main)  # the latest good of the last two
    if found is not None:
        state, loaded = found
        _restore(phase, state)
        if state["finished"]:
            ctx.log(f"[{phase.name}] finished earlier; loaded {loaded}")
            return state["summary"]
        epoch, step, totals, summary = state["epoch"], state["step"], state["totals"], state["summary"]
        ctx.log(f"[{phase.name}] resuming from {loaded} at epoch {epoch + 1}, step {step}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    ctx.metrics.truncate(phase.name, epoch)
    if ctx.tensorboard is not None:  # the phase's events rewritten from metrics.csv: they match after a resume
        ctx.tensorboard.start_phase(phase.name, ctx.metrics.rows())
    faults = Faults.from_env(phase.name)  # test hooks, inert unless MHGD_FAST_FAULT is set
    with _StopOnSigint(ctx.log) as stop:
        while epoch < phase.epochs:
            phase.train_mode()
            lr = phase.optimizer.param_groups[0]["lr"]
            bar = tqdm(total=len(loader), initial=step, desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                       disable=not (ctx.progress and ctx.main), leave=False, dynamic_ncols=True)
            tick = time.perf_counter()
            for x, y in loader.batches(epoch, step):
                if any_rank(stop.requested):
                    totals["seconds"] += time.perf_counter() - tick
                    bar.close()
                    _save(ctx, phase, {"epoch": epoch, "step": step, "totals": totals, "summary": summary})
                    raise TrainingInterrupted(
                        f"[{phase.name}] interrupted at epoch {epoch + 1}, step {step}; checkpoint {path}. "
                        f"Run the same command again to resume.")
                where["epoch"], where["step"] = epoch, step
                x = faults.before_step(epoch, step, x)
                logits, losses = phase.forward(epoch, step, x, y)
                bad = {k: float(v.detach()) for k, v in losses.items() if not math.isfinite(float(v.detach()))}
                if any_rank(bool(bad)):
                    bar.close()
                    kept = _kept_checkpoint(path)
                    raise NonFiniteLossError(
                        f"[{phase.name}] non-finite loss at epoch {epoch + 1}, step {step}: {_nonfinite_report(bad)}. "
                        f"The step was not applied; the last good checkpoint is {kept}. Lower the learning "
                        f"rate or check the data, then resume.")
                phase.update(epoch, losses)
                scaler = phase.precision.scaler if phase.precision is not None else None
                if scaler is not None:
                    totals["amp_skipped"] = totals.get("amp_skipped", 0) + phase.precision.take_skipped()
                sampled = phase.diagnostics() if phase.diagnostics is not None else None
                step += 1
                n = y.numel()
                totals["loss"] += float(sum(losses.values()).detach()) * n
                totals["transfer"] += float(losses["transfer"].detach()) * n if "transfer" in losses else 0.0
                totals["count"] += n
                totals["steps"] += 1
                if logits is not None:
                    totals["correct"] += int((logits.argmax(1) == y.to(logits.device)).sum())
                elapsed = totals["seconds"] + time.perf_counter() - tick
                postfix = {"loss": f"{totals['loss'] / totals['count']:.3f}",
                           "img/s": f"{totals['count'] * world / max(elapsed, 1e-9):.0f}"}
                if logits is not None:
                    postfix["acc"] = f"{100 * totals['correct'] / totals['count']:.1f}"
                if sampled:
                    for key, value in sampled.items():
                        acc = totals["diag"].setdefault(key, [0.0, 0])
                        if math.isfinite(value):
                            acc[0], acc[1] = acc[0] + value, acc[1] + 1
                        latest = totals.setdefault("latest", {})
                        latest[key] = value
                for key, label in phase.postfix_keys.items():
                    if key in totals.get("latest", {}):
                        postfix[label] = _format_value(totals["latest"][key])
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                for callback in ctx.callbacks:
                    callback(phase.name, epoch, step)
            bar.close()
            where["step"] = step  # the epoch's end: its metrics, then the checkpoint (a barrier)
            # every process evaluates, saves and goes on (later phases: a frozen teacher, the graph
            # network) with the BN statistics the checkpoint holds, so a resumed run is the same run
            broadcast_buffers(phase.modules.values())
            totals["seconds"] += time.perf_counter() - tick
            if phase.scheduler is not None:
                phase.scheduler.step()
            row = {"phase": phase.name, "epoch": epoch, "lr": lr,
                   "train_loss": totals["loss"] / totals["count"],
                   "images_per_s": totals["count"] * world / max(totals["seconds"], 1e-9),
                   "seconds": totals["seconds"]}
            if "transfer" in losses:
                row["transfer_loss"] = totals["transfer"] / totals["count"]
            if logits is not None:
                row["train_acc"] = 100 * totals["correct"] / totals["count"]
            if phase.precision is not None and phase.precision.scaler is not None:
                row["amp_skipped_steps"] = totals.get("amp_skipped", 0)
            for key, (total, count) in totals["diag"].items():
                row[key] = total / count if count else float("nan")
            message = f"[{phase.name}] epoch {epoch + 1}/{phase.epochs} loss {row['train_loss']:.4f}"
            if phase.epoch_metrics is not None:
                row.update(phase.epoch_metrics())
            if phase.evaluate is not None:
                row["test_loss"], row["test_acc"] = phase.evaluate()
                message += f" | train acc {row.get('train_acc', float('nan')):.2f} test acc {row['test_acc']:.2f}"
            if "val_acc" in row:
                message += f" val acc {row['val_acc']:.2f}"
            if "val_estimator_loss" in row:
                message += f" | held-out estimator loss {row['val_estimator_loss']:.4f}"
            _update_summary(summary, row)
            summary["seconds"] += totals["seconds"]
            ctx.log(f"{message} | {row['images_per_s']:.0f} img/s, {totals['seconds']:.1f} s")
            if ctx.main:
                ctx.metrics.append(row)
                if ctx.tensorboard is not None:
                    ctx.tensorboard.append(row)
                plot_curves(ctx.metrics.rows(), phase.name, os.path.join(ctx.run_dir, "plots", f"{phase.name}.png"))
            epoch, step, totals = epoch + 1, 0, _fresh_totals()
            _save(ctx, phase, {"epoch": epoch, "step": 0, "totals": totals, "summary": summary})
    summary.update(model=phase.model_name, epochs=phase.epochs)
    if phase.evaluate is not None and "final_test_acc" not in summary:  # zero epochs: report as it is
        row = {"test_acc": phase.evaluate()[1], **(phase.epoch_metrics() if phase.epoch_metrics else {})}
        _update_summary(summary, row)
    _save(ctx, phase, {"epoch": epoch, "step": 0, "totals": totals, "summary": summary}, finished=True)
    return summary
