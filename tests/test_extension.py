"""The compiled extension: build facts, version guard, op registration, opcheck, torch.compile."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import _vex
import mhgd_fast as mf
from conftest import REQUIRE_EXTENSION
from mhgd_fast import _extension

compiled = pytest.mark.skipif(not mf.build_info()["extension_loaded"] and not REQUIRE_EXTENSION,
                              reason="extension not built")


def test_reference_always_available():
    assert mf.available_backends()[0] == "reference"


def test_extension_loaded_when_built_or_required():
    """A build beside the package (its _build_meta.json) is loaded, and `make test`
    (MHGD_REQUIRE_EXTENSION=1) insists on one; without a build only the reference backend is
    offered and build_info says why."""
    info = mf.build_info()
    if REQUIRE_EXTENSION or os.path.exists(_extension._META_PATH):
        assert info["extension_loaded"], info.get("extension_problem")
        assert "cpu" in mf.available_backends() and "cpu" in info["compiled_backends"]
    else:
        assert not info["extension_loaded"] and "not built" in info["extension_problem"]
        assert mf.available_backends() == ["reference"] and info["compiled_backends"] == []


@compiled
def test_build_info_reports_what_was_compiled():
    info = mf.build_info()
    assert info["package_version"] == mf.__version__
    assert info["torch_version"] == torch.__version__ == info["build_torch_version"]
    assert "cpu" in info["compiled_backends"]
    assert "-fopenmp" in info["build_cxx_flags"] and info["openmp"]
    if "cuda" in info["compiled_backends"]:
        assert info["build_cuda_archs"] and info["cuda_runtime_compiled"] and info["build_nvcc_flags"]
        assert ("cuda" in mf.available_backends()) == torch.cuda.is_available()
    else:
        assert "cuda" not in mf.available_backends()


def _cpu_has(*flags):
    """Whether /proc/cpuinfo lists every one of ``flags`` (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(flags) <= set(line.split(":", 1)[1].split())


@compiled
def test_build_info_reports_the_cpu_kernel_table_in_use():
    """The AVX2 table is compiled on x86-64 with g++ and used exactly when the CPU has AVX2 and
    FMA (the choice is the extension's own; /proc/cpuinfo is the independent witness)."""
    info = mf.build_info()
    compiled_tables = info["cpu_capabilities_compiled"]
    assert compiled_tables[0] == "generic" and set(compiled_tables) <= {"generic", "avx2"}
    x86_gcc = platform.machine() in ("x86_64", "AMD64") and info.get("cxx_compiler", "").startswith("gcc")
    assert ("avx2" in compiled_tables) == x86_gcc
    expected = "avx2" if "avx2" in compiled_tables and _cpu_has("avx2", "fma") else "generic"
    if os.environ.get("MHGD_FAST_CPU_CAPABILITY") == "generic":
        expected = "generic"
    assert info["cpu_capability"] == expected


@compiled
@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to disassemble the extension")
def test_avx2_code_stays_in_the_avx2_kernel_table():
    """On a CPU without AVX2 the generic table must not reach an AVX2 instruction. kernels_avx2.cpp
    compiles under an AVX2 target pragma; an inline or template function it shares with another
    unit (a COMDAT) could be emitted as AVX2 code there and picked by the linker for everyone. So:
    every function of the built library that uses an AVX/AVX2/FMA instruction has a name only the
    AVX2 unit can emit: it is in, or instantiated with a type from, a per-capability namespace
    (``mhgd_fast::cpu::avx2``, graph_kl_math's ``avx2`` ABI namespace, at::vec's ``mhgd_avx2``)."""
    if "avx2" not in mf.build_info()["cpu_capabilities_compiled"]:
        pytest.skip("no AVX2 kernel table in this build")
    library = mf._extension._C.__file__
    vex = _vex.functions_using_vex(library)
    outside = _vex.outside_the_avx2_table(vex)
    assert len(outside) < len(vex), "the AVX2 kernels were not found in the disassembly"
    assert not outside, f"AVX code outside the AVX2 table in {library}: {outside[:20]}"


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("g++") is None
                    or platform.machine() not in ("x86_64", "AMD64"), reason="needs objdump, g++ and x86-64")
