"""The torchdistill plug-in (mhgd_fast.contrib.torchdistill): the tiny config end to end with the
real torchdistill, and its pieces against this project's own functions."""
import copy
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchdistill", reason="torchdistill is not installed (pip install .[torchdistill]; CI installs it)")

from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402

import mhgd_fast as mf  # noqa: E402
from mhgd_fast.contrib import torchdistill as td  # noqa: E402
from mhgd_fast.training.features import FeatureCapture  # noqa: E402
from mhgd_fast.training.models import build_model  # noqa: E402
from mhgd_fast.training.config import PipelineConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "torchdistill")
POINTS = ["layer1", "layer2", "layer3"]


# ---------------------------------------------------------------- end to end, real torchdistill

@pytest.mark.subprocess
def test_tiny_config_end_to_end(tmp_path):
    """Stage 1 trains the heads, stage 2 leaves them (and their BN statistics) exactly as saved,
    and the transfer loss falls."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(EXAMPLES, "train.py"), "--config", os.path.join(EXAMPLES, "synthetic_tiny.yaml"),
           "--device", "cpu", "--record", "rec"]
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the tiny torchdistill run did not finish in 240 s:\n{exc.stdout}\n{exc.stderr}")
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    with open(tmp_path / "rec" / "history.json") as f:
        history = json.load(f)["epochs"]
    snapshots = torch.load(tmp_path / "rec" / "heads.pt")
    assert [r["stage"] for r in history] == [1, 1, 2, 2, 2]
    saved = torch.load(tmp_path / "torchdistill-tiny" / "mhgd_heads.pt")
    assert (tmp_path / "torchdistill-tiny" / "student.pt").exists()

    stage1 = [s for s in snapshots if s["stage"] == 1]
    first, last = stage1[0]["start"], stage1[-1]["end"]
    for key in first:
        if key.endswith(("weight", "running_mean", "running_var")):
            assert not torch.equal(first[key], last[key]), f"stage 1 left {key} unchanged"
    assert last.keys() == saved.keys()
    for key in saved:
        assert torch.equal(last[key], saved[key]), key  # the file holds the heads at the end of stage 1

    for snap in (s for s in snapshots if s["stage"] == 2):
        for when in ("start", "end"):
            for key in saved:  # parameters, running_mean / running_var, num_batches_tracked
                assert torch.equal(snap[when][key], saved[key]), f"stage 2 epoch {snap['epoch']} changed {key}"

    stage2 = [r for r in history if r["stage"] == 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ce"], r["transfer"]])).all() for r in stage2)
    assert stage2[-1]["transfer"] < 0.8 * stage2[0]["transfer"], [r["transfer"] for r in stage2]
    assert stage2[0]["lr"] == pytest.approx(0.1) and stage2[-1]["lr"] == pytest.approx(0.001)  # MultiStepLR [1, 2]


# ---------------------------------------------------------------- pieces

def _models():
    torch.manual_seed(0)
    teacher = build_model("resnet14", 10, 0.25)
    student = build_model("resnet8", 10, 0.25)
    return teacher, student


def _saved_heads(tmp_path, teacher):
    """A trained-looking heads file: random weights and non-trivial BN running statistics."""
    heads = mf.MHGD(mf.training.distiller.feature_channels(teacher, POINTS), heads=4)
    with torch.no_grad():
        for name, buf in heads.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = str(tmp_path / "heads.pt")
    torch.save(heads.state_dict(), path)
    return path, heads


def _stage2_config(heads_path, **optimizer):
    loader = {"dataset_id": "none"}
    return {
        "num_epochs": 1, "train_data_loader": loader, "val_data_loader": loader,
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False,
                    "auxiliary_model_wrapper": {"key": "Teacher4MHGD", "kwargs": {
                        "sensing_points": POINTS, "heads_ckpt": heads_path, "trains_heads": False,
                        "mhgd_kwargs": {"heads": 4}}},
                    "forward_hook": {"input": [], "output": [f"teacher_model.{p}" for p in POINTS]}},
        "student": {"forward_proc": "forward_batch_only_no_sync", "requires_grad": True,
                    "forward_hook": {"input": [], "output": POINTS}},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 1.0}, **optimizer},
        "criterion": {"key": "MHGDLoss", "kwargs": {"student_paths": POINTS}},
        "post_forward_process": "mhgd_balanced_post_forward_process",
    }


def _box(teacher, student, config):
    box = get_distillation_box(teacher, student, {}, config, torch.device("cpu"), None, False, 1)
    box.train_data_loader = [None] * 10  # steps per epoch, for the clip factor of a one-stage box
    box.pre_epoch_process(epoch=0)
    return box


def _expected_balanced_grads(student, teacher, heads, x, y, epoch, init_epoch):
    """The stage-2 gradient by this project's functions on a copy of the student."""
    student = copy.deepcopy(student)
    with FeatureCapture(student, POINTS) as s_cap, FeatureCapture(teacher, POINTS) as t_cap:
        with torch.no_grad():
            teacher(x)
        logits = student(x)
        ce = F.cross_entropy(logits, y)
        transfer = heads(s_cap.features, t_cap.features)
    params = list(student.parameters())
    mf.balanced_backward(ce, transfer, params, epoch=epoch, init_epoch=init_epoch)
    return [p.grad for p in params], float(ce.detach()), float(transfer.detach())


