"""graph_kl's accuracy at any logit size: the statement of the ``ops.graph_kl`` docstring.

Every case is compared with the reference evaluated in float64 on the same inputs. Most inputs are
*exact*: integer multiples of powers of two whose products ``scale·q kᵀ`` every dtype computes
without rounding, so that what is measured is the row math alone, against the bound
``(4 + M/128)·ε·(|KL| + log M + 1)``. Random inputs add the rounding of the logits themselves (the
docstring's ``(2·|KL| + 4)·Δ`` term). The cases reproduce a fuzz run's findings: near-one-hot
rows, logits up to ~1e30, rows whose logits share a large offset (the KL, a small difference of
large terms when the log-sum-exps were not shifted out), and one column (KL exactly 0).
The CUDA kernels run on the same cases in the host SIMT simulator (tests/simt).
"""
import math

import pytest
import torch

import _simt
import mhgd_fast as mf
import mhgd_fast.reference as ref

DIRECTIONS = ("student_teacher", "teacher_student")
REDUCTIONS = ("none", "sum", "mean")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}


def c_row(m):
    """The row math's constant for rows of m columns (ops.graph_kl docstring): its sums of m terms
    run in a few lanes, so it grows with m (measured on CPU: 1.6 for m ≤ 130, 32 at m = 4000)."""
    return 4 + m / 128


def eps_of(dtype):
    return torch.finfo(ref.compute_dtype(dtype)).eps


# ----------------------------------------------------------------------------------- inputs

def exact_inputs(h, n, m, d, dtype, *, offset_bits=0, spread=3, exponent=0, one_hot=0.0, seed=0):
    """q_s, k_s, q_t, k_t whose products q kᵀ are exact in ``dtype``: small integers times 2^exponent.

    Feature 0 carries a per-row offset (up to 2^offset_bits, shared by the row's logits, so that
    only the differences, of size ``spread``, make the KL). ``one_hot`` > 0 adds that much to the
    student's logit 0 and the teacher's logit m // 2 (feature 1): near-one-hot rows with the
    teacher's mass where the student has none.
    """
    gen = torch.Generator().manual_seed(seed)
    ints = lambda *shape, bound: torch.randint(-bound, bound + 1, shape, generator=gen).double()  # noqa: E731
    mant = 8 if dtype == torch.bfloat16 else 24 if ref.compute_dtype(dtype) == torch.float32 else 53
    tensors = []
    for side in range(2):
        q = ints(h, n, d, bound=spread)
        k = ints(h, m, d, bound=1)
        if d >= 2:
            q[..., 0] = ints(h, n, bound=2 ** offset_bits) if offset_bits else q[..., 0]
            k[..., 0] = 1.0 if offset_bits else k[..., 0]
        if one_hot and d >= 2:
            q[..., 1] = one_hot
            k[..., 1] = 0.0
            k[:, 0 if side == 0 else m // 2, 1] = 1.0
        # Every product is exact when each sum of d products stays within the mantissa.
        bound = (q.abs() @ k.abs().transpose(1, 2)).max().item() if n and m else 0
        assert bound < 2.0 ** mant and q.abs().max() < 2.0 ** mant, "inputs would round: lower the sizes"
        tensors += [q * 2.0 ** exponent, k]
    q_s, q_t = tensors[0], tensors[2]
    k_s, k_t = tensors[1], tensors[3]
    return [t.to(dtype) for t in (q_s, k_s, q_t, k_t)]


def exact_result(inputs, squash, scale, direction, weights):
    """Rows and the gradients of Σ weights·rows from the reference in float64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    rows = ref.graph_kl(*leaves, squash, scale, direction, "none")
    grads = torch.autograd.grad((rows * weights.double()).sum(), leaves)
    return rows.detach(), grads


def logit_rounding(inputs, scale, squash, exact_logits):
    """Δ per row [H, N]: a bound on the rounding of the row's logits in the compute dtype."""
    eps = eps_of(inputs[0].dtype)
    if exact_logits:
        delta = torch.zeros(inputs[0].shape[:2], dtype=torch.float64)
    else:
        d = inputs[0].shape[2]
        delta = torch.zeros(inputs[0].shape[:2], dtype=torch.float64)
        for q, k in ((inputs[0], inputs[1]), (inputs[2], inputs[3])):
            size = (q.double().abs() @ k.double().abs().transpose(1, 2)).amax(-1) * abs(scale)
            delta = torch.maximum(delta, (d + 1) * eps * size)
    return delta + (2 * eps if squash == "tanh" else 0.0)


def row_tolerance(exact_rows, inputs, scale, squash, exact_logits):
    """The docstring's bound: (4 + M/128)·ε·(|KL| + log M + 1) + (2·|KL| + 4)·Δ."""
    eps, m = eps_of(inputs[0].dtype), inputs[1].shape[1]
    kl = exact_rows.abs()
    return c_row(m) * eps * (kl + math.log(m) + 1) + (2 * kl + 4) * logit_rounding(inputs, scale, squash, exact_logits)


def reduce(rows, reduction):
    return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]


