"""One rank threshold for topk_singular_vectors in every backend (docs/method.md §3).

A singular value computed from a Gram is √(λ_max·noise): with eps = √ε of float64 the zero tail
of a rank-deficient map sat at the threshold, and the cpu and reference backends returned zeros
for different samples. The default eps (``reference.default_eps``) keeps a margin above the
float64 Gram's rounding floor, ops computes it once, and every backend (reference, the CPU
kernel, the CUDA kernels run in the host SIMT simulator) must decide the same zeros on exactly
rank-deficient maps, and agree on the vectors and (float64) gradients.
"""
import math

import numpy as np
import pytest
import torch

import _simt
import mhgd_fast as mf
import mhgd_fast.reference as ref
from _helpers import rel_err, usable_compiled_backends
from test_singular_vectors import controlled_map

FAST = [b for b in usable_compiled_backends() if b == "cpu"]
DTYPES = {"f32": torch.float32, "f64": torch.float64}
BATCH = 12  # samples per case: on the old threshold about a third of float64 samples disagreed


def rank_deficient_map(kind, batch, c, hw, dtype, seed):
    """[B, C, HW] maps of exact rank r (before rounding to dtype); returns the map and r.

    kind: "zero" (r = 0), "r1"/"r2" (Gaussian factors, as a fuzz run draws them), "repeated"
    (σ = 2, 2: a two-dimensional top space), "r2_positive" (positive factors, post-ReLU-like).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(batch, c, hw, dtype=dtype), 0
    if kind == "repeated":
        torch.manual_seed(seed)
        return controlled_map(batch, c, hw, [2.0, 2.0], dtype=dtype), 2
    r = 1 if kind == "r1" else 2
    draw = torch.rand if kind == "r2_positive" else torch.randn
    a = draw(batch, c, r, generator=gen, dtype=torch.float64)
    b = draw(batch, r, hw, generator=gen, dtype=torch.float64)
    return (a @ b).to(dtype).contiguous(), r


# (C, HW, k): HW ≥ C (Gram XᵀX) and HW < C (XXᵀ), odd sizes, one Gram past the CPU's block split
# (n ≥ 32), k from r + 1 to 6.
SHAPES = [(7, 30, 3), (13, 13, 4), (9, 50, 6), (33, 70, 3), (30, 7, 3), (45, 11, 5), (60, 40, 4)]
KINDS = ["zero", "r1", "r2", "repeated", "r2_positive"]
CASES = [(kind, c, hw, k) for kind in KINDS for (c, hw, k) in SHAPES]


def case_id(case):
    return "{}-C{}-HW{}-k{}".format(*case)


def zero_rows(out):
    return out.norm(dim=-1) == 0


def check_vectors_agree(out, want, r, repeated, tol):
    """Distinct σ: the vectors themselves (canonical sign); the repeated pair: its projector."""
    if repeated:
        p_out = out[:, :r].transpose(1, 2) @ out[:, :r]
        p_want = want[:, :r].transpose(1, 2) @ want[:, :r]
        assert (p_out.double() - p_want.double()).abs().max() <= tol
    else:
        assert (out.double() - want.double()).abs().max() <= tol


def loss_weights(out, r, repeated, seed):
    """A loss whose gradient is defined: linear in distinct vectors, a quadratic form of the
    repeated pair's projector (any basis of that plane gives the same value)."""
    gen = torch.Generator().manual_seed(seed)
    if repeated:
        a = torch.randn(out.shape[0], out.shape[2], generator=gen, dtype=out.dtype)
        return lambda v: ((v[:, :r] * a.unsqueeze(1)).sum(-1) ** 2).sum()
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return lambda v: (v * w).sum()


