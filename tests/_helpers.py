"""Helpers shared by the tests (on sys.path through pyproject's pytest `pythonpath`)."""
import torch

import mhgd_fast as mf


def backends_for(op: str):
    """Backends that can run ``op`` on tensors of their own device here."""
    return ["reference"] + [b for b in mf.available_backends() if b in mf.backends.OP_KERNELS[op]]


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
