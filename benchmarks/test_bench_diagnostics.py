"""pytest-benchmark: what the stage-2 diagnostics cost, the cases of :mod:`benchmarks.diagnostics`.
One stage-2 step of the demo setting (ResNet-14 → ResNet-8 at half width, batch 64, 8 heads,
2 threads) without diagnostics, and with them collected at that step; the amortised cost is
(sampled − plain) / 10 of a step.

    python -m pytest benchmarks/test_bench_diagnostics.py --benchmark-only
    mhgd-fast bench --suite diagnostics [--threads 2] [--quick]
        (the four step kinds interleaved round by round, for ratios on a busy machine)
"""
import pytest

from benchmarks import diagnostics


@pytest.fixture(scope="module")
def step_parts():
    return diagnostics.make_parts()  # under conftest.py's bench_threads, as every benchmark


@pytest.mark.parametrize("balance", diagnostics.BALANCE, ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("sampled", diagnostics.SAMPLED, ids=["plain", "sampled"])
def test_stage2_step(benchmark, step_parts, balance, sampled):
    benchmark.group = f"stage-2 step, {'balanced' if balance else 'unbalanced'}"
    benchmark.pedantic(diagnostics.make_step(step_parts, balance, sampled), rounds=15, warmup_rounds=2)