def test_default_eps_is_one_rule():
    """√ε of the compute dtype, or twice the float64 Gram's noise floor in σ, whichever is larger."""
    for n in (1, 2, 7, 196, 2048):
        floor = 16 * n * torch.finfo(torch.float64).eps
        assert ref.null_floor(n) == pytest.approx(floor)
        assert ref.default_eps(torch.float64, n) == pytest.approx(max(2 ** -26, 2 * math.sqrt(floor)))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert ref.default_eps(dtype, n) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    assert ref.default_eps(torch.float64, 2048) > 100 * torch.finfo(torch.float64).eps ** 0.5
    assert ref.gram_size((4, 9, 5, 7)) == 9 and ref.gram_size((4, 9, 2, 3)) == 6 and ref.gram_size((4, 9)) == 1


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_backends_agree_on_rank_deficient_maps(backend, dtype, case):
    """Same zero rows as the reference (exactly the rank's tail), same vectors, same gradients."""
    kind, c, hw, k = case
    seed = 1000 * KINDS.index(kind) + 10 * c + hw
    fm, r = rank_deficient_map(kind, BATCH, c, hw, DTYPES[dtype], seed)
    repeated = kind == "repeated"
    x = fm.clone().requires_grad_()
    x_ref = fm.clone().requires_grad_()
    out = mf.ops.topk_singular_vectors(x, k, backend=backend)
    want = mf.ops.topk_singular_vectors(x_ref, k, backend="reference")
    expected = torch.arange(k).expand(BATCH, k) >= r
    assert torch.equal(zero_rows(want), expected), "reference: the zero rows are not the rank's tail"
    assert torch.equal(zero_rows(out), expected), f"{backend}: the zero rows are not the rank's tail"
    tol = 1e-9 if dtype == "f64" else 2e-5
    check_vectors_agree(out.detach(), want.detach(), r, repeated, tol)
    if dtype == "f32" or r == 0:
        return
    loss = loss_weights(out, r, repeated, seed)
    g, = torch.autograd.grad(loss(out), x)
    r_g, = torch.autograd.grad(loss(want), x_ref)
    assert torch.isfinite(g).all()
    assert rel_err(g, r_g) < 1e-8


@pytest.mark.matrix()
def test_given_eps_keeps_its_meaning(backend):
    """σ = 3, 1, 0.002: with eps = 1e-3 the third is zero (0.002 ≤ 0.003), with 1e-4 it is not."""
    torch.manual_seed(3)
    fm = controlled_map(4, 11, 17, [3.0, 1.0, 0.002])
    assert (mf.ops.topk_singular_vectors(fm, 3, eps=1e-3, backend=backend)[:, 2] == 0).all()
    assert (mf.ops.topk_singular_vectors(fm, 3, eps=1e-4, backend=backend)[:, 2].norm(dim=-1) > 0.99).all()


# ------------------------------------------------------- the CUDA kernels in the SIMT simulator

needs_simt = pytest.mark.skipif(_simt.CXX is None, reason="no C++20 compiler (g++) to build the SIMT simulator")


@pytest.fixture(scope="module")
def topk_sim():
    return _simt.build("topk_singular_vectors_sim")


def simulate(binary, mode_args, arrays, outputs, tmp_path):
    for name, (array, np_dtype) in arrays.items():
        array.contiguous().numpy().astype(np_dtype).tofile(tmp_path / f"{name}.bin")
    result = _simt.run(binary, *mode_args, tmp_path, tmp_path, jitter_us="2")
    assert result.returncode == 0, result.stderr
    return {name: torch.from_numpy(np.fromfile(tmp_path / f"{name}.bin", dtype=np_dtype).copy()).reshape(shape)
            for name, (np_dtype, shape) in outputs.items()}


def host_forward(fm, k, eps, state):
    """topk_singular_vectors_host.h's forward after the kernel: mask σ ≤ eps·σ_max, v = Xᵀu/σ on the
    XXᵀ route, canonical sign (the CUDA op's host code, which the simulator does not run)."""
    rows = fm.reshape(fm.shape[0], fm.shape[1], -1).to(ref.compute_dtype(fm.dtype))
    c, hw = rows.shape[1], rows.shape[2]
    e, lam = state["basis"], state["eigenvalues"]
    kk = e.shape[2]
    sigma = lam[:, :kk].clamp_min(0).sqrt()
    valid = sigma > eps * sigma[:, :1]
    mask = valid.unsqueeze(1).double()
    if hw >= c:
        v = e * mask
    else:
        v = (rows @ e.to(rows.dtype)).double() / torch.where(valid, sigma, 1.0).unsqueeze(1) * mask
    sign = torch.where(v.sum(1) < 0, -1.0, 1.0) * valid
    out = torch.zeros(fm.shape[0], k, c, dtype=torch.float64)
    out[:, :kk] = (v * sign.unsqueeze(1)).transpose(1, 2)
    return out, e * mask, valid