def test_stage2_step_equals_balanced_backward(tmp_path):
    teacher, student = _models()
    path, heads = _saved_heads(tmp_path, teacher)
    heads.eval()
    box = _box(teacher, student, _stage2_config(path))
    assert box.teacher_model.teacher_model.training is False and box.teacher_model.mhgd.training is False
    assert not any(p.requires_grad for p in box.teacher_model.parameters())
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    before = [p.detach().clone() for p in student.parameters()]
    expected, ce, transfer = _expected_balanced_grads(student, teacher, heads, x, y, 0, 0)

    loss = box.forward_process(x, y, {})
    assert isinstance(loss.mhgd_terms, td.MHGDTerms)
    assert float(loss.mhgd_terms.ce.detach()) == pytest.approx(ce, rel=1e-6)
    assert float(loss.mhgd_terms.transfer.detach()) == pytest.approx(transfer, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(ce + transfer, rel=1e-6)
    box.post_forward_process(loss=loss)
    for p, p0, g in zip(student.parameters(), before, expected):  # SGD, lr 1, no momentum: Δw = −g
        torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-5, atol=1e-6)
    assert box.mhgd_grad_stats["factor"] == pytest.approx(0.5)  # σ(0): the first epoch of the stage
    for key, value in heads.state_dict().items():  # the loaded heads are the file's, untouched
        assert torch.equal(box.teacher_model.mhgd.state_dict()[key], value), key


def test_stage2_gradient_accumulation_and_stepwise_scheduler(tmp_path):
    """grad_accum_step k: each call adds 1/k of its balanced gradient; the optimiser and a
    step-wise scheduler step on every k-th call (torchdistill's default post-forward rules)."""
    teacher, student = _models()
    path, heads = _saved_heads(tmp_path, teacher)
    heads.eval()
    config = _stage2_config(path, grad_accum_step=2)
    config["scheduler"] = {"key": "MultiStepLR", "kwargs": {"milestones": [1], "gamma": 0.5}, "scheduling_step": 1}
    box = _box(teacher, student, config)
    batches = [(torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))) for _ in range(2)]
    before = [p.detach().clone() for p in student.parameters()]
    total = None
    for i, (x, y) in enumerate(batches):
        grads, _, _ = _expected_balanced_grads(student, teacher, heads, x, y, 0, 0)
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
        box.post_forward_process(loss=box.forward_process(x, y, {}))
        if i == 0:  # no step yet: parameters as they were, half the balanced gradient accumulated
            assert all(torch.equal(p, p0) for p, p0 in zip(student.parameters(), before))
            for p, g in zip(student.parameters(), grads):
                torch.testing.assert_close(p.grad, g / 2, rtol=1e-5, atol=1e-7)
            assert box.optimizer.param_groups[0]["lr"] == 1.0
    for p, p0, g in zip(student.parameters(), before, total):
        torch.testing.assert_close(p0 - p.detach(), g / 2, rtol=1e-5, atol=1e-6)
    assert box.optimizer.param_groups[0]["lr"] == 0.5


def test_stage2_nonfinite_stops_before_any_update(tmp_path):
    teacher, student = _models()
    path, _ = _saved_heads(tmp_path, teacher)
    box = _box(teacher, student, _stage2_config(path))
    loss = box.forward_process(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), {})
    loss.mhgd_terms.transfer = loss.mhgd_terms.transfer * float("nan")
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(ValueError, match="non-finite"):
        box.post_forward_process(loss=loss)
    assert all(torch.equal(p, p0) for p, p0 in zip(student.parameters(), before))
    with pytest.raises(TypeError, match="MHGDLoss"):
        box.post_forward_process(loss=torch.tensor(1.0, requires_grad=True))


def test_balance_epochs_follow_the_stages():
    multi = types.SimpleNamespace(stage_number=2, stage_end_epoch=140, current_epoch=45,
                                  train_config={"stage1": {"num_epochs": 40}, "stage2": {"num_epochs": 100}})
    assert td.balance_epochs(multi) == (45, 40)  # as the pipeline: epoch from the start of stage 1
    single = types.SimpleNamespace(stage_grad_count=25, train_data_loader=[None] * 10)
    assert td.balance_epochs(single) == (2, 0)


