"""Test hooks that inject the failures a run must survive, read from one environment variable
when a phase starts; inert when it is unset (the tests of ``tests/test_ddp_failures.py`` set it).

``MHGD_FAST_FAULT=ACTION:RANK:PHASE:EPOCH:STEP``, several separated by ``;``. EPOCH and STEP
count as the run's messages do (epoch from 1, step from 0 within the epoch); RANK is the process
(0 in a single process). At that step, before its forward pass, that process:

- ``nan``: gets a batch of NaN images, so its losses become non-finite;
- ``exit``: ends at once with exit code 17 (``os._exit``: no clean-up, like a crash);
- ``kill``: sends itself SIGKILL;
- ``hang``: sleeps for an hour (a stuck process).
"""
from __future__ import annotations

import os
import signal
import time
from typing import List, Tuple

import torch
import torch.distributed as dist

__all__ = ["ENV", "ACTIONS", "EXIT_CODE", "Faults", "parse"]

ENV = "MHGD_FAST_FAULT"
ACTIONS = ("nan", "exit", "kill", "hang")
EXIT_CODE = 17


def parse(text: str) -> List[Tuple[str, int, str, int, int]]:
    """``[(action, rank, phase, epoch, step)]`` of a ``MHGD_FAST_FAULT`` value."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        fields = item.split(":")
        try:
            action, rank, phase, epoch, step = fields
            fault = (action, int(rank), phase, int(epoch), int(step))
        except ValueError:
            raise ValueError(f"{ENV}: expected ACTION:RANK:PHASE:EPOCH:STEP, got {item!r}") from None
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: action must be one of {ACTIONS}, got {action!r} in {item!r}")
        faults.append(fault)
    return faults


class Faults:
    """The faults of one phase on this process."""

    def __init__(self, phase: str, rank: int, faults=()):
        self.at = {(epoch, step): action for action, r, p, epoch, step in faults if r == rank and p == phase}

    @classmethod
    def from_env(cls, phase: str) -> "Faults":
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(phase, rank, parse(os.environ.get(ENV, "")))

    def before_step(self, epoch: int, step: int, x: torch.Tensor) -> torch.Tensor:
        """``x``, or what the fault at (``epoch`` counted from 0, ``step``) makes of it."""
        action = self.at.get((epoch + 1, step)) if self.at else None
        if action == "nan":
            return torch.full_like(x, float("nan"))
        if action == "exit":
            os._exit(EXIT_CODE)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "hang":
            time.sleep(3600)
        return x
