"""Checkpoints are read with torch.load(weights_only=True): a file whose unpickling would run code
is refused with a clear error naming it, and nothing in it runs (teacher checkpoint and resume)."""
import os
import shlex

import pytest
import torch

from mhgd_fast.training import CheckpointError, PipelineConfig, checkpoint, run_pipeline

TINY = dict(dataset="synthetic", synthetic_train=16, synthetic_test=20, teacher="resnet8", student="resnet8",
            teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64, teacher_epochs=1,
            student_epochs=1, stage1_epochs=1, heads=2, student_vectors=2, progress=False)


class RunsAShellCommand:
    """Unpickling this calls os.system: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class PlainCustomClass:
    pass


def hostile_checkpoint(path, marker):
    weights = torch.nn.Linear(3, 2).state_dict()
    torch.save({"modules": {"model": weights}, "note": RunsAShellCommand(marker)}, path)
    return path


@pytest.mark.parametrize("kind", ["code", "custom class"])
def test_a_checkpoint_with_python_objects_is_refused_and_nothing_runs(tmp_path, kind):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "bad.pt")
    if kind == "code":
        hostile_checkpoint(path, marker)
    else:
        torch.save({"model": torch.ones(2), "extra": PlainCustomClass()}, path)
    with pytest.raises(checkpoint.UnsafeCheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert path in message and "not loaded" in message
    assert "Python objects other than tensors" in message and "weights_only=True" in message
    assert ("system" if kind == "code" else "PlainCustomClass") in message  # torch names the object
    assert isinstance(info.value, CheckpointError)
    assert not os.path.exists(marker)


def test_hostile_teacher_checkpoint_and_resume_file_are_refused(tmp_path, capsys):
    marker = str(tmp_path / "pwned")
    bad = hostile_checkpoint(str(tmp_path / "teacher.pt"), marker)
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), teacher_checkpoint=bad, methods=["student"], **TINY)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="teacher.pt was not loaded"):
        run_pipeline(cfg)
    # the CLI: one clear line, exit code 1
    from test_pipeline import parser
    args = parser().parse_args(["train", "--dataset", "synthetic", "--synthetic-train", "16", "--synthetic-test", "20",
                                "--teacher", "resnet8", "--teacher-width", "0.25", "--teacher-checkpoint", bad,
                                "--batch-size", "16", "--run-dir", str(tmp_path / "cli"), "--no-progress"])
    assert args.handler(args) == 1
    err = capsys.readouterr().err
    assert "error:" in err and bad in err and "unpickling them could run arbitrary code" in err
    # resume: a phase checkpoint replaced by a hostile file is not loaded; the run stops
    resumed = PipelineConfig(run_dir=str(tmp_path / "resume"), methods=[], **TINY)
    os.makedirs(os.path.join(resumed.run_dir, "checkpoints"))
    hostile_checkpoint(os.path.join(resumed.run_dir, "checkpoints", "teacher.pt"), marker)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*was not loaded.*Python objects"):
        run_pipeline(resumed)
    assert not os.path.exists(marker)


def test_own_checkpoints_and_plain_state_dicts_load_weights_only(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), methods=[], **TINY)
    run_pipeline(cfg)
    state = checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", "teacher.pt"))  # RNG, scheduler, optimiser
    assert state["finished"] and "model" in state["modules"]
    plain = torch.nn.Linear(3, 2).state_dict()
    torch.save(plain, tmp_path / "plain.pt")
    loaded = checkpoint.load(str(tmp_path / "plain.pt"))
    assert all(torch.equal(loaded[k], plain[k]) for k in plain)
