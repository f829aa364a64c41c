"""``mhgd-fast study``: one configuration over several seeds, with paired comparisons.

A study trains (or loads) one teacher, then for every seed the student alone, KD and MHGD with
that seed (same initial weights, same batches; only the loss differs), and aggregates:

* per method, mean ± sample std over seeds of the last-epoch and best-epoch test accuracy, the
  last-epoch validation accuracy and the test accuracy at the epoch of best validation accuracy;
* per method, the paired difference to the student alone (same seed), its mean and a 95 %
  Student-t interval, ``mean ± t_{0.975, n−1} · sd / √n``;
* MHGD's stage-2 diagnostics averaged over epochs and seeds.

Every training run is an ordinary pipeline run folder under ``<study-dir>/runs/``, named by the
method, the seed and a hash of the settings that run depends on. So runs are shared between the
studies of one study folder: an ablation that only changes ``transfer_cap`` reuses the teacher and
the student-alone and KD runs of the recipe's study, and a study that was stopped (Ctrl-C, a crash)
resumes where it stopped when run again. Each study writes ``<study-dir>/<name>/study.json``,
``study.md`` and ``study.png``; ``<study-dir>/summary.md`` (and ``summary.json``, ``summary.png``)
compares every study of the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from .config import LATER_FIELDS, PipelineConfig
from .records import write_results
from .stages import run_pipeline

__all__ = ["run_study", "study_runs", "aggregate", "paired_difference", "t_quantile", "format_study",
           "write_summary", "KD_FIELDS", "MHGD_FIELDS", "STUDENT_FIELDS"]

# Settings that only some runs depend on. A run's folder hash leaves out the fields it ignores, so
# every study that differs only in them shares the run.
STUDENT_FIELDS = ("student", "student_width", "student_epochs")
KD_FIELDS = ("kd_temperature", "kd_ce_weight", "kd_weight")
MHGD_FIELDS = ("stage1_epochs", "stage1_lr", "heads", "student_vectors", "global_graph", "balance",
               "transfer_cap", "transfer_weight", "scale", "squash", "diag_every", "backend")
# Fields that never change a result (how it runs, not what it computes) or are set per run.
NOT_HASHED = ("run_dir", "methods", "progress", "threads", "device", "ddp_timeout", "tensorboard")
ACCURACIES = ("final_test_acc", "best_test_acc", "final_val_acc", "test_acc_at_best_val")


def _reset(values: dict, fields: Sequence[str]) -> dict:
    defaults = PipelineConfig()
    return {**values, **{f: getattr(defaults, f) for f in fields}}


def _run_dir(study_dir: str, label: str, values: dict) -> str:
    """The run's folder: the label and a hash of the result-changing settings (``amp`` among them).
    A field added later (:data:`LATER_FIELDS`) is hashed only when it differs from the value runs
    had before it existed, so the runs of an older study folder keep their names."""
    key = json.dumps({k: v for k, v in values.items()
                      if k not in NOT_HASHED and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}, sort_keys=True)
    return os.path.join(study_dir, "runs", f"{label}-{hashlib.sha1(key.encode()).hexdigest()[:10]}")


def teacher_config(base: PipelineConfig, study_dir: str, teacher_seed: int) -> PipelineConfig:
    """The teacher-only run (``methods=[]``) shared by every seed of the studies in ``study_dir``."""
    values = _reset(dataclasses.asdict(base), STUDENT_FIELDS + KD_FIELDS + MHGD_FIELDS)
    values.update(seed=teacher_seed, methods=[], teacher_checkpoint=None)
    return PipelineConfig(**{**values, "run_dir": _run_dir(study_dir, f"teacher-seed{teacher_seed}", values)})


def study_runs(base: PipelineConfig, study_dir: str, seeds: Sequence[int], teacher_checkpoint: str):
    """``[(seed, method, PipelineConfig)]`` in the order they are trained (seed by seed)."""
    runs = []
    for seed in seeds:
        for method in base.methods:
            values = dataclasses.asdict(base)
            values.update(seed=seed, methods=[method], teacher_checkpoint=teacher_checkpoint,
                          teacher_epochs=PipelineConfig().teacher_epochs)  # the teacher is loaded
            if method != "kd":
                values = _reset(values, KD_FIELDS)
            if method != "mhgd":
                values = _reset(values, MHGD_FIELDS)
            cfg = PipelineConfig(**{**values, "run_dir": _run_dir(study_dir, f"{method}-seed{seed}", values)})
            runs.append((seed, method, cfg))
    return runs


def _finished_results(cfg: PipelineConfig) -> Optional[dict]:
    path = os.path.join(cfg.run_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    config = {**LATER_FIELDS, **saved.get("config", {})}
    return saved if config == cfg.to_dict() else None


def run_study(base: PipelineConfig, study_dir: str, name: str = "recipe", seeds: Sequence[int] = range(5),
              teacher_seed: int = 0, callbacks: Sequence[Callable] = (), log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study ``name`` of ``base`` over ``seeds``; write and return its summary.

    ``base.teacher_checkpoint``, when set, is the teacher of every seed; otherwise one teacher is
    trained with ``teacher_seed`` (once per study folder and teacher configuration)."""
    base.validate()
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"a study needs at least 2 distinct seeds, got {seeds}")
    if not base.methods:
        raise ValueError("a study needs at least one method")
    os.makedirs(study_dir, exist_ok=True)
    start = time.perf_counter()
    teacher = base.teacher_checkpoint
    teacher_result = None
    if teacher is None:
        tcfg = teacher_config(base, study_dir, teacher_seed)
        log(f"study {name}: teacher in {tcfg.run_dir}")
        teacher_result = (_finished_results(tcfg) or run_pipeline(tcfg, callbacks))["results"]["teacher"]
        teacher = os.path.join(tcfg.run_dir, "checkpoints", "teacher.pt")
    runs = study_runs(base, study_dir, seeds, teacher)
    per_seed: Dict[int, Dict[str, dict]] = {s: {} for s in seeds}
    for seed, method, cfg in tqdm(runs, desc=f"study {name}", unit="run", disable=not base.progress):
        saved = _finished_results(cfg)
        if saved is None:
            log(f"study {name}: seed {seed}, {method} in {cfg.run_dir}")
            saved = run_pipeline(cfg, callbacks)
        per_seed[seed][method] = saved["results"][method]
        if teacher_result is None:
            teacher_result = saved["results"]["teacher"]
    summary = aggregate(per_seed)
    summary.update(name=name, seeds=seeds, teacher=teacher_result, teacher_checkpoint=teacher,
                   config={k: v for k, v in base.to_dict().items() if k not in ("run_dir", "seed")},
                   runs={f"{m}/seed{s}": cfg.run_dir for s, m, cfg in runs},
                   wall_seconds_this_call=time.perf_counter() - start)
    out_dir = os.path.join(study_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    write_results(os.path.join(out_dir, "study.json"), summary)
    table = format_study(summary)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(table + "\n")
    plot_study(summary, os.path.join(out_dir, "study.png"))
    write_summary(study_dir)
    log(table)
    return summary


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (scipy's ``stats.t.ppf``)."""
    from scipy import stats
    return float(stats.t.ppf(p, df))


def _mean_std(values: List[float]) -> dict:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "values": values}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """``a − b`` seed by seed: mean, sample std and the ``confidence`` Student-t interval of the mean."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    out = _mean_std(diffs)
    n = out["n"]
    if n > 1:
        half = t_quantile(0.5 + confidence / 2, n - 1) * out["std"] / math.sqrt(n)
        out.update(low=out["mean"] - half, high=out["mean"] + half)
    else:
        out.update(low=float("nan"), high=float("nan"))
    out["confidence"] = confidence
    return out


def aggregate(per_seed: Dict[int, Dict[str, dict]]) -> dict:
    """Mean ± std per method and metric, paired differences to ``"student"``, MHGD diagnostics."""
    seeds = sorted(per_seed)
    methods = [m for m in ("student", "kd", "mhgd") if all(m in per_seed[s] for s in seeds)]
    out = {"methods": {}, "vs_student": {}, "diagnostics": {}}
    for method in methods:
        rows = [per_seed[s][method] for s in seeds]
        out["methods"][method] = {key: _mean_std([r[key] for r in rows]) for key in ACCURACIES
                                  if all(key in r for r in rows)}
    if "student" in methods:
        for method in methods:
            if method == "student":
                continue
            out["vs_student"][method] = {
                key: paired_difference(out["methods"][method][key]["values"], out["methods"]["student"][key]["values"])
                for key in out["methods"][method] if key in out["methods"]["student"]}
    if "mhgd" in methods:
        rows = [per_seed[s]["mhgd"] for s in seeds]
        keys = sorted({k for r in rows for k in r.get("diagnostics", {})})
        for key in keys:
            values = [r["diagnostics"][key] for r in rows if math.isfinite(r["diagnostics"].get(key, math.nan))]
            out["diagnostics"][key] = _mean_std(values)
        held = [r["stage1"]["final_val_estimator_loss"] for r in rows if "final_val_estimator_loss" in r.get("stage1", {})]
        if held:
            out["diagnostics"]["stage1_val_estimator_loss"] = _mean_std(held)
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def _pm(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _interval(diff: dict) -> str:
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"


def format_study(summary: dict) -> str:
    """Markdown: accuracies per method, paired differences, diagnostics."""
    n = len(summary["seeds"])
    lines = [f"Study `{summary['name']}`: {n} seeds ({', '.join(map(str, summary['seeds']))}); "
             f"teacher test acc {summary['teacher']['final_test_acc']:.2f} %. Mean ± std over seeds; "
             f"Δ = paired difference to the student alone, mean [95 % t-interval].", "",
             "| method | last-epoch test acc | best-epoch test acc | val acc | test acc at best val "
             "| Δ last-epoch test | Δ test at best val |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method, stats in summary["methods"].items():
        diff = summary["vs_student"].get(method, {})
        cells = [_pm(stats[k]) if k in stats else "—" for k in ACCURACIES]
        cells += [_interval(diff[k]) if k in diff else "—" for k in ("final_test_acc", "test_acc_at_best_val")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary["diagnostics"]:
        lines += ["", "MHGD stage-2 diagnostics (epoch means, then mean ± std over seeds):", "",
                  "| diagnostic | value |", "|---|---:|"]
        for key, stat in summary["diagnostics"].items():
            lines.append(f"| {key} | {stat['mean']:.4g} ± {stat['std']:.2g} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_study(summary: dict, path: str) -> None:
    """Left: last-epoch test accuracy per method (mean ± std, seeds as dots). Right: paired
    difference to the student alone with its 95 % interval."""
    plt = _pyplot()
    fig, (ax_acc, ax_diff) = plt.subplots(1, 2, figsize=(10, 3.8))
    methods = list(summary["methods"])
    for i, method in enumerate(methods):
        stat = summary["methods"][method]["final_test_acc"]
        ax_acc.bar(i, stat["mean"], yerr=stat["std"] if math.isfinite(stat["std"]) else 0, capsize=4,
                   color=["#777777", "#4c72b0", "#c44e52"][i % 3])
        ax_acc.plot([i] * len(stat["values"]), stat["values"], "k.", alpha=0.6)
    ax_acc.set_xticks(range(len(methods)), methods)
    values = [v for m in methods for v in summary["methods"][m]["final_test_acc"]["values"]]
    ax_acc.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    ax_acc.set(ylabel="last-epoch test top-1 (%)", title=f"study {summary['name']}")
    _plot_differences(ax_diff, {m: d["final_test_acc"] for m, d in summary["vs_student"].items()})
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_differences(ax, diffs: Dict[str, dict]) -> None:
    names = list(diffs)
    for i, name in enumerate(names):
        d = diffs[name]
        ok = math.isfinite(d["low"])
        ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]] if ok else None,
                    fmt="o", capsize=4, color="#c44e52" if ok and d["high"] < 0 else
                    "#55a868" if ok and d["low"] > 0 else "#4c72b0")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="Δ test top-1 vs student alone (pp)", title="paired difference, 95 % t-interval")


def write_summary(study_dir: str) -> Optional[str]:
    """``summary.md``/``.json``/``.png`` over every study in ``study_dir``: MHGD (and KD) against the
    student alone, one row per study, sorted by name; the diagnostics are means over epochs and
    seeds (saturation per pair, ``p0/p1/…``)."""
    studies = []
    for entry in sorted(os.listdir(study_dir)):
        path = os.path.join(study_dir, entry, "study.json")
        if os.path.isfile(path):
            with open(path) as f:
                studies.append(json.load(f))
    if not studies:
        return None
    lines = ["| study | seeds | MHGD last-epoch test | Δ MHGD vs student | Δ MHGD at best val | Δ MHGD val acc "
             "| Δ KD vs student | ‖g_tr‖/‖g_ce‖ | cos(g_ce, g_tr) | clipped share | saturated, student (per pair) "
             "| saturated, teacher | stage-1 held-out loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    diffs = {}
    for s in studies:
        vs, diag = s["vs_student"], s["diagnostics"]
        mhgd = s["methods"].get("mhgd", {}).get("final_test_acc")
        cell = lambda d, k: _interval(d[k]) if d and k in d else "—"  # noqa: E731
        stat = lambda k, fmt: (fmt.format(diag[k]["mean"]) if k in diag else "—")  # noqa: E731
        sat = lambda side: "/".join(f"{diag[k]['mean']:.2f}" for k in sorted(diag)  # noqa: E731
                                    if k.startswith(f"sat_{side}_p")) or "—"
        lines.append(f"| {s['name']} | {len(s['seeds'])} | {_pm(mhgd) if mhgd else '—'} "
                     f"| {cell(vs.get('mhgd'), 'final_test_acc')} | {cell(vs.get('mhgd'), 'test_acc_at_best_val')} "
                     f"| {cell(vs.get('mhgd'), 'final_val_acc')} "
                     f"| {cell(vs.get('kd'), 'final_test_acc')} | {stat('grad_ratio', '{:.3g}')} "
                     f"| {stat('grad_cosine', '{:+.3f}')} | {stat('clipped_share', '{:.2f}')} "
                     f"| {sat('student')} | {sat('teacher')} | {stat('stage1_val_estimator_loss', '{:.4f}')} |")
        if "mhgd" in vs:
            diffs[s["name"]] = vs["mhgd"]["final_test_acc"]
    table = "\n".join(lines)
    with open(os.path.join(study_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    write_results(os.path.join(study_dir, "summary.json"), {"studies": studies})
    if diffs:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(diffs) + 2), 3.8))
        _plot_differences(ax, diffs)
        ax.set_title("MHGD − student alone, last-epoch test acc, 95 % t-interval")
        fig.tight_layout()
        fig.savefig(os.path.join(study_dir, "summary.png"), dpi=100)
        plt.close(fig)
    return table