def test_vex_scan_sees_avx2_code_outside_the_table(tmp_path):
    """The scan above can fail: an AVX2 function outside an avx2 namespace is found and named."""
    source = tmp_path / "leak.cpp"
    source.write_text(
        '#pragma GCC target("avx2,fma")\n'
        'extern "C" void leak(float* a, const float* b, int n) { for (int i = 0; i < n; ++i) a[i] += 2 * b[i]; }\n'
        'namespace lib { namespace avx2 { void kept(float* a, int n) { for (int i = 0; i < n; ++i) a[i] *= 3; } } }\n')
    library = tmp_path / "libleak.so"
    subprocess.run(["g++", "-O3", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    vex = _vex.functions_using_vex(str(library))
    assert "leak" in vex and "lib::avx2::kept(float*, int)" in vex
    assert _vex.outside_the_avx2_table(vex) == ["leak"]


@compiled
def test_limits_come_from_the_one_cpp_definition():
    """Python reads the kernels' size limits from the extension; they are those of csrc/limits.h."""
    header = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "limits.h")).read()
    defined = {name: int(value) for name, value in re.findall(r"constexpr int64_t k(\w+) = (\d+);", header)}
    assert defined == {"CudaTopkMaxK": 8, "CudaTopkMaxN": 2048}
    assert _extension.limits() == {"cuda_topk_max_k": defined["CudaTopkMaxK"],
                                   "cuda_topk_max_n": defined["CudaTopkMaxN"]}


def test_version_mismatch_names_both_versions(monkeypatch):
    monkeypatch.setattr(_extension, "_read_meta", lambda: {"torch_version": "1.2.3", "backends": ["cpu"]})
    with pytest.raises(ImportError) as info:
        _extension._load()
    assert "1.2.3" in str(info.value) and torch.__version__ in str(info.value)


def test_version_mismatch_gives_the_rebuild_command(monkeypatch):
    """The refusal says which command rebuilds for the running torch: this interpreter's pip,
    without isolation (the installed torch itself), mhgd_fast alone, from the recorded source tree
    (a placeholder when that tree is gone)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for source, expected in ((root, root), ("/nonexistent/src", "<mhgd_fast source directory>")):
        meta = {"torch_version": "1.2.3", "backends": ["cpu"], "source_dir": source}
        monkeypatch.setattr(_extension, "_read_meta", lambda: meta)
        with pytest.raises(_extension.ExtensionVersionError) as info:
            _extension._load()
        message = str(info.value)
        assert (f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall "
                f"{expected}") in message, message
        assert f"Rebuild it for torch {torch.__version__}" in message and "install torch 1.2.3" in message


@pytest.mark.subprocess
def test_build_backend_pins_the_installed_torch():
    """tools/build_backend.py asks for a torch of the installed version (no local label), so that
    an isolated build compiles against the torch that will import the extension."""
    script = ("import sys; sys.path.insert(0, 'tools'); import build_backend as b; "
              "print(b.get_requires_for_build_wheel(), b.get_requires_for_build_sdist())")
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pin = f"torch=={torch.__version__.split('+')[0]}"
    assert done.stdout.strip() == f"{[pin]} {[pin]}", done.stdout


def test_unbuilt_extension_leaves_reference_backend(monkeypatch):
    monkeypatch.setattr(_extension, "_read_meta", lambda: None)
    module, meta, problem = _extension._load()
    assert module is None and meta is None and "not built" in problem


@compiled
def test_backends_are_worked_out_once(monkeypatch):
    """The usable backends are worked out once (the GPU asked for at most once, however many
    calls), every call gets its own list, and `backends._refresh()` reads them again."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append(1) or True)
    monkeypatch.setattr(_extension, "_META", {**_extension._META, "backends": ["cpu", "cuda"]})
    try:
        mf.backends._refresh()
        for _ in range(3):
            assert mf.available_backends() == ["reference", "cpu", "cuda"]
            assert mf.backends.resolve("graph_kl", "cpu", torch.device("cpu")) == "cpu"
        assert len(calls) == 1
        mf.available_backends().append("tpu")
        assert mf.available_backends() == ["reference", "cpu", "cuda"]
    finally:
        monkeypatch.undo()
        mf.backends._refresh()
    assert "cuda" not in mf.available_backends() or torch.cuda.is_available()


