"""The compiled topk_singular_vectors kernels, cpu and cuda (docs/method.md §3).

Accuracy is judged against a float64 SVD / the float64 reference: |cos| ≥ 0.99999 for every
vector whose relative gap (σ_i − σ_{i+1})/σ_1 and (σ_{i−1} − σ_i)/σ_1 is ≥ 1e-3, and gradients
within the dtype's ``TOLERANCES[dtype].rtol`` relative on such inputs (1e-3 for float32, 1e-8 for
float64). Both Gram routes (HW ≥ C: XᵀX; HW < C: XXᵀ) are covered,
with Grams large enough (n ≥ 32) for the CPU's block-split Gram GEMMs.
"""
import pytest
import torch

import mhgd_fast as mf
from _helpers import FLOATS, TOLERANCES, device_of, rel_err, usable_compiled_backends
from conftest import REQUIRE_EXTENSION
from test_singular_vectors import canonical_svd_vectors, controlled_map

pytestmark = pytest.mark.skipif(not usable_compiled_backends() and not REQUIRE_EXTENSION,
                                reason="extension not built")
GAP = 1e-3


def well_separated(fm64, k):
    """[B, k] mask: vectors whose gaps to both neighbours are ≥ GAP·σ_1 (from a float64 SVD)."""
    x = fm64.reshape(fm64.shape[0], fm64.shape[1], -1)
    s = torch.linalg.svdvals(x)
    s = torch.cat([s, s.new_zeros(s.shape[0], k + 1)], 1)
    rel = (s[:, :-1] - s[:, 1:]) / s[:, :1]
    below = rel[:, :k]
    above = torch.cat([torch.full_like(rel[:, :1], float("inf")), rel[:, : k - 1]], 1)
    return (below >= GAP) & (above >= GAP)


def check_against_float64(fm, k, backend, grad=True):
    """|cos| and gradient checks of backend on fm against the float64 reference on fm.double()."""
    fm64 = fm.detach().double()
    keep = well_separated(fm64, k).to(fm.device)
    x = fm.detach().clone().requires_grad_(grad)
    out = mf.ops.topk_singular_vectors(x, k, backend=backend)
    assert out.dtype == fm.dtype and out.shape == (fm.shape[0], k, fm.shape[1])
    assert torch.isfinite(out).all()
    ref64 = canonical_svd_vectors(fm64, k)
    cos = (out.double() * ref64).sum(-1)
    assert float(cos[keep].detach().min()) >= 1 - 1e-5, "sign or direction differs from the float64 SVD"
    if not grad:
        return
    w = torch.randn(out.shape, dtype=torch.float64, device=fm.device) * keep.unsqueeze(-1)
    g, = torch.autograd.grad((out.double() * w).sum(), x)
    x64 = fm64.clone().requires_grad_()
    r_g, = torch.autograd.grad((mf.ops.topk_singular_vectors(x64, k, backend="reference") * w).sum(), x64)
    assert rel_err(g, r_g) <= TOLERANCES[fm.dtype].rtol


def decaying(r, ratio=0.8):
    return [5.0 * ratio ** i for i in range(r)]


# (C, HW): both routes, odd sizes, Grams well above the direct threshold.
ROUTE_SHAPES = [(40, 75), (33, 120), (120, 33), (90, 45)]


@pytest.mark.matrix(dtypes=FLOATS, reference=False)
@pytest.mark.parametrize("c,hw", ROUTE_SHAPES)
@pytest.mark.parametrize("k", range(1, 9))
def test_controlled_spectra_every_k(backend, dtype, device, c, hw, k):
    r = min(c, hw)
    fm = controlled_map(3, c, hw, decaying(r), dtype=dtype).to(device)
    check_against_float64(fm, k, backend)


@pytest.mark.matrix(dtypes=FLOATS, reference=False)
@pytest.mark.parametrize("c,hw", [(48, 96), (96, 48)])
@pytest.mark.parametrize("k", [1, 8])
def test_flat_spectrum_with_minimum_gaps(backend, dtype, device, c, hw, k):
    """Relative gaps of ~1e-3·σ_1 over a flat top: bisection and inverse iteration must still
    separate the vectors (and, without a gradient, k = 1's power steps give up for the full route)."""
    r = min(c, hw)
    sigmas = [1.0 - 0.0012 * i for i in range(10)] + [0.5 * 0.97 ** i for i in range(r - 10)]
    fm = controlled_map(2, c, hw, sigmas, dtype=dtype).to(device)
    check_against_float64(fm, k, backend)


