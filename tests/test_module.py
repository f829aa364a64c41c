"""The MHGD module (§4–§6) and the gradient-balancing rule."""
import copy
import math

import pytest
import torch

import mhgd_fast as mf
from mhgd_fast.module import drop_head_mask

CHANNELS = [6, 10, 14]


def feats(batch, channels=CHANNELS, spatial=(5, 5), grad=False, dtype=torch.float32):
    return [torch.relu(torch.randn(batch, c, *spatial, dtype=dtype)).requires_grad_(grad) for c in channels]


def expected_pair_params(c_f, c_b, heads):
    d = (c_f + c_b) // 2
    embed = (c_b + c_f) * heads * d + 2 * (2 * heads * d)
    estimator = c_f * d + 2 * d + heads * d * c_b + c_b
    return embed + estimator


def test_structure_and_parameter_count():
    model = mf.MHGD(CHANNELS, heads=3)
    assert len(model.pairs) == 2
    for m, pair in enumerate(model.pairs):
        c_f, c_b = CHANNELS[m], CHANNELS[m + 1]
        d = (c_f + c_b) // 2
        for embed, c_in in ((pair.embed_back, c_b), (pair.embed_front, c_f)):
            assert isinstance(embed, torch.nn.Sequential) and len(embed) == 2
            lin, bn = embed
            assert isinstance(lin, torch.nn.Linear) and lin.bias is None
            assert (lin.in_features, lin.out_features) == (c_in, 3 * d)
            assert isinstance(bn, torch.nn.BatchNorm1d) and bn.num_features == 3 * d
            assert bn.eps == 1e-5 and bn.momentum == 0.1
        assert (pair.estimator.out.bias == 0).all()
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(expected_pair_params(CHANNELS[m], CHANNELS[m + 1], 3) for m in range(2))


def test_kaiming_fan_out_init():
    model = mf.MHGD([64, 128], heads=8)
    w = model.pairs[0].embed_back[0].weight.detach()  # [H·d, 128], fan_out = H·d
    expected_std = math.sqrt(2.0 / w.shape[0])
    assert abs(float(w.std()) / expected_std - 1) < 0.05


def manual_transfer_loss(model, student, teacher):
    """§6 written out independently: eval-mode heads on teacher k=1 / aligned student vectors."""
    frozen = copy.deepcopy(model).eval()
    v_t = [mf.ops.topk_singular_vectors(t, 1)[:, 0] for t in teacher]
    v_s = [mf.ops.align_singular_vectors(mf.ops.topk_singular_vectors(s, model.student_vectors), vt)
           for s, vt in zip(student, v_t)]
    loss = 0
    for m, pair in enumerate(frozen.pairs):
        def heads(embed, v):
            return embed(v).view(v.shape[0], model.heads, -1).transpose(0, 1)
        q_s, k_s = heads(pair.embed_back, v_s[m + 1]), heads(pair.embed_front, v_s[m])
        q_t, k_t = heads(pair.embed_back, v_t[m + 1]), heads(pair.embed_front, v_t[m])
        log_ps = torch.log_softmax(torch.tanh(q_s @ k_s.transpose(1, 2)), -1)
        log_pt = torch.log_softmax(torch.tanh(q_t @ k_t.transpose(1, 2)), -1)
        loss = loss + (log_ps.exp() * (log_ps - log_pt)).sum()
    return loss


def warm_up_running_stats(model, batch=16):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.estimator_loss(feats(batch))


def test_forward_matches_manual_formula_and_leaves_module_untouched():
    model = mf.MHGD(CHANNELS, heads=4, student_vectors=3)
    warm_up_running_stats(model)
    model.train()
    state = copy.deepcopy(model.state_dict())
    student, teacher = feats(9, grad=True), feats(9)
    loss = model(student, teacher)
    assert model.training
    expected = manual_transfer_loss(model, student, teacher)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in student)
    g_manual = torch.autograd.grad(expected, student)
    for s, g in zip(student, g_manual):
        torch.testing.assert_close(s.grad, g, rtol=1e-4, atol=1e-6)


def test_forward_is_zero_when_student_equals_teacher():
    model = mf.MHGD(CHANNELS, heads=2)
    warm_up_running_stats(model)
    t = feats(7)
    assert abs(float(model(t, t))) < 1e-5


def test_reduction_mean_divides_each_pair_by_rows():
    model = mf.MHGD(CHANNELS, heads=4)
    warm_up_running_stats(model)
    student, teacher = feats(6), feats(6)
    total = model(student, teacher)
    model.reduction = "mean"
    torch.testing.assert_close(model(student, teacher), total / (4 * 6))


