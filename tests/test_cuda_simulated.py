"""CUDA kernels run in the host SIMT simulator (tests/simt) against the reference (docs/design.md §4).

The simulator compiles the same csrc/cuda/*.cuh headers that nvcc compiles; a planted bug must
make the comparison fail, and nvcc's resource report must show no warnings or spills.
"""
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import _simt
import mhgd_fast.reference as ref

pytestmark = [pytest.mark.simulator,
              pytest.mark.skipif(_simt.CXX is None, reason="no C++20 compiler (g++) to build the SIMT simulator")]

DTYPES = {"f32": torch.float32, "f64": torch.float64}
# (rows, cols): cols < 32, not a multiple of 32, and more than the 256 threads of a block.
SHAPES = [(6, 7), (5, 45), (3, 300), (2, 777)]


def simulate_rows(binary, dtype, direction, s, dp=None, scale=1.0, squash=False, tmp_path=None):
    """Runs attention_softmax_{forward,backward} on raw logits ``s`` [rows, cols]; returns the output."""
    np_dtype = np.float64 if dtype == "f64" else np.float32
    paths = [tmp_path / "s.bin"] + ([tmp_path / "dp.bin"] if dp is not None else [])
    for path, array in zip(paths, (s, dp)):
        array.numpy().astype(np_dtype).tofile(path)
    out = tmp_path / "out.bin"
    rows, cols = s.shape
    result = _simt.run(binary, dtype, direction, rows, cols, repr(scale), int(squash), *paths, out)
    assert result.returncode == 0, result.stderr
    return torch.from_numpy(np.fromfile(out, dtype=np_dtype).reshape(rows, cols))


def reference_rows(s, dp, scale, squash):
    """Row softmax of squash(scale * s) and dL/ds through the reference: q = s, k = I gives q kᵀ = s."""
    q = s.detach().clone()[None].requires_grad_()
    k = torch.eye(s.shape[1], dtype=s.dtype)[None]
    p = ref.attention_graph(q, k, "tanh" if squash else None, scale)
    p.backward(dp[None])
    return p[0].detach(), q.grad[0]


def assert_matches(got, same_precision, exact, what, magnitude=None, ulps=4):
    """Flash-attention's rule: error vs float64 at most 2x that of plain PyTorch in the same dtype
    (plus ``ulps`` units in the last place of ``magnitude``, the size of the terms the result is
    computed from: in float64 the "same precision" reference is exact)."""
    err = (got.double() - exact).abs().max().item()
    torch_err = (same_precision.double() - exact).abs().max().item()
    magnitude = exact.abs().max().item() if magnitude is None else magnitude
    floor = ulps * torch.finfo(got.dtype).eps * magnitude
    assert err <= 2 * torch_err + floor, f"{what}: max error {err:.3g} vs PyTorch's {torch_err:.3g}"


def random_case(rows, cols, dtype):
    s = 3 * torch.randn(rows, cols, dtype=torch.float64)  # wide logits: the row max matters
    return s.to(dtype).double(), torch.randn(rows, cols, dtype=torch.float64).to(dtype).double()


@pytest.fixture(scope="module")
def attention_sim():
    return _simt.build("attention_graph_sim")


def test_simulator_primitives():
    result = _simt.run(_simt.build("simt_selftest"))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize("misuse", ["partial_mask", "divergent_shuffle", "divergent_syncthreads"])
def test_simulator_refuses_misuse(misuse):
    result = _simt.run(_simt.build("simt_selftest"), misuse)
    assert result.returncode != 0 and "simt:" in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("squash", [False, True], ids=["plain", "tanh"])