@pytest.mark.matrix(dtypes=FLOATS, reference=False)
def test_post_relu_conv_maps_both_routes(backend, dtype, device):
    """Real conv-layer activations (HW ≥ C and HW < C), student k = 4 and teacher k = 1."""
    torch.manual_seed(1)
    dev = device
    image = torch.rand(4, 3, 16, 16)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())
    down = torch.nn.Sequential(torch.nn.Conv2d(32, 96, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(96, 96, 3, stride=2, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        a = stem(image)  # [4, 32, 16, 16]: HW = 256 ≥ C
        b = down(a)  # [4, 96, 4, 4]: HW = 16 < C
    for fm in (a, b):
        for k in (1, 4):
            check_against_float64(fm.to(dev, dtype), k, backend)


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,side", [(64, 32), (128, 16), (256, 8)])
def test_paper_shapes_small_batch(backend, c, side):
    fm = torch.relu(torch.randn(4, c, side, side, device=device_of(backend)))
    for k in (1, 4):
        check_against_float64(fm, k, backend)


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,hw", [(40, 60), (60, 40)])
def test_repeated_value_at_the_cut_is_finite_and_exact_above_it(backend, c, hw):
    """σ_4 = σ_5 with k = 4: the backward computes the pair at the cut and drops its coupling
    exactly as the reference does; v_1..v_3 and their gradients are unique."""
    r = min(c, hw)
    sigmas = [4.0, 3.0, 2.0, 1.0, 1.0] + [0.5 * 0.9 ** i for i in range(r - 5)]
    fm = controlled_map(2, c, hw, sigmas).to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, 4, backend=backend)
    ref = mf.ops.topk_singular_vectors(fm, 4, backend="reference")
    torch.testing.assert_close(out[:, :3], ref[:, :3], atol=1e-9, rtol=0)
    w = torch.randn_like(out)
    w[:, 3] = 0
    g, = torch.autograd.grad((out * w).sum(), fm, retain_graph=True)
    r_g, = torch.autograd.grad((ref * w).sum(), fm)
    assert rel_err(g, r_g) < 1e-8
    g_all, = torch.autograd.grad((out * torch.randn_like(out)).sum(), fm)
    assert torch.isfinite(g_all).all()


# Drop rule of §3 against the reference, float64, explicit eps = 1e-3: (C, HW) with HW < C (the
# push-through backward on XXᵀ) and HW ≥ C; HW ≤ 17 keeps the full basis even for k = 1, larger
# Grams take the k = 1 CG route with its spectral fallback.
DROP_EPS = 1e-3
DROP_SHAPES = [(41, 7), (45, 23), (23, 41), (7, 45)]


def check_gradient_matches_reference(fm, k, backend, eps=DROP_EPS, tol=1e-10):
    fm = fm.to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, k, eps=eps, backend=backend)
    ref = mf.ops.topk_singular_vectors(fm, k, eps=eps, backend="reference")
    assert (out.norm(dim=-1) > 0.5).all()  # every vector valid: the gradients are not trivially 0
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)
    w = torch.randn_like(out)
    g, = torch.autograd.grad((out * w).sum(), fm)
    r_g, = torch.autograd.grad((ref * w).sum(), fm)
    assert torch.isfinite(g).all()
    assert rel_err(g, r_g) <= tol


