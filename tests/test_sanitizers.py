"""The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer, and the SIMT simulator's
kernel runs under ThreadSanitizer.

Each builds an instrumented copy and runs a fixed subset of the existing tests in a subprocess:
the op fuzz cases of tests/test_fuzz_ops.py (profile ``sanitize``: fixed seed) plus the argument
checks of tests/test_errors.py for the CPU kernels; the kernel-vs-reference cases of
tests/test_cuda_simulated.py for the simulator. Any sanitizer report is fatal there, so it fails
the test. The instrumented extension (``MHGD_SANITIZE=1 python setup.py build_ext``, CPU kernels
only) is cached under build/sanitize; its first build takes several minutes.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _simt
import _vex

ROOT = Path(__file__).resolve().parent.parent
SANITIZE_DIR = ROOT / "build" / "sanitize"
LIB = SANITIZE_DIR / "lib"
CXX = shutil.which(os.environ.get("CXX", "g++"))

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.skipif(CXX is None, reason="no g++ to build the sanitizer runtimes")]


def runtime(name: str) -> str:
    """Path of a GCC sanitizer runtime (libasan.so, ...), or skip if this compiler has none."""
    path = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.skip(f"{CXX} has no {name}")
    return path


def run_python(args, env, timeout):
    """``python -P`` (the repo root is not put on sys.path: the instrumented copy is imported)."""
    result = subprocess.run([sys.executable, "-P", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, (result.stdout + result.stderr)[-6000:]


@pytest.fixture(scope="module")
def asan_env():
    preload = " ".join(runtime(n) for n in ("libasan.so", "libubsan.so"))
    build_env = dict(os.environ, MHGD_SANITIZE="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(LIB),
                            "--build-temp", str(SANITIZE_DIR / "tmp")],
                           cwd=ROOT, env=build_env, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, f"sanitizer build failed:\n{(build.stdout + build.stderr)[-6000:]}"
    # The package's Python files next to the instrumented library (build_ext only places the .so).
    for src in (ROOT / "mhgd_fast").rglob("*.py"):
        dst = LIB / src.relative_to(ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB), str(ROOT / "tests")]), LD_PRELOAD=preload,
                # Python and torch are not instrumented: their allocations are not leaks of ours.
                ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=66",
                UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=67",
                MHGD_FUZZ_PROFILE="sanitize", MHGD_REQUIRE_EXTENSION="1", OMP_NUM_THREADS="2")


def test_instrumented_extension_is_the_one_loaded(asan_env):
    code = ("import mhgd_fast as mf, pathlib; print(mf.__file__); print(mf.build_info().get('build_sanitize'));"
            "print(any('libasan' in line for line in pathlib.Path('/proc/self/maps').read_text().splitlines()))")
    result, out = run_python(["-c", code], asan_env, timeout=300)
    assert result.returncode == 0, out
    path, sanitize, asan_mapped = result.stdout.split()
    assert Path(path).is_relative_to(LIB) and sanitize == "True" and asan_mapped == "True", out


def test_cpu_kernels_under_asan_and_ubsan(asan_env):
    result, out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_ops.py",
                              "tests/test_errors.py"], asan_env, timeout=1800)
    assert result.returncode == 0, out
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to disassemble the extension")
def test_instrumented_avx2_code_stays_in_the_avx2_table(asan_env):
    """The -O1 sanitizer build inlines less than the -O3 one, so shared inline and template code
    (COMDATs) is emitted out of line there: the check of tests/test_extension.py, on this build."""
    library = next(LIB.glob("mhgd_fast/_C*.so"))
    vex = _vex.functions_using_vex(str(library))
    if not vex:
        pytest.skip("no AVX2 kernel table in this build")
    assert not _vex.outside_the_avx2_table(vex), _vex.outside_the_avx2_table(vex)[:20]


@pytest.mark.simulator
def test_simulated_cuda_kernels_under_tsan():
    runtime("libtsan.so")
    env = dict(os.environ, MHGD_SIMT_SANITIZE="thread")
    # The kernel-vs-reference cases; planted-bug and misuse tests are left out (they fail on purpose).
    select = "primitives or match_reference or matches_eigh or repeated_values or matches_spectral_route"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_cuda_simulated.py", "-k", select], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    out = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, out
    assert "passed" in out and "WARNING: ThreadSanitizer" not in out, out
    assert _simt.CXX is not None
