"""What a run leaves behind: a log file, a metrics CSV, PNG plots and ``results.json``; with
``--tensorboard``, TensorBoard event files of the metrics too."""
from __future__ import annotations

import csv
import glob
import json
import os
import time
from typing import Dict, List

from tqdm import tqdm

__all__ = ["RunLog", "MetricsCSV", "TensorBoardLog", "TensorBoardUnavailable", "plot_curves", "plot_diagnostics", "plot_comparison", "write_results",
           "format_table", "METRIC_FIELDS", "DIAGNOSTICS"]

METRIC_FIELDS = ["phase", "epoch", "lr", "train_loss", "train_acc", "transfer_loss", "val_loss", "val_acc",
                 "test_loss", "test_acc", "val_estimator_loss", "images_per_s", "seconds"]
# Stage-2 diagnostics (epoch means of the sampled steps) follow these columns; see DIAGNOSTICS.
DIAGNOSTICS = {
    "grad_ratio": "‖g_transfer‖ / ‖g_ce‖ over all student tensors, before clipping",
    "grad_cosine": "cosine between the CE and the transfer gradient over all student tensors",
    "clipped_share": "share of student tensors whose transfer gradient was clipped",
    "kl_row_p{m}": "mean KL per graph row of pair m",
    "sat_student_p{m}": "share of the student's logits of pair m with |tanh S| > 0.995",
    "sat_teacher_p{m}": "share of the teacher's logits of pair m with |tanh S| > 0.995",
    "kl_check_p{m}": "squash none only: relative difference of the fused KL to the float64 reference",
}


