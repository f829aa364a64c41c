"""Backend names and how ``backend=`` resolves for each op (MHGD_SPEC.md §8).

``"reference"`` (pure PyTorch) is always present. ``"cpu"`` and ``"cuda"`` are the compiled
kernels of the extension; an op uses them only where this table says it has a kernel.
"""
from __future__ import annotations

from typing import List

import torch

from ._extension import compiled_backends

# Ops with compiled kernels, and the devices they are compiled for; an op runs on the reference
# backend wherever its tuple lacks the device.
OP_KERNELS = {
    "attention_graph": ("cpu", "cuda"),
    "graph_kl": ("cpu", "cuda"),
    "topk_singular_vectors": ("cpu", "cuda"),
}

DEVICE_BACKENDS = ("cpu", "cuda")


class BackendUnavailableError(ValueError, RuntimeError):
    """A backend was named that is unknown, not compiled, or has no kernel for this op."""


def available_backends() -> List[str]:
    """Usable backends: ``"reference"``, ``"cpu"`` when compiled, ``"cuda"`` when compiled and a
    GPU is visible."""
    usable = ["reference"]
    compiled = compiled_backends()
    if "cpu" in compiled:
        usable.append("cpu")
    if "cuda" in compiled and torch.cuda.is_available():
        usable.append("cuda")
    return usable


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` on tensors living on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    kernels = OP_KERNELS[op]
    if backend == "auto":
        if device.type in kernels and device.type in available_backends():
            return device.type
        return "reference"
    if backend == "reference":
        return backend
    if backend not in DEVICE_BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {backend!r}; expected 'auto', 'reference', 'cpu' or 'cuda'")
    if backend not in available_backends():
        raise BackendUnavailableError(
            f"backend {backend!r} is not available here (available: {available_backends()}); "
            + ("no GPU is visible" if backend in compiled_backends() else
               "the extension was not compiled with it"))
    if backend not in kernels:
        raise BackendUnavailableError(
            f"{op} has no {backend!r} kernel; use backend='reference' or 'auto'")
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
    return backend
