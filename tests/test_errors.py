"""Every bad input gets a clear error naming the argument (§8)."""
import pytest
import torch

import mhgd_fast as mf

R = torch.randn


def kl_args(**over):
    args = dict(q_s=R(2, 3, 4), k_s=R(2, 5, 4), q_t=R(2, 3, 4), k_t=R(2, 5, 4))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(q_s=R(3, 4)), ValueError, "q_s must be 3-D"),
    (dict(k_t=R(2, 5, 4, 1)), ValueError, "k_t must be 3-D"),
    (dict(q_s=[[1.0]]), TypeError, "q_s must be a torch.Tensor"),
    (dict(k_s=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "k_s must be float"),
    (dict(k_s=R(3, 5, 4)), ValueError, "k_s has head count"),
    (dict(k_s=R(2, 5, 6)), ValueError, "k_s has feature size"),
    (dict(q_t=R(2, 4, 4)), ValueError, "q_t has row count"),
    (dict(k_t=R(2, 6, 4)), ValueError, "k_t has column count"),
    (dict(q_t=R(2, 3, 4, dtype=torch.float64)), TypeError, "q_t has dtype"),
    (dict(k_t=R(2, 5, 4, device="meta")), ValueError, "k_t is on meta"),
    (dict(k_s=R(2, 0, 4), k_t=R(2, 0, 4)), ValueError, "k_s has no columns"),
])
def test_graph_kl_bad_tensors(over, exc, match):
    with pytest.raises(exc, match=match):
        mf.ops.graph_kl(**kl_args(**over))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(squash="relu"), ValueError, "squash must be one of"),
    (dict(direction="sideways"), ValueError, "direction must be one of"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="1"), TypeError, "scale must be a real number"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    (dict(backend=3), TypeError, "backend must be a string"),
])
def test_graph_kl_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mf.ops.graph_kl(**kl_args(), **kwargs)


def test_unavailable_backends_are_named():
    if "cuda" not in mf.available_backends():
        with pytest.raises(mf.BackendUnavailableError, match="'cuda' is not available"):
            mf.ops.attention_graph(R(2, 3, 4), R(2, 3, 4), backend="cuda")
    if "cpu" not in mf.available_backends():
        with pytest.raises(mf.BackendUnavailableError, match="not compiled"):
            mf.ops.attention_graph(R(2, 3, 4), R(2, 3, 4), backend="cpu")


OPS_AND_ARGS = [(mf.ops.graph_kl, lambda dev: [t.to(dev) for t in kl_args().values()]),
                (mf.ops.attention_graph, lambda dev: (R(2, 3, 4, device=dev), R(2, 5, 4, device=dev))),
                (mf.ops.topk_singular_vectors, lambda dev: (R(2, 3, 4, device=dev), 1))]


@pytest.mark.parametrize("op,make_args", OPS_AND_ARGS, ids=[op.__name__ for op, _ in OPS_AND_ARGS])
def test_op_without_a_kernel_is_refused_by_name(monkeypatch, op, make_args):
    """An op the loaded extension registered no kernel for on a usable backend's device (a build
    from other sources; simulated by dropping it from what backends read off the dispatcher):
    naming that backend raises an error naming the op, and "auto" runs the reference."""
    device = next((b for b in mf.available_backends() if b != "reference"), None)
    if device is None:
        pytest.skip("no compiled backend is usable here")
    args = make_args(device)
    assert op.__name__ in mf.backends._KERNELS[device]  # the real build has the kernel
    monkeypatch.setitem(mf.backends._KERNELS, device, mf.backends._KERNELS[device] - {op.__name__})
    with pytest.raises(mf.BackendUnavailableError, match=f"{op.__name__} has no '{device}' kernel"):
        op(*args, backend=device)
    assert mf.backends.resolve(op.__name__, "auto", torch.device(device)) == "reference"
    torch.testing.assert_close(op(*args), op(*args, backend="reference"))


def test_backend_device_mismatch():
    if "cpu" in mf.available_backends():
        with pytest.raises(ValueError, match="backend='cpu' needs cpu tensors"):
            mf.ops.attention_graph(R(2, 3, 4, device="meta"), R(2, 3, 4, device="meta"), backend="cpu")


