"""CUDA kernels run in the host SIMT simulator (tests/simt) against the reference (MHGD_SPEC.md §11).

The simulator compiles the same csrc/cuda/*.cuh headers that nvcc compiles; a planted bug must
make the comparison fail, and nvcc's resource report must show no warnings or spills.
"""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

import _simt
import mhgd_fast.reference as ref

pytestmark = pytest.mark.skipif(_simt.CXX is None, reason="no C++20 compiler (g++) to build the SIMT simulator")

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


@needs_nvcc
def test_kernel_headers_compile_without_warnings_or_spills(tmp_path):
    result = run_resource_check(tmp_path / "report.md")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    for arch in RESOURCE_CHECK.ARCHS:
        for kernel in ("attention_softmax_forward", "attention_softmax_backward"):
            for t in ("float", "double"):
                assert f"`{kernel}<{t}>` | sm_{arch} |" in report


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


@needs_nvcc
def test_resource_check_fails_on_warning_and_spill(tmp_path):
    (tmp_path / "sloppy.cuh").write_text(SLOPPY_HEADER)
    (tmp_path / "spilling.cuh").write_text(SPILLING_HEADER)
    result = run_resource_check(tmp_path / "report.md", tmp_path / "sloppy.cuh", tmp_path / "spilling.cuh")
    assert result.returncode != 0
    assert "sloppy.cuh sm_80: nvcc failed or warned" in result.stderr
    assert "spilling.cuh sm_80: spilling<float> spills" in result.stderr


# ---------------------------------------------------------------------------- graph_kl kernels

GRAPH_NAMES = ("kl", "lse_s", "lse_t", "dq_s", "dk_s", "dq_t", "dk_t")


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
    shapes = {"kl": (h, n), "lse_s": (h, n), "lse_t": (h, n), "dq_s": (h, n, d), "dq_t": (h, n, d),
              "dk_s": (h, m, d), "dk_t": (h, m, d)}
    return {name: torch.from_numpy(np.fromfile(tmp_path / "out" / f"{name}.bin", dtype=np_dtype).reshape(shapes[name]))
            for name in GRAPH_NAMES}


def reference_graph_kl(inputs, row_grad, scale, squash, teacher_student):
    """Rows, log-sum-exps and gradients of Σ row_grad·KL through the reference (autograd)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    squash_name = "tanh" if squash else None
    direction = "teacher_student" if teacher_student else "student_teacher"
    rows = ref.graph_kl(*leaves, squash_name, scale, direction, "none")
    grads = torch.autograd.grad((rows * row_grad).sum(), leaves)
    lse = [torch.logsumexp(ref.attention_logits(q, k, squash_name, scale), -1)
           for q, k in ((inputs[0], inputs[1]), (inputs[2], inputs[3]))]
    return dict(zip(GRAPH_NAMES, (rows.detach(), *lse, grads[0], grads[1], grads[2], grads[3])))


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
    lse_size = max(exact["lse_s"].abs().max().item(), exact["lse_t"].abs().max().item())
    for name in GRAPH_NAMES:
        # Sums over up to 45 terms of either sign: 64 ulps of the largest term.
        assert_matches(got[name], same[name], exact[name], name, lse_size if name == "kl" else None, ulps=64)


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
