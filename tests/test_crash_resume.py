"""Checkpoints survive ``kill -9`` at any moment, and a damaged checkpoint falls back to the
previous one.

The fuzz test kills a tiny run (teacher, KD, MHGD stage 1 and 2) with SIGKILL at seeded points
spread over every phase, some of them inside a checkpoint write (``checkpoint.KILL_ENV``) and a
few at random wall-clock moments, resumes after each kill, and requires the final weights,
``results.json`` and ``metrics.csv`` to equal an uninterrupted run's bit for bit (times aside).
"""
import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

from mhgd_fast.training import CheckpointError, PipelineConfig, run_pipeline
from mhgd_fast.training import checkpoint
from mhgd_fast.training.cli import add_subcommands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_crash_worker.py")

# 64 images, a quarter held out: 48 training images, 3 steps per epoch of 16
FUZZ = dict(dataset="synthetic", synthetic_train=64, synthetic_test=24, val_split=0.25, teacher="resnet8",
            student="resnet8", teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64,
            teacher_epochs=2, student_epochs=3, stage1_epochs=2, heads=2, student_vectors=2,
            methods=["kd", "mhgd"], diag_every=2, threads=1, progress=False)
STEPS_PER_EPOCH = 3
PHASE_EPOCHS = [("teacher", 2), ("kd", 3), ("mhgd-stage1", 2), ("mhgd-stage2", 3)]
TIMING = {"seconds", "wall_seconds", "images_per_s"}  # the only values allowed to differ


def timeline():
    """Every step of the fuzz run as the loop's callbacks see it, in order."""
    return [(phase, epoch, step) for phase, epochs in PHASE_EPOCHS
            for epoch in range(epochs) for step in range(1, STEPS_PER_EPOCH + 1)]