@compiled
def test_every_compiled_op_has_a_kernel_for_every_compiled_backend():
    """What backends reads off the dispatcher: each public compiled op and its backward ops, on
    each compiled device backend (a CPU-only build registers no CUDA kernels)."""
    ops = {"attention_graph", "attention_graph_backward", "graph_kl", "graph_kl_backward",
           "graph_kl_fused", "topk_singular_vectors", "topk_singular_vectors_backward"}
    for backend in mf.build_info()["compiled_backends"]:
        assert mf.backends._KERNELS[backend] == ops, backend


# ---------------------------------------------------------------------------- registered ops

def attention_samples():
    shapes = [(3, 7, 11, 5), (1, 1, 2, 1), (2, 16, 16, 9)]
    for (h, n, m, d), squash, grad in zip(shapes * 2, [True, False] * 3, [True, True, True, False, False, False]):
        q = torch.randn(h, n, d, requires_grad=grad)
        k = torch.randn(h, m, d, requires_grad=grad)
        yield q, k, squash, 0.7


@compiled
@pytest.mark.parametrize("sample", list(attention_samples()))
def test_opcheck_attention_graph(sample):
    torch.library.opcheck(torch.ops.mhgd_fast.attention_graph.default, sample)


@compiled
def test_opcheck_attention_graph_backward():
    q, k = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    for squash in (True, False):
        torch.library.opcheck(torch.ops.mhgd_fast.attention_graph_backward.default,
                              (torch.randn(2, 5, 4), q, k, squash, 1.5))


@compiled
def test_torch_compile_fullgraph_attention_graph():
    def loss_fn(q, k):
        return (mf.ops.attention_graph(q, k, squash="tanh", scale=0.5, backend="cpu") ** 2).sum()

    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    q = torch.randn(4, 9, 6, requires_grad=True)
    k = torch.randn(4, 13, 6, requires_grad=True)
    out = compiled_fn(q, k)
    dq, dk = torch.autograd.grad(out, (q, k))
    ref = (mf.reference.attention_graph(q, k, "tanh", 0.5) ** 2).sum()
    rdq, rdk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dq, rdq)
    torch.testing.assert_close(dk, rdk)


@compiled
def test_direct_op_call_checks_inputs():
    with pytest.raises(RuntimeError, match="disagree on H or d"):
        torch.ops.mhgd_fast.attention_graph(torch.randn(2, 3, 4), torch.randn(2, 3, 5), False, 1.0)
    with pytest.raises(RuntimeError, match="no columns"):
        torch.ops.mhgd_fast.attention_graph(torch.randn(2, 3, 4), torch.randn(2, 0, 4), False, 1.0)


def graph_kl_samples():
    for (h, n, m, d), squash, ts, grad in [((2, 5, 7, 3), True, False, True), ((1, 4, 4, 9), False, True, True),
                                           ((3, 6, 2, 4), True, True, False)]:
        t = [torch.randn(h, rows, d, requires_grad=grad) for rows in (n, m, n, m)]
        yield t, squash, ts


