"""graph_kl fwd+bwd at B ∈ {128, 1024, 4096}: fused kernel vs eager and compiled reference.

The same cases as ``mhgd-fast bench --suite graph_kl_scaling`` (which also measures each case's
extra peak memory in a fresh process). Run with ``pytest benchmarks --benchmark-only``.
"""
import pytest
import torch

import mhgd_fast as mf
from mhgd_fast import bench_scaling

pytestmark = pytest.mark.skipif("cpu" not in mf.available_backends(), reason="needs the compiled cpu backend")


@pytest.mark.parametrize("impl", bench_scaling.IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", bench_scaling.BATCHES)
def test_graph_kl_scaling(benchmark, impl, batch):
    benchmark.group = f"graph_kl fwd+bwd B={batch}"
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(bench_scaling.HEADS, batch, bench_scaling.DIM, generator=gen) for _ in range(4)]
    for t in inputs[:2]:
        t.requires_grad_()
    loss_fn = bench_scaling.loss_fn(impl)

    def step():
        for t in inputs[:2]:
            t.grad = None
        loss_fn(*inputs).backward()

    benchmark.extra_info.update(impl=impl, batch=batch, threads=torch.get_num_threads())
    benchmark.pedantic(step, warmup_rounds=1, rounds=3 if batch >= 4096 else 7, iterations=1)
