"""pytest-benchmark: what the stage-2 diagnostics cost. One stage-2 step of the demo setting
(ResNet-14 → ResNet-8 at half width, batch 64, 8 heads, 2 threads) without diagnostics, and with
them collected at that step (graph statistics in ``MHGD.forward`` and, without balancing, the two
separate backward passes they need). The pipeline samples every ``diag_every`` (default 10) steps,
so the amortised cost is (sampled − plain) / 10 of a step.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_diagnostics.py --benchmark-only
    PYTHONPATH=. python benchmarks/test_bench_diagnostics.py [--threads 2] [--rounds 40]
        (the four step kinds interleaved round by round, for ratios on a busy machine)
"""
import pytest
import torch
import torch.nn.functional as F

import mhgd_fast as mf
from mhgd_fast.training.distiller import MHGDDistiller
from mhgd_fast.training.models import build_model


def make_parts():
    torch.manual_seed(0)
    teacher, student = build_model("resnet14", 10, 0.5), build_model("resnet8", 10, 0.5)
    distiller = MHGDDistiller(student, teacher, student.sensing_points, teacher.sensing_points, heads=8)
    distiller.mhgd.eval().requires_grad_(False)
    distiller.train()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return distiller, list(student.parameters()), x, y


@pytest.fixture(scope="module")
def step_parts():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield make_parts()
    torch.set_num_threads(before)


def make_step(parts, balance, sampled):
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


@pytest.mark.parametrize("balance", [True, False], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("sampled", [False, True], ids=["plain", "sampled"])
def test_stage2_step(benchmark, step_parts, balance, sampled):
    benchmark.group = f"stage-2 step, {'balanced' if balance else 'unbalanced'}"
    benchmark.pedantic(make_step(step_parts, balance, sampled), rounds=15, warmup_rounds=2)


def main():
    import argparse
    import statistics
    import time
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="sampling interval to amortise over")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = make_parts()
    kinds = {(b, s): make_step(parts, b, s) for b in (True, False) for s in (False, True)}
    times = {k: [] for k in kinds}
    for round_ in range(args.rounds + 3):
        for kind, step in kinds.items():
            start = time.perf_counter()
            step()
            if round_ >= 3:  # warm-up
                times[kind].append(time.perf_counter() - start)
    print(f"stage-2 step of the demo setting, batch 64, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"median ms; amortised = (sampled/plain − 1)/{args.every}")
    print()
    print("| mode | plain ms | sampled ms | sampled / plain | amortised overhead |")
    print("|---|---:|---:|---:|---:|")
    for balance in (True, False):
        plain = statistics.median(times[(balance, False)]) * 1e3
        sampled = statistics.median(times[(balance, True)]) * 1e3
        print(f"| {'balanced (authors)' if balance else 'unbalanced'} | {plain:.1f} | {sampled:.1f} "
              f"| {sampled / plain:.3f} | {100 * (sampled / plain - 1) / args.every:.1f} % |")


if __name__ == "__main__":
    main()
