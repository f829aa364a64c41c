"""The multi-seed study: aggregation maths against hand-computed values, run sharing between
studies, resume after an interruption, the CLI; and the pipeline features it relies on (cap 0 is
the student alone bit for bit, the validation split, the stage-2 diagnostics)."""
import argparse
import csv
import json
import math
import os
import signal

import pytest
import torch

from mhgd_fast.training import PipelineConfig, TrainingInterrupted, run_pipeline
from mhgd_fast.training import checkpoint
from mhgd_fast.training.settings import SETTINGS, study_config
from mhgd_fast.training.stages import load_datasets
from mhgd_fast.training.study import aggregate, paired_difference, run_study, t_quantile
from mhgd_fast.training.cli import add_subcommands

TINY = dict(dataset="synthetic", synthetic_train=60, synthetic_test=20, teacher="resnet8", student="resnet8",
            teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64, teacher_epochs=1,
            student_epochs=2, stage1_epochs=1, heads=2, student_vectors=2, progress=False, val_split=0.2,
            data_seed=0, diag_every=1)


def final_weights(run_dir, phase):
    state = checkpoint.load(os.path.join(run_dir, "checkpoints", f"{phase}.pt"))
    assert state["finished"]
    return state["modules"]["model"]


# --- statistics ------------------------------------------------------------------------------

def test_t_quantile_matches_tables():
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)


def test_paired_difference_by_hand():
    a, b = [70.0, 72.0, 71.0, 75.0], [69.0, 70.0, 72.0, 71.0]
    d = paired_difference(a, b)  # diffs 1, 2, -1, 4: mean 1.5, sd sqrt(13/3)
    sd = math.sqrt(((1 - 1.5) ** 2 + (2 - 1.5) ** 2 + (-1 - 1.5) ** 2 + (4 - 1.5) ** 2) / 3)
    half = 3.182446305 * sd / 2  # t_{0.975, 3}
    assert (d["mean"], d["std"], d["n"]) == (pytest.approx(1.5), pytest.approx(sd), 4)
    assert (d["low"], d["high"]) == (pytest.approx(1.5 - half), pytest.approx(1.5 + half))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_aggregate_by_hand():
    def res(final, best, val, at_val):
        return {"final_test_acc": final, "best_test_acc": best, "final_val_acc": val, "test_acc_at_best_val": at_val}
    per_seed = {
        0: {"student": res(50, 52, 51, 50), "mhgd": {**res(53, 53, 52, 53), "diagnostics": {"grad_ratio": 10.0},
                                                    "stage1": {"final_val_estimator_loss": 0.1}}},
        1: {"student": res(54, 55, 53, 54), "mhgd": {**res(55, 56, 54, 56), "diagnostics": {"grad_ratio": 30.0},
                                                    "stage1": {"final_val_estimator_loss": 0.3}}},
        2: {"student": res(52, 52, 52, 51), "mhgd": {**res(52, 54, 50, 52), "diagnostics": {"grad_ratio": 20.0},
                                                    "stage1": {"final_val_estimator_loss": 0.2}}},
    }
    out = aggregate(per_seed)
    student = out["methods"]["student"]["final_test_acc"]
    assert (student["mean"], student["std"], student["values"]) == (52, 2, [50, 54, 52])
    mhgd = out["methods"]["mhgd"]["best_test_acc"]
    assert mhgd["mean"] == pytest.approx(163 / 3) and mhgd["std"] == pytest.approx(math.sqrt(7 / 3))
    diff = out["vs_student"]["mhgd"]["final_test_acc"]  # diffs 3, 1, 0: mean 4/3, sd sqrt(7/3)
    half = 4.302652730 * math.sqrt(7 / 3) / math.sqrt(3)
    assert diff["mean"] == pytest.approx(4 / 3) and diff["low"] == pytest.approx(4 / 3 - half)
    assert diff["high"] == pytest.approx(4 / 3 + half)
    assert out["vs_student"]["mhgd"]["test_acc_at_best_val"]["mean"] == pytest.approx((3 + 2 + 1) / 3)
    assert out["diagnostics"]["grad_ratio"]["mean"] == 20 and out["diagnostics"]["grad_ratio"]["std"] == 10
    assert out["diagnostics"]["stage1_val_estimator_loss"]["mean"] == pytest.approx(0.2)


