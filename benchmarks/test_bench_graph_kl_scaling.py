"""graph_kl fwd+bwd at B ∈ {128, 1024, 4096}: fused kernel vs eager and compiled reference.

The cases of :mod:`benchmarks.scaling` (``mhgd-fast bench --suite graph_kl_scaling`` also measures
each case's extra peak memory in a fresh process). Run with ``pytest benchmarks --benchmark-only``.
"""
import pytest
import torch

import mhgd_fast as mf
from benchmarks import scaling

pytestmark = pytest.mark.skipif("cpu" not in mf.available_backends(), reason="needs the compiled cpu backend")


@pytest.mark.parametrize("impl", scaling.IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", scaling.BATCHES)
def test_graph_kl_scaling(benchmark, impl, batch):
    benchmark.group = f"graph_kl fwd+bwd B={batch}"
    step = scaling.make_step(impl, batch)
    benchmark.extra_info.update(impl=impl, batch=batch, threads=torch.get_num_threads())
    benchmark.pedantic(step, warmup_rounds=1, rounds=3 if batch >= 4096 else 7, iterations=1)