def kill_plan(seed: int, steps, step_kills: int = 14, save_kills: int = 7, clock_kills: int = 3):
    """Seeded attempts at sorted distinct targets in ``steps`` (the timeline): kills right after
    the step; kills inside the next checkpoint write, or inside the one after when no later
    target is in the same phase (this reaches the phases' final saves), each kill point at least
    twice; wall-clock kills a random 0–0.6 s after the step, none among the last four attempts (a
    late kill near the end of the run could leave the later targets nothing to do). Then a last
    attempt that runs to the end. Every kill leaves the resume point at or before the next target."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(len(steps)), step_kills + save_kills + clock_kills))
    kinds = ["step"] * step_kills + [checkpoint.KILL_POINTS[i % len(checkpoint.KILL_POINTS)] for i in range(save_kills)]
    rng.shuffle(kinds)
    for _ in range(clock_kills):
        kinds.insert(rng.randrange(len(kinds) - 3), "clock")
    attempts = []
    for i, (target, kind) in enumerate(zip(targets, kinds)):
        if kind == "step":
            attempts.append({"kind": "step", "target": target})
        elif kind == "clock":
            attempts.append({"kind": "clock", "target": target, "delay": rng.uniform(0.0, 0.6)})
        else:
            last_in_phase = i + 1 == len(targets) or steps[targets[i + 1]][0] != steps[target][0]
            attempts.append({"kind": "save", "target": target, "point": kind,
                             "nth": 2 if last_in_phase else 1})
    return attempts + [{"kind": "none"}]


def run_worker(tmp_path, attempts, timeout_per_attempt=180, timeout=1200):
    plan = {"config": FUZZ, "timeline": timeline(), "attempts": attempts, "timeout": timeout_per_attempt,
            "logs": str(tmp_path / "logs")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop(checkpoint.KILL_ENV, None)
    try:
        done = subprocess.run([sys.executable, WORKER, str(tmp_path / "plan.json"), str(tmp_path / "report.json")],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the crash worker did not finish within {timeout} s")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for i, outcome in enumerate(report):
        assert not outcome["timed_out"], f"attempt {i} {attempts[i]} ran past {timeout_per_attempt} s:\n{tail(outcome)}"
    assert len(report) == len(attempts)
    return report


def tail(outcome, lines=30):
    with open(outcome["log"]) as f:
        return "".join(f.readlines()[-lines:])


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def results_without_timing(run_dir):
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    results["table"] = re.sub(r"\| [^|]* \|$", "|", results["table"], flags=re.M)  # drop the train-time column
    assert results["config"].pop("run_dir") == run_dir
    return without_timing(results)


def metrics_without_timing(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [without_timing(row) for row in csv.DictReader(f)]


def assert_same_tensors(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys differ"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


@pytest.mark.subprocess
@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_run_bit_for_bit(tmp_path):
    steps = timeline()
    attempts = [dict(a, run_dir=str(tmp_path / "fuzzed")) for a in kill_plan(seed=2024, steps=steps)]
    reference = {"kind": "none", "run_dir": str(tmp_path / "reference")}
    # the plan covers every phase, each kill point inside a write, and the wall clock
    hit = {steps[a["target"]][0] for a in attempts if "target" in a}
    assert hit == {phase for phase, _ in PHASE_EPOCHS}
    assert {a["point"] for a in attempts if a["kind"] == "save"} == set(checkpoint.KILL_POINTS)
    report = run_worker(tmp_path, [reference] + attempts)

    assert report[0]["exit"] == 0, tail(report[0])
    kills, resume_at_most = 0, 0
    for attempt, outcome in zip(attempts, report[1:]):
        if "target" in attempt and resume_at_most < attempt["target"]:  # the kill comes exactly at its target
            assert outcome["fired"] == attempt["target"], (attempt, outcome)
        # a kill right after a step resumes at or before that step; the others may have saved later ones
        resume_at_most = outcome["fired"] if attempt["kind"] == "step" else len(steps)
        if attempt["kind"] == "none":
            assert outcome["exit"] == 0, tail(outcome)
            continue
        if attempt["kind"] == "clock" and outcome["exit"] == 0:
            continue  # the run ended before the timer did (possible only for a target near the end)
        assert outcome["signal"] == signal.SIGKILL, f"{attempt} was not killed: {outcome}\n{tail(outcome)}"
        kills += 1
        if attempt["kind"] == "save":  # the kill came inside a write: the temporary file is left behind
            temps = [name[:-len(".pt.tmp")] for name in outcome["files"] if name.endswith(".pt.tmp")]
            assert temps, outcome["files"]
            if attempt["point"] == "between-renames":  # the latest was renamed away, not yet replaced
                phase = temps[0]
                assert len(temps) == 1 and f"{phase}.pt" not in outcome["files"], outcome["files"]
                if f"{phase}.prev.pt" in outcome["files"]:  # the next attempt goes on from the previous one
                    with open(report[report.index(outcome) + 1]["log"]) as f:
                        assert f"{phase}.prev.pt at epoch" in f.read()
    assert kills >= 20

    fuzzed, ref = attempts[0]["run_dir"], reference["run_dir"]
    names = sorted(os.listdir(os.path.join(ref, "checkpoints")))
    assert names == sorted(f"{phase}{suffix}.pt" for phase, _ in PHASE_EPOCHS for suffix in ("", ".prev"))
    assert sorted(os.listdir(os.path.join(fuzzed, "checkpoints"))) == names  # no temporary or damaged file left
    for name in names:
        a = checkpoint.load(os.path.join(ref, "checkpoints", name))
        b = checkpoint.load(os.path.join(fuzzed, "checkpoints", name))
        assert (a["phase"], a["epoch"], a["step"], a["finished"]) == (b["phase"], b["epoch"], b["step"], b["finished"])
        for part in ("modules", "optimizer", "scheduler"):
            assert_same_tensors(a[part], b[part], f"{name}:{part}")
        assert json.dumps(without_timing(a["summary"])) == json.dumps(without_timing(b["summary"]))  # NaN too
        torch.load(os.path.join(fuzzed, "checkpoints", name), weights_only=True)  # plain data only
    assert results_without_timing(ref) == results_without_timing(fuzzed)
    assert metrics_without_timing(ref) == metrics_without_timing(fuzzed)
    with open(os.path.join(fuzzed, "train.log")) as f:
        assert "unusable checkpoint" not in f.read()  # a kill never damages a checkpoint in place


# ---------------------------------------------------------------------------------------------
# a damaged latest checkpoint

SMALL = dict(dataset="synthetic", synthetic_train=48, synthetic_test=20, teacher="resnet8", student="resnet8",
             teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64, teacher_epochs=1,
             student_epochs=3, heads=2, student_vectors=2, methods=["student"], threads=1, progress=False)


def small(path, **overrides):
    return PipelineConfig(run_dir=str(path), **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def reference_student(tmp_path_factory):
    cfg = small(tmp_path_factory.mktemp("reference") / "run")
    run_pipeline(cfg)
    return checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", "student.pt"))["modules"]


def crashed_in_third_epoch(path):
    """A student run that crashed in its third epoch: student.pt is the end of epoch 2,
    student.prev.pt the end of epoch 1."""
    cfg = small(path)

    def crash(phase, epoch, step):
        if (phase, epoch, step) == ("student", 2, 1):
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(cfg, callbacks=[crash])
    folder = os.path.join(cfg.run_dir, "checkpoints")
    latest, previous = os.path.join(folder, "student.pt"), os.path.join(folder, "student.prev.pt")
    assert (checkpoint.load(latest)["epoch"], checkpoint.load(previous)["epoch"]) == (2, 1)
    return cfg, latest, previous


def damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 3 // 5)
    elif how == "empty":
        open(path, "wb").close()
    elif how == "altered":  # a readable file whose contents no longer match their sha256
        state = torch.load(path, weights_only=False)
        weight = state["modules"]["model"]["fc.weight"]
        weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(float("inf")))
        torch.save(state, path)


REASONS = {"truncated": "cannot be read", "empty": "cannot be read", "altered": "fails its checksum"}


@pytest.mark.parametrize("how", ["truncated", "empty", "altered"])
def test_damaged_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous(tmp_path, how, capsys,
                                                                                    reference_student):
    cfg, latest, previous = crashed_in_third_epoch(tmp_path / "run")
    damage(latest, how)
    capsys.readouterr()
    run_pipeline(cfg)
    with open(os.path.join(cfg.run_dir, "train.log")) as f:
        log = f.read()
    warning = f"warning: unusable checkpoint: {latest} {REASONS[how]}"
    assert warning in log and warning in capsys.readouterr().out  # logged and shown
    assert f"; falling back to {previous}" in log and f"moved the unusable {latest} to {latest}.corrupt" in log
    assert f"[student] resuming from {previous} at epoch 2, step 0" in log
    assert os.path.exists(latest + ".corrupt")
    # the replayed epochs give the uninterrupted run's weights
    final = checkpoint.load(latest)
    assert final["finished"]
    for name, tensor in reference_student["model"].items():
        assert torch.equal(tensor, final["modules"]["model"][name]), name


def test_no_usable_checkpoint_stops_with_a_clear_error_naming_both_files(tmp_path, capsys):
    cfg, latest, previous = crashed_in_third_epoch(tmp_path / "run")
    damage(latest, "altered")
    damage(previous, "truncated")
    with pytest.raises(CheckpointError) as info:
        run_pipeline(cfg)
    message = str(info.value)
    assert f"{latest} fails its checksum" in message and f"{previous} cannot be read" in message
    assert "train this phase again from its start" in message
    # the command line reports it as an error (exit 1) instead of a traceback
    top = argparse.ArgumentParser(prog="mhgd-fast")
    add_subcommands(top.add_subparsers(dest="command", required=True))
    flags = ["train", "--run-dir", cfg.run_dir]
    for key, value in SMALL.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
    args = top.parse_args(flags)
    capsys.readouterr()
    assert args.handler(args) == 1
    assert "error: no usable checkpoint" in capsys.readouterr().err  # every retry stops the same way
    assert not os.path.exists(latest + ".corrupt")  # nothing is moved when there is nothing to resume from


# ---------------------------------------------------------------------------------------------
# the checkpoint module on its own

def test_save_keeps_the_last_two_and_load_checks_the_digest(tmp_path):
    path = str(tmp_path / "ckpt" / "x.pt")
    for i in range(3):
        checkpoint.save_atomic({"i": i, "w": torch.full((5, 3), float(i)), "rng": checkpoint.rng_state()}, path)
    assert checkpoint.load(path)["i"] == 2 and checkpoint.load(checkpoint.previous_path(path))["i"] == 1
    torch.load(path, weights_only=True)  # plain data, the RNG states included
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["x.prev.pt", "x.pt"]
    raw = torch.load(path, weights_only=False)  # a plain torch file: the digest is one more key
    assert raw[checkpoint.DIGEST_KEY] == checkpoint.digest({k: v for k, v in raw.items() if k != checkpoint.DIGEST_KEY})
    # files without a digest (older checkpoints, plain state_dicts) still load
    torch.save({"w": torch.ones(2)}, str(tmp_path / "plain.pt"))
    assert torch.equal(checkpoint.load(str(tmp_path / "plain.pt"))["w"], torch.ones(2))


def test_digest_sees_every_value_and_refuses_objects():
    base = {"a": torch.arange(6.0).view(2, 3), "b": [1, 2.5, "s", None, True], "c": {"n": (1, 2)}}
    same = {"a": torch.arange(6.0).view(2, 3).t().contiguous().t(), "b": [1, 2.5, "s", None, True], "c": {"n": (1, 2)}}
    assert checkpoint.digest(base) == checkpoint.digest(same)
    changes = [{**base, "a": base["a"].double()}, {**base, "a": base["a"].view(3, 2)},
               {**base, "b": [1, 2.5, "s", None, 1]}, {**base, "b": [1, 2.5000000000000004, "s", None, True]},
               {**base, "c": {"n": [1, 2]}}, {**base, "c": {"m": (1, 2)}}]
    digests = {checkpoint.digest(c) for c in changes}
    assert len(digests) == len(changes) and checkpoint.digest(base) not in digests
    with pytest.raises(TypeError, match="tensors, numbers, strings, lists and dicts only, got object"):
        checkpoint.digest({"x": object()})


def test_a_byte_flipped_anywhere_is_detected(tmp_path):
    path = str(tmp_path / "x.pt")
    weights = torch.randn(64, 64)
    checkpoint.save_atomic({"w": weights, "step": 3}, path)
    data = open(path, "rb").read()
    rng = random.Random(5)
    detected = 0
    for offset in rng.sample(range(len(data)), 25):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << rng.randrange(8)
        open(path, "wb").write(bytes(damaged))
        try:
            state = checkpoint.load(path)
        except CheckpointError as exc:
            assert path in str(exc)
            detected += 1
        else:  # bytes the reader never uses (zip padding, names it ignores) may change nothing
            assert torch.equal(state["w"], weights)
            assert state["step"] == 3
    assert detected >= 20  # most bytes are tensor data, which torch reads without a check of its own


def test_kill_hook_is_inert_unless_set_and_checks_its_value(tmp_path, monkeypatch):
    monkeypatch.delenv(checkpoint.KILL_ENV, raising=False)
    checkpoint.save_atomic({"i": 1}, str(tmp_path / "x.pt"))  # no variable: an ordinary save
    monkeypatch.setenv(checkpoint.KILL_ENV, "halfway")
    with pytest.raises(ValueError, match="mid-write"):
        checkpoint.save_atomic({"i": 2}, str(tmp_path / "x.pt"))
    assert checkpoint.load(str(tmp_path / "x.pt"))["i"] == 1


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import numpy
    numpy.random.seed(3)
    numpy.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.seed(4)
    torch.manual_seed(5)
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, str(tmp_path / "x.pt"))
    expected = (numpy.random.standard_normal(4), random.random(), torch.rand(3))
    numpy.random.seed(0), random.seed(0), torch.manual_seed(0)
    state = torch.load(str(tmp_path / "x.pt"), weights_only=True)
    checkpoint.set_rng_state(state["rng"])
    numpy.testing.assert_array_equal(numpy.random.standard_normal(4), expected[0])
    assert random.random() == expected[1] and torch.equal(torch.rand(3), expected[2])
