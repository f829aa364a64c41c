"""Build of mhgd_fast: a torch C++ extension (CPU kernels always, CUDA kernels when usable).

CUDA sources compile when a GPU is visible or FORCE_CUDA=1, never with a CPU build of torch;
FORCE_ONLY_CPU=1 skips them. MHGD_SANITIZE=1 builds the CPU kernels only, instrumented with
AddressSanitizer + UndefinedBehaviorSanitizer (load it with the runtimes preloaded: see
tests/test_sanitizers.py). ``pip install .`` builds in isolation against a torch of the installed
version (tools/build_backend.py); ``pip install --no-build-isolation .`` against the installed torch.
"""
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _has_cudart(root):
    return bool(root) and any(os.path.exists(os.path.join(root, lib, "libcudart.so"))
                              for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")))


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else found from nvcc.

    The nvcc on PATH may be a wrapper script outside the toolkit (torch would then take its
    grandparent folder, which has no libcudart, and the link fails). Follow symlinks, and if that
    folder has no runtime, read the script for the toolkit path it executes.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        if os.path.getsize(real) < 64 * 1024:
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            candidates += re.findall(r"(/[^\s\"'`;]+?)/bin/nvcc\b", text)
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    return next((c for c in candidates if _has_cudart(c)), None)


_cuda_home = find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = _cuda_home

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("mhgd_fast is compiled against torch, but torch is not importable in this build "
             "environment (a --no-build-isolation build, or a frontend that skipped the torch build "
             "requirement of tools/build_backend.py). Install torch first:\n"
             "    pip install torch==2.14.1   # or torch==2.13.0 (CPU build)\n"
             "    pip install .               # or: pip install --no-build-isolation .")


SANITIZE = os.environ.get("MHGD_SANITIZE") == "1"


def want_cuda():
    if os.environ.get("FORCE_ONLY_CPU") == "1" or SANITIZE:
        return False
    forced = os.environ.get("FORCE_CUDA") == "1"
    if torch.version.cuda is None:
        if forced:
            sys.exit(f"FORCE_CUDA=1, but the installed torch {torch.__version__} is a CPU build and "
                     "cannot compile CUDA extensions. Install a CUDA build (e.g. torch==2.14.1) or unset "
                     "FORCE_CUDA.")
        print("mhgd_fast: CPU build of torch: building the CPU kernels only", file=sys.stderr)
        return False
    if not (forced or torch.cuda.is_available()):
        print("mhgd_fast: no GPU visible and FORCE_CUDA unset: building the CPU kernels only",
              file=sys.stderr)
        return False
    if not _cuda_home:
        message = "no CUDA toolkit (nvcc + libcudart) was found; set CUDA_HOME to the toolkit root"
        if forced:
            sys.exit(f"mhgd_fast: FORCE_CUDA=1 but {message}.")
        print(f"mhgd_fast: a GPU is visible but {message}: building the CPU kernels only", file=sys.stderr)
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU: the default archs. A visible GPU: torch targets the visible devices; record them.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS if not torch.cuda.is_available() else ";".join(
            sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))
    return True


WITH_CUDA = want_cuda()
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
if SANITIZE:
    # Every finding is fatal (no recovery), frames stay readable, -O1 keeps it fast enough.
    _sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    CXX_FLAGS = ["-O1", "-g", "-fopenmp"] + _sanitizers
    LINK_FLAGS = LINK_FLAGS + _sanitizers
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xptxas=-warn-spills", "--Werror=all-warnings"]


def extension():
    sources = ["csrc/mhgd_fast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # csrc/cuda on the include path: kernel headers include <device_common.cuh> by name, so that the
    # simulator tests can shadow it (tests/simt).
    kwargs = dict(name="mhgd_fast._C", extra_link_args=LINK_FLAGS,
                  include_dirs=[os.path.join(ROOT, "csrc", "cuda")])
    if WITH_CUDA:
        return CUDAExtension(sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
                             define_macros=[("WITH_CUDA", None)],
                             extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)


def _first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        return out[-1] if out else None
    except (OSError, subprocess.CalledProcessError):
        return None


class BuildWithMeta(BuildExtension):
    """Builds the extension, then records what was built next to it (mhgd_fast/_build_meta.json),
    which the package reads before loading the library."""

    def run(self):
        super().run()
        meta = {
            "torch_version": torch.__version__,
            "torch_cuda_version": torch.version.cuda,
            "backends": ["cpu", "cuda"] if WITH_CUDA else ["cpu"],
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
            "cuda_home": _cuda_home if WITH_CUDA else None,
            "nvcc": _first_line([os.path.join(_cuda_home, "bin", "nvcc"), "--version"]) if WITH_CUDA else None,
            "cxx_flags": CXX_FLAGS,
            "sanitize": SANITIZE,
            "nvcc_flags": NVCC_FLAGS if WITH_CUDA else None,
            # Where it was built from: the version guard's rebuild command names it.
            "source_dir": ROOT,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        root = ROOT if self.inplace else self.build_lib
        with open(os.path.join(root, "mhgd_fast", "_build_meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def _version():
    with open(os.path.join(ROOT, "mhgd_fast", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="mhgd_fast",
    version=_version(),
    description="Fast multi-head attention graph knowledge distillation (MHGD) for PyTorch",
    python_requires=">=3.9",
    install_requires=["torch", "tqdm", "numpy", "matplotlib", "scipy"],
    extras_require={
        "torchdistill": ["torchdistill>=1.1"],  # mhgd_fast.contrib.torchdistill
        "tensorboard": ["tensorboard"],  # `train/demo/study --tensorboard`
    },
    # The library and its training subpackages, and the benchmark package that `mhgd-fast bench`
    # and tools/gpu_check.py import (top-level `benchmarks`, as in a source checkout).
    packages=find_packages(include=["mhgd_fast", "mhgd_fast.*", "benchmarks"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithMeta.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["mhgd-fast = mhgd_fast.cli:main"]},
)
