"""Property-based fuzzing of every op on every backend (hypothesis).

Inputs: random shapes (0 and 1 sizes, N ≠ M, d = 1), non-contiguous and expanded strides,
float16/bfloat16/float32/float64, magnitudes 1e-30 … 1e30, NaN/Inf, rank-deficient, repeated-spectrum
and zero feature maps. Each case must either match the truth (the reference evaluated in float64 on
the same inputs) within the tolerance the op documents, or raise the error the op documents; a
crash fails the run.

The tolerance is the rule of the simulator tests (flash-attention's): the largest error against the
float64 truth at most twice the largest error of the reference computed in the input's own
precision, plus a few units in the last place of the result's magnitude. A result may be non-finite only where the
reference in the same precision is (overflowing logits, NaN/Inf inputs), and must be where NaN
reaches it.

Profiles (``MHGD_FUZZ_PROFILE``): ``ci`` (default; fixed seed, 200 cases per test),
``sanitize`` (fewer cases, for the ASan/UBSan build of tests/test_sanitizers.py), ``deep`` (many
random cases: ``MHGD_FUZZ_PROFILE=deep pytest tests/test_fuzz_ops.py``).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mhgd_fast as mf  # noqa: E402
import mhgd_fast.reference as ref  # noqa: E402
from _helpers import device_of  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("sanitize", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("deep", max_examples=2000, **_COMMON)
PROFILE = os.environ.get("MHGD_FUZZ_PROFILE", "ci")
fuzz = settings(settings.get_profile(PROFILE))

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MAGNITUDES = [1e-30, 1e-8, 1e-3, 1.0, 10.0, 1e3, 1e8, 1e30]
ULPS = 16  # units in the last place of the compute dtype, times the terms' magnitude


# ------------------------------------------------------------------------------ input makers


@st.composite
def layouts(draw):
    return draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))


def with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``values`` (3-D, float64) in a tensor with the requested strides."""
    if layout == "transposed":  # storage [.., last, first-but-one] viewed back
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every other element of a larger buffer
        big = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "expanded" and values.shape[0] > 0:  # head 0 repeated with stride 0
        return values[:1].expand(values.shape)
    return values.contiguous()


def special(draw, t: torch.Tensor) -> torch.Tensor:
    """Maybe plants NaN or ±Inf at one position (the same tensor semantics in every layout)."""
    kind = draw(st.sampled_from([None, None, None, "nan", "inf", "-inf"]))
    if kind is None or t.numel() == 0:
        return t
    t = t.clone()
    flat = t.view(-1)
    flat[draw(st.integers(0, t.numel() - 1))] = float(kind)
    return t


