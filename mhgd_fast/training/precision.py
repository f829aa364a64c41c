"""Mixed precision of the pipeline (``--amp``): autocast for the networks' forward, and for
float16 a loss scaler whose skipped steps (inf/NaN gradients) are counted, not treated as a failure.

* ``off``: float32 throughout (the default).
* ``bf16``: the teacher's and student's forward under ``torch.autocast(dtype=torch.bfloat16)``;
  bfloat16 has float32's range, so no loss scaling. Works on the CPU.
* ``fp16``: autocast to float16 and a ``torch.amp.GradScaler``: the losses are multiplied by the
  scale before backward, the optimiser step is skipped (and the scale halved) when a gradient is
  inf/NaN. Stage 2's gradient balancing clips the *unscaled* gradients (see
  :func:`mhgd_fast.balanced_backward`'s ``grad_scale``), so its clip is the float32 one.

Weights, optimiser state and the MHGD graph network stay float32: the graph ops receive the
student's and teacher's low-precision feature maps, accumulate in float32, and the graph network
itself runs outside autocast (:class:`mhgd_fast.MHGD`).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["AMP_MODES", "Precision"]

AMP_MODES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The autocast context and, for ``fp16``, the loss scaler of one run on ``device``."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in AMP_MODES:
            raise ValueError(f"amp must be one of {tuple(AMP_MODES)}, got {mode!r}")
        self.mode, self.device_type, self.dtype = mode, torch.device(device).type, AMP_MODES[mode]
        self.scaler: Optional[torch.amp.GradScaler] = (torch.amp.GradScaler(self.device_type)
                                                       if mode == "fp16" else None)
        self.skipped = 0  # optimiser steps skipped by the scaler since the last take_skipped()

    def autocast(self):
        """Context for a forward pass: autocast to the run's dtype, or nothing when ``off``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale (unchanged without a scaler)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def grad_scale(self) -> Optional[float]:
        """The factor :meth:`scale` multiplies by, or None without a scaler."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the step from the (scaled) gradients in ``.grad``; return False when the scaler
        skipped it because a gradient was inf/NaN (it then lowers the scale for the next step)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscales, checks every gradient, steps only if all are finite
        self.scaler.update()
        applied = not self.scaler.get_scale() < before  # the scale only drops after an inf/NaN
        self.skipped += not applied
        return applied

    def take_skipped(self) -> int:
        """Steps skipped since the last call (for the epoch's metrics row)."""
        count, self.skipped = self.skipped, 0
        return count

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
