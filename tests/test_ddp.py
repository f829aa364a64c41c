"""Two gloo CPU processes against one process on the same global batch."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import mhgd_fast as mf

import _ddp_workers

from test_pipeline import TINY

# Every test spawns worker processes (torch.multiprocessing).
pytestmark = pytest.mark.subprocess


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs=2, deadline=180):
    """``mp.spawn`` that fails the test (after killing every process) past ``deadline`` seconds."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    end = time.monotonic() + deadline
    while not context.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() >= end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} still running after {deadline} s: it hangs")


def test_global_graph_loss_and_feature_gradients_equal_single_process(tmp_path):
    channels, world, batch = [5, 7, 9], 2, 14  # 7 rows per process, odd everywhere
    model = mf.MHGD(channels, heads=3, student_vectors=2)
    model.train()
    with torch.no_grad():  # give the frozen BN non-trivial running statistics
        for _ in range(3):
            model.estimator_loss([torch.relu(torch.randn(batch, c, 3, 5)) for c in channels])
    student = [torch.relu(torch.randn(batch, c, 3, 5)) for c in channels]
    teacher = [torch.relu(torch.randn(batch, c, 3, 5)) for c in channels]
    torch.save({"channels": channels, "heads": 3, "student_vectors": 2, "state": model.state_dict(),
                "student": student, "teacher": teacher}, tmp_path / "inputs.pt")
    spawn(_ddp_workers.global_graph_loss, (world, free_port(), str(tmp_path / "inputs.pt"), str(tmp_path)), world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    single = [f.clone().requires_grad_() for f in student]
    loss = model(single, teacher)
    loss.backward()
    distributed_loss = sum(r["loss"] for r in ranks)
    assert torch.allclose(distributed_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for m in range(len(channels)):
        grad = torch.cat([r["grads"][m] for r in ranks])
        assert grad.abs().max() > 0
        assert torch.allclose(grad, single[m].grad, rtol=1e-4, atol=1e-6), f"feature gradient {m}"
    # a local graph is a different loss: the test would notice a gather that did nothing
    local = sum(model([f[r * 7:(r + 1) * 7] for f in student], [f[r * 7:(r + 1) * 7] for f in teacher])
                for r in range(world))
    assert not torch.allclose(local, loss.detach(), rtol=1e-3)


@pytest.mark.slow
def test_pipeline_runs_under_two_processes_with_global_graph(tmp_path):
    config = {**TINY, "run_dir": str(tmp_path / "run"), "methods": ["mhgd"], "global_graph": True,
              "teacher_epochs": 1, "student_epochs": 2, "stage1_epochs": 1}
    spawn(_ddp_workers.pipeline_run, (2, free_port(), config, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("teacher", "mhgd"):  # every process evaluates its own copy: the copies agree
        for key in ("final_test_acc", "best_test_acc"):
            assert ranks[0]["results"][name][key] == ranks[1]["results"][name][key]
    assert ranks[0]["finished_on_disk"]
    assert os.path.exists(tmp_path / "run" / "results.json")