@pytest.mark.parametrize("q,k,exc,match", [
    (R(3, 4), R(2, 3, 4), ValueError, "q must be 3-D"),
    (R(2, 3, 4), R(2, 3, 5), ValueError, "k has feature size"),
    (R(2, 3, 4), R(2, 3, 4, dtype=torch.float64), TypeError, "k has dtype"),
    (R(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.int32), TypeError, "k must be float"),
])
def test_attention_graph_errors(q, k, exc, match):
    with pytest.raises(exc, match=match):
        mf.ops.attention_graph(q, k)


@pytest.mark.parametrize("fm,k,kwargs,exc,match", [
    (R(4), 1, {}, ValueError, "fm must have at least 2 dims"),
    (R(2, 3, 4), 0, {}, ValueError, "k must be in"),
    (R(2, 3, 4), 4, {}, ValueError, r"k must be in \[1, C=3\]"),
    (R(2, 3, 4), 1.0, {}, TypeError, "k must be an int"),
    (torch.ones(2, 3, 4, dtype=torch.int64), 1, {}, TypeError, "fm must be float"),
    (torch.full((2, 3, 4), float("nan")), 1, {}, ValueError, "fm contains NaN or Inf"),
    (torch.full((2, 3, 4), float("inf")), 1, {}, ValueError, "fm contains NaN or Inf"),
    (R(2, 3, 4), 1, dict(eps=-1.0), ValueError, "eps must be"),
])
def test_topk_errors(fm, k, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mf.ops.topk_singular_vectors(fm, k, **kwargs)


@pytest.mark.parametrize("v_s,v_t,exc,match", [
    (R(2, 3), R(2, 3), ValueError, "v_s must be 3-D"),
    (R(2, 3, 4), R(2, 4, 1), ValueError, "v_t must be 2-D"),
    (R(2, 3, 4), R(3, 4), ValueError, "v_t has batch size"),
    (R(2, 3, 4), R(2, 5), ValueError, "v_t has channel count"),
    (R(2, 0, 4), R(2, 4), ValueError, "ks = 0"),
    (R(2, 3, 4), R(2, 4, dtype=torch.float64), TypeError, "v_t has dtype"),
])
def test_align_errors(v_s, v_t, exc, match):
    with pytest.raises(exc, match=match):
        mf.ops.align_singular_vectors(v_s, v_t)


def test_module_errors():
    with pytest.raises(ValueError, match="channels must list"):
        mf.MHGD([8])
    with pytest.raises(ValueError, match="heads must be"):
        mf.MHGD([4, 4], heads=0)
    with pytest.raises(ValueError, match="squash must be one of"):
        mf.MHGD([4, 4], squash="sigmoid")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mf.MHGD([4, 4], reduction="none")
    model = mf.MHGD([4, 6], heads=2)
    good = [R(3, 4, 2, 2), R(3, 6, 2, 2)]
    with pytest.raises(ValueError, match=r"student_feats\[1\] has 5 channels but sensing point 1 expects 6"):
        model([R(3, 4, 2, 2), R(3, 5, 2, 2)], good)
    with pytest.raises(ValueError, match="teacher_feats must be a list of 2 feature maps, got 1"):
        model(good, good[:1])
    with pytest.raises(ValueError, match=r"teacher_feats\[1\] has batch size 2"):
        model(good, [R(3, 4, 2, 2), R(2, 6, 2, 2)])
    with pytest.raises(ValueError, match="student batch 2 != teacher batch 3"):
        model([R(2, 4, 2, 2), R(2, 6, 2, 2)], good)
    with pytest.raises(ValueError, match="empty batch"):
        model([R(0, 4, 2, 2), R(0, 6, 2, 2)], [R(0, 4, 2, 2), R(0, 6, 2, 2)])
    with pytest.raises(ValueError, match="at least 2"):
        model.estimator_loss([R(1, 4, 2, 2), R(1, 6, 2, 2)])
    with pytest.raises(ValueError, match=r"student_feats\[0\] contains NaN|fm contains NaN"):
        model([torch.full((3, 4, 2, 2), float("nan")), R(3, 6, 2, 2)], good)
