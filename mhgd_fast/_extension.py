"""Loading the compiled extension ``mhgd_fast._C`` and describing what it was built with.

The build writes ``_build_meta.json`` next to the extension (torch version, compiled backends,
CUDA archs, flags). It is read *before* the shared library is loaded, so that an extension built
against another torch fails with a message naming both versions instead of an opaque symbol error.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import shlex
import sys
from typing import Any, Dict, Optional

import torch

from . import __version__

_META_PATH = os.path.join(os.path.dirname(__file__), "_build_meta.json")


class ExtensionVersionError(ImportError):
    """The compiled extension does not match the running torch."""


def _read_meta() -> Optional[Dict[str, Any]]:
    if not os.path.exists(_META_PATH):
        return None
    with open(_META_PATH, encoding="utf-8") as f:
        return json.load(f)


def rebuild_command(meta: Dict[str, Any]) -> str:
    """The shell command that rebuilds the extension against the torch this interpreter imports.

    --no-build-isolation compiles against this environment's torch itself (no second torch is
    installed), --no-deps --force-reinstall rebuilds mhgd_fast alone, leaving torch as it is. The
    source tree is the one recorded at build time when it is still there."""
    source = meta.get("source_dir")
    source = (shlex.quote(source) if source and os.path.exists(os.path.join(source, "setup.py"))
              else "<mhgd_fast source directory>")
    pip = f"{shlex.quote(sys.executable)} -m pip"
    return (f'{pip} install "setuptools>=64" wheel ninja pybind11 && '
            f"{pip} install --no-build-isolation --no-deps --force-reinstall {source}")


def _load():
    meta = _read_meta()
    if meta is None:
        return None, None, "not built (no _build_meta.json: install with `pip install .`)"
    built, running = meta.get("torch_version"), torch.__version__
    if built != running:
        # A torch C++ extension links against that torch's C++ API, which has no stable ABI across
        # releases (nor across the CPU and CUDA builds of one): loading it under another torch
        # fails with undefined symbols, or worse, so it is refused here.
        raise ExtensionVersionError(
            f"mhgd_fast's compiled extension was built against torch {built}, but torch {running} "
            "is installed, and a C++ extension only loads under the torch it was compiled against. "
            f"Rebuild it for torch {running} with\n    {rebuild_command(meta)}\n"
            f"(or install torch {built} again)."
        )
    try:
        module = importlib.import_module("mhgd_fast._C")
    except ImportError as exc:
        raise ExtensionVersionError(
            f"mhgd_fast's compiled extension (built against torch {built}) failed to load under "
            f"torch {running}: {exc}"
        ) from exc
    return module, meta, None


_C, _META, _LOAD_PROBLEM = _load()


def limits() -> Dict[str, int]:
    """The kernels' size limits as compiled (csrc/limits.h): ``cuda_topk_max_k``, ``cuda_topk_max_n``.
    Empty when the extension is not built (no kernel to limit)."""
    return dict(_C.limits()) if _C is not None else {}


def compiled_backends() -> tuple:
    """Device backends whose kernels are compiled in (whether or not the device is present)."""
    return tuple(_META["backends"]) if _META else ()


def build_info() -> Dict[str, Any]:
    """What was compiled, against which torch, for which CUDA archs, with which flags, and which
    CPU kernel table this process uses (``cpu_capability``: ``"avx2"`` or ``"generic"``, chosen
    once from the CPU's features; ``MHGD_FAST_CPU_CAPABILITY=generic`` forces the portable one)."""
    info: Dict[str, Any] = {
        "package_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "extension_loaded": _C is not None,
        "compiled_backends": list(compiled_backends()),
    }
    if _C is None:
        info["extension_problem"] = _LOAD_PROBLEM
        return info
    info.update({f"build_{key}": value for key, value in _META.items()})
    info.update(_C.compile_info())
    info.update(_C.cpu_capability())
    return info