def test_stage1_loss_is_the_estimator_loss(tmp_path):
    teacher, _ = _models()
    wrapper = td.Teacher4MHGD(teacher, POINTS, str(tmp_path / "h.pt"), torch.device("cpu"), trains_heads=True,
                              mhgd_kwargs={"heads": 4})
    wrapper.train()
    assert wrapper.mhgd.training and not wrapper.teacher_model.training
    assert not any(p.requires_grad for p in wrapper.teacher_model.parameters())
    reference = copy.deepcopy(wrapper.mhgd)
    x = torch.randn(9, 3, 32, 32)
    with FeatureCapture(teacher, POINTS) as cap:
        wrapper(x)
        feats = cap.features
    io = {f"teacher_model.{p}": {"output": f} for p, f in zip(POINTS, feats)}
    torch.manual_seed(3)  # the same drop-head draws
    wrapper.secondary_forward(io)
    loss = td.MHGDEstimatorLoss()({}, io, None)
    torch.manual_seed(3)
    expected = reference.estimator_loss(feats, weight_decay=5e-4)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(wrapper.mhgd.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    wrapper.post_epoch_process()
    saved = torch.load(tmp_path / "h.pt")
    assert all(torch.equal(saved[k], v) for k, v in wrapper.mhgd.state_dict().items())


def test_clear_errors(tmp_path):
    teacher, _ = _models()
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        td.Teacher4MHGD(teacher, POINTS, str(tmp_path / "missing.pt"), torch.device("cpu"), trains_heads=False)
    wrapper = td.Teacher4MHGD(teacher, POINTS, str(tmp_path / "h.pt"), torch.device("cpu"))
    with pytest.raises(KeyError, match="forward_hook"):
        wrapper.secondary_forward({})
    with pytest.raises(KeyError, match="Teacher4MHGD"):
        td.MHGDLoss(POINTS)({"student": {}, "teacher": {}}, {}, None)
    with pytest.raises(ValueError, match="cap"):
        td.MHGDLoss(POINTS, cap=-1)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "mhgd_fast.contrib.torchdistill")
    for name in [m for m in sys.modules if m == "torchdistill" or m.startswith("torchdistill.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install \.\[torchdistill\]"):
        import mhgd_fast.contrib.torchdistill  # noqa: F401


# ---------------------------------------------------------------- the authors' config

def test_authors_config_is_the_recipe(tmp_path, monkeypatch):
    """The CIFAR-100 config carries settings.py's "authors" recipe (PipelineConfig defaults) and
    builds a stage-1 box with torchdistill (CIFAR-100 replaced by a stub: nothing is downloaded)."""
    import torchvision

    class StubCIFAR100(torch.utils.data.Dataset):
        def __init__(self, root, train, download, transform):
            assert not download
            self.transform = transform

        def __len__(self):
            return 8

        def __getitem__(self, i):
            from PIL import Image
            return self.transform(Image.new("RGB", (32, 32))), i

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", StubCIFAR100)
    config = yaml_util.load_yaml_file(os.path.join(EXAMPLES, "cifar100_resnet32x4_resnet8x4.yaml"))
    cfg = PipelineConfig()  # the authors' recipe
    train = config["train"]
    s1, s2 = train["stage1"], train["stage2"]
    assert config["models"]["teacher_model"]["kwargs"]["name"] == cfg.teacher
    assert config["models"]["student_model"]["kwargs"]["name"] == cfg.student
    assert (s1["num_epochs"], s2["num_epochs"]) == (cfg.stage1_epochs, cfg.student_epochs)
    for stage in (s1, s2):
        assert stage["train_data_loader"]["kwargs"]["batch_size"] == cfg.batch_size
        kw = stage["optimizer"]["kwargs"]
        assert (stage["optimizer"]["key"], kw["momentum"], kw["nesterov"]) == ("SGD", cfg.momentum, True)
    assert s1["optimizer"]["kwargs"]["lr"] == cfg.stage1_lr and s1["optimizer"]["kwargs"]["weight_decay"] == 0
    assert s2["optimizer"]["kwargs"]["lr"] == cfg.lr and s2["optimizer"]["kwargs"]["weight_decay"] == cfg.weight_decay
    wrapper_kwargs = s1["teacher"]["auxiliary_model_wrapper"]["kwargs"]
    assert wrapper_kwargs["weight_decay"] == cfg.weight_decay
    assert s2["scheduler"]["kwargs"] == {"milestones": [round(f * cfg.student_epochs) for f in cfg.milestones],
                                         "gamma": cfg.lr_decay}
    mhgd_kwargs = wrapper_kwargs["mhgd_kwargs"]
    assert (mhgd_kwargs["heads"], mhgd_kwargs["student_vectors"], mhgd_kwargs["squash"], mhgd_kwargs["scale"]) == \
        (cfg.heads, cfg.student_vectors, cfg.squash, cfg.scale)
    assert s2["criterion"]["kwargs"]["cap"] == cfg.transfer_cap
    assert s2["post_forward_process"] == "mhgd_balanced_post_forward_process"

    monkeypatch.chdir(tmp_path)
    teacher = td.mhgd_fast_model("resnet32x4", 100)
    student = td.mhgd_fast_model("resnet8x4", 100)
    box = get_distillation_box(teacher, student, config["datasets"], train, torch.device("cpu"), None, False, 1)
    heads = box.teacher_model.mhgd
    assert heads.channels == [64, 128, 256] and heads.heads == 8
    assert {id(p) for g in box.optimizer.param_groups for p in g["params"]} == {id(p) for p in heads.parameters()}
