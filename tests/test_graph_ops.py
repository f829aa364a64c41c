"""attention_graph and graph_kl against directly materialised float64 formulas (§4, §6–§8)."""
import itertools

import pytest
import torch

import mhgd_fast as mf
from _helpers import HALVES, device_of, rel_err


def direct_probs(q, k, squash, scale):
    s = scale * torch.einsum("hnd,hmd->hnm", q.double(), k.double())
    if squash == "tanh":
        s = torch.tanh(s)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def direct_graph_kl_rows(q_s, k_s, q_t, k_t, squash, scale, direction):
    ps, pt = direct_probs(q_s, k_s, squash, scale), direct_probs(q_t, k_t, squash, scale)
    a, b = (ps, pt) if direction == "student_teacher" else (pt, ps)
    return (a * (torch.log(a) - torch.log(b))).sum(-1)


def reduce(rows, reduction):
    return {"sum": rows.sum(), "mean": rows.mean(), "none": rows}[reduction]


def make_inputs(h, n, m, d, dtype=torch.float32, device="cpu", grad=True, spread=1.0):
    tensors = [torch.randn(h, rows, d, dtype=torch.float64) * spread / d ** 0.25
               for rows in (n, m, n, m)]
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in tensors]


# ---------------------------------------------------------------------------- attention_graph

@pytest.mark.matrix()
@pytest.mark.parametrize("squash", [None, "tanh"])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("shape", [(3, 7, 11, 5), (1, 1, 1, 1), (2, 33, 17, 96), (8, 129, 65, 3)])
def test_attention_graph_matches_direct_formula(backend, squash, scale, shape):
    h, n, m, d = shape
    q, k = make_inputs(h, n, m, d, device=device_of(backend))[:2]
    out = mf.ops.attention_graph(q, k, squash=squash, scale=scale, backend=backend)
    ref = direct_probs(q, k, squash, scale)
    assert out.shape == (h, n, m) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(ref)
    dq, dk = torch.autograd.grad((out.double() * g).sum(), (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq, rk = torch.autograd.grad((direct_probs(q64, k64, squash, scale) * g).sum(), (q64, k64))
    assert rel_err(dq, rq) < 1e-5 and rel_err(dk, rk) < 1e-5


@pytest.mark.matrix()
@pytest.mark.parametrize("squash", [None, "tanh"])
def test_attention_graph_gradcheck(backend, squash):
    q, k = make_inputs(2, 5, 4, 3, dtype=torch.float64, device=device_of(backend))[:2]
    fn = lambda q, k: mf.ops.attention_graph(q, k, squash=squash, scale=0.8, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.matrix(dtypes=HALVES)
def test_attention_graph_half_accumulates_in_float32(backend, dtype, device, tol):
    q, k = make_inputs(4, 37, 29, 64, dtype=dtype, device=device)[:2]
    out = mf.ops.attention_graph(q, k, squash="tanh", backend=backend)
    assert out.dtype == dtype
    ref = direct_probs(q, k, "tanh", 1.0)
    # Only the final rounding to 16 bits may differ from the float64 result of the same inputs:
    # tol.rtol is the dtype's ε.
    assert float(((out.double() - ref).abs() / ref).max().detach()) <= tol.rtol
    out.float().sum().backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


@pytest.mark.matrix()
def test_attention_graph_any_strides(backend):
    dev = device_of(backend)
    q = torch.randn(9, 3, 6, device=dev).transpose(0, 1)  # [3, 9, 6], non-contiguous
    k = torch.randn(3, 6, 14, device=dev).transpose(1, 2)[:, ::2]  # [3, 7, 6], strided
    out = mf.ops.attention_graph(q, k, backend=backend)
    torch.testing.assert_close(out, mf.ops.attention_graph(q.contiguous(), k.contiguous(), backend=backend))


def test_attention_graph_rows_are_distributions():
    q, k = make_inputs(2, 13, 31, 8, grad=False)[:2]
    out = mf.ops.attention_graph(q * 50, k, squash=None)  # large logits: no overflow
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 13), atol=1e-6, rtol=0)


@pytest.mark.matrix()
def test_attention_graph_empty_rows(backend):
    q, k = torch.randn(2, 0, 4, device=device_of(backend)), torch.randn(2, 3, 4, device=device_of(backend))
    assert mf.ops.attention_graph(q, k, backend=backend).shape == (2, 0, 3)


# ---------------------------------------------------------------------------- graph_kl

OPTIONS = list(itertools.product([None, "tanh"], [1.0, 0.6], ["student_teacher", "teacher_student"],
                                 ["sum", "mean", "none"]))


@pytest.mark.matrix()
@pytest.mark.parametrize("squash,scale,direction,reduction", OPTIONS)
@pytest.mark.parametrize("shape", [(3, 17, 9, 5), (2, 8, 23, 96)])
def test_graph_kl_matches_direct_formula(backend, squash, scale, direction, reduction, shape):
    h, n, m, d = shape
    inputs = make_inputs(h, n, m, d, device=device_of(backend), spread=2.0)
    out = mf.ops.graph_kl(*inputs, squash=squash, scale=scale, direction=direction, reduction=reduction,
                          backend=backend)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = reduce(direct_graph_kl_rows(*inputs64, squash, scale, direction), reduction)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * w).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs64)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