# --- pipeline features the study relies on ---------------------------------------------------

def test_transfer_cap_zero_gives_the_student_alone_bit_for_bit(tmp_path):
    """Same initial weights, same batches, same optimiser: with the transfer gradient capped to 0
    the MHGD student is the student alone, so any difference in a study is the transfer's."""
    cfg = PipelineConfig(run_dir=str(tmp_path / "r"), methods=["student", "mhgd"], transfer_cap=0.0,
                         **{**TINY, "student_epochs": 3})
    out = run_pipeline(cfg)
    student, mhgd = final_weights(cfg.run_dir, "student"), final_weights(cfg.run_dir, "mhgd-stage2")
    for name, tensor in student.items():
        assert torch.equal(tensor, mhgd[name]), name
    assert out["results"]["mhgd"]["final_test_acc"] == out["results"]["student"]["final_test_acc"]
    assert out["results"]["mhgd"]["diagnostics"]["clipped_share"] == 1.0  # every tensor clipped (to 0)


def test_validation_split_is_disjoint_fixed_and_reported(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "r"), **{**TINY, "seed": 3})
    train, val, test = load_datasets(cfg)
    assert (len(train), len(val), len(test)) == (48, 12, 20)
    full = load_datasets(PipelineConfig(**{**TINY, "val_split": 0.0}))[0]
    rows = {tuple(img.flatten()[:64].tolist()) for img in full.images}
    train_rows = {tuple(img.flatten()[:64].tolist()) for img in train.images}
    val_rows = {tuple(img.flatten()[:64].tolist()) for img in val.images}
    assert train_rows | val_rows == rows and not train_rows & val_rows
    other_seed = load_datasets(PipelineConfig(**{**TINY, "seed": 4}))[1]  # data_seed fixed: same split
    assert torch.equal(other_seed.images, val.images)
    with pytest.raises(ValueError, match="val_split"):
        PipelineConfig(**{**TINY, "val_split": 1.0}).validate()