def test_drop_head_mask_statistics():
    mask = drop_head_mask(8, 20000, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (8, 20000) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(mask.mean()) - 0.5) < 0.02
    assert (mask.sum(0) >= 1).all() and (mask.sum(0) <= 7).all()  # never all or none of 8 heads


def test_estimator_loss_value_in_eval_mode_and_weight_decay():
    model = mf.MHGD(CHANNELS, heads=2)
    warm_up_running_stats(model)
    model.eval()
    teacher = feats(5)
    plain = model.estimator_loss(teacher, weight_decay=0.0)
    v = [mf.ops.topk_singular_vectors(t, 1)[:, 0] for t in teacher]
    manual = 0
    for m, pair in enumerate(model.pairs):
        q, k = pair.queries_keys(v[m], v[m + 1], frozen=False)
        graph = torch.softmax(q @ k.transpose(1, 2), -1)
        f1 = pair.estimator.front(v[m])
        cat = (graph @ f1).transpose(0, 1).reshape(5, -1)
        v_hat = torch.nn.functional.normalize(pair.estimator.out(cat), dim=-1)
        manual = manual + (1 - (v_hat * v[m + 1]).sum(-1)).mean()
    torch.testing.assert_close(plain, manual)
    wd = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    torch.testing.assert_close(model.estimator_loss(teacher), plain + 5e-4 * wd)


def test_stage1_loss_decreases_on_fixed_problem():
    torch.manual_seed(3)
    base = torch.relu(torch.randn(48, 6, 5, 5))
    teacher = [base, torch.relu(torch.randn(10, 6) @ base.flatten(2)).view(48, 10, 5, 5)]
    teacher.append(torch.relu(torch.randn(14, 10) @ teacher[1].flatten(2)).view(48, 14, 5, 5))
    model = mf.MHGD(CHANNELS, heads=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(60):
        loss = model.estimator_loss(teacher, weight_decay=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_estimator_loss_updates_bn_only_in_training():
    model = mf.MHGD(CHANNELS, heads=2)
    before = model.pairs[0].embed_back[1].running_mean.clone()
    model.eval()
    model.estimator_loss(feats(8))
    assert torch.equal(model.pairs[0].embed_back[1].running_mean, before)
    model.train()
    model.estimator_loss(feats(8))
    assert not torch.equal(model.pairs[0].embed_back[1].running_mean, before)


# ---------------------------------------------------------------------------- balancing

def test_transfer_clip_factor():
    assert mf.transfer_clip_factor(40, 40) == 0.5
    assert mf.transfer_clip_factor(41, 40) == pytest.approx(1 / (1 + math.exp(-1)))
    assert mf.transfer_clip_factor(59, 40) == 1.0  # σ(19) > 1 − 1e-8
    assert mf.transfer_clip_factor(0, 40) == pytest.approx(1 / (1 + math.exp(40)))
    assert mf.transfer_clip_factor(-1e6, 0) == 0.0


def test_clip_by_norm():
    t = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(mf.clip_by_norm(t, torch.tensor(1.0)), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(mf.clip_by_norm(t, torch.tensor(10.0)), t)
    assert (mf.clip_by_norm(t, torch.tensor(0.0)) == 0).all()
    assert (mf.clip_by_norm(torch.zeros(2), torch.tensor(0.0)) == 0).all()


def test_balanced_backward_per_tensor_rule():
    torch.manual_seed(5)
    body, head, side = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    h = body(x)
    ce = torch.nn.functional.cross_entropy(head(h), y)
    transfer = 50 * h.pow(2).sum() + side(h).pow(2).sum()  # `side` only sees the transfer loss
    params = list(body.parameters()) + list(head.parameters()) + list(side.parameters())
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_tr = torch.autograd.grad(transfer, params, retain_graph=True, allow_unused=True)
    stats = mf.balanced_backward(ce, transfer, params, epoch=41, init_epoch=40)
    f = 1 / (1 + math.exp(-1))
    for p, gc, gt in zip(params, g_ce, g_tr):
        gc = torch.zeros_like(p) if gc is None else gc
        expected = gc.clone()
        if gt is not None:
            cap = gc.norm() * f
            expected += gt * min(1.0, float(cap / gt.norm())) if gt.norm() > 0 else 0
        torch.testing.assert_close(p.grad, expected)
    assert all((p.grad == 0).all() for p in side.parameters())  # CE never reaches `side`: cap 0
    assert stats["factor"] == pytest.approx(f) and stats["transfer_clipped"] <= stats["transfer"]


def test_balanced_backward_accumulates_like_backward():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    lin.weight.grad = torch.ones_like(lin.weight)
    out = lin(x)
    mf.balanced_backward(out.sum(), out.detach().sum(), lin.parameters(), 0, 0)
    torch.testing.assert_close(lin.weight.grad, 1 + x.sum(0).expand(2, 3))