# ------------------------------------------------------------------------------ the checks

def check_values(got, exact_rows, inputs, scale, squash, reduction, exact_logits, what=""):
    tol_rows = row_tolerance(exact_rows, inputs, scale, squash, exact_logits)
    # A reduction adds the rounding of summing H·N rows in the compute dtype.
    count = max(exact_rows.numel(), 1)
    tol = reduce(tol_rows, reduction) + (count * eps_of(inputs[0].dtype) * exact_rows.abs().sum()
                                         / (count if reduction == "mean" else 1) if reduction != "none" else 0)
    want = reduce(exact_rows, reduction)
    assert torch.isfinite(want).all(), "the reference itself must be finite on a test case"
    err = (got.double() - want).abs()
    assert (err <= tol).all(), (f"{what}: value error {err.max().item():.3g} above the bound "
                                f"(at {(err - tol).argmax().item()}: got {got.flatten()[(err - tol).argmax()].item()!r}, "
                                f"want {want.flatten()[(err - tol).argmax()].item()!r})")


def check_grads(grads, exact_grads, same_grads, inputs, exact_rows, weights, scale, what=""):
    """FlashAttention's rule against float64: error at most 2× that of the reference computed in
    the same precision, plus a floor of 64 ulps (of the gradients' dtype) of the largest gradient
    and of the logit gradients' own rounding: dL/dz = w·P·(ℓ − KL) (and the like) is a difference
    of terms of size |KL|, so each carries about ε·w·(|KL| + log M + 1), the float64 reference's
    included. A gradient beyond the dtype's range (dk ~ |q|·|KL| ~ 1e52 for float32 logits ~1e30)
    is not compared."""
    eps, m = eps_of(inputs[0].dtype), inputs[1].shape[1]
    row_noise = eps * abs(scale) * weights.abs() * (exact_rows.abs() + math.log(m) + 1)  # [H, N]
    big = lambda t: t.double().abs().amax(dim=(1, 2)) if t.numel() else torch.zeros(t.shape[0])  # noqa: E731
    noise = {"dq_s": row_noise.amax(1) * big(inputs[1]), "dq_t": row_noise.amax(1) * big(inputs[3]),
             "dk_s": row_noise.sum(1) * big(inputs[0]), "dk_t": row_noise.sum(1) * big(inputs[2])}
    for name, got, exact, same in zip(("dq_s", "dk_s", "dq_t", "dk_t"), grads, exact_grads, same_grads):
        if not exact.numel():
            continue
        if exact.abs().max() > torch.finfo(got.dtype).max / 64:
            continue
        err = (got.double() - exact).abs().max().item()
        same_err = (same.double() - exact).abs().max().item()
        floor = 64 * (torch.finfo(got.dtype).eps * exact.abs().max().item() + noise[name].max().item())
        assert err <= 2 * same_err + floor, f"{what} {name}: error {err:.3g} vs the reference's {same_err:.3g}"


