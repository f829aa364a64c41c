"""Backend names, which of them this process can use, and how ``backend=`` resolves (README.md, "The ops on their own").

``"reference"`` (pure PyTorch) is always usable. ``"cpu"`` and ``"cuda"`` are the compiled kernels
of the extension: ``"cpu"`` is usable when the extension was built with it, ``"cuda"`` when it was
built with it and torch sees a GPU. The build is read once, at import; the GPU's presence once, at
first need.

Every op with compiled kernels has them for both devices, so there is no table of ops and devices
here. What the loaded extension registered is read from the dispatcher once, at import (the
``TORCH_LIBRARY_IMPL`` blocks in ``csrc/`` are the one statement of it), so that a build from other
sources that lacks an op is named as such, and ``"auto"`` runs the reference for that op.
``align_singular_vectors`` has no compiled kernel at all and never comes here (see its wrapper in
``ops.py``).
"""
from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from . import _extension

DEVICE_BACKENDS = ("cpu", "cuda")

# The dispatch key under which each device backend's kernels are registered.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


class BackendUnavailableError(ValueError, RuntimeError):
    """A backend was named that is unknown, not compiled, or has no kernel for this op."""


def _registered_kernels(compiled: Tuple[str, ...]) -> Dict[str, FrozenSet[str]]:
    """Per compiled device backend, the names of the ``mhgd_fast::`` ops that have a kernel under
    its dispatch key (``"graph_kl"``, ...). Reads the dispatcher only: no device is touched."""
    if _extension._C is None:
        return {}
    kernels = {}
    for backend in compiled:
        if backend in _DISPATCH_KEYS:
            names = torch._C._dispatch_get_registrations_for_dispatch_key(_DISPATCH_KEYS[backend])
            kernels[backend] = frozenset(name.split("::", 1)[1] for name in names
                                         if name.startswith("mhgd_fast::"))
    return kernels


# What the extension brings, read once at import (`_refresh()` reads it again).
_COMPILED: Tuple[str, ...] = ()
_KERNELS: Dict[str, FrozenSet[str]] = {}
# The usable backends, worked out once, on first need: with a CUDA build that asks
# `torch.cuda.is_available()`, which initialises the CUDA driver, and a process that has done so
# cannot use CUDA in a forked child, so importing the package does not ask it.
_USABLE: Optional[Tuple[str, ...]] = None


def _refresh() -> None:
    """Forget what import read and read it again: the extension's compiled backends, the kernels
    it registered, and (on next use) whether a GPU is visible.

    Call it only after changing what these read (``_extension._C`` / ``_META``, or what
    ``torch.cuda.is_available()`` answers), as a test simulating another machine does; undo the
    change and call it again afterwards."""
    global _COMPILED, _KERNELS, _USABLE
    _COMPILED = _extension.compiled_backends()
    _KERNELS = _registered_kernels(_COMPILED)
    _USABLE = None


_refresh()


def _usable() -> Tuple[str, ...]:
    global _USABLE
    if _USABLE is None:
        usable = ["reference"] + [b for b in DEVICE_BACKENDS if b in _COMPILED]
        if "cuda" in usable and not torch.cuda.is_available():
            usable.remove("cuda")
        _USABLE = tuple(usable)
    return _USABLE


def available_backends() -> List[str]:
    """Usable backends: ``"reference"``, ``"cpu"`` when compiled, ``"cuda"`` when compiled and a
    GPU is visible (a new list on every call)."""
    return list(_usable())


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs the compiled op ``op`` (``"graph_kl"``, ...) on tensors living on
    ``device``: ``"reference"``, ``"cpu"`` or ``"cuda"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        # Tensors on a device prove it is present: only the kernel's registration matters.
        return device.type if op in _KERNELS.get(device.type, ()) else "reference"
    if backend == "reference":
        return backend
    if backend not in DEVICE_BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; expected 'auto', 'reference', 'cpu' or 'cuda'")
    usable = _usable()
    if backend not in usable:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available here (available: {list(usable)}); "
            + ("no GPU is visible" if backend in _COMPILED else "the extension was not compiled with it"))
    if op not in _KERNELS[backend]:
        raise BackendUnavailableError(
            f"{op} has no {backend!r} kernel in this build of the extension (rebuild it from these "
            "sources); use backend='reference' or 'auto'")
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    return backend