def tail(r, start, ratio=0.9):
    return [start * ratio ** i for i in range(r)]


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,hw", DROP_SHAPES)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_near_repeated_value_at_the_cut_drops_the_coupling(backend, c, hw, k):
    """λ_k − λ_{k+1} ≤ eps·λ_max (σ_k, σ_{k+1} = s, s − 1e-4, vectors still unique): the reference
    drops that coupling. The push-through form (HW < C) used to keep its r_l/λ_k part."""
    r = min(c, hw)
    top = [3.0, 2.6, 2.0, 1.5]
    sigmas = top[:k] + [top[k - 1] - 1e-4] + tail(r - k - 1, 0.5 * top[k - 1])
    torch.manual_seed(10 * k + c)
    check_gradient_matches_reference(controlled_map(2, c, hw, sigmas), k, backend)


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,hw", DROP_SHAPES)
@pytest.mark.parametrize("k", [4, 5])
def test_small_valid_vectors_drop_the_null_space_term(backend, c, hw, k):
    """σ_4 = 0.03, σ_5 = 0.01 with σ_1 = 3 and eps = 1e-3: valid (σ > eps·σ_1) but λ ≤ eps·λ_max,
    so the reference drops every coupling beyond the top k, its null-space term r/λ_i included;
    the tail (σ ≤ eps·σ_1) is null space in the reference's HW < C route."""
    r = min(c, hw)
    sigmas = [3.0, 2.0, 1.0, 0.03, 0.01] + tail(r - 5, 0.002)
    torch.manual_seed(10 * k + c)
    check_gradient_matches_reference(controlled_map(2, c, hw, sigmas), k, backend)


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,hw", [(40, 60), (60, 40)])
def test_rank_below_k_on_large_gram(backend, c, hw):
    """Rank 2 < k = 6 on a Gram large enough for the block-split GEMMs: zero tail, zero gradient."""
    fm = controlled_map(3, c, hw, [3.0, 1.0]).to(device_of(backend)).requires_grad_()
    # An explicit eps well above the Gram's rounding of σ_3 (the default's margin over it is
    # tested in test_rank_threshold.py).
    out = mf.ops.topk_singular_vectors(fm, 6, eps=1e-6, backend=backend)
    assert (out[:, 2:] == 0).all()
    ref = mf.ops.topk_singular_vectors(fm, 6, eps=1e-6, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)
    w = torch.randn_like(out)
    g, = torch.autograd.grad((out * w).sum(), fm)
    r_g, = torch.autograd.grad((ref * w).sum(), fm)
    assert rel_err(g, r_g) < 1e-8


@pytest.mark.matrix(reference=False)
def test_zero_and_mixed_batch(backend):
    """A batch mixing an all-zero map with ordinary ones: zeros (and zero gradient) only there."""
    fm = torch.relu(torch.randn(3, 40, 64, dtype=torch.float64, device=device_of(backend)))
    fm[1] = 0
    fm.requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, 3, backend=backend)
    assert (out[1] == 0).all() and (out[[0, 2]].norm(dim=-1) > 0.99).all()
    out.sum().backward()
    assert (fm.grad[1] == 0).all() and torch.isfinite(fm.grad).all()


