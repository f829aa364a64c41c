"""The study's knobs on the library API, against their formulas: the balancing cap and its
diagnostics, the unbalanced weight, MHGD(scale="rsqrt-d"), squash "none", and forward's stats."""
import math

import pytest
import torch
import torch.nn.functional as F

import mhgd_fast as mf
from mhgd_fast import reference

CHANNELS = [5, 9, 13]  # pair d = 7 and 11: different 1/√d per pair


def feats(batch, channels=CHANNELS, spatial=(3, 4), grad=False):
    return [torch.relu(torch.randn(batch, c, *spatial)).requires_grad_(grad) for c in channels]


def two_losses():
    torch.manual_seed(11)
    body, head, side = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    h = body(x)
    ce = F.cross_entropy(head(h), y)
    transfer = 7 * h.pow(2).sum() + side(h).pow(2).sum() + 0.01 * head.weight.pow(2).sum()
    params = list(body.parameters()) + list(head.parameters()) + list(side.parameters())
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_tr = torch.autograd.grad(transfer, params, retain_graph=True, allow_unused=True)
    two_losses.reached = [g is not None for g in g_tr]  # tensors the transfer loss reaches
    g_ce = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ce)]
    g_tr = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_tr)]
    return ce, transfer, params, g_ce, g_tr


@pytest.mark.parametrize("cap", [1.0, 0.3, 0.1, 0.0, 5.0])
def test_balanced_backward_cap_is_the_formula(cap):
    ce, transfer, params, g_ce, g_tr = two_losses()
    epoch, init = 42.5, 40
    sigma = 1 / (1 + math.exp(-(epoch - init)))
    stats = mf.balanced_backward(ce, transfer, params, epoch=epoch, init_epoch=init, cap=cap)
    clipped = 0
    for p, gc, gt, reached in zip(params, g_ce, g_tr, two_losses.reached):
        limit = cap * sigma * float(gc.norm())
        norm = float(gt.norm())
        expected = gc + (gt if norm <= limit else gt * (limit / norm))
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)
        clipped += reached and norm > limit
    if cap == 0:
        for p, gc in zip(params, g_ce):
            assert torch.equal(p.grad, gc)  # exactly the CE gradient: the student-alone update
    ce_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_ce))
    tr_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_tr))
    dot = sum(float((a * b).sum()) for a, b in zip(g_ce, g_tr))
    assert stats["ce"] == pytest.approx(ce_norm, rel=1e-5)
    assert stats["transfer"] == pytest.approx(tr_norm, rel=1e-5)
    assert stats["ratio"] == pytest.approx(tr_norm / ce_norm, rel=1e-5)
    assert stats["cosine"] == pytest.approx(dot / (ce_norm * tr_norm), rel=1e-4, abs=1e-6)
    # the share counts the tensors the transfer loss reaches (here all but head.bias)
    assert stats["clipped_share"] == pytest.approx(clipped / sum(two_losses.reached))
    assert 0 < stats["clipped_share"] < 1 or cap == 0  # the case mixes clipped and unclipped tensors
    assert stats["factor"] == pytest.approx(sigma)


def test_weighted_backward_is_ce_plus_weight_times_transfer():
    ce, transfer, params, g_ce, g_tr = two_losses()
    stats = mf.weighted_backward(ce, transfer, params, weight=0.25)
    for p, gc, gt in zip(params, g_ce, g_tr):
        torch.testing.assert_close(p.grad, gc + 0.25 * gt)
    assert stats["clipped_share"] == 0
    assert stats["transfer"] == pytest.approx(0.25 * math.sqrt(sum(float(g.pow(2).sum()) for g in g_tr)), rel=1e-5)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_cap_and_weight_must_be_finite_and_nonnegative(bad):
    ce, transfer, params, _, _ = two_losses()
    with pytest.raises(ValueError, match="cap"):
        mf.balanced_backward(ce, transfer, params, 1, 0, cap=bad)
    with pytest.raises(ValueError, match="weight"):
        mf.weighted_backward(ce, transfer, params, weight=bad)
    assert all(p.grad is None for p in params)  # nothing accumulated before the error


