"""pytest-benchmark settings shared by the benchmark modules (run with ``pytest benchmarks --benchmark-only``)."""
import pytest
import torch

from mhgd_fast import bench


@pytest.fixture(autouse=True, scope="session")
def bench_threads():
    """Pin torch's CPU threads, as ``mhgd-fast bench`` does, so the numbers compare across runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(bench.DEFAULT_THREADS)
    yield bench.DEFAULT_THREADS
    torch.set_num_threads(previous)