def test_stage2_diagnostics_in_metrics_results_and_plots(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "r"), methods=["mhgd"], **TINY)
    out = run_pipeline(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    stage1 = [r for r in rows if r["phase"] == "mhgd-stage1"]
    assert all(float(r["val_estimator_loss"]) > 0 for r in stage1)
    stage2 = [r for r in rows if r["phase"] == "mhgd-stage2"]
    for r in stage2:
        assert float(r["grad_ratio"]) > 0 and -1 <= float(r["grad_cosine"]) <= 1
        assert 0 <= float(r["clipped_share"]) <= 1
        for m in (0, 1):
            assert float(r[f"kl_row_p{m}"]) >= 0
            assert 0 <= float(r[f"sat_student_p{m}"]) <= 1 and 0 <= float(r[f"sat_teacher_p{m}"]) <= 1
        assert 0 <= float(r["val_acc"]) <= 100
    result = out["results"]["mhgd"]
    assert result["stage1"]["final_val_estimator_loss"] == pytest.approx(float(stage1[-1]["val_estimator_loss"]))
    assert set(result["diagnostics"]) >= {"grad_ratio", "grad_cosine", "clipped_share", "kl_row_p0", "sat_student_p1"}
    assert "test_acc_at_best_val" in result
    with open(os.path.join(cfg.run_dir, "plots", "mhgd-stage2-diagnostics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_balance_uses_the_transfer_weight(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "r"), methods=["student", "mhgd"], balance=False,
                         transfer_weight=0.0, **{**TINY, "diag_every": 0})
    run_pipeline(cfg)  # weight 0 without balancing: the student alone again
    student, mhgd = final_weights(cfg.run_dir, "student"), final_weights(cfg.run_dir, "mhgd-stage2")
    for name, tensor in student.items():
        assert torch.equal(tensor, mhgd[name]), name


# --- the study ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_study_shares_runs_resumes_and_reports(tmp_path):
    base = PipelineConfig(**TINY)
    reference = run_study(base, str(tmp_path / "uninterrupted"), seeds=[0, 1], log=lambda m: None)

    study_dir = str(tmp_path / "study")

    def ctrl_c(phase, epoch, step):  # the second seed's MHGD stage 2, mid-epoch
        if (phase, epoch, step) == ("mhgd-stage2", 1, 1) and "seed1" in ctrl_c.run_dir():
            os.kill(os.getpid(), signal.SIGINT)
    import mhgd_fast.training.study as study_module
    original = study_module.run_pipeline

    def tracking(cfg, callbacks=()):
        ctrl_c.run_dir = lambda: cfg.run_dir
        return original(cfg, callbacks)
    study_module.run_pipeline = tracking
    try:
        with pytest.raises(TrainingInterrupted):
            run_study(base, study_dir, seeds=[0, 1], callbacks=[ctrl_c], log=lambda m: None)
    finally:
        study_module.run_pipeline = original
    assert not os.path.exists(os.path.join(study_dir, "recipe", "study.json"))
    resumed = run_study(base, study_dir, seeds=[0, 1], log=lambda m: None)
    for method, stats in reference["methods"].items():
        for key, stat in stats.items():
            assert resumed["methods"][method][key]["values"] == stat["values"], (method, key)
    for name in ("study.json", "study.md", "study.png"):
        assert os.path.getsize(os.path.join(study_dir, "recipe", name)) > 0
    table = open(os.path.join(study_dir, "recipe", "study.md")).read()
    assert "| mhgd |" in table and "95 % t-interval" in table

    # an ablation trains only its MHGD runs; the teacher and the baselines are shared
    before = set(os.listdir(os.path.join(study_dir, "runs")))
    ablation = run_study(PipelineConfig(**{**TINY, "transfer_cap": 0.0}), study_dir, name="cap0",
                         seeds=[0, 1], log=lambda m: None)
    added = set(os.listdir(os.path.join(study_dir, "runs"))) - before
    assert sorted(a.split("-")[0] + "-" + a.split("-")[1] for a in added) == ["mhgd-seed0", "mhgd-seed1"]
    # cap 0 is the student alone (see above): a zero difference with a zero-width interval
    diff = ablation["vs_student"]["mhgd"]["final_test_acc"]
    assert diff["mean"] == diff["low"] == diff["high"] == 0
    summary = open(os.path.join(study_dir, "summary.md")).read()
    assert "| cap0 |" in summary and "| recipe |" in summary
    assert json.load(open(os.path.join(study_dir, "summary.json")))["studies"][0]["name"] == "cap0"


def test_study_needs_two_seeds(tmp_path):
    with pytest.raises(ValueError, match="2 distinct seeds"):
        run_study(PipelineConfig(**TINY), str(tmp_path), seeds=[0])


def parser():
    top = argparse.ArgumentParser(prog="mhgd-fast")
    add_subcommands(top.add_subparsers(dest="command", required=True))
    return top


def test_study_cli_layers_flags_over_the_setting(tmp_path, monkeypatch):
    import mhgd_fast.training.cli as cli
    seen = {}
    monkeypatch.setattr(cli, "run_study", lambda base, study_dir, **kw: seen.update(base=base, dir=study_dir, **kw))
    args = parser().parse_args(["study", "--setting", "demo", "--name", "x", "--seeds", "3", "--transfer-cap", "0.3",
                                "--scale", "rsqrt-d", "--squash", "none", "--heads", "2", "--stage1-epochs", "7"])
    assert args.handler(args) == 0
    base = seen["base"]
    assert seen["dir"] == "runs/study-demo" and seen["name"] == "x" and seen["seeds"] == [0, 1, 2]
    assert (base.transfer_cap, base.scale, base.squash, base.heads, base.stage1_epochs) == (0.3, "rsqrt-d", "none", 2, 7)
    assert base == study_config("demo", transfer_cap=0.3, scale="rsqrt-d", squash="none", heads=2, stage1_epochs=7)
    assert base.teacher == SETTINGS["demo"]["values"]["teacher"] and base.val_split == 0.1 and base.data_seed == 0
    args = parser().parse_args(["study", "--setting", "wide", "--scale", "0.5", "--seed-list", "3", "9"])
    args.handler(args)
    assert seen["base"].scale == 0.5 and seen["seeds"] == [3, 9] and seen["base"].student_width == 1.0
    for bad in (["--scale", "big"], ["--squash", "relu"], ["--setting", "nope"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["study", *bad])