@pytest.mark.matrix()
@pytest.mark.parametrize("squash,direction,reduction",
                         [(None, "student_teacher", "sum"), ("tanh", "teacher_student", "mean"),
                          ("tanh", "student_teacher", "none")])
def test_graph_kl_gradcheck_every_input(backend, squash, direction, reduction):
    inputs = make_inputs(2, 4, 5, 3, dtype=torch.float64, device=device_of(backend))
    fn = lambda *t: mf.ops.graph_kl(*t, squash=squash, scale=1.3, direction=direction,  # noqa: E731
                                    reduction=reduction, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.matrix()
def test_graph_kl_teacher_constant_gets_no_grad(backend):
    q_s, k_s, q_t, k_t = make_inputs(2, 6, 6, 4, device=device_of(backend))
    q_t, k_t = q_t.detach(), k_t.detach()
    mf.ops.graph_kl(q_s, k_s, q_t, k_t, backend=backend).backward()
    assert q_s.grad is not None and k_s.grad is not None and q_t.grad is None


@pytest.mark.matrix()
def test_graph_kl_identical_graphs_is_zero_and_nonnegative(backend):
    q, k, _, _ = make_inputs(3, 10, 12, 7, device=device_of(backend), grad=False)
    assert abs(float(mf.ops.graph_kl(q, k, q, k, backend=backend))) < 1e-6
    rows = mf.ops.graph_kl(*make_inputs(3, 10, 12, 7, grad=False, device=device_of(backend)),
                           reduction="none", backend=backend)
    assert (rows >= -1e-6).all()


@pytest.mark.matrix(dtypes=HALVES)
def test_graph_kl_half_accumulates_in_float32(backend, dtype, device):
    inputs = make_inputs(8, 64, 64, 32, dtype=dtype, device=device, spread=2.0)
    out = mf.ops.graph_kl(*inputs, backend=backend)
    assert out.dtype == torch.float32
    ref = direct_graph_kl_rows(*inputs, "tanh", 1.0, "student_teacher").sum().detach()
    assert abs(float(out.detach()) - float(ref)) <= 1e-5 * float(ref) + 1e-6
    out.backward()
    assert inputs[0].grad.dtype == dtype


@pytest.mark.matrix()
def test_graph_kl_any_strides(backend):
    dev = device_of(backend)
    base = [torch.randn(5, 3, 4, device=dev), torch.randn(3, 4, 7, device=dev)]
    q_s, k_s = base[0].transpose(0, 1), base[1].transpose(1, 2)  # [3, 5, 4], [3, 7, 4]
    q_t, k_t = torch.randn(3, 5, 8, device=dev)[..., ::2], torch.randn(3, 7, 4, device=dev)
    out = mf.ops.graph_kl(q_s, k_s, q_t, k_t, backend=backend)
    ref = mf.ops.graph_kl(*(t.contiguous() for t in (q_s, k_s, q_t, k_t)), backend=backend)
    torch.testing.assert_close(out, ref)


def test_graph_kl_empty_rows():
    q, k = torch.randn(2, 0, 4), torch.randn(2, 3, 4)
    assert float(mf.ops.graph_kl(q, k, q, k)) == 0.0
    assert mf.ops.graph_kl(q, k, q, k, reduction="none").shape == (2, 0)
    with pytest.raises(ValueError, match="mean"):
        mf.ops.graph_kl(q, k, q, k, reduction="mean")


def test_graph_kl_nan_propagates():
    """Documented: non-finite inputs give a non-finite loss (no silent finite garbage)."""
    q_s, k_s, q_t, k_t = make_inputs(2, 4, 4, 3, grad=False)
    q_s[0, 1, 2] = float("nan")
    assert torch.isnan(mf.ops.graph_kl(q_s, k_s, q_t, k_t))


@pytest.mark.matrix()
@pytest.mark.parametrize("heads,n,m", [(1, 1100, 530), (2, 520, 530)])
def test_graph_kl_streamed_row_blocks(backend, heads, n, m):
    """Graphs too large to be made whole are streamed in row blocks (with a row tail, and with
    per-chunk dk accumulators when the threads outnumber the heads): same values and gradients."""
    inputs = make_inputs(heads, n, m, 5, dtype=torch.float64, device=device_of(backend), spread=2.0)
    out = mf.ops.graph_kl(*inputs, backend=backend)
    inputs64 = [t.detach().requires_grad_() for t in inputs]
    ref = direct_graph_kl_rows(*inputs64, "tanh", 1.0, "student_teacher").sum()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs64)):
        assert rel_err(g, r) < 1e-10
    rows = mf.ops.graph_kl(*inputs, reduction="none", backend=backend)  # the unfused backward
    w = torch.randn_like(rows)
    ref_rows = direct_graph_kl_rows(*inputs64, "tanh", 1.0, "student_teacher")
    for g, r in zip(torch.autograd.grad((rows * w).sum(), inputs), torch.autograd.grad((ref_rows * w).sum(), inputs64)):
        assert rel_err(g, r) < 1e-10