@pytest.mark.simulator
@needs_simt
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(kind, c, hw, k) for kind in ("r1", "r2", "repeated")
                                  for (c, hw, k) in [(7, 30, 3), (30, 7, 3), (13, 13, 4)]],
                         ids=case_id)
def test_simulated_cuda_kernels_agree(topk_sim, dtype, case, tmp_path):
    """topk_decompose on the Gram the CUDA op forms (float64 for k ≥ 2), the op's threshold: the
    reference's zero rows and vectors; topk_complement_solve on the same samples: the spectral
    formula with the reference's dropping rule, or the sample flagged for the exact route."""
    kind, c, hw, k = case
    batch = 6
    seed = 1000 * KINDS.index(kind) + 10 * c + hw
    fm, r = rank_deficient_map(kind, batch, c, hw, DTYPES[dtype], seed)
    n = min(c, hw)
    eps = ref.default_eps(fm.dtype, n)
    x = fm.double()
    gram = x @ x.transpose(1, 2) if hw >= c else x.transpose(1, 2) @ x  # [B, n, n] float64
    nl = min(n, k + 1)
    state = simulate(topk_sim, ("decompose", "f64", batch, n, k), {"gram": (gram, np.float64)},
                     {"householder": (np.float64, (batch, n, n)), "tridiagonal": (np.float64, (batch, 3, n)),
                      "basis": (np.float64, (batch, n, k)), "eigenvalues": (np.float64, (batch, nl))}, tmp_path)
    out, e, valid = host_forward(fm, k, eps, state)
    want = mf.ops.topk_singular_vectors(fm, k, backend="reference")
    expected = torch.arange(k).expand(batch, k) >= r
    assert torch.equal(zero_rows(out), expected) and torch.equal(zero_rows(want), expected)
    check_vectors_agree(out, want, r, kind == "repeated", 1e-9 if dtype == "f64" else 2e-5)
    # The complement solve with the thresholds the host passes (topk_singular_vectors_host.h).
    lam_max = state["eigenvalues"][:, 0]
    thresh = eps * lam_max
    unit = torch.finfo(ref.compute_dtype(fm.dtype)).eps
    null_floor = 16 * unit * n * lam_max
    floor2 = (eps * lam_max.sqrt()) ** 2 if hw < c else None
    rhs = torch.randn(batch, n, k, dtype=torch.float64) * valid.unsqueeze(1)
    rhs = rhs - e @ (e.transpose(1, 2) @ rhs)
    arrays = {"householder": (state["householder"], np.float64), "tridiagonal": (state["tridiagonal"], np.float64),
              "e": (e, np.float64), "eigenvalues": (state["eigenvalues"], np.float64), "rhs": (rhs, np.float64),
              "thresh": (thresh, np.float64), "null_floor": (null_floor, np.float64)}
    if floor2 is not None:
        arrays["floor2"] = (floor2, np.float64)
    solved = simulate(topk_sim, ("solve", int(floor2 is not None), batch, n, k), arrays,
                      {"y": (np.float64, (batch, n, k)), "exact": (np.uint8, (batch,))}, tmp_path)
    exact = solved["exact"].bool()
    # A numerical null space beyond the top k: every sample of a rank-deficient map goes exact.
    assert exact.all() or n <= k
    lam, u = torch.linalg.eigh(gram)
    diff = state["eigenvalues"][:, :k].unsqueeze(1) - lam.unsqueeze(2)
    coupling = torch.where(diff.abs() > thresh.view(-1, 1, 1), 1.0 / torch.where(diff == 0, 1.0, diff), 0.0)
    if floor2 is not None:
        in_range = (lam > floor2.view(-1, 1)).unsqueeze(2)
        coupling = torch.where(in_range, torch.where(diff.abs() > thresh.view(-1, 1, 1), coupling,
                                                     -1.0 / torch.where(in_range, lam.unsqueeze(2), 1.0)), 0.0)
    y_want = u @ ((u.transpose(1, 2) @ rhs) * coupling)
    y_want = y_want - e @ (e.transpose(1, 2) @ y_want)
    fast = ~exact
    if fast.any():
        assert (solved["y"][fast] - y_want[fast]).abs().max() <= 1e-9 * y_want[fast].abs().max().clamp_min(1e-300)
