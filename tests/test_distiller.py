"""Distillers for user training loops: KD against the formula, teacher frozen in eval mode,
MHGD on user models with hooks, and a plain loop that learns."""
import math

import pytest
import torch
import torch.nn as nn

import mhgd_fast as mf
from mhgd_fast.training.distiller import KDDistiller, KDLoss, MHGDDistiller
from mhgd_fast.training.models import build_model


def test_kd_loss_matches_the_formula():
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    p_t, p_s = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    expected = 16 * sum(float((p_t[i] * (p_t[i] / p_s[i]).log()).sum()) for i in range(5)) / 5
    assert float(KDLoss(4.0)(s, t)) == pytest.approx(expected, rel=1e-12)
    assert float(KDLoss(4.0, reduction="sum")(s, t)) == pytest.approx(5 * expected, rel=1e-12)
    assert float(KDLoss(2.0)(t, t)) == pytest.approx(0.0, abs=1e-12)


def test_kd_distiller_keeps_teacher_frozen_in_eval_mode():
    student, teacher = build_model("resnet8", 5, 0.25), build_model("resnet14", 5, 0.25)
    distiller = KDDistiller(student, teacher).train()
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    logits, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 5) and set(losses) == {"ce", "kd"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


class UserNet(nn.Module):
    """A model the package has never seen: points addressed by path, no rewriting."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 10, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(10, width, 3, 1, 1), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_mhgd_distiller_on_user_models_in_a_plain_loop():
    torch.manual_seed(0)
    teacher, student = UserNet(12), UserNet(12)
    distiller = MHGDDistiller(student, teacher, ["body.1", "body.3", "body.5"], ["body.1", "body.3", "body.5"],
                              heads=2, student_vectors=2)
    assert distiller.extra_modules() == [distiller.mhgd] and distiller.mhgd.channels == [6, 10, 12]
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 3, (8,))
    opt1 = torch.optim.SGD(distiller.mhgd.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    first = None
    for _ in range(15):  # stage 1 lowers the estimator loss
        loss = distiller.estimator_loss(x)
        first = float(loss.detach()) if first is None else first
        opt1.zero_grad()
        loss.backward()
        opt1.step()
    opt1.zero_grad()
    distiller.mhgd.eval()
    assert float(distiller.estimator_loss(x).detach()) < first
    distiller.train()
    logits, losses = distiller(x, y)
    assert math.isfinite(float(losses["transfer"].detach())) and float(losses["transfer"].detach()) >= 0
    stats = mf.balanced_backward(losses["ce"], losses["transfer"], student.parameters(), epoch=1, init_epoch=1)
    assert stats["transfer"] > 0 and stats["factor"] == 0.5
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in distiller.mhgd.parameters())


def test_mismatched_channels_and_point_counts_are_rejected():
    with pytest.raises(ValueError, match="same channels"):
        MHGDDistiller(UserNet(12), UserNet(9), ["body.1", "body.5"], ["body.1", "body.5"])
    with pytest.raises(ValueError, match="sensing points"):
        MHGDDistiller(UserNet(12), UserNet(12), ["body.1"], ["body.1", "body.5"])