class RunLog:
    """Appends time-stamped lines to ``<run_dir>/train.log`` and prints them above the progress bars."""

    def __init__(self, path: str, echo: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.echo = path, echo

    def __call__(self, message: str, echo: bool = True) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self.echo and echo:
            tqdm.write(message)


class MetricsCSV:
    """One row per (phase, epoch). On resume, rows at or after the resume point are dropped
    first, so the file never holds an epoch twice. Columns: :data:`METRIC_FIELDS`, then any other
    key a row brings (the diagnostics), in order of first appearance."""

    def __init__(self, path: str):
        self.path = path

    def rows(self) -> List[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, phase: str, from_epoch: int) -> None:
        kept = [r for r in self.rows() if not (r["phase"] == phase and int(r["epoch"]) >= from_epoch)]
        self._write(kept)

    def append(self, row: Dict) -> None:
        self._write(self.rows() + [dict(row)])

    def _write(self, rows: List[dict]) -> None:
        fields = list(METRIC_FIELDS)
        for row in rows:
            fields += [k for k in row if k not in fields]
        tmp = f"{self.path}.{os.getpid()}.tmp"  # ranks writing at once never share a temp file
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


class TensorBoardUnavailable(RuntimeError):
    """``--tensorboard`` was asked for, but the optional ``tensorboard`` package is not installed."""


class TensorBoardLog:
    """The scalars of ``metrics.csv`` as TensorBoard events: one run folder per phase
    (``<directory>/<phase>/``), one tag per column (``train_loss``, ``test_acc``, the stage-2
    diagnostics, …), the step being the CSV's ``epoch`` (from 0). A phase's events are rewritten
    from ``metrics.csv`` whenever the phase starts or resumes, so they never hold an epoch twice
    and match the CSV after any resume. ``tensorboard --logdir <run-dir>/tensorboard`` shows the
    phases side by side (the students' ``test_acc`` on one chart)."""

    def __init__(self, directory: str):
        self.directory, self._writer, self._phase = directory, None, None
        self._summary_writer = self.check_available()

    @staticmethod
    def check_available():
        """torch's ``SummaryWriter``; :class:`TensorBoardUnavailable` when tensorboard is missing."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardUnavailable(
                f"--tensorboard needs the optional tensorboard package, which cannot be imported ({exc}). "
                "Install it with  pip install tensorboard  (or the mhgd_fast[tensorboard] extra), or run "
                "without --tensorboard: metrics.csv holds the same numbers.") from None
        return SummaryWriter

    def start_phase(self, phase: str, rows: List[dict]) -> None:
        """Open ``phase``'s folder afresh and write its rows of ``metrics.csv`` so far."""
        self.close()
        folder = os.path.join(self.directory, phase)
        for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
            os.remove(old)
        self._writer, self._phase = self._summary_writer(folder), phase
        for row in rows:
            if row["phase"] == phase:
                self._add(row)
        self._writer.flush()

    def append(self, row: Dict) -> None:
        if row["phase"] != self._phase:
            raise ValueError(f"TensorBoardLog: a row of {row['phase']!r} while {self._phase!r} is open")
        self._add(row)
        self._writer.flush()

    def _add(self, row: Dict) -> None:
        epoch = int(row["epoch"])
        for key, value in row.items():
            if key in ("phase", "epoch") or value in ("", None):
                continue
            self._writer.add_scalar(key, float(value), epoch)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._phase = None, None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: List[dict], phase: str, path: str) -> None:
    """Loss and accuracy against epoch for one phase (train and test)."""
    rows = [r for r in rows if r["phase"] == phase]
    if not rows:
        return
    plt = _pyplot()
    epochs = [int(r["epoch"]) + 1 for r in rows]

    def series(key):
        return [float(r[key]) if r[key] not in ("", None) else float("nan") for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, series("train_loss"), label="train")
    if any(r["test_loss"] for r in rows):
        ax_loss.plot(epochs, series("test_loss"), label="test")
    if any(r["transfer_loss"] for r in rows):
        ax_loss.plot(epochs, series("transfer_loss"), label="transfer (MHGD)")
    if any(r.get("val_estimator_loss") for r in rows):
        ax_loss.plot(epochs, series("val_estimator_loss"), label="held-out (eval mode)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{phase}: loss")
    ax_loss.legend()
    if any(r["train_acc"] for r in rows):
        ax_acc.plot(epochs, series("train_acc"), label="train")
        if any(r.get("val_acc") for r in rows):
            ax_acc.plot(epochs, series("val_acc"), label="validation")
        ax_acc.plot(epochs, series("test_acc"), label="test")
        ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title=f"{phase}: accuracy")
        ax_acc.legend()
    else:
        ax_acc.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diagnostics(rows: List[dict], phase: str, path: str) -> None:
    """Stage-2 diagnostics against epoch: KL per row per pair, gradient ratio, gradient cosine and
    clipped share, logit saturation."""
    rows = [r for r in rows if r["phase"] == phase and r.get("grad_ratio") not in ("", None)]
    if not rows:
        return
    plt = _pyplot()
    epochs = [int(r["epoch"]) + 1 for r in rows]

    def series(key):
        return [float(r[key]) if r.get(key) not in ("", None) else float("nan") for r in rows]

    pairs = sorted({k[len("kl_row_p"):] for k in rows[0] if k.startswith("kl_row_p")}, key=int)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for m in pairs:
        axes[0].plot(epochs, series(f"kl_row_p{m}"), label=f"pair {m}")
    axes[0].set(xlabel="epoch", ylabel="nats", title="mean KL per graph row")
    axes[1].plot(epochs, series("grad_ratio"))
    axes[1].set(xlabel="epoch", title="‖g_transfer‖ / ‖g_ce‖ (before clip)", yscale="log")
    axes[2].plot(epochs, series("grad_cosine"), label="cos(g_ce, g_transfer)")
    axes[2].plot(epochs, series("clipped_share"), label="clipped share")
    axes[2].set(xlabel="epoch", title="gradient geometry", ylim=(-1.05, 1.05))
    for m in pairs:
        axes[3].plot(epochs, series(f"sat_student_p{m}"), label=f"student, pair {m}")
        axes[3].plot(epochs, series(f"sat_teacher_p{m}"), "--", label=f"teacher, pair {m}")
    axes[3].set(xlabel="epoch", title="share |tanh S| > 0.995", ylim=(-0.02, 1.02))
    for ax in (axes[0], axes[2], axes[3]):
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(accuracies: Dict[str, float], path: str, title: str) -> None:
    """Bar chart of the final test accuracy per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names, values = list(accuracies), list(accuracies.values())
    bars = ax.bar(names, values, color=["#777777", "#4c72b0", "#55a868", "#c44e52"][:len(names)])
    ax.bar_label(bars, fmt="%.2f")
    low = min(values)
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(values) + 5))
    ax.set(ylabel="test top-1 accuracy (%)", title=title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: Dict[str, dict]) -> str:
    """Markdown table: one row per trained network."""
    lines = ["| network | model | final test acc (%) | best test acc (%) | epochs | train time (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['model']} | {r['final_test_acc']:.2f} | {r['best_test_acc']:.2f} "
                     f"| {r['epochs']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_results(path: str, payload: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
