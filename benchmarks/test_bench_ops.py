"""The cases of :mod:`benchmarks.ops` as pytest-benchmark tests: case × mode × runnable backend.

Run with ``pytest benchmarks --benchmark-only`` (``make bench``); not part of the unit tests.
"""
import pytest
import torch

from benchmarks import harness, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
JOBS = [job for device in DEVICES for job in ops.plan(device=device)]


@pytest.mark.parametrize("job", JOBS, ids=[job.id for job in JOBS])
def test_op(benchmark, job):
    # Grouped by case and mode, so each group of pytest-benchmark's report compares the backends.
    benchmark.group = f"{job.case.op} {job.case.shape} {job.mode} {job.device}"
    benchmark.extra_info.update(op=job.case.op, case=job.case.shape, mode=job.mode,
                                backend=job.backend, device=job.device,
                                threads=torch.get_num_threads())
    step = harness.synchronized(job.make_step(), job.device)
    benchmark.pedantic(step, warmup_rounds=harness.FULL.warmup, rounds=harness.FULL.repeat, iterations=1)
