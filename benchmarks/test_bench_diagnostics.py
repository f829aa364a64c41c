"""pytest-benchmark: what the stage-2 diagnostics cost. One stage-2 step of the demo setting
(ResNet-14 → ResNet-8 at half width, batch 64, 8 heads, 2 threads) without diagnostics, and with
them collected at that step (graph statistics in ``MHGD.forward`` and, without balancing, the two
separate backward passes they need). The pipeline samples every ``diag_every`` (default 10) steps,
so the amortised cost is (sampled − plain) / 10 of a step.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_diagnostics.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import mhgd_fast as mf
from mhgd_fast.distiller import MHGDDistiller
from mhgd_fast.models import build_model


@pytest.fixture(scope="module")
def step_parts():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    teacher, student = build_model("resnet14", 10, 0.5), build_model("resnet8", 10, 0.5)
    distiller = MHGDDistiller(student, teacher, student.sensing_points, teacher.sensing_points, heads=8)
    distiller.mhgd.eval().requires_grad_(False)
    distiller.train()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    yield distiller, list(student.parameters()), x, y
    torch.set_num_threads(before)


@pytest.mark.parametrize("balance", [True, False], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("sampled", [False, True], ids=["plain", "sampled"])
def test_stage2_step(benchmark, step_parts, balance, sampled):
    distiller, params, x, y = step_parts
    benchmark.group = f"stage-2 step, {'balanced' if balance else 'unbalanced'}"

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

    benchmark.pedantic(step, rounds=15, warmup_rounds=2)
