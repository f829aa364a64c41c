"""Helpers shared by the tests (on sys.path through pyproject's pytest `pythonpath`)."""
import pytest
import torch

import mhgd_fast as mf
from mhgd_fast._extension import compiled_backends


def _cuda_skip_reason():
    if "cuda" in mf.available_backends():
        return None
    if "cuda" in compiled_backends():
        return "no GPU visible (the extension has CUDA kernels)"
    return "the extension was not compiled with CUDA kernels" + (
        " (a GPU is visible: rebuild with FORCE_CUDA=1)" if torch.cuda.is_available() else "")


def compiled_backends_for(op: str):
    """The compiled backends to test ``op`` on: ``"cpu"`` when built and ``OP_KERNELS`` lists it,
    and ``"cuda"`` whenever ``OP_KERNELS`` lists it, marked ``cuda`` and skipped (with the reason)
    where it cannot run, so that ``pytest -m cuda`` selects every CUDA case and a machine without a
    GPU shows them as skipped rather than not at all."""
    params = []
    kernels = mf.backends.OP_KERNELS[op]
    if "cpu" in kernels and "cpu" in mf.available_backends():
        params.append("cpu")
    if "cuda" in kernels:
        reason = _cuda_skip_reason()
        params.append(pytest.param("cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(reason is not None, reason=reason or "")]))
    return params


def backends_for(op: str):
    """Backends that run ``op`` (tensors on the backend's own device, see :func:`device_of`):
    the reference, then :func:`compiled_backends_for`."""
    return ["reference"] + compiled_backends_for(op)


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