@pytest.mark.matrix()
def test_graph_kl_half_gradients_scaled_before_rounding(backend):
    """A large upstream gradient (AMP's loss scale) multiplies the float32 gradient before it is
    rounded to float16: tiny per-element gradients survive, as in the unfused path."""
    q_s, k_s, q_t, k_t = make_inputs(2, 40, 40, 8, dtype=torch.float16, device=device_of(backend))
    loss = mf.ops.graph_kl(q_s, k_s, q_t, k_t, reduction="mean", backend=backend)
    (loss * 65536.0).backward()
    inputs32 = [t.detach().float().requires_grad_() for t in (q_s, k_s, q_t, k_t)]
    ref = mf.reference.graph_kl(*inputs32, "tanh", 1.0, "student_teacher", "mean") * 65536.0
    g_ref = torch.autograd.grad(ref, inputs32[:2])
    for got, want in zip((q_s.grad, k_s.grad), g_ref):
        assert rel_err(got.float(), want) < 2e-3


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("n,m", [(200, 173), (700, 900)])  # made whole, and streamed
def test_graph_kl_float32_error_at_most_twice_eager(backend, n, m):
    """FlashAttention's rule: against a float64 reference, the fused float32 kernel's error (loss
    and gradients) is at most 2× that of the float32 eager reference, on the backend's device."""
    inputs64 = [t.detach() for t in make_inputs(8, n, m, 96, dtype=torch.float64, device=device_of(backend),
                                                 spread=2.0)]

    def loss_and_grads(impl, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs64]
        out = (mf.ops.graph_kl(*leaves, backend=impl) if impl != "eager" else
               mf.reference.graph_kl(*leaves, "tanh", 1.0, "student_teacher", "sum"))
        return [out.detach().double()] + [g.double() for g in torch.autograd.grad(out, leaves)]

    exact = loss_and_grads("eager", torch.float64)
    eager = loss_and_grads("eager", torch.float32)
    fused = loss_and_grads(backend, torch.float32)
    for name, e, f, x in zip(("loss", "dq_s", "dk_s", "dq_t", "dk_t"), eager, fused, exact):
        err_fused, err_eager = float((f - x).abs().max()), float((e - x).abs().max())
        assert err_fused <= 2 * err_eager + 1e-7 * float(x.abs().max()), (name, err_fused, err_eager)
