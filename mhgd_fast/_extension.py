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


def _load():
    meta = _read_meta()
    if meta is None:
        return None, None, "not built (no _build_meta.json: install with `pip install --no-build-isolation .`)"
    built, running = meta.get("torch_version"), torch.__version__
    if built != running:
        raise ExtensionVersionError(
            f"mhgd_fast's compiled extension was built against torch {built}, but torch {running} "
            "is installed; rebuild it with `pip install --no-build-isolation --force-reinstall .` "
            "(or `make install`)."
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


def compiled_backends() -> tuple:
    """Device backends whose kernels are compiled in (whether or not the device is present)."""
    return tuple(_META["backends"]) if _META else ()


def build_info() -> Dict[str, Any]:
    """What was compiled, against which torch, for which CUDA archs, with which flags."""
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
    return info
