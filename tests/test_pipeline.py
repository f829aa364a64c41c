"""The training pipeline end to end on tiny settings: outputs, exact resume, Ctrl-C, NaN stop,
run-folder checks, the CLI flags and the demo."""
import argparse
import csv
import json
import math
import os
import signal

import pytest
import torch

from mhgd_fast.training import (NonFiniteLossError, PipelineConfig, RunDirMismatch, TrainingInterrupted,
                                run_pipeline)
from mhgd_fast.training import checkpoint
from mhgd_fast.training.cli import add_subcommands, config_from_args

TINY = dict(dataset="synthetic", synthetic_train=48, synthetic_test=20, teacher="resnet8", student="resnet8",
            teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64, teacher_epochs=2,
            student_epochs=3, stage1_epochs=2, heads=2, student_vectors=2, progress=False)


def tiny(tmp_path, name="run", **overrides):
    return PipelineConfig(run_dir=str(tmp_path / name), **{**TINY, **overrides})


def final_weights(run_dir, phase):
    state = checkpoint.load(os.path.join(run_dir, "checkpoints", f"{phase}.pt"))
    assert state["finished"]
    return state["modules"]


def assert_identical(a, b):
    for key in a:
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"


def test_teacher_and_student_widths_must_match_at_sensing_points(tmp_path):
    with pytest.raises(ValueError, match="same channels at each sensing point"):
        run_pipeline(tiny(tmp_path, methods=["mhgd"], teacher_epochs=0, student_width=0.5))


