"""Checkpoints that resume exactly: weights, optimiser, scheduler, every RNG, position in the run.

The data order and augmentation are functions of ``(seed, epoch, step)`` (see
:class:`mhgd_fast.data.BatchLoader`), so the position ``(epoch, step)`` restores them.
"""
from __future__ import annotations

import os
import random

import torch

__all__ = ["rng_state", "set_rng_state", "save_atomic", "load"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        state["numpy"] = numpy.random.get_state()
    except ImportError:  # numpy is optional; nothing here draws from it
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(state["numpy"])


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
