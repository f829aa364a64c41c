"""pytest-benchmark settings shared by the benchmark drivers (run with ``pytest benchmarks --benchmark-only``)."""
import pytest

from benchmarks import harness


@pytest.fixture(autouse=True, scope="session")
def bench_threads():
    """Pin torch's CPU threads, as ``mhgd-fast bench`` does, so the numbers compare across runs."""
    with harness.threads(harness.DEFAULT_THREADS) as count:
        yield count
