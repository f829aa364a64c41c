"""Failures under DDP stop every process cleanly, never hang: a NaN loss on one process, a process
that dies mid-epoch, a process that hangs. Each run is the real command line (``python -m
mhgd_fast train``) in two gloo processes started as torchrun would start them, with the faults of
``mhgd_fast.training.faults``; a run still going after its deadline is killed and fails the test.
Resuming afterwards gives the uninterrupted run's weights and results, bit for bit."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from mhgd_fast.training.distiller import MHGDDistiller
from mhgd_fast.training.models import build_model
from mhgd_fast.training import NonFiniteLossError, PipelineConfig, run_pipeline
from mhgd_fast.training import checkpoint, faults

from test_ddp import free_port
from test_pipeline import TINY, assert_identical, final_weights, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {**TINY, "methods": ["mhgd"], "global_graph": True, "teacher_epochs": 1, "stage1_epochs": 1,
          "student_epochs": 2, "threads": 1}
PHASES = ("teacher", "mhgd-stage1", "mhgd-stage2")
DEADLINE_S = 180  # per launch: a run of CONFIG takes ~20 s on two busy cores


def flags(config: dict) -> list:
    out = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def launch(run_dir, fault=None, ddp_timeout=600, world=2, deadline=DEADLINE_S, expect_hung=()):
    """Start ``world`` processes of ``mhgd_fast train`` as torchrun would; wait for them up to
    ``deadline`` seconds in all. Returns ``[(exit code, stderr)]`` by rank. A process still running
    at the deadline fails the test (after every process is killed) unless its rank is in
    ``expect_hung`` (a process the test made hang on purpose: killed once the others ended)."""
    args = [sys.executable, "-m", "mhgd_fast", "train", *flags({**CONFIG, "run_dir": str(run_dir)}),
            "--ddp-timeout", str(ddp_timeout)]
    port, procs, logs = free_port(), [], []
    os.makedirs(run_dir.parent, exist_ok=True)
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        env.pop(faults.ENV, None)
        if fault:
            env[faults.ENV] = fault
        log = open(run_dir.parent / f"{run_dir.name}-rank{rank}.err", "w+")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log))
        logs.append(log)
    end = time.monotonic() + deadline
    try:
        for rank, proc in enumerate(procs):
            if rank in expect_hung:
                continue
            try:
                proc.wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} still running after {deadline} s: the run hangs\n{_read(logs[rank])}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, _read(log)) for proc, log in zip(procs, logs)]


def _read(log) -> str:
    log.seek(0)
    text = log.read()
    log.close()
    return text


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted two-process run the resumed ones must equal."""
    run_dir = tmp_path_factory.mktemp("ddp-reference") / "run"
    codes = launch(run_dir)
    assert [code for code, _ in codes] == [0, 0], codes
    return run_dir


def assert_same_run(run_dir, reference_dir):
    for phase in PHASES:
        assert_identical(final_weights(str(reference_dir), phase), final_weights(str(run_dir), phase))
    got, want = (json.load(open(d / "results.json"))["results"] for d in (run_dir, reference_dir))
    for name in ("teacher", "mhgd"):
        for key in ("final_test_acc", "best_test_acc"):
            assert got[name][key] == want[name][key], (name, key)


@pytest.mark.subprocess
@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_at_that_step_and_resume_equals_the_uninterrupted_run(tmp_path, reference):
    # rank 1's features turn NaN in stage 2 before the global graph's gather: rank 0 must not wait
    # in a gather rank 1 never starts
    run_dir = tmp_path / "run"
    ranks = launch(run_dir, fault="nan:1:mhgd-stage2:2:1")
    assert [code for code, _ in ranks] == [1, 1], ranks
    messages = [error_line(stderr) for _, stderr in ranks]
    assert messages[0] == messages[1]  # the same words on every process
    assert messages[0].startswith("error: [mhgd-stage2] non-finite loss at epoch 2, step 1: "
                                  "rank 0: transfer=nan; rank 1: ce=nan, transfer=nan."), messages[0]
    assert "The step was not applied; the last good checkpoint is" in messages[0]
    state = checkpoint.load(os.path.join(run_dir, "checkpoints", "mhgd-stage2.pt"))  # kept: the end of epoch 1
    assert (state["epoch"], state["step"], state["finished"]) == (1, 0, False)
    assert all(torch.isfinite(t).all() for t in state["modules"]["model"].values() if t.is_floating_point())

    assert [code for code, _ in launch(run_dir)] == [0, 0]
    assert_same_run(run_dir, reference)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_rank_that_exits_mid_epoch_stops_the_other_at_once_and_resume_equals_the_uninterrupted_run(tmp_path, reference):
    # rank 1 ends without clean-up in the middle of stage 2's second epoch; the collective timeout
    # stays at its default of 10 minutes, so rank 0 must notice the closed connection, not time out
    run_dir = tmp_path / "run"
    (code0, err0), (code1, _) = launch(run_dir, fault="exit:1:mhgd-stage2:2:1")
    assert (code0, code1) == (1, faults.EXIT_CODE), err0
    message = error_line(err0)
    assert message.startswith("error: [mhgd-stage2] rank 0 stopped at epoch 2, step 1: another process exited "
                              "or crashed"), message
    assert "mhgd-stage2.pt; once every process has stopped, run the same command again to resume" in message
    assert "Traceback" not in err0
    assert checkpoint.load(os.path.join(run_dir, "checkpoints", "mhgd-stage2.pt"))["epoch"] == 1

    assert [code for code, _ in launch(run_dir)] == [0, 0]
    assert_same_run(run_dir, reference)


