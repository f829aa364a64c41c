"""Multi-process helpers: process-group setup from ``torchrun``'s environment, the
column all-gather of ``--global-graph``, and gradient averaging for hand-computed gradients."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "all_gather_columns", "all_reduce_grads", "is_main"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA); a single
    process without ``WORLD_SIZE`` runs undistributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class _GatherColumns(torch.autograd.Function):
    """All-gather along dim 1; the backward sums every process's gradient of the gathered tensor
    and keeps this process's slice. (``torch.distributed.nn.functional.all_gather`` gave wrong
    gradients on gloo here, through its all-to-all emulation; ``tests/test_ddp.py`` checks this.)"""

    @staticmethod
    def forward(ctx, k):
        parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, k.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), k.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[:, ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_columns(k: torch.Tensor) -> torch.Tensor:
    """``[H, N, d]`` local keys → ``[H, world·N, d]`` keys of every process, in rank order, with
    gradient: this process's keys get the sum of every process's gradient for them. Every
    process must pass the same N."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return k
    return _GatherColumns.apply(k)


def all_reduce_grads(grads: List[Optional[torch.Tensor]], params, average: bool) -> List[torch.Tensor]:
    """Sum (or average) per-parameter gradients over processes; a missing gradient counts as 0
    so every process joins every collective."""
    out = [torch.zeros_like(p) if g is None else g.clone() for g, p in zip(grads, params)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([g.reshape(-1) for g in out])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        out = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in out]), out)]
    return out