@pytest.mark.slow
def test_full_run_writes_every_output(tmp_path, capsys):
    cfg = tiny(tmp_path)
    out = run_pipeline(cfg)
    run = cfg.run_dir
    assert set(out["results"]) == {"teacher", "student", "kd", "mhgd"}
    for name in ("config.json", "train.log", "metrics.csv", "results.json"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    for plot in ("teacher", "student", "kd", "mhgd-stage1", "mhgd-stage2", "comparison"):
        with open(os.path.join(run, "plots", f"{plot}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    phases = [r["phase"] for r in rows]
    assert phases == ["teacher"] * 2 + ["student"] * 3 + ["kd"] * 3 + ["mhgd-stage1"] * 2 + ["mhgd-stage2"] * 3
    stage2 = [r for r in rows if r["phase"] == "mhgd-stage2"]
    assert all(float(r["transfer_loss"]) > 0 for r in stage2)
    assert [float(r["lr"]) for r in stage2] == pytest.approx([0.1, 0.01, 0.001])  # 30/60/80 % of 3 epochs
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["config"] == cfg.to_dict() == json.load(open(os.path.join(run, "config.json")))
    for name, r in results["results"].items():
        assert 0 <= r["final_test_acc"] <= 100 and r["final_test_acc"] == pytest.approx(out["results"][name]["final_test_acc"])
    assert "| mhgd |" in results["table"]
    # a finished run called again trains nothing and reports the same results
    again = run_pipeline(cfg)
    assert again["results"] == out["results"]


@pytest.mark.slow
def test_resume_after_a_crash_and_after_ctrl_c_is_bit_identical(tmp_path):
    reference = tiny(tmp_path, "reference", methods=["kd", "mhgd"])
    run_pipeline(reference)

    cfg = tiny(tmp_path, "interrupted", methods=["kd", "mhgd"])

    def crash_in_kd(phase, epoch, step):  # a crash: only the end-of-epoch checkpoint survives
        if (phase, epoch, step) == ("kd", 1, 2):
            raise RuntimeError("simulated crash")

    def ctrl_c(at):
        def callback(phase, epoch, step):
            if (phase, epoch, step) == at:
                os.kill(os.getpid(), signal.SIGINT)  # the real signal, through the real handler
        return callback

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(cfg, callbacks=[crash_in_kd])
    assert checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", "kd.pt"))["epoch"] == 1
    for at in (("mhgd-stage1", 0, 1), ("mhgd-stage2", 1, 2)):  # mid-epoch: drop-head RNG, balancing
        with pytest.raises(TrainingInterrupted, match="resume"):
            run_pipeline(cfg, callbacks=[ctrl_c(at)])
        state = checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", f"{at[0]}.pt"))
        assert (state["epoch"], state["step"], state["finished"]) == (at[1], at[2], False)
    run_pipeline(cfg)
    for phase in ("teacher", "kd", "mhgd-stage1", "mhgd-stage2"):
        assert_identical(final_weights(reference.run_dir, phase), final_weights(cfg.run_dir, phase))
    with open(os.path.join(cfg.run_dir, "metrics.csv")) as f:
        rows = [(r["phase"], r["epoch"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) == 2 + 3 + 2 + 3  # every epoch once, none repeated


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, methods=["student"])

    def poison(phase, epoch, step):
        if (phase, epoch, step) == ("student", 1, 1):
            poison.target.fc.weight.data.fill_(float("nan"))

    import mhgd_fast.training.stages as stages
    original = stages.build_model

    def capture_student(name, classes, width):
        model = original(name, classes, width)
        if width == cfg.student_width:
            poison.target = model
        return model

    stages.build_model = capture_student
    try:
        with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1.*last good checkpoint.*student\.pt"):
            run_pipeline(cfg, callbacks=[poison])
    finally:
        stages.build_model = original
    state = checkpoint.load(os.path.join(cfg.run_dir, "checkpoints", "student.pt"))
    assert state["epoch"] == 1 and state["step"] == 0 and not state["finished"]
    assert all(torch.isfinite(t).all() for t in state["modules"]["model"].values() if t.is_floating_point())


def test_run_folder_with_other_settings_is_refused(tmp_path):
    run_pipeline(tiny(tmp_path, methods=["student"], teacher_epochs=1, student_epochs=1))
    with pytest.raises(RunDirMismatch, match="student_epochs"):
        run_pipeline(tiny(tmp_path, methods=["student"], teacher_epochs=1, student_epochs=2))


def test_teacher_checkpoint_is_loaded_instead_of_trained(tmp_path):
    first = tiny(tmp_path, "first", methods=["student"], student_epochs=1)
    run_pipeline(first)
    cfg = tiny(tmp_path, "second", methods=["student"], student_epochs=1,
               teacher_checkpoint=os.path.join(first.run_dir, "checkpoints", "teacher.pt"))
    out = run_pipeline(cfg)
    assert out["results"]["teacher"]["epochs"] == 0
    assert not os.path.exists(os.path.join(cfg.run_dir, "checkpoints", "teacher.pt"))
    assert_identical(final_weights(first.run_dir, "student"), final_weights(cfg.run_dir, "student"))


def parser():
    top = argparse.ArgumentParser(prog="mhgd-fast")
    add_subcommands(top.add_subparsers(dest="command", required=True))
    return top


def test_train_flags_default_to_the_authors_values():
    args = parser().parse_args(["train"])
    cfg = config_from_args(args)
    assert cfg == PipelineConfig()
    assert (cfg.teacher, cfg.student, cfg.dataset) == ("resnet32x4", "resnet8x4", "cifar100")
    assert (cfg.stage1_epochs, cfg.student_epochs, cfg.batch_size, cfg.heads, cfg.student_vectors) == (40, 100, 128, 8, 4)
    assert (cfg.lr, cfg.stage1_lr, cfg.weight_decay, cfg.momentum, cfg.milestones) == (0.1, 0.1, 5e-4, 0.9, [0.3, 0.6, 0.8])
    assert cfg.kd_temperature == 4.0 and cfg.balance and not cfg.global_graph


def test_train_flags_parse_and_bad_data_folder_fails_at_once(tmp_path, capsys):
    args = parser().parse_args(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                                "--run-dir", str(tmp_path / "r"), "--methods", "kd", "mhgd", "--global-graph",
                                "--no-balance", "--milestones", "0.5", "--heads", "3", "--threads", "1"])
    cfg = config_from_args(args)
    assert cfg.methods == ["kd", "mhgd"] and cfg.global_graph and not cfg.balance
    assert cfg.milestones == [0.5] and cfg.heads == 3 and cfg.threads == 1
    assert args.handler(args) == 1
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "data_batch_1" in err and "test_batch" in err
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--methods", "fitnet"])


def test_demo_command_prints_the_table_and_writes_outputs(tmp_path, capsys, monkeypatch):
    import mhgd_fast.training.demo as demo
    real = demo.demo_config
    monkeypatch.setattr(demo, "demo_config", lambda run_dir, **kw: real(run_dir, **{**TINY, **kw}))
    args = parser().parse_args(["demo", "--run-dir", str(tmp_path / "demo"), "--no-progress"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "student", "kd", "mhgd"):
        assert out.count(f"| {name} |") == 1  # the table is printed once
    assert "wall time" in out
    assert os.path.exists(tmp_path / "demo" / "plots" / "comparison.png")
    assert json.load(open(tmp_path / "demo" / "results.json"))["config"]["dataset"] == "synthetic"


def test_the_real_demo_config_is_synthetic_small_and_the_authors_recipe():
    from mhgd_fast.training import demo_config
    cfg = demo_config()
    cfg.validate()
    authors = PipelineConfig()
    assert cfg.dataset == "synthetic" and cfg.methods == ["student", "kd", "mhgd"]
    assert not math.isnan(cfg.lr)
    # the rule of its docstring: the authors' recipe, stage 1 : stage 2 = 40 : 100, a validation split
    for name in ("heads", "student_vectors", "squash", "scale", "transfer_cap", "transfer_weight", "balance",
                 "lr", "stage1_lr", "momentum", "weight_decay", "milestones"):
        assert getattr(cfg, name) == getattr(authors, name), name
    assert cfg.stage1_epochs * 100 == cfg.student_epochs * 40 and cfg.val_split == 0.1