@pytest.mark.parametrize("rows,cols", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_rows_match_reference(attention_sim, dtype, rows, cols, squash, tmp_path):
    scale = 0.37 if squash else 1.6
    s, dp = random_case(rows, cols, DTYPES[dtype])
    p64, ds64 = reference_rows(s, dp, scale, squash)
    p_same, ds_same = reference_rows(s.to(DTYPES[dtype]), dp.to(DTYPES[dtype]), scale, squash)
    p_sim = simulate_rows(attention_sim, dtype, "forward", s, scale=scale, squash=squash, tmp_path=tmp_path)
    ds_sim = simulate_rows(attention_sim, dtype, "backward", s, dp, scale=scale, squash=squash, tmp_path=tmp_path)
    assert_matches(p_sim, p_same, p64, "forward")
    assert_matches(ds_sim, ds_same, ds64, "backward")


# Planted bugs: each mutant of the kernel header must fail the comparison above.
MUTANTS = {
    "missing_barrier": {"device_common.cuh": [("  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n",
                                               "  if (lane == 0) scratch[warp] = v;\n")]},
    "tail_off_by_one": {"attention_graph_kernels.cuh": [("j < cols; j += blockDim.x) row[j] *= inv;",
                                                         "j < cols - 1; j += blockDim.x) row[j] *= inv;")]},
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_planted_bug_is_caught(attention_sim, mutant, tmp_path):
    buggy = _simt.build("attention_graph_sim", MUTANTS[mutant])
    s, _ = random_case(8, 300, torch.float64)  # 8 rows of 8 warps each: many chances for a race
    p64, _ = reference_rows(s, torch.zeros_like(s), 0.37, True)
    good = simulate_rows(attention_sim, "f64", "forward", s, scale=0.37, squash=True, tmp_path=tmp_path)
    bad = simulate_rows(buggy, "f64", "forward", s, scale=0.37, squash=True, tmp_path=tmp_path)
    assert (good - p64).abs().max() < 1e-12
    assert (bad - p64).abs().max() > 1e-6, f"the simulator did not catch the planted bug {mutant}"


RESOURCE_SCRIPT = _simt.ROOT / "tools" / "check_cuda_resources.py"


def _resource_check():
    spec = importlib.util.spec_from_file_location("check_cuda_resources", RESOURCE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESOURCE_CHECK = _resource_check()
needs_nvcc = pytest.mark.skipif(RESOURCE_CHECK.find_nvcc() is None, reason="no nvcc: the ptxas resource check needs it")


def run_resource_check(output, *headers):
    return subprocess.run([sys.executable, str(RESOURCE_SCRIPT), "--output", str(output), *map(str, headers)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.nvcc
@pytest.mark.subprocess
@needs_nvcc
def test_kernel_headers_compile_without_warnings_or_spills(tmp_path):
    result = run_resource_check(tmp_path / "report.md")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    for arch in RESOURCE_CHECK.ARCHS:
        for kernel in ("attention_softmax_forward", "attention_softmax_backward"):
            for t in ("float", "double"):
                assert f"`{kernel}<{t}>` | sm_{arch} |" in report
        for kernel in ("topk_decompose<float>", "topk_decompose<double>", "topk_complement_solve"):
            assert f"`{kernel}` | sm_{arch} |" in report


# The check itself must not be blind: a warning and a register spill each fail it.
SLOPPY_HEADER = """namespace mhgd_fast { namespace cuda_kernels {
template <typename T> __global__ void sloppy(T* x) { int unused; x[threadIdx.x] = T(1); }
}}
"""
SPILLING_HEADER = """namespace mhgd_fast { namespace cuda_kernels {
template <typename T> __global__ void __launch_bounds__(1024, 2) spilling(T* x, int n) {
  T acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = x[i * n + threadIdx.x];
  for (int k = 0; k < n; ++k) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + 1) & 63] + x[k];
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) x[i] += acc[i];
}
}}
"""


@pytest.mark.nvcc
@pytest.mark.subprocess
@needs_nvcc
def test_resource_check_fails_on_warning_and_spill(tmp_path):
    (tmp_path / "sloppy.cuh").write_text(SLOPPY_HEADER)
    (tmp_path / "spilling.cuh").write_text(SPILLING_HEADER)
    result = run_resource_check(tmp_path / "report.md", tmp_path / "sloppy.cuh", tmp_path / "spilling.cuh")
    assert result.returncode != 0
    assert "sloppy.cuh sm_80: nvcc failed or warned" in result.stderr
    assert "spilling.cuh sm_80: spilling<float> spills" in result.stderr


# ---------------------------------------------------------------------------- graph_kl kernels

GRAPH_NAMES = ("kl", "stats_s", "stats_t", "dq_s", "dk_s", "dq_t", "dk_t")


@pytest.fixture(scope="module")
def graph_kl_sim():
    return _simt.build("graph_kl_sim")


def simulate_graph_kl(binary, dtype, inputs, row_grad, scale, squash, teacher_student, tmp_path,
                      jitter_us=_simt.JITTER_US):
    np_dtype = np.float64 if dtype == "f64" else np.float32
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    for name, t in zip(("q_s", "k_s", "q_t", "k_t", "row_grad"), (*inputs, row_grad)):
        t.detach().numpy().astype(np_dtype).tofile(tmp_path / "in" / f"{name}.bin")
    h, n, d = inputs[0].shape
    m = inputs[1].shape[1]
    result = _simt.run(binary, dtype, h, n, m, d, repr(scale), int(squash), int(teacher_student),
                       tmp_path / "in", tmp_path / "out", jitter_us=jitter_us)
    assert result.returncode == 0, result.stderr
    shapes = {"kl": (h, n), "stats_s": (h, n, 2), "stats_t": (h, n, 2), "dq_s": (h, n, d), "dq_t": (h, n, d),
              "dk_s": (h, m, d), "dk_t": (h, m, d)}
    return {name: torch.from_numpy(np.fromfile(tmp_path / "out" / f"{name}.bin", dtype=np_dtype).reshape(shapes[name]))
            for name in GRAPH_NAMES}


def reference_graph_kl(inputs, row_grad, scale, squash, teacher_student):
    """Rows, row statistics (max, log Σ exp(logit − max)) and gradients of Σ row_grad·KL through the
    reference (autograd)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    squash_name = "tanh" if squash else None
    direction = "teacher_student" if teacher_student else "student_teacher"
    rows = ref.graph_kl(*leaves, squash_name, scale, direction, "none")
    grads = torch.autograd.grad((rows * row_grad).sum(), leaves)
    stats = []
    for q, k in ((inputs[0], inputs[1]), (inputs[2], inputs[3])):
        z = ref.attention_logits(q, k, squash_name, scale)
        top = z.max(-1, keepdim=True).values
        stats.append(torch.stack([top[..., 0], torch.logsumexp(z - top, -1)], -1))
    return dict(zip(GRAPH_NAMES, (rows.detach(), *stats, grads[0], grads[1], grads[2], grads[3])))


# (dtype, H, N, M, d, squash, teacher_student): N ≠ M, neither a multiple of the 32-wide chunks,
# d ∈ {1, 17, 96, 192}, every option in both dtypes.
GRAPH_CASES = [
    ("f32", 2, 13, 45, 1, True, False), ("f64", 2, 13, 45, 1, False, True),
    ("f32", 1, 40, 7, 17, False, False), ("f64", 1, 40, 7, 17, True, True),
    ("f32", 2, 9, 33, 96, True, True), ("f64", 2, 9, 33, 96, True, False),
    ("f32", 1, 5, 38, 192, False, True), ("f64", 1, 5, 38, 192, True, False),
]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=["-".join(map(str, c)) for c in GRAPH_CASES])
def test_graph_kl_kernels_match_reference(graph_kl_sim, case, tmp_path):
    dtype, h, n, m, d, squash, teacher_student = case
    torch.manual_seed(n * m + d)
    inputs = [torch.randn(h, rows, d, dtype=torch.float64) * 1.5 / d ** 0.25 for rows in (n, m, n, m)]
    inputs = [t.to(DTYPES[dtype]).double() for t in inputs]  # representable in the tested dtype
    row_grad = torch.randn(h, n, dtype=torch.float64).to(DTYPES[dtype]).double()
    scale = 0.8
    exact = reference_graph_kl(inputs, row_grad, scale, squash, teacher_student)
    same = reference_graph_kl([t.to(DTYPES[dtype]) for t in inputs], row_grad.to(DTYPES[dtype]), scale, squash,
                              teacher_student)
    # Light jitter: these compare values; the planted-bug tests below use the full jitter.
    got = simulate_graph_kl(graph_kl_sim, dtype, inputs, row_grad, scale, squash, teacher_student, tmp_path,
                            jitter_us="2")
    # The KL's terms are at most |KL| + log M in size (shifted logits), not the logits' size.
    kl_size = exact["kl"].abs().max().item() + math.log(m) + 1
    for name in GRAPH_NAMES:
        # Sums over up to 45 terms of either sign: 64 ulps of the largest term.
        assert_matches(got[name], same[name], exact[name], name, kl_size if name == "kl" else None, ulps=64)


GRAPH_MUTANTS = {
    # the warp reads its shared q row before every lane has written it
    "missing_syncwarp": {"graph_kl_kernels.cuh": [("  for (int64_t k = lane; k < a.dim; k += 32) acc_s[k] = acc_t[k] = T(0);\n  __syncwarp();\n",
                                                   "  for (int64_t k = lane; k < a.dim; k += 32) acc_s[k] = acc_t[k] = T(0);\n")]},
    # the last element of every 32-wide chunk is skipped
    "chunk_tail_off_by_one": {"graph_kl_kernels.cuh": [("if (src >= chunk) continue;", "if (src >= chunk - 1) continue;")]},
}


@pytest.mark.parametrize("mutant", GRAPH_MUTANTS)
def test_graph_kl_planted_bug_is_caught(graph_kl_sim, mutant, tmp_path):
    buggy = _simt.build("graph_kl_sim", GRAPH_MUTANTS[mutant])
    torch.manual_seed(1)
    inputs = [torch.randn(2, rows, 70, dtype=torch.float64) / 3 for rows in (9, 45, 9, 45)]
    row_grad = torch.randn(2, 9, dtype=torch.float64)
    exact = reference_graph_kl(inputs, row_grad, 1.0, True, False)
    good = simulate_graph_kl(graph_kl_sim, "f64", inputs, row_grad, 1.0, True, False, tmp_path)
    bad = simulate_graph_kl(buggy, "f64", inputs, row_grad, 1.0, True, False, tmp_path)
    worst = lambda got: max(float((got[n] - exact[n]).abs().max()) for n in GRAPH_NAMES)  # noqa: E731
    assert worst(good) < 1e-10
    assert worst(bad) > 1e-6, f"the simulator did not catch the planted bug {mutant}"


# ---------------------------------------------------------------------- topk_singular_vectors

@pytest.fixture(scope="module")
def topk_sim():
    return _simt.build("topk_singular_vectors_sim")


def spectral_gram(batch, n, sigmas, seed):
    """[B, n, n] float64 Grams X Xᵀ of maps with singular values ``sigmas`` (random singular vectors)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    grams = []
    for _ in range(batch):
        u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
        grams.append(u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64) ** 2) @ u.T)
    return torch.stack(grams)


def simulate_decompose(binary, dtype, gram, kk, tmp_path):
    np_dtype = np.float64 if dtype == "f64" else np.float32
    batch, n = gram.shape[:2]
    gram.numpy().astype(np_dtype).tofile(tmp_path / "gram.bin")
    result = _simt.run(binary, "decompose", dtype, batch, n, kk, tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    nl = min(n, kk + 1)

    def load(name, *shape):
        return torch.from_numpy(np.fromfile(tmp_path / f"{name}.bin", dtype=np.float64).reshape(*shape))

    return {"householder": load("householder", batch, n, n), "tridiagonal": load("tridiagonal", batch, 3, n),
            "basis": load("basis", batch, n, kk), "eigenvalues": load("eigenvalues", batch, nl),
            "nonfinite": int(np.fromfile(tmp_path / "nonfinite.bin", dtype=np.int32)[0])}


def q_times_t_times_qt(householder, tridiagonal):
    """Q T Qᵀ from the kernel's layout (row j right of the diagonal: u_j; beta_j in row 2)."""
    n = householder.shape[0]
    d, e, beta = tridiagonal
    t = torch.diag(d) + torch.diag(e[: n - 1], 1) + torch.diag(e[: n - 1], -1)
    q = torch.eye(n, dtype=torch.float64)
    for j in range(n - 2):
        u = torch.zeros(n, dtype=torch.float64)
        u[j + 1:] = householder[j, j + 1:]
        q = q @ (torch.eye(n, dtype=torch.float64) - beta[j] * torch.outer(u, u))
    return q @ t @ q.T


def check_decomposition(state, gram, kk):
    """Q T Qᵀ = Gram, eigenvalues = eigh's, vectors = eigh's (up to sign) where the gap is ≥ 1e-3·λ_1."""
    lam, vec = torch.linalg.eigh(gram)
    lam, vec = lam.flip(-1), vec.flip(-1)
    nl = state["eigenvalues"].shape[1]
    scale = lam[:, :1]
    for b in range(gram.shape[0]):
        rebuilt = q_times_t_times_qt(state["householder"][b], state["tridiagonal"][b])
        assert (rebuilt - gram[b]).abs().max() <= 1e-12 * scale[b, 0]
    assert ((state["eigenvalues"] - lam[:, :nl]).abs() <= 1e-11 * scale).all()
    padded = torch.cat([lam, lam.new_zeros(lam.shape[0], 1)], 1)
    gaps = torch.minimum(padded[:, :kk] - padded[:, 1:kk + 1],
                         torch.cat([torch.full_like(lam[:, :1], float("inf")), lam[:, :kk - 1] - lam[:, 1:kk]], 1))
    cos = (state["basis"] * vec[:, :, :kk]).sum(1).abs()
    keep = gaps >= 1e-3 * scale
    assert keep.any()
    assert (cos[keep] >= 1 - 1e-9).all()
    assert torch.allclose(state["basis"].norm(dim=1), torch.ones(1, dtype=torch.float64))


# Every k ≤ 8 on an odd size, plus a size past one block's 128 threads (the cost of a simulated
# barrier grows with the threads, so sizes stay small).
TOPK_CASES = [(13, k) for k in range(1, 9)] + [(7, 3), (131, 2)]


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("n,k", TOPK_CASES, ids=[f"n{n}-k{k}" for n, k in TOPK_CASES])
def test_topk_decompose_matches_eigh(topk_sim, dtype, n, k, tmp_path):
    """The simulated kernel against torch.linalg.eigh of the same (dtype-rounded) Gram, every k ≤ 8."""
    sigmas = [4.0 * 0.85 ** i for i in range(n)]
    gram = spectral_gram(2, n, sigmas, seed=n * 10 + k).to(DTYPES[dtype]).double()
    state = simulate_decompose(topk_sim, dtype, gram, k, tmp_path)
    assert state["nonfinite"] == 0
    check_decomposition(state, gram, k)


def test_topk_decompose_repeated_values_and_rank_deficiency(topk_sim, tmp_path):
    """σ_2 = σ_3 (a 2-D eigenspace) and rank 5 < n: eigenvalues exact, vectors orthonormal."""
    gram = spectral_gram(2, 19, [3.0, 2.0, 2.0, 1.0, 0.5], seed=3)
    state = simulate_decompose(topk_sim, "f64", gram, 6, tmp_path)
    lam = torch.linalg.eigvalsh(gram).flip(-1)[:, :7]
    assert ((state["eigenvalues"] - lam).abs() <= 1e-11 * lam[:, :1]).all()
    gram_of_basis = state["basis"].transpose(1, 2) @ state["basis"]
    assert torch.allclose(gram_of_basis[:, :5, :5], torch.eye(5, dtype=torch.float64).expand(2, 5, 5), atol=1e-9)
    # The top 3 span the eigenvectors of 9 and 4 (4 twice): G v = λ v for each.
    for i in range(3):
        v = state["basis"][:, :, i:i + 1]
        assert ((gram @ v - state["eigenvalues"][:, i].view(-1, 1, 1) * v).abs().max()) < 1e-9


def test_topk_decompose_flags_nonfinite(topk_sim, tmp_path):
    gram = spectral_gram(2, 9, [2.0, 1.0], seed=4)
    gram[1, 3, 3] = float("nan")
    assert simulate_decompose(topk_sim, "f64", gram, 2, tmp_path)["nonfinite"] == 1


def expected_solve(gram, e, lam_top, rhs, thresh, floor2):
    """mhgd_fast's spectral route (the reference's dropping rule), from a float64 eigh."""
    lam, u = torch.linalg.eigh(gram)
    diff = lam_top.unsqueeze(1) - lam.unsqueeze(2)
    kept = diff.abs() > thresh.view(-1, 1, 1)
    inverse = 1.0 / torch.where(diff == 0, 1.0, diff)
    if floor2 is None:
        coupling = torch.where(kept, inverse, 0.0)
    else:
        in_range = (lam > floor2.view(-1, 1)).unsqueeze(2)
        coupling = torch.where(in_range, torch.where(kept, inverse, -1.0 / torch.where(in_range, lam.unsqueeze(2), 1.0)), 0.0)
    y = u @ ((u.transpose(1, 2) @ rhs) * coupling)
    return y - e @ (e.transpose(1, 2) @ y)


def simulate_solve(binary, state, rhs, thresh, null_floor, floor2, tmp_path):
    batch, n, kk = state["basis"].shape
    arrays = {"householder": state["householder"], "tridiagonal": state["tridiagonal"], "e": state["basis"],
              "eigenvalues": state["eigenvalues"], "rhs": rhs, "thresh": thresh, "null_floor": null_floor}
    if floor2 is not None:
        arrays["floor2"] = floor2
    for name, array in arrays.items():
        array.contiguous().numpy().astype(np.float64).tofile(tmp_path / f"{name}.bin")
    result = _simt.run(binary, "solve", int(floor2 is not None), batch, n, kk, tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    y = torch.from_numpy(np.fromfile(tmp_path / "y.bin", dtype=np.float64).reshape(batch, n, kk))
    return y, torch.from_numpy(np.fromfile(tmp_path / "exact.bin", dtype=np.uint8)).bool()


# Every σ above eps·σ_max (1e-3·4): smaller nonzero ones send an XXᵀ sample to the exact route.
SOLVE_SPECTRA = {
    "separated": lambda k, n: [4.0 * 0.85 ** i for i in range(n)],
    # σ_{k+1} = σ_k − 1e-4: within eps·λ_max of λ_k, so that coupling is dropped (computed pair).
    "dropped": lambda k, n: [4.0 * 0.85 ** i for i in range(k)] + [4.0 * 0.85 ** (k - 1) - 1e-4]
    + [2.0 * 0.85 ** i for i in range(k, n - 1)],
}


@pytest.mark.parametrize("push_through", [False, True], ids=["XtX", "XXt"])
@pytest.mark.parametrize("spectrum", list(SOLVE_SPECTRA))
@pytest.mark.parametrize("n,k", [(9, 1), (14, 4), (17, 8)])
def test_topk_complement_solve_matches_spectral_route(topk_sim, n, k, spectrum, push_through, tmp_path):
    gram = spectral_gram(3, n, SOLVE_SPECTRA[spectrum](k, n), seed=n + k)
    state = simulate_decompose(topk_sim, "f64", gram, k, tmp_path)
    e = state["basis"]
    rhs = torch.randn(3, n, k, dtype=torch.float64)
    rhs = rhs - e @ (e.transpose(1, 2) @ rhs)
    rhs[1, :, 0] = 0  # an inactive column stays zero
    lam_max = state["eigenvalues"][:, 0]
    thresh = 1e-3 * lam_max
    floor2 = (1e-3 * lam_max.sqrt()) ** 2 if push_through else None
    y, exact = simulate_solve(topk_sim, state, rhs, thresh, 16 * 2.2e-16 * n * lam_max, floor2, tmp_path)
    assert not exact.any()
    want = expected_solve(gram, e, state["eigenvalues"][:, :k], rhs, thresh, floor2)
    assert (y - want).abs().max() <= 1e-9 * want.abs().max()


def test_topk_complement_solve_sends_small_nonzero_directions_to_the_exact_route(topk_sim, tmp_path):
    """XXᵀ route: σ_l ≤ eps·σ_max but not numerically zero → the sample is flagged, not guessed."""
    gram = spectral_gram(2, 15, [3.0, 2.0, 1.0, 0.001], seed=5)
    state = simulate_decompose(topk_sim, "f64", gram, 2, tmp_path)
    rhs = torch.randn(2, 15, 2, dtype=torch.float64)
    rhs = rhs - state["basis"] @ (state["basis"].transpose(1, 2) @ rhs)
    lam_max = state["eigenvalues"][:, 0]
    _, exact = simulate_solve(topk_sim, state, rhs, 1e-2 * lam_max, 1e-20 * lam_max,
                              (1e-2 * lam_max.sqrt()) ** 2, tmp_path)
    assert exact.all()


TOPK_MUTANTS = {
    "update_off_by_one": {"topk_singular_vectors_kernels.cuh": [
        ("idx < m * m; idx += blockDim.x", "idx < m * m - 1; idx += blockDim.x")]},
    "solve_sign": {"topk_singular_vectors_kernels.cuh": [("= -rb[idx];", "= rb[idx];")]},
    # Without this barrier the block updates the vectors with the previous reflector's dots.
    "apply_q_missing_barrier": {"topk_singular_vectors_kernels.cuh": [
        ("    __syncthreads();\n    const int64_t m = n - j - 1;\n    for (int64_t idx = threadIdx.x; idx < count * m;",
         "    const int64_t m = n - j - 1;\n    for (int64_t idx = threadIdx.x; idx < count * m;")]},
}


@pytest.mark.parametrize("mutant", list(TOPK_MUTANTS))
def test_topk_planted_bug_is_caught(topk_sim, mutant, tmp_path):
    buggy = _simt.build("topk_singular_vectors_sim", TOPK_MUTANTS[mutant])
    gram = spectral_gram(2, 17, [4.0 * 0.85 ** i for i in range(17)], seed=6)
    good = simulate_decompose(topk_sim, "f64", gram, 3, tmp_path)
    check_decomposition(good, gram, 3)
    bad = simulate_decompose(buggy, "f64", gram, 3, tmp_path)
    rhs = torch.randn(2, 17, 3, dtype=torch.float64)
    rhs = rhs - good["basis"] @ (good["basis"].transpose(1, 2) @ rhs)
    lam_max = good["eigenvalues"][:, 0]
    args = (rhs, 1e-3 * lam_max, 16 * 2.2e-16 * 17 * lam_max, None, tmp_path)
    want = expected_solve(gram, good["basis"], good["eigenvalues"][:, :3], rhs, 1e-3 * lam_max, None)
    y_good, _ = simulate_solve(topk_sim, good, *args)
    assert (y_good - want).abs().max() <= 1e-9 * want.abs().max()
    try:
        check_decomposition(bad, gram, 3)
        decomposition_ok = True
    except AssertionError:
        decomposition_ok = False
    y_bad, _ = simulate_solve(buggy, good, *args)
    assert not decomposition_ok or (y_bad - want).abs().max() > 1e-6 * want.abs().max()
