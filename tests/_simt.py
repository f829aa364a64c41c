"""Builds and runs the host SIMT simulator's drivers (tests/simt, docs/design.md §4).

A driver is ``tests/simt/<name>.cpp``: it includes ``simt_runtime.h`` and kernel headers from
csrc/cuda. Binaries are cached by a hash of everything they are built from, so only the first
run after a change compiles.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIMT_DIR = ROOT / "tests" / "simt"
KERNEL_DIR = ROOT / "csrc" / "cuda"
CXX = shutil.which(os.environ.get("CXX", "g++"))
CXX_FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror"]
# MHGD_SIMT_SANITIZE=thread builds the drivers with ThreadSanitizer (tests/test_sanitizers.py):
# a data race between simulated threads, i.e. a missing barrier in a kernel, then fails the run
# even where the adversarial jitter does not change the result.
SANITIZE = os.environ.get("MHGD_SIMT_SANITIZE")
if SANITIZE:
    CXX_FLAGS += [f"-fsanitize={SANITIZE}", "-g"]
# Each thread sleeps up to this many µs before every barrier: adversarial scheduling that makes
# a missing barrier give wrong results instead of passing by luck.
JITTER_US = "30"


def cache_dir() -> Path:
    return Path(os.environ.get("MHGD_SIMT_CACHE") or tempfile.gettempdir()) / f"mhgd_fast_simt-{os.getuid()}"


def _mutated_headers(mutations):
    """{header: text} for the headers that ``mutations`` ({header: [(old, new), ...]}) change."""
    headers = {}
    for name, edits in mutations.items():
        text = (KERNEL_DIR / name).read_text()
        for old, new in edits:
            assert text.count(old) == 1, f"mutation of {name} no longer applies (update the test): {old!r}"
            text = text.replace(old, new)
        headers[name] = text
    return headers


def build(driver: str, mutations=None) -> Path:
    """Compiles tests/simt/<driver>.cpp and returns the binary.

    ``mutations`` plants bugs in copies of kernel headers, which shadow the real ones: a test
    proves the simulator tests fail on that variant, without keeping a copy of the kernel.
    """
    mutated = _mutated_headers(mutations or {})
    digest = hashlib.sha256(" ".join([CXX] + CXX_FLAGS).encode())
    # Kernel headers may include the host/device-shared headers of csrc/ (tridiagonal.h).
    for path in (sorted(SIMT_DIR.glob("*.h")) + sorted(SIMT_DIR.glob("*.cpp")) + sorted(KERNEL_DIR.glob("*.cuh"))
                 + sorted(KERNEL_DIR.parent.glob("*.h"))):
        digest.update(path.name.encode() + path.read_bytes())
    for name, text in sorted(mutated.items()):
        digest.update(b"mutated " + name.encode() + text.encode())
    out_dir = cache_dir() / f"{driver}-{digest.hexdigest()[:16]}"
    binary = out_dir / driver
    if binary.exists():
        return binary
    include = out_dir / "include"
    include.mkdir(parents=True, exist_ok=True)
    for name, text in mutated.items():
        (include / name).write_text(text)
    partial = out_dir / f"{driver}.{os.getpid()}.tmp"
    cmd = [CXX, *CXX_FLAGS, f"-I{SIMT_DIR}", f"-I{include}", f"-I{KERNEL_DIR}", str(SIMT_DIR / f"{driver}.cpp"),
           "-o", str(partial)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    os.replace(partial, binary)  # atomic: concurrent test runs never see half a binary
    return binary


def run(binary: Path, *args, jitter_us: str = JITTER_US, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, SIMT_JITTER_US=jitter_us, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
