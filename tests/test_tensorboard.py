"""--tensorboard: the event files hold the scalars of metrics.csv (every phase, every epoch, the
stage-2 diagnostics), also after a crash and resume; a clear error when the package is missing."""
import csv
import math
import os
import sys

import pytest

from mhgd_fast.training import PipelineConfig, run_pipeline
from mhgd_fast.training.records import TensorBoardUnavailable

TINY = dict(dataset="synthetic", synthetic_train=32, synthetic_test=20, teacher="resnet8", student="resnet8",
            teacher_width=0.25, student_width=0.25, batch_size=16, eval_batch_size=64, teacher_epochs=1,
            student_epochs=3, stage1_epochs=1, heads=2, student_vectors=2, progress=False, diag_every=1,
            val_split=0.25, methods=["student", "mhgd"])


def event_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_match_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    phases = sorted({r["phase"] for r in rows})
    assert sorted(os.listdir(os.path.join(run_dir, "tensorboard"))) == phases
    for phase in phases:
        expected = {}
        for row in (r for r in rows if r["phase"] == phase):
            for key, value in row.items():
                if key not in ("phase", "epoch") and value not in ("", None):
                    expected.setdefault(key, []).append((int(row["epoch"]), float(value)))
        got = event_scalars(os.path.join(run_dir, "tensorboard", phase))
        assert sorted(got) == sorted(expected), phase
        for tag, points in expected.items():
            assert [s for s, _ in got[tag]] == [s for s, _ in points], (phase, tag)  # each epoch once
            for (_, value), (_, stored) in zip(points, got[tag]):  # events hold float32
                assert stored == pytest.approx(value, rel=1e-6, abs=1e-30) or (math.isnan(value) and math.isnan(stored))
    return rows


def test_event_files_match_metrics_csv_after_a_crash_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), tensorboard=True, **TINY)

    def crash(phase, epoch, step):  # stage 2, second epoch: its first epoch's events are rewritten on resume
        if (phase, epoch, step) == ("mhgd-stage2", 1, 1):
            raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(cfg, callbacks=[crash])
    assert_events_match_metrics(cfg.run_dir)
    run_pipeline(cfg)
    rows = assert_events_match_metrics(cfg.run_dir)
    stage2 = event_scalars(os.path.join(cfg.run_dir, "tensorboard", "mhgd-stage2"))
    for tag in ("grad_ratio", "grad_cosine", "clipped_share", "kl_row_p0", "sat_student_p0", "test_acc", "val_acc"):
        assert [s for s, _ in stage2[tag]] == [0, 1, 2], tag
    assert "val_estimator_loss" in event_scalars(os.path.join(cfg.run_dir, "tensorboard", "mhgd-stage1"))
    assert len([r for r in rows if r["phase"] == "mhgd-stage2"]) == 3


def test_missing_tensorboard_is_a_clear_error_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), tensorboard=True, **TINY)
    with pytest.raises(TensorBoardUnavailable, match="pip install tensorboard"):
        run_pipeline(cfg)
    assert not os.path.exists(cfg.run_dir)
    from test_pipeline import parser
    args = parser().parse_args(["train", "--tensorboard", "--run-dir", str(tmp_path / "cli"), "--no-progress"])
    assert args.handler(args) == 1
    assert "error: --tensorboard needs the optional tensorboard package" in capsys.readouterr().err
    run_pipeline(PipelineConfig(**{**TINY, "run_dir": str(tmp_path / "off"), "methods": [], "teacher_epochs": 0}))


def test_amp_and_tensorboard_flags_parse():
    from test_pipeline import parser
    args = parser().parse_args(["train", "--amp", "bf16", "--tensorboard"])
    from mhgd_fast.training.cli import config_from_args
    cfg = config_from_args(args)
    assert cfg.amp == "bf16" and cfg.tensorboard
    assert config_from_args(parser().parse_args(["train"])).amp == "off"
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--amp", "fp8"])
    demo = parser().parse_args(["demo", "--amp", "fp16", "--tensorboard"])
    assert demo.amp == "fp16" and demo.tensorboard
    study = parser().parse_args(["study", "--amp", "bf16"])
    assert study.amp == "bf16" and not hasattr(study, "tensorboard")  # absent flags stay out (preset layering)