def run_kernel(backend, inputs, squash, scale, direction, reduction, weights):
    """Values and gradients of Σ weights·rows (reduction 'none', the unfused backward) or of the
    reduced loss (the fused forward+backward)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = mf.ops.graph_kl(*leaves, squash=squash, scale=scale, direction=direction, reduction=reduction,
                          backend=backend)
    target = (out * weights.to(out.dtype)).sum() if reduction == "none" else out
    return out.detach(), torch.autograd.grad(target, leaves)


def reduced_weights(exact_rows, reduction):
    """The dL/dKL_i each reduction hands the rows."""
    if reduction == "none":
        return torch.randn(exact_rows.shape, dtype=torch.float64)
    return torch.full(exact_rows.shape, 1.0 / max(exact_rows.numel(), 1) if reduction == "mean" else 1.0,
                      dtype=torch.float64)


def check_case(backend, inputs, squash, scale, direction, reduction, exact_logits, what=""):
    probe = exact_result(inputs, squash, scale, direction, torch.zeros(inputs[0].shape[:2]))[0]
    # Rounded as the kernel sees them (the rows' gradient, or 1/(H·N), in the compute dtype).
    weights = reduced_weights(probe, reduction).to(ref.compute_dtype(inputs[0].dtype)).double()
    exact_rows, exact_grads = exact_result(inputs, squash, scale, direction, weights)
    got, grads = run_kernel(backend, inputs, squash, scale, direction, reduction, weights)
    check_values(got, exact_rows, inputs, scale, squash, reduction, exact_logits, what)
    _, same_grads = run_kernel("reference", inputs, squash, scale, direction, reduction, weights)
    check_grads(grads, exact_grads, same_grads, inputs, exact_rows, weights, scale, what)


# ------------------------------------------------------------------------------------ cases

# (name, dtype, (H, N, M, d), exact_inputs options, scale): the findings and their neighbours.
EXACT_CASES = [
    # one student logit 1e3 above the rest, the teacher's max elsewhere (the fuzz's shapes)
    ("one_hot_f32_130x2", "f32", (2, 130, 2, 3), dict(one_hot=1024.0, spread=40), 0.125),
    ("one_hot_f32_130x33", "f32", (8, 130, 33, 96), dict(one_hot=4096.0, spread=2), 4.0),
    ("one_hot_bf16_7x7", "bf16", (2, 7, 7, 2), dict(one_hot=96.0, spread=3), 4.0),
    ("one_hot_f64", "f64", (2, 9, 17, 4), dict(one_hot=2.0 ** 40, spread=1000), 1.0),
    # a per-row offset far above the differences: the unshifted form cancelled the KL away
    ("offset_f32_2^21", "f32", (2, 130, 33, 3), dict(offset_bits=21, spread=3), 0.5),
    ("offset_f32_2^21_scaled_1e30", "f32", (2, 11, 9, 4), dict(offset_bits=21, spread=3, exponent=78), 0.5),
    ("offset_f64_2^48", "f64", (2, 13, 40, 5), dict(offset_bits=48, spread=3), 0.5),
    ("offset_f64_scaled_1e30", "f64", (1, 9, 8, 3), dict(offset_bits=40, spread=3, exponent=60), 1.0),
    ("offset_bf16", "bf16", (2, 7, 7, 2), dict(offset_bits=7, spread=1), 1.0),
    # logits ~1e30 with differences of the same size: one-hot rows with a KL ~1e30
    ("huge_f32", "f32", (2, 6, 9, 3), dict(spread=100, exponent=90), 2.0),
    ("huge_f64", "f64", (2, 6, 9, 3), dict(spread=100, exponent=90), 2.0),
    # ordinary rows: the bound also holds where nothing cancels
    ("plain_f32", "f32", (3, 17, 45, 8), dict(spread=2), 0.25),
    ("plain_bf16", "bf16", (2, 9, 20, 4), dict(spread=2), 0.5),
    # long rows: the bound grows with M
    ("offset_f32_long_rows", "f32", (1, 64, 4000, 3), dict(offset_bits=21, spread=3), 0.5),
]


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", EXACT_CASES, ids=[c[0] for c in EXACT_CASES])
def test_row_math_is_accurate_at_any_logit_size(backend, case, direction, reduction):
    name, dtype, (h, n, m, d), options, scale = case
    inputs = exact_inputs(h, n, m, d, DTYPES[dtype], seed=n * m + d, **options)
    check_case(backend, inputs, None, scale, direction, reduction, exact_logits=True, what=name)


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tanh_rows_are_accurate(backend, dtype, direction, reduction):
    """Squashed logits lie in [-1, 1]: only tanh's own rounding joins the row math's."""
    inputs = exact_inputs(3, 21, 37, 6, DTYPES[dtype], spread=5, seed=5)
    check_case(backend, inputs, "tanh", 0.125, direction, reduction, exact_logits=True, what="tanh")


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("squash", [None, "tanh"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_column_is_exactly_zero(backend, dtype, direction, squash, reduction):
    """M = 1: both rows are [1], the KL and every gradient exactly 0, with teacher logits ~1e22
    (the unshifted form returned 1.7e7)."""
    gen = torch.Generator().manual_seed(1)
    sizes = (3.0, 2.0, 1e11, 1e11)
    inputs = [(torch.randn(2, rows, 3, generator=gen, dtype=torch.float64) * size).to(DTYPES[dtype])
              for rows, size in zip((130, 1, 130, 1), sizes)]
    weights = torch.randn(2, 130, dtype=torch.float64)
    got, grads = run_kernel(backend, inputs, squash, 0.7, direction, reduction, weights)
    assert (got == 0).all(), got
    for g in grads:
        assert (g == 0).all()


@pytest.mark.matrix(reference=False)
def test_random_magnitudes(backend):
    """The lead's fuzz: magnitudes 1e-3..1e4 per tensor (the unshifted form erred up to 17 % in
    6 % of these cases). The logits round here: the bound includes their rounding."""
    gen = torch.Generator().manual_seed(7)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    for case in range(150):
        dtype = pick([torch.float32, torch.float64, torch.bfloat16])
        h, n, m, d = pick([1, 2]), pick([1, 3, 7, 130]), pick([1, 2, 3, 7, 33]), pick([1, 3, 8])
        scale, direction, squash = pick([0.1, 1.0, 3.0]), pick(DIRECTIONS), pick([None, None, "tanh"])
        sizes = 10.0 ** (torch.rand(4, generator=gen, dtype=torch.float64) * 7 - 3)
        inputs = [(torch.randn(h, rows, d, generator=gen, dtype=torch.float64) * size).to(dtype)
                  for rows, size in zip((n, m, n, m), sizes.tolist())]
        what = f"case {case}: {dtype} {(h, n, m, d)} scale {scale} {direction} {squash} sizes {sizes.tolist()}"
        check_case(backend, inputs, squash, scale, direction, pick(REDUCTIONS), exact_logits=False, what=what)


@pytest.mark.matrix(reference=False)
def test_saved_statistics_rebuild_the_probabilities(backend):
    """The backward of reduction='none' reads the forward's saved row statistics: with logits
    ~2^21 in float32 a saved log-sum-exp (max + log Σ) would round away log Σ and misscale P."""
    inputs = exact_inputs(2, 19, 23, 3, torch.float32, offset_bits=21, spread=3, seed=3)
    kl, stats_s, stats_t = torch.ops.mhgd_fast.graph_kl(*inputs, False, 0.5, False)
    for (q, k), stats in zip(((inputs[0], inputs[1]), (inputs[2], inputs[3])), (stats_s, stats_t)):
        z = ref.attention_logits(q.double(), k.double(), None, 0.5)
        top = z.amax(-1)
        assert stats.shape == (*z.shape[:2], 2) and stats.dtype == torch.float32
        assert torch.equal(stats[..., 0].double(), top)
        log_sum = torch.logsumexp(z - top.unsqueeze(-1), -1)
        assert ((stats[..., 1].double() - log_sum).abs() <= 4 * eps_of(torch.float32) * (log_sum + 1)).all()
    check_case(backend, inputs, None, 0.5, "student_teacher", "none", exact_logits=True, what="saved stats")


def cross_overflow_inputs(dtype, direction, h=1, n=5, m=800, seed=11):
    """The deep fuzz's last finding: the KL's weighting side uniform (its logits exactly 0) and the
    other side's logits near the dtype's range over many columns. Each of the M terms
    e^a·(a − b) of the cross sum is then of the logits' range, and their unscaled sum overflowed
    (bf16, M = 800, logits ±1e37: inf where the KL is ~1e37). Products are exact: small integers
    times a power of two."""
    exponent = {torch.float64: 1020}.get(dtype, 124)  # logits up to 6·2^exponent·scale, a range of twice that
    gen = torch.Generator().manual_seed(seed)
    ints = lambda *shape, bound: torch.randint(-bound, bound + 1, shape, generator=gen).double()  # noqa: E731
    huge_q, huge_k = ints(h, n, 2, bound=3) * 2.0 ** exponent, ints(h, m, 2, bound=1)
    flat_q, flat_k = torch.zeros(h, n, 2, dtype=torch.float64), ints(h, m, 2, bound=1)
    sides = [(flat_q, flat_k), (huge_q, huge_k)]  # (weighting side, other side)
    if direction == "teacher_student":  # KL(P_t || P_s): the teacher's P weights the terms, not the student's
        sides.reverse()
    (q_s, k_s), (q_t, k_t) = sides
    return [t.to(dtype) for t in (q_s, k_s, q_t, k_t)]


@pytest.mark.matrix(reference=False)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cross_sum_of_many_huge_terms_stays_finite(backend, dtype, direction, reduction):
    inputs = cross_overflow_inputs(DTYPES[dtype], direction)
    exact_rows = exact_result(inputs, None, 0.5, direction, torch.zeros(inputs[0].shape[:2]))[0]
    m, big = inputs[1].shape[1], torch.finfo(ref.compute_dtype(DTYPES[dtype])).max
    assert exact_rows.abs().max() * m > big > exact_rows.abs().max(), "the case must overflow an unscaled sum"
    check_case(backend, inputs, None, 0.5, direction, reduction, exact_logits=True, what=f"cross overflow {dtype}")


# ---------------------------------------------------------------- the CUDA kernels, simulated

# The simulator is slow: the small exact cases, plus rows of 2 and 70 columns (lanes holding up
# to three columns each, merged across the warp), and tanh.
SIM_CASES = [c for c in EXACT_CASES if c[1] != "bf16" and c[2][0] * c[2][1] <= 40] + [
    ("one_hot_f32_13x2", "f32", (2, 13, 2, 3), dict(one_hot=1024.0, spread=40), 0.125),
    ("offset_f32_9x70", "f32", (2, 9, 70, 3), dict(offset_bits=21, spread=3), 0.5),
    ("offset_f64_5x70", "f64", (1, 5, 70, 4), dict(offset_bits=48, spread=3), 0.5),
    ("tanh_f32", "f32", (2, 5, 37, 6), dict(spread=5), 0.125),
]


@pytest.fixture(scope="module")
def graph_kl_sim():
    if _simt.CXX is None:
        pytest.skip("no C++20 compiler (g++) to build the SIMT simulator")
    return _simt.build("graph_kl_sim")


def simulated(binary, inputs, squash, scale, direction, weights, tmp_path):
    from test_cuda_simulated import simulate_graph_kl
    dtype = "f64" if inputs[0].dtype == torch.float64 else "f32"
    got = simulate_graph_kl(binary, dtype, [t.double() for t in inputs], weights, scale, squash == "tanh",
                            direction == "teacher_student", tmp_path, jitter_us="0")
    return got["kl"], (got["dq_s"], got["dk_s"], got["dq_t"], got["dk_t"])


@pytest.mark.simulator
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", SIM_CASES, ids=[c[0] for c in SIM_CASES])
def test_simulated_cuda_kernels_accurate_at_any_logit_size(graph_kl_sim, case, direction, tmp_path):
    name, dtype, (h, n, m, d), options, scale = case
    squash = "tanh" if name.startswith("tanh") else None
    inputs = exact_inputs(h, n, m, d, DTYPES[dtype], seed=n * m + d, **options)
    weights = torch.randn(h, n, dtype=torch.float64).to(DTYPES[dtype]).double()
    exact_rows, exact_grads = exact_result(inputs, squash, scale, direction, weights)
    rows, grads = simulated(graph_kl_sim, inputs, squash, scale, direction, weights, tmp_path)
    check_values(rows, exact_rows, inputs, scale, squash, "none", exact_logits=True, what=name)
    _, same_grads = run_kernel("reference", inputs, squash, scale, direction, "none", weights)
    check_grads([g.to(DTYPES[dtype]) for g in grads], exact_grads, same_grads, inputs, exact_rows, weights, scale,
                name)


@pytest.mark.simulator
@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_simulated_cuda_cross_sum_stays_finite(graph_kl_sim, dtype, direction, tmp_path):
    """The cross-overflow case on the kernels: 100 columns, 3 or 4 per lane, merged across the warp."""
    inputs = cross_overflow_inputs(DTYPES[dtype], direction, n=3, m=100)
    assert exact_result(inputs, None, 0.5, direction, torch.zeros(1, 3))[0].abs().max() * 100 > torch.finfo(
        DTYPES[dtype]).max, "the case must overflow an unscaled sum"
    weights = torch.randn(1, 3, dtype=torch.float64).to(DTYPES[dtype]).double()
    exact_rows, _ = exact_result(inputs, None, 0.5, direction, weights)
    rows, _ = simulated(graph_kl_sim, inputs, None, 0.5, direction, weights, tmp_path)
    check_values(rows, exact_rows, inputs, 0.5, None, "none", exact_logits=True, what=f"cross overflow {dtype}")


@pytest.mark.simulator
@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_simulated_cuda_one_column_is_exactly_zero(graph_kl_sim, dtype, direction, tmp_path):
    gen = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(2, rows, 3, generator=gen, dtype=torch.float64) * size).to(DTYPES[dtype])
              for rows, size in zip((37, 1, 37, 1), (3.0, 2.0, 1e11, 1e11))]
    rows, grads = simulated(graph_kl_sim, inputs, None, 0.7, direction, torch.randn(2, 37, dtype=torch.float64),
                            tmp_path)
    assert (rows == 0).all(), rows
    for g in grads:
        assert (g == 0).all()
