"""Helpers shared by the tests (on sys.path through pyproject's pytest `pythonpath`).

The op tests run as a ``backend × dtype`` matrix: a test marked ``@pytest.mark.matrix(...)``
receives ``backend`` (and ``dtype`` when the marker names dtypes) from conftest's
``pytest_generate_tests``, plus the fixtures ``device`` (the backend's device) and ``tol`` (the
dtype's row of :data:`TOLERANCES`).
"""
from typing import NamedTuple

import pytest
import torch

import mhgd_fast as mf
from mhgd_fast._extension import compiled_backends


class Tolerance(NamedTuple):
    """How far a result computed in a dtype may be from the float64 answer on the same inputs.
    ``rtol``: relative error (norm-wise, or per element where a test says so); ``atol``: largest
    absolute difference of unit-scale values (singular vectors, probabilities)."""
    rtol: float
    atol: float


# Per compute dtype. float64: rounding noise of O(n) float64 operations. float32: the kernels'
# float32 accumulation (gradients through an eigen-solve lose about three digits more than values).
# float16/bfloat16 inputs accumulate in float32, so one final rounding to 16 bits remains: ε.
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-8, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-3, atol=1e-4),
    torch.float16: Tolerance(rtol=torch.finfo(torch.float16).eps, atol=torch.finfo(torch.float16).eps),
    torch.bfloat16: Tolerance(rtol=torch.finfo(torch.bfloat16).eps, atol=torch.finfo(torch.bfloat16).eps),
}

FLOATS = (torch.float32, torch.float64)
HALVES = (torch.float16, torch.bfloat16)


def _cuda_skip_reason():
    if "cuda" in mf.available_backends():
        return None
    if "cuda" in compiled_backends():
        return "no GPU visible (the extension has CUDA kernels)"
    return "the extension was not compiled with CUDA kernels" + (
        " (a GPU is visible: rebuild with FORCE_CUDA=1)" if torch.cuda.is_available() else "")


def compiled_backend_params():
    """The compiled backends to test on: ``"cpu"`` when built, and ``"cuda"`` always, marked
    ``cuda`` and skipped (with the reason) where it cannot run, so that ``pytest -m cuda`` selects
    every CUDA case and a machine without a GPU shows them as skipped rather than not at all.
    Every op with compiled kernels has them for both devices."""
    params = []
    if "cpu" in mf.available_backends():
        params.append("cpu")
    reason = _cuda_skip_reason()
    params.append(pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(reason is not None, reason=reason or "")]))
    return params


def usable_compiled_backends():
    """The compiled backends that can run here (no skipped parameters): for module-level skips."""
    return [b for b in mf.available_backends() if b != "reference"]


def matrix_params(dtypes=None, reference=True):
    """``pytest.param``s of the ``backend × dtype`` matrix (only backends when ``dtypes`` is None):
    the reference (unless ``reference=False``), then :func:`compiled_backend_params`; each with
    that backend's marks."""
    backends = (["reference"] if reference else []) + compiled_backend_params()
    params = []
    for entry in backends:
        backend, marks = (entry, ()) if isinstance(entry, str) else (entry.values[0], entry.marks)
        if dtypes is None:
            params.append(pytest.param(backend, marks=marks, id=backend))
        else:
            params.extend(pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype).split('.')[-1]}")
                          for dtype in dtypes)
    return params


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