@compiled
@pytest.mark.parametrize("sample", list(graph_kl_samples()))
def test_opcheck_graph_kl_ops(sample):
    (q_s, k_s, q_t, k_t), squash, ts = sample
    ops = torch.ops.mhgd_fast
    torch.library.opcheck(ops.graph_kl.default, (q_s, k_s, q_t, k_t, squash, 0.7, ts))
    for mean in (False, True):
        mask = [t.requires_grad for t in (q_s, k_s, q_t, k_t)]
        torch.library.opcheck(ops.graph_kl_fused.default, (q_s, k_s, q_t, k_t, squash, 0.7, ts, mean, mask))
    with torch.no_grad():
        kl, stats_s, stats_t = ops.graph_kl(q_s, k_s, q_t, k_t, squash, 0.7, ts)
    torch.library.opcheck(ops.graph_kl_backward.default,
                          (torch.randn_like(kl), q_s.detach(), k_s.detach(), q_t.detach(), k_t.detach(), kl, stats_s,
                           stats_t, squash, 0.7, ts, [True, False, True, True]))


@compiled
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_torch_compile_fullgraph_graph_kl(reduction):
    def loss_fn(q_s, k_s, q_t, k_t):
        out = mf.ops.graph_kl(q_s, k_s, q_t, k_t, reduction=reduction, backend="cpu")
        return out if reduction == "sum" else (out * out).sum()

    inputs = [torch.randn(3, rows, 5, requires_grad=i < 2) for i, rows in enumerate((6, 9, 6, 9))]
    out = torch.compile(loss_fn, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out, inputs[:2])
    ref = mf.reference.graph_kl(*inputs, "tanh", 1.0, "student_teacher", reduction)
    ref = ref if reduction == "sum" else (ref * ref).sum()
    ref_grads = torch.autograd.grad(ref, inputs[:2])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@compiled
def test_fused_graph_kl_refuses_double_backward():
    inputs = [torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    loss = mf.ops.graph_kl(*inputs, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, inputs[0], create_graph=True)


@pytest.mark.subprocess
@compiled
def test_generic_cpu_path_matches(tmp_path):
    """The portable (non-AVX2) kernels (graph-KL row math, Householder reduction), forced by
    MHGD_FAST_CPU_CAPABILITY=generic in a fresh process, match the reference."""
    script = tmp_path / "generic.py"
    script.write_text(
        "import torch, mhgd_fast as mf\n"
        "assert mf.build_info()['cpu_capability'] == 'generic', mf.build_info()\n"
        "torch.manual_seed(0)\n"
        "x = [torch.randn(3, n, 17, dtype=torch.float64, requires_grad=True) for n in (21, 38, 21, 38)]\n"
        "out = mf.ops.graph_kl(*x, backend='cpu')\n"
        "g = torch.autograd.grad(out, x)\n"
        "ref = mf.reference.graph_kl(*x, 'tanh', 1.0, 'student_teacher', 'sum')\n"
        "rg = torch.autograd.grad(ref, x)\n"
        "torch.testing.assert_close(out, ref)\n"
        "[torch.testing.assert_close(a, b) for a, b in zip(g, rg)]\n"
        "fm = torch.relu(torch.randn(3, 37, 6, 9, dtype=torch.float64)).requires_grad_()\n"
        "w = torch.randn(3, 4, 37, dtype=torch.float64)\n"
        "v = mf.ops.topk_singular_vectors(fm, 4, eps=1e-3, backend='cpu')\n"
        "gv, = torch.autograd.grad((v * w).sum(), fm)\n"
        "rv = mf.ops.topk_singular_vectors(fm, 4, eps=1e-3, backend='reference')\n"
        "rgv, = torch.autograd.grad((rv * w).sum(), fm)\n"
        "torch.testing.assert_close(v, rv)\n"
        "torch.testing.assert_close(gv, rgv)\n"
        "print('ok')\n")
    env = dict(os.environ, MHGD_FAST_CPU_CAPABILITY="generic")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