@pytest.mark.matrix(reference=False)
def test_deterministic(backend):
    fm = torch.relu(torch.randn(5, 50, 70, device=device_of(backend)))
    a = mf.ops.topk_singular_vectors(fm, 4, backend=backend)
    b = mf.ops.topk_singular_vectors(fm, 4, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.matrix(reference=False)
def test_gradcheck_iterative_route(backend):
    fm = controlled_map(2, 30, 28, decaying(28, 0.75)).to(device_of(backend)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mf.ops.topk_singular_vectors(x, 3, backend=backend), (fm,))


# ---------------------------------------------------------------------------- op registration

def svd_samples():
    for (b, c, spatial), k, grad in [((3, 7, (5,)), 2, True), ((2, 30, (6, 6)), 3, True),
                                     ((2, 40, (5, 5)), 4, False), ((2, 9, (4, 4)), 1, False),
                                     ((1, 26, (40,)), 8, True)]:
        fm = torch.relu(torch.randn(b, c, *spatial, dtype=torch.float64)).requires_grad_(grad)
        yield fm, k, 1.5e-8
        if not grad:  # the stateless forward (power steps for k = 1)
            yield fm, k, 1.5e-8, False


@pytest.mark.parametrize("sample", list(svd_samples()))
def test_opcheck_topk_singular_vectors(sample):
    torch.library.opcheck(torch.ops.mhgd_fast.topk_singular_vectors.default, sample)


def test_opcheck_topk_singular_vectors_backward():
    for c, hw, k in [(7, 5, 2), (30, 36, 3), (40, 25, 4)]:
        fm = torch.relu(torch.randn(2, c, hw, dtype=torch.float64))
        _, *saved = torch.ops.mhgd_fast.topk_singular_vectors(fm, k, 1.5e-8)
        torch.library.opcheck(torch.ops.mhgd_fast.topk_singular_vectors_backward.default,
                              (torch.randn(2, k, c, dtype=torch.float64), fm, *saved, k, 1.5e-8))


@pytest.mark.slow
def test_torch_compile_fullgraph_topk_singular_vectors():
    def loss_fn(fm, w):
        return (mf.ops.topk_singular_vectors(fm, 4, backend="cpu") * w).sum()

    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    fm = torch.relu(torch.randn(3, 24, 6, 6, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, 4, 24, dtype=torch.float64)
    out = compiled_fn(fm, w)
    g, = torch.autograd.grad(out, fm)
    ref = loss_fn(fm, w)
    r_g, = torch.autograd.grad(ref, fm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, r_g)


def test_direct_op_call_checks_inputs():
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        torch.ops.mhgd_fast.topk_singular_vectors(torch.randn(2, 3, 4), 0, 1e-4)
    fm = torch.randn(2, 5, 6)
    _, *saved = torch.ops.mhgd_fast.topk_singular_vectors(fm, 2, 1e-4)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.mhgd_fast.topk_singular_vectors_backward(torch.randn(2, 3, 5), fm, *saved, 2, 1e-4)
    with pytest.raises(RuntimeError, match="saved tensors do not match"):
        torch.ops.mhgd_fast.topk_singular_vectors_backward(torch.randn(2, 2, 5), fm, saved[0][:, :3, :3],
                                                           *saved[1:], 2, 1e-4)


# ---------------------------------------------------------------------------- without saved state

@pytest.mark.matrix(dtypes=FLOATS, reference=False)
@pytest.mark.parametrize("c,hw", [(40, 75), (90, 45)])
@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_without_grad_k1_matches_float64_svd(backend, dtype, device, tol, c, hw, spectrum):
    """No gradient wanted: k = 1 may take power steps (decaying spectra) or, when they do not
    converge (a flat top with gaps of ~1e-3·σ_1), the full route. Both meet the accuracy target and
    agree with the state-keeping forward."""
    r = min(c, hw)
    sigmas = decaying(r, 0.6) if spectrum == "decaying" else [1.0 - 0.0012 * i for i in range(r)]
    fm = controlled_map(3, c, hw, sigmas, dtype=dtype).to(device)
    check_against_float64(fm, 1, backend, grad=False)
    with torch.no_grad():
        fast = mf.ops.topk_singular_vectors(fm, 1, backend=backend)
    kept = mf.ops.topk_singular_vectors(fm.clone().requires_grad_(), 1, backend=backend).detach()
    torch.testing.assert_close(fast, kept, atol=tol.atol, rtol=0)


@pytest.mark.matrix(reference=False)
def test_post_relu_teacher_maps_without_grad(backend):
    """The teacher's case (k = 1, no gradient) on post-ReLU maps of both Gram routes."""
    for c, side in [(64, 8), (96, 3)]:
        fm = torch.relu(torch.randn(6, c, side, side, device=device_of(backend)))
        check_against_float64(fm, 1, backend, grad=False)


def test_backward_without_saved_state_raises():
    fm = torch.relu(torch.randn(2, 6, 5, dtype=torch.float64)).requires_grad_()
    out = torch.ops.mhgd_fast.topk_singular_vectors(fm, 2, 1e-8, False)[0]
    with pytest.raises(RuntimeError, match="no saved state"):
        out.sum().backward()


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("c,hw", [(16, 30), (40, 60), (33, 70), (30, 16)])
@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_of_a_rank_deficient_map_is_exact(backend, c, hw, k, seed):
    """Rank 2 with the default eps: a numerical null space beyond the top k. The shifted solves of
    the fast backward lost up to 6 % there (machine-dependent); such samples take the exact route."""
    torch.manual_seed(seed)
    fm = controlled_map(3, c, hw, [3.0, 1.0]).to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, k, eps=1e-6, backend=backend)
    ref = mf.ops.topk_singular_vectors(fm, k, eps=1e-6, backend="reference")
    w = torch.randn_like(out)
    g, = torch.autograd.grad((out * w).sum(), fm)
    r_g, = torch.autograd.grad((ref * w).sum(), fm)
    assert rel_err(g, r_g) < 1e-8
    # and the reference against a central difference along a random direction, on the two valid
    # vectors (a perturbation switches the zero tail on: not differentiable there)
    w[:, 2:] = 0
    r_g, = torch.autograd.grad((mf.ops.topk_singular_vectors(fm, k, eps=1e-6, backend="reference") * w).sum(), fm)
    d = torch.randn_like(fm)
    f = lambda t: float((mf.ops.topk_singular_vectors(t, k, eps=1e-6, backend="reference") * w).sum())  # noqa: E731
    h = 1e-6
    fd = (f(fm.detach() + h * d) - f(fm.detach() - h * d)) / (2 * h)
    assert float((r_g * d).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-8)