def frozen_qk(pair, v_front, v_back):
    def embed(seq, v):
        lin, bn = seq
        return F.batch_norm(v @ lin.weight.T, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    theta, phi = embed(pair.embed_back, v_back), embed(pair.embed_front, v_front)
    split = lambda z: z.view(z.shape[0], pair.heads, pair.d).transpose(0, 1)  # noqa: E731
    return split(theta), split(phi)


@pytest.mark.parametrize("squash", ["tanh", "none"])
def test_rsqrt_d_scale_is_one_over_sqrt_d_per_pair(squash):
    torch.manual_seed(3)
    model = mf.MHGD(CHANNELS, heads=3, student_vectors=2, scale="rsqrt-d", squash=squash, backend="reference")
    assert model.squash == (None if squash == "none" else "tanh")
    for m, pair in enumerate(model.pairs):
        assert model.pair_scale(m) == pytest.approx(1 / math.sqrt(pair.d))
    assert {pair.d for pair in model.pairs} == {7, 11}
    model.train()
    model.estimator_loss(feats(9))  # running statistics that are not the identity
    model.eval()
    s_feats, t_feats = feats(9, grad=True), feats(9)
    loss = model(s_feats, t_feats)
    # independent: SVD vectors, the frozen heads by hand, the reference KL at each pair's scale
    v_t = [torch.linalg.svd(f.reshape(9, f.shape[1], -1).transpose(1, 2))[2][:, 0] for f in t_feats]
    v_t = [v * torch.where(v.sum(-1, keepdim=True) < 0, -1.0, 1.0) for v in v_t]
    v_s = [mf.ops.align_singular_vectors(mf.ops.topk_singular_vectors(f, 2, backend="reference"), vt)
           for f, vt in zip(s_feats, v_t)]
    expected = 0
    with torch.no_grad():
        for m, pair in enumerate(model.pairs):
            q_s, k_s = frozen_qk(pair, v_s[m], v_s[m + 1])
            q_t, k_t = frozen_qk(pair, v_t[m], v_t[m + 1])
            expected += reference.graph_kl(q_s, k_s, q_t, k_t, None if squash == "none" else "tanh",
                                           1 / math.sqrt(pair.d))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    # the stage-1 graph uses the same per-pair scale
    model_one = mf.MHGD(CHANNELS, heads=3, scale=1.0, backend="reference")
    model_one.load_state_dict(model.state_dict())
    model_one.eval()
    with torch.no_grad():
            assert float(model_one.estimator_loss(t_feats, weight_decay=0)) != pytest.approx(
            float(model.estimator_loss(t_feats, weight_decay=0)), rel=1e-4)


@pytest.mark.parametrize("scale", ["rsqrt", "1/sqrt(d)", float("nan"), True])
def test_bad_scale_is_refused(scale):
    with pytest.raises((ValueError, TypeError), match="scale"):
        mf.MHGD(CHANNELS, scale=scale)


def test_forward_stats_match_independent_values():
    torch.manual_seed(4)
    model = mf.MHGD(CHANNELS, heads=2, student_vectors=2, scale=30.0, squash=None)
    model.eval()
    s_feats, t_feats = feats(11), feats(11)
    stats = {}
    loss = model(s_feats, t_feats, stats=stats)
    assert loss == pytest.approx(model(s_feats, t_feats).item())  # stats change nothing
    rows = 2 * 11
    terms, saturations = [], []
    v_t = model.teacher_vectors(t_feats)
    v_s = model.student_vectors_aligned(s_feats, v_t)
    for m, pair in enumerate(model.pairs):
        q_s, k_s = pair.queries_keys(v_s[m], v_s[m + 1], frozen=True)
        q_t, k_t = pair.queries_keys(v_t[m], v_t[m + 1], frozen=True)
        term = reference.graph_kl(q_s.double(), k_s.double(), q_t.double(), k_t.double(), None, 30.0)
        terms.append(float(term))
        assert stats[f"kl_row_p{m}"] == pytest.approx(float(term) / rows, rel=1e-4)
        for side, q, k in (("student", q_s, k_s), ("teacher", q_t, k_t)):
            share = float((torch.tanh(30.0 * q.double() @ k.double().transpose(1, 2)).abs() > 0.995).double().mean())
            assert stats[f"sat_{side}_p{m}"] == pytest.approx(share, abs=1e-3)
            saturations.append(share)
        assert stats[f"kl_check_p{m}"] < 1e-4  # squash None on a compiled backend is cross-checked
    assert sum(terms) == pytest.approx(float(loss), rel=1e-4)
    assert 0 < max(saturations) < 1  # the case has saturated and unsaturated logits
