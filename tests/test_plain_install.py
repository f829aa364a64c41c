"""Plain ``pip install .`` (with build isolation) in a fresh virtual environment.

A new venv gets torch 2.13.0, the 1 GB CPU build this project's machines offer beside 2.14.1
(MHGD_PLAIN_INSTALL_TORCH overrides it): lighter than the 5.5 GB CUDA build, and not the newest
release, so the test also checks that the isolated build follows the installed torch,
then ``pip install <copy of this source tree>`` with FORCE_ONLY_CPU=1: the isolated build must
compile against a torch of the installed version (tools/build_backend.py), and from a directory
outside the source tree the installed package must load its extension and run the cpu kernels to
the reference's values. The CUDA build is `make test`'s (FORCE_CUDA=1), the --no-build-isolation
install `make install`'s. Several minutes: the compile of every translation unit dominates.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = os.environ.get("MHGD_PLAIN_INSTALL_TORCH") or "2.13.0"
# Neither copied nor looked at: build outputs, environments, caches, results.
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "_build_meta.json",
                                 "__pycache__", ".pytest_cache", ".benchmarks", "runs", "gpu-check-out",
                                 "*.stamp")

CHECK = r"""
import json, torch, mhgd_fast as mf
from mhgd_fast import reference
info = mf.build_info()
assert info["extension_loaded"], info.get("extension_problem")
torch.manual_seed(0)
q_s, k_s, q_t, k_t = [torch.randn(3, n, 5, dtype=torch.float64, requires_grad=True) for n in (7, 11, 7, 11)]
out = mf.ops.graph_kl(q_s, k_s, q_t, k_t, reduction="none", backend="cpu")
ref = reference.graph_kl(q_s, k_s, q_t, k_t, reduction="none")
grads = torch.autograd.grad(out.sum(), (q_s, k_s))
ref_grads = torch.autograd.grad(ref.sum(), (q_s, k_s))
fm = torch.randn(4, 6, 5, 3, dtype=torch.float64)
v = mf.ops.topk_singular_vectors(fm, 3, backend="cpu")
v_ref = reference.topk_singular_vectors(fm, 3)
print(json.dumps({
    "file": mf.__file__, "torch": torch.__version__, "build_torch": info["build_torch_version"],
    "backends": info["compiled_backends"], "available": mf.available_backends(),
    "kl_err": (out - ref).abs().max().item(),
    "grad_err": max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)),
    "svd_err": (v - v_ref).abs().max().item(),
}))
"""


def run(cmd, timeout, **kwargs):
    shown = " ".join(arg if "\n" not in arg else "<script>" for arg in cmd)
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{shown}` did not finish in {timeout} s:\n{exc.stdout}\n{exc.stderr}")
    print(f"{time.monotonic() - start:7.1f} s  {shown}")
    assert done.returncode == 0, (f"`{shown}` failed ({done.returncode}):\n"
                                  f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return done


@pytest.fixture
def workdir(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps the last runs' folders, and a venv with a CUDA
    build of torch is 5.5 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_plain_pip_install_builds_and_runs(workdir):
    source, venv, elsewhere = workdir / "src", workdir / "venv", workdir / "elsewhere"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_CUDA", "MHGD_SANITIZE", "PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_BUILD_ISOLATION")}
    env.update(FORCE_ONLY_CPU="1", MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    python = str(venv / "bin" / "python")

    run([sys.executable, "-m", "venv", str(venv)], timeout=300, env=env)
    run([python, "-m", "pip", "install", "--quiet", f"torch=={TORCH}"], timeout=1200, env=env)
    installed = run([python, "-c", "import torch; print(torch.__version__)"], timeout=300, env=env,
                    cwd=elsewhere).stdout.strip()
    build = run([python, "-m", "pip", "install", "--verbose", str(source)], timeout=2400, env=env)
    assert f"mhgd_fast: building against torch=={TORCH}" in build.stdout + build.stderr

    result = json.loads(run([python, "-c", CHECK], timeout=600, env=env, cwd=elsewhere).stdout.splitlines()[-1])
    assert result["file"].startswith(str(venv)), result   # the installed package, not the source tree
    assert result["torch"] == result["build_torch"] == installed, result
    assert result["backends"] == ["cpu"] and "cpu" in result["available"], result
    assert result["kl_err"] < 1e-12 and result["grad_err"] < 1e-12 and result["svd_err"] < 1e-9, result