@st.composite
def head_tensors(draw, rows_name_sizes, d):
    """Float64 values for q/k-like tensors [H, rows, d] of one magnitude each."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for h, rows in rows_name_sizes:
        mag = draw(st.sampled_from(MAGNITUDES))
        out.append(torch.randn(h, rows, d, generator=gen, dtype=torch.float64) * mag)
    return out


def cast(values, dtype, device, layout):
    x = with_layout(values, layout).to(device=device, dtype=dtype)
    return x


def finite_close(got, same, truth, acc_dtype, what, magnitude=None):
    """The tolerance rule of the module docstring, over the entries where the reference is finite:
    max error ≤ 2 · (the same-precision reference's max error) + ULPS · ε · magnitude, where
    magnitude defaults to the largest |truth| (at least 1)."""
    got, same = got.detach().double().cpu(), same.detach().double().cpu()
    truth = truth.detach().double().cpu()
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    same_ok = torch.isfinite(same)
    # Non-finite only where the reference in the same precision is non-finite too.
    bad = ~torch.isfinite(got) & same_ok & torch.isfinite(truth)
    assert not bad.any(), f"{what}: non-finite where the reference is finite ({int(bad.sum())} entries)"
    check = same_ok & torch.isfinite(got) & torch.isfinite(truth)
    if not check.any():
        return
    err = (got - truth).abs()[check]
    ref_err = float((same - truth).abs()[check].max())
    if magnitude is None:
        magnitude = max(1.0, float(truth[check].abs().max()))
    floor = ULPS * torch.finfo(acc_dtype).eps * magnitude
    worst = int(err.argmax())
    assert err[worst] <= 2 * ref_err + floor, (
        f"{what}: max error {err[worst].item():.3g} vs the reference's {ref_err:.3g} (+ floor {floor:.3g}); "
        f"value {got[check][worst].item():.6g}, truth {truth[check][worst].item():.6g}")


def nan_reaches(got, same, what):
    """NaN in the inputs: wherever the same-precision reference is NaN, the result is non-finite."""
    got, same = got.detach().cpu(), same.detach().cpu()
    missing = torch.isnan(same) & torch.isfinite(got)
    assert not missing.any(), f"{what}: NaN input produced finite values where the reference is NaN"


def raises_same(fn_ref, fn_fast):
    """Both raise the same documented exception type, or neither raises; returns results."""
    results, errors = [], []
    for fn in (fn_ref, fn_fast):
        try:
            results.append(fn())
            errors.append(None)
        except (ValueError, TypeError, RuntimeError) as e:  # the documented error types
            results.append(None)
            errors.append(e)
    if errors[0] is not None or errors[1] is not None:
        assert type(errors[0]) is type(errors[1]), f"reference raised {errors[0]!r}, fast raised {errors[1]!r}"
        assert errors[1] is None or not isinstance(errors[1], RuntimeError) or "mhgd" in str(errors[1]).lower() \
            or "graph_kl" in str(errors[1]) or "topk" in str(errors[1]), f"undocumented error: {errors[1]!r}"
        return None
    return results


def run_three_ways(op, case, backend, opts):
    """Runs a graph op on the case's inputs on ``backend`` and through the reference in the inputs'
    precision (both must raise alike, see :func:`raises_same`; None when they raised), then through
    the reference in float64 on the same values (the truth). Gradients are wanted when the case
    asks and the inputs are finite."""
    raw = case["values"]
    has_nan_inf = any(not bool(torch.isfinite(v).all()) for v in raw)
    want_grad = case["grad"] and not has_nan_inf

    def make(device):
        return [cast(v, case["dtype"], device, case["layout"]).requires_grad_(want_grad) for v in raw]

    fast_in, same_in = make(device_of(backend)), make("cpu")
    truth_in = [s.detach().double().requires_grad_(want_grad) for s in same_in]
    results = raises_same(lambda: op(*same_in, backend="reference", **opts),
                          lambda: op(*fast_in, backend=backend, **opts))
    if results is None:
        return None
    return SimpleNamespace(raw=raw, has_nan_inf=has_nan_inf, want_grad=want_grad, fast_in=fast_in, same_in=same_in,
                           truth_in=truth_in, same=results[0], got=results[1],
                           truth=op(*truth_in, backend="reference", **opts))


# ---------------------------------------------------------------------------- graph ops


@st.composite
def graph_cases(draw):
    h = draw(st.integers(0, 3))
    n = draw(st.sampled_from([0, 1, 2, 5, 9, 33]))
    m = draw(st.sampled_from([1, 2, 3, 7, 16, 40]))
    if draw(st.integers(0, 7)) == 0:  # graphs above 4 MiB take the streamed (row-block) path
        h, n, m = draw(st.integers(1, 2)), 700, 800
    d = draw(st.sampled_from([1, 2, 3, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(layouts())
    values = draw(head_tensors([(h, n), (h, m), (h, n), (h, m)], d))
    values = [special(draw, v) if draw(st.booleans()) else v for v in values]
    squash = draw(st.sampled_from([None, "tanh"]))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return dict(values=values, dtype=dtype, layout=layout, squash=squash, scale=scale,
                direction=draw(st.sampled_from(["student_teacher", "teacher_student"])),
                reduction=draw(st.sampled_from(["none", "sum", "mean"])),
                grad=draw(st.booleans()))


def finite_amax(t):
    """Largest finite |value| (0 for an empty tensor)."""
    t = t.detach()
    t = t[torch.isfinite(t)]
    return float(t.abs().amax()) if t.numel() else 0.0


@pytest.mark.matrix(reference=False)
@fuzz
@given(case=graph_cases())
def test_graph_kl_fuzz(backend, case):
    dtype = case["dtype"]
    opts = dict(squash=case["squash"], scale=case["scale"], direction=case["direction"],
                reduction=case["reduction"])
    run = run_three_ways(mf.ops.graph_kl, case, backend, opts)
    if run is None:
        return
    raw, has_nan_inf, want_grad = run.raw, run.has_nan_inf, run.want_grad
    fast_in, same_in, truth_in, same, got, truth = run.fast_in, run.same_in, run.truth_in, run.same, run.got, run.truth
    acc = ref.compute_dtype(dtype)
    assert got.dtype == acc and same.dtype == acc
    if has_nan_inf:
        nan_reaches(got, same, "graph_kl")
    # The documented bound is per row, ε·(|KL| + log M + 1) (times a small constant): a sum adds
    # the rows' errors.
    h, n, m = raw[0].shape[0], raw[0].shape[1], raw[1].shape[1]
    rows64 = mf.ops.graph_kl(*(t.detach() for t in truth_in), backend="reference", **{**opts, "reduction": "none"})
    row_bound = finite_amax(rows64) + math.log(m) + 1
    finite_close(got, same, truth, acc, "graph_kl value",
                 max(1.0, finite_amax(truth), row_bound * (h * n if case["reduction"] == "sum" else 1)))
    if not want_grad or not bool(torch.isfinite(same).all()) or got.numel() == 0:
        return
    upstream = torch.randn(got.shape, dtype=torch.float64)
    grads = [torch.autograd.grad((o.double().cpu() * upstream).sum(), i, allow_unused=True)
             for o, i in ((got, fast_in), (same, same_in), (truth, truth_in))]
    # The documented gradient bound: ε·(|KL| + log M + 1) per unit of dL/dKL on each logit, which
    # dq = scale·dZ·k sums over M columns and dk = scale·dZᵀ·q over N rows.
    per_row = {"none": float(upstream.abs().max()), "sum": 1.0, "mean": 1.0 / max(h * n, 1)}[case["reduction"]]
    logit_grad = per_row * row_bound
    for idx, (name, g_fast, g_same, g_truth) in enumerate(zip(("q_s", "k_s", "q_t", "k_t"), *grads)):
        zero = torch.zeros_like(truth_in[idx])
        g_fast, g_same = (zero if g is None else g for g in (g_fast, g_same))
        g_truth = zero if g_truth is None else g_truth
        partner, count = (raw[idx + 1], m) if idx % 2 == 0 else (raw[idx - 1], n)
        magnitude = max(1.0, finite_amax(g_truth), logit_grad * case["scale"] * count * finite_amax(partner))
        finite_close(g_fast, g_same, g_truth, acc, f"graph_kl d{name}", magnitude)


@st.composite
def attention_cases(draw):
    h = draw(st.integers(0, 3))
    n = draw(st.sampled_from([0, 1, 2, 5, 33]))
    m = draw(st.sampled_from([1, 2, 7, 16, 40]))
    d = draw(st.sampled_from([1, 3, 8]))
    values = draw(head_tensors([(h, n), (h, m)], d))
    values = [special(draw, v) if draw(st.booleans()) else v for v in values]
    return dict(values=values, dtype=draw(st.sampled_from(DTYPES)), layout=draw(layouts()),
                squash=draw(st.sampled_from([None, "tanh"])), scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
                grad=draw(st.booleans()))


@pytest.mark.matrix(reference=False)
@fuzz
@given(case=attention_cases())
def test_attention_graph_fuzz(backend, case):
    dtype = case["dtype"]
    run = run_three_ways(mf.ops.attention_graph, case, backend, dict(squash=case["squash"], scale=case["scale"]))
    if run is None:
        return
    has_nan_inf, want_grad = run.has_nan_inf, run.want_grad
    fast_in, same_in, truth_in, same, got, truth = run.fast_in, run.same_in, run.truth_in, run.same, run.got, run.truth
    assert got.dtype == dtype
    acc = ref.compute_dtype(dtype)
    if has_nan_inf:
        nan_reaches(got, same, "attention_graph")
    finite_close(got, same, truth, acc, "attention_graph value")
    if not want_grad or got.numel() == 0 or not bool(torch.isfinite(same).all()):
        return
    upstream = torch.randn(got.shape, dtype=torch.float64)
    grads = [torch.autograd.grad((o.double().cpu() * upstream).sum(), i)
             for o, i in ((got, fast_in), (same, same_in), (truth, truth_in))]
    # dS = P ⊙ (g − Σ P g) per logit is at most 2·max|g|; dq = scale·dS·k sums M columns, dk N rows.
    raw, (n, m) = run.raw, (run.raw[0].shape[1], run.raw[1].shape[1])
    for idx, (name, g_fast, g_same, g_truth) in enumerate(zip(("q", "k"), *grads)):
        partner, count = (raw[1], m) if idx == 0 else (raw[0], n)
        bound = 2 * float(upstream.abs().max()) * case["scale"] * count * finite_amax(partner)
        finite_close(g_fast, g_same, g_truth, acc, f"attention_graph d{name}",
                     max(1.0, finite_amax(g_truth), bound))


# ------------------------------------------------------------------------ singular vectors


@st.composite
def feature_maps(draw):
    """[B, C, *spatial] maps: random, rank-deficient, repeated-spectrum or zero samples."""
    b = draw(st.sampled_from([0, 1, 2, 3]))
    c = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 70]))
    spatial = draw(st.sampled_from([(), (1,), (3,), (2, 2), (4, 5), (17,), (7, 7), (9, 10)]))
    hw = math.prod(spatial)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    samples = []
    for _ in range(b):
        kind = draw(st.sampled_from(["random", "random", "rank", "repeated", "zero"]))
        if kind == "rank":
            r = draw(st.integers(0, max(0, min(c, hw) - 1)))
            x = torch.randn(hw, r, generator=gen, dtype=torch.float64) @ torch.randn(
                r, c, generator=gen, dtype=torch.float64)
        elif kind == "repeated":  # X = U diag(σ) Vᵀ with σ repeated
            r = min(c, hw)
            u = torch.linalg.qr(torch.randn(hw, r, generator=gen, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(c, r, generator=gen, dtype=torch.float64))[0]
            sig = torch.tensor([2.0 if i < (r + 1) // 2 else 1.0 for i in range(r)], dtype=torch.float64)
            x = u @ torch.diag(sig) @ v.T
        elif kind == "zero":
            x = torch.zeros(hw, c, dtype=torch.float64)
        else:
            x = torch.randn(hw, c, generator=gen, dtype=torch.float64)
        samples.append(x.T.reshape(c, *spatial) * draw(st.sampled_from(MAGNITUDES)))
    fm = torch.stack(samples) if samples else torch.zeros(0, c, *spatial, dtype=torch.float64)
    if draw(st.integers(0, 5)) == 0:
        fm = special(draw, fm)
    k = draw(st.integers(1, min(c, 9)))
    if draw(st.integers(0, 9)) == 0:
        k = draw(st.sampled_from([0, c + 1]))  # invalid: ValueError
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    return dict(fm=fm, k=k, dtype=draw(st.sampled_from(DTYPES)), layout=layout)


def fm_layout(fm, layout):
    if layout == "channels_last" and fm.dim() >= 3:
        perm = [0] + list(range(2, fm.dim())) + [1]
        inv = [perm.index(i) for i in range(fm.dim())]
        return fm.permute(perm).contiguous().permute(inv)
    if layout == "strided" and fm.dim() >= 2:
        big = fm.new_zeros(fm.shape[0], 2 * fm.shape[1], *fm.shape[2:])
        big[:, ::2] = fm
        return big[:, ::2]
    return fm


def compare_singular_vectors(got, truth_fm, k, eps_default, what, dtype):
    """``got`` [B, k, C] against the float64 SVD of the same map: the zero pattern of a clear
    rank, unit vectors spanning the right singular subspaces (clusters of equal σ compared as
    subspaces), canonical sign for isolated vectors."""
    got = got.detach().double().cpu()
    unit_tol = max(1e-6, 4 * torch.finfo(dtype).eps)  # a unit vector rounded to the output dtype
    b, c = truth_fm.shape[:2]
    if b == 0:
        return
    x = truth_fm.reshape(b, c, -1).transpose(-1, -2)
    for i in range(b):
        s, v = torch.linalg.svd(x[i], full_matrices=True)[1:]
        sigma = torch.zeros(c, dtype=torch.float64)
        sigma[: s.numel()] = s
        smax = float(sigma[0]) if c else 0.0
        tol = max(1e-6, 8 * torch.finfo(dtype).eps ** 0.5) if dtype != torch.float64 else 1e-6
        for j in range(k):
            vec = got[i, j]
            norm = float(vec.norm())
            # σ_j clearly above or below the threshold (4x margin): the pattern is fixed.
            if smax == 0 or sigma[j] <= 0.25 * eps_default * smax:
                assert norm == 0, f"{what}: sample {i} vector {j} should be zero (σ={float(sigma[j]):.3g})"
                continue
            if sigma[j] < 4 * eps_default * smax:
                continue  # within the threshold's band: either answer is documented
            assert abs(norm - 1) < unit_tol, f"{what}: sample {i} vector {j} has norm {norm}"
            # The cluster of singular values equal to σ_j (relative gap below 1e-6 of σ_max).
            cluster = ((sigma - sigma[j]).abs() <= 1e-6 * smax).nonzero().flatten()
            basis = v.T[:, cluster] if cluster.numel() <= v.shape[0] else v.T
            resid = float((vec - basis @ (basis.T @ vec)).norm())
            gap = float(min([abs(sigma[j] - sigma[m]) for m in range(c) if m not in cluster] + [smax])) / smax
            if gap < 1e-3:
                continue  # nearly degenerate beyond the cluster: direction is ill-conditioned
            assert resid < tol / gap, f"{what}: sample {i} vector {j} leaves its singular subspace by {resid:.3g}"


@pytest.mark.matrix(reference=False)
@fuzz
@given(case=feature_maps())
def test_topk_singular_vectors_fuzz(backend, case):
    dtype, k = case["dtype"], case["k"]
    fm64 = case["fm"]
    fast_in = fm_layout(fm64, case["layout"]).to(device=device_of(backend), dtype=dtype)
    same_in = fm_layout(fm64, case["layout"]).to(dtype=dtype)
    results = raises_same(lambda: mf.ops.topk_singular_vectors(same_in, k, backend="reference"),
                          lambda: mf.ops.topk_singular_vectors(fast_in, k, backend=backend))
    if results is None:
        # Documented: NaN/Inf (also from a 16-bit overflow) and k outside [1, C] raise ValueError.
        assert not bool(torch.isfinite(same_in).all()) or not 1 <= k <= fm64.shape[1]
        return
    same, got = results
    assert bool(torch.isfinite(same_in).all()) and 1 <= k <= fm64.shape[1], "bad input was accepted"
    assert got.shape == (fm64.shape[0], k, fm64.shape[1]) and got.dtype == dtype
    assert bool(torch.isfinite(got).all()), "non-finite singular vectors from finite input"
    eps = ref.default_eps(dtype, ref.gram_size(fm64.shape))
    compare_singular_vectors(got, same_in.double(), k, eps, f"topk[{backend}]", dtype)
    compare_singular_vectors(same, same_in.double(), k, eps, "topk[reference]", dtype)
    # One rule in every backend: the same vectors are zero, unless a σ lies within 1 % of the cut.
    if fm64.shape[0] and math.prod(fm64.shape[2:]):
        x = same_in.double().reshape(fm64.shape[0], fm64.shape[1], -1).transpose(-1, -2)
        sigma = torch.linalg.svdvals(x)
        sigma = torch.cat([sigma, sigma.new_zeros(sigma.shape[0], max(0, k - sigma.shape[1]))], 1)[:, :k]
        ratio = sigma / sigma[:, :1].clamp_min(1e-300)
        near_cut = ((ratio / eps - 1).abs() < 0.01).any(1)
        zero_fast = got.detach().cpu().abs().amax(-1) == 0
        zero_ref = same.abs().amax(-1) == 0
        differ = (zero_fast != zero_ref).any(1) & ~near_cut
        assert not differ.any(), f"backends zero different vectors: {zero_fast[differ]} vs {zero_ref[differ]}"


@st.composite
def align_cases(draw):
    b = draw(st.sampled_from([0, 1, 3]))
    ks = draw(st.sampled_from([0, 1, 2, 4]))
    c = draw(st.sampled_from([1, 3, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    v_s = torch.randn(b, ks, c, generator=gen, dtype=torch.float64) * draw(st.sampled_from(MAGNITUDES))
    v_t = torch.randn(b, c, generator=gen, dtype=torch.float64) * draw(st.sampled_from(MAGNITUDES))
    if draw(st.booleans()) and b and ks:
        v_s[:, -1] = -v_s[:, 0]  # ties in |cos|: the first wins
    return v_s, v_t, draw(st.sampled_from(DTYPES))


@fuzz
@given(case=align_cases())
def test_align_singular_vectors_fuzz(case):
    v_s64, v_t64, dtype = case
    v_s, v_t = v_s64.to(dtype), v_t64.to(dtype)
    if v_s.shape[1] == 0:
        with pytest.raises(ValueError, match="no candidate"):
            mf.ops.align_singular_vectors(v_s, v_t)
        return
    assume(bool(torch.isfinite(v_s).all() and torch.isfinite(v_t).all()))
    out = mf.ops.align_singular_vectors(v_s, v_t)
    assert out.shape == v_t.shape and out.dtype == dtype
    # Independent statement: per sample, maximise |cos| (first on ties), flip by its sign.
    for i in range(v_s.shape[0]):
        a, t = v_s[i].double(), v_t[i].double()
        cos = [float(a[j] @ t) / max(float(a[j].norm() * t.norm()), 1e-300) for j in range(a.shape[0])]
        best = max(abs(x) for x in cos)
        candidates = [j for j, x in enumerate(cos) if abs(abs(x) - best) <= 1e-3 * max(best, 1e-30)]
        matches = [j for j in candidates for sign in ((-1, 1) if abs(cos[j]) <= 1e-3 else (-1 if cos[j] < 0 else 1,))
                   if torch.equal(out[i], v_s[i, j] * sign)]
        assert matches, f"sample {i}: picked vector is none of the maximal-|cos| candidates {candidates}"
