"""pytest-benchmark: per-map compression at the paper's shapes (B=128, 2 threads), the fast op
against torch.linalg.svd and smaller-side Gram + eigh, forward and forward+backward; and the whole
MHGD transfer loss next to a teacher ResNet32 forward and a student ResNet8 forward+backward. The
cases of :mod:`benchmarks.compression` (``mhgd-fast bench --suite compression``).

    python -m pytest benchmarks/test_bench_svd.py --benchmark-only
"""
import pytest
import torch

from benchmarks import harness
from benchmarks.compression import PAPER_SHAPES, compression_methods, fast_backend, mhgd_parts

METHODS = compression_methods(fast_backend())


@pytest.fixture(autouse=True)
def _seeded():
    """Each case on the same random maps (the threads are pinned by conftest.py's bench_threads)."""
    torch.manual_seed(harness.SEED)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("c,side", PAPER_SHAPES)
@pytest.mark.parametrize("stage", ["fwd", "fwd+bwd"])
def test_compression(benchmark, stage, c, side, k, method):
    benchmark.group = f"{stage} {c}x{side}x{side} k={k}"
    fn = METHODS[method]
    fm = torch.relu(torch.randn(128, c, side, side))
    if stage == "fwd":
        benchmark(fn, fm, k)
        return
    fm.requires_grad_()
    w = torch.randn(128, k, c)
    benchmark(lambda: torch.autograd.grad((fn(fm, k) * w).sum(), fm))


PARTS = mhgd_parts(128)


@pytest.mark.parametrize("part", list(PARTS))
def test_mhgd_loss_against_the_networks(benchmark, part):
    benchmark.group = "MHGD loss vs ResNets, B=128"
    benchmark.pedantic(PARTS[part], rounds=5, warmup_rounds=1)