@pytest.mark.subprocess
@pytest.mark.slow
def test_rank_0_killed_in_the_first_epoch_stops_the_other(tmp_path):
    # SIGKILL of the process that writes the checkpoints, mid-way through DDP's own gradient
    # all-reduce phase (the teacher), before any checkpoint exists
    run_dir = tmp_path / "run"
    (code0, _), (code1, err1) = launch(run_dir, fault="kill:0:teacher:1:1")
    assert (code0, code1) == (-9, 1), err1
    message = error_line(err1)
    assert message.startswith("error: [teacher] rank 1 stopped at epoch 1, step 1: another process exited or "
                              "crashed"), message
    assert "The last good checkpoint is none (failed in the first epoch)" in message


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_hung_rank_makes_the_other_stop_after_the_collective_timeout(tmp_path):
    run_dir = tmp_path / "run"
    (code0, err0), _ = launch(run_dir, fault="hang:1:mhgd-stage1:1:1", ddp_timeout=3, expect_hung=(1,))
    assert code0 == 1, err0
    message = error_line(err0)
    assert message.startswith("error: [mhgd-stage1] rank 0 stopped at epoch 1, step 1: another process did not "
                              "join a collective operation within the collective timeout (3 s, --ddp-timeout)"), message
    assert "mhgd-stage1.pt" not in message and "none (failed in the first epoch)" in message


def test_fault_hooks_parse_and_stay_inert_when_unset(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    x = torch.randn(3, 2)
    inert = faults.Faults.from_env("teacher")
    assert inert.before_step(0, 0, x) is x
    assert faults.parse(" nan:1:mhgd-stage2:2:1 ; exit:0:teacher:1:0;") == [
        ("nan", 1, "mhgd-stage2", 2, 1), ("exit", 0, "teacher", 1, 0)]
    hooks = faults.Faults("teacher", 1, faults.parse("nan:1:teacher:2:3;nan:0:teacher:1:0;nan:1:kd:1:0"))
    assert hooks.before_step(1, 3, x).isnan().all()  # epoch counted from 1 in the spec, from 0 in the loop
    for epoch, step in ((0, 0), (1, 2), (0, 3)):
        assert hooks.before_step(epoch, step, x) is x
    for bad in ("nan:1:teacher:2", "boom:0:teacher:1:0", "nan:x:teacher:1:0", "nan:0:teacher:1:0:9"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


def test_nan_in_stage_1_stops_with_the_non_finite_loss_message(tmp_path, monkeypatch):
    # stage 1's SVD would reject NaN features with a bare ValueError; the runner's message says
    # where it happened and which checkpoint is kept
    monkeypatch.setenv(faults.ENV, "nan:0:mhgd-stage1:2:1")
    cfg = tiny(tmp_path, methods=["mhgd"], teacher_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"\[mhgd-stage1\] non-finite loss at epoch 2, step 1: "
                                                 r"estimator=nan\. .*checkpoints.mhgd-stage1\.pt"):
        run_pipeline(cfg)
    assert checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", "mhgd-stage1.pt"))["epoch"] == 1


def _distiller(agree, gather):
    torch.manual_seed(3)
    student, teacher = build_model("resnet8", 5, 0.25), build_model("resnet8", 5, 0.25)
    return MHGDDistiller(student, teacher.eval(), student.sensing_points, teacher.sensing_points, heads=2,
                         student_vectors=2, gather=gather, agree=agree)


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()))


@pytest.mark.parametrize("poison", [False, True])
def test_with_a_gather_the_distiller_agrees_before_gathering(poison):
    """Every process takes the gather branch only when every process's inputs are finite."""
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 5
    if poison:
        x[2, 0, 5, 5] = float("nan")
    flags_seen, gathered = [], []

    def gather(k):
        gathered.append(k.shape)
        return k

    def others_fine(flag):  # another process's inputs are finite
        flags_seen.append(flag)
        return flag

    _, losses = _distiller(others_fine, gather)(x, y)
    assert flags_seen == [not poison]
    assert bool(gathered) == (not poison) and finite(losses["transfer"]) == (not poison)

    def another_is_bad(flag):
        return False
    gathered.clear()
    _, losses = _distiller(another_is_bad, gather)(x, y)
    assert not gathered and not finite(losses["transfer"])
    assert finite(losses["ce"]) == (not poison)  # this process's own CE is untouched

    # without a gather nothing is agreed: a local graph needs no other process
    _, local = _distiller(lambda flag: pytest.fail("agreed without a gather"), None)(x, y)
    assert finite(local["transfer"]) == (not poison)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_ddp_timeout_must_be_a_positive_number(value, tmp_path):
    with pytest.raises(ValueError, match="ddp_timeout"):
        PipelineConfig(run_dir=str(tmp_path), ddp_timeout=value).validate()
