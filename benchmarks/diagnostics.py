"""The diagnostics benchmark (``mhgd-fast bench --suite diagnostics``,
``benchmarks/test_bench_diagnostics.py``): what the stage-2 diagnostics cost.

One stage-2 step of the demo setting (ResNet-14 → ResNet-8 at half width, batch 64, 8 heads)
without diagnostics ("plain"), and with them collected at that step ("sampled": graph statistics
in ``MHGD.forward`` and, without balancing, the two separate backward passes they need), with and
without the authors' gradient balancing. The pipeline samples every ``diag_every`` (default 10)
steps, so the amortised cost is (sampled − plain) / 10 of a step. The four step kinds are timed
round-robin (:func:`benchmarks.harness.round_robin`), so their ratios hold on a busy machine.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

import mhgd_fast as mf
from mhgd_fast.training.distiller import MHGDDistiller
from mhgd_fast.training.models import build_model

from . import harness

BATCH = 64
HEADS = 8
BALANCE = (True, False)  # the authors' balancing, plain CE + transfer
SAMPLED = (False, True)  # without, with the diagnostics at this step
DIAG_EVERY = 10  # the pipeline's default sampling interval, to amortise over
QUICK_ROUNDS, FULL_ROUNDS = 5, 40
WARMUP_ROUNDS = 3


def make_parts():
    """(distiller, the student's parameters, images, labels), seeded; the graph network frozen as
    in stage 2."""
    torch.manual_seed(harness.SEED)
    teacher, student = build_model("resnet14", 10, 0.5), build_model("resnet8", 10, 0.5)
    distiller = MHGDDistiller(student, teacher, student.sensing_points, teacher.sensing_points, heads=HEADS)
    distiller.mhgd.eval().requires_grad_(False)
    distiller.train()
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    return distiller, list(student.parameters()), x, y


def make_step(parts, balance: bool, sampled: bool) -> Callable[[], None]:
    """One stage-2 step: forward, then the backward of ``balance`` (balanced, or CE + transfer;
    with ``sampled``, the diagnostics too)."""
    distiller, params, x, y = parts

    def step():
        stats = {} if sampled else None
        _, losses = distiller(x, y, stats=stats)
        for p in params:
            p.grad = None
        if balance:
            mf.balanced_backward(losses["ce"], losses["transfer"], params, epoch=45, init_epoch=40)
        elif sampled:
            mf.weighted_backward(losses["ce"], losses["transfer"], params)
        else:
            (losses["ce"] + losses["transfer"]).backward()
    return step


def run(rounds: int) -> Dict[Tuple[bool, bool], float]:
    """Median ms of each step kind ``(balance, sampled)``, the four kinds timed round-robin over
    ``rounds`` rounds after :data:`WARMUP_ROUNDS` untimed ones."""
    parts = make_parts()
    steps = {(balance, sampled): make_step(parts, balance, sampled) for balance in BALANCE for sampled in SAMPLED}
    return harness.medians(harness.round_robin(steps, harness.Repeats(warmup=WARMUP_ROUNDS, repeat=rounds)))


def format_markdown(times: Dict[Tuple[bool, bool], float], every: int = DIAG_EVERY) -> List[str]:
    """:func:`run`'s medians as Markdown table lines, with the overhead amortised over ``every`` steps."""
    lines = ["| mode | plain ms | sampled ms | sampled / plain | amortised overhead |",
             "|---|---:|---:|---:|---:|"]
    for balance in BALANCE:
        plain, sampled = times[(balance, False)], times[(balance, True)]
        lines.append(f"| {'balanced (authors)' if balance else 'unbalanced'} | {plain:.1f} | {sampled:.1f} "
                     f"| {sampled / plain:.3f} | {100 * (sampled / plain - 1) / every:.1f} % |")
    return lines
