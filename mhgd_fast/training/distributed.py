"""Multi-process helpers: process-group setup from ``torchrun``'s environment, the
column all-gather of ``--global-graph``, gradient averaging for hand-computed gradients, flags
that every process agrees on, and a plain-words reading of a failed collective."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "all_gather_columns", "all_reduce_grads", "is_main", "any_rank",
           "all_ranks", "broadcast_buffers", "collective_failure"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device: torch.device, timeout: Optional[float] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA); a single
    process without ``WORLD_SIZE`` runs undistributed. ``timeout`` (seconds, default torch's 30
    min) bounds every collective: a process whose peer stops responding gets an error instead
    of waiting for ever (on nccl through torch's watchdog, which ends the process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **extra)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _flag(value: bool) -> torch.Tensor:
    # nccl reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([int(value)], device=device)


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (one all-reduce of one number; no-op in
    a single process). Every process must call it at the same point."""
    if not _distributed():
        return flag
    t = _flag(flag)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every process when ``flag`` is true on all of them (see :func:`any_rank`)."""
    return not any_rank(not flag)


def broadcast_buffers(modules) -> None:
    """Give every process rank 0's buffers of ``modules`` (BN running statistics: DDP copies them
    from rank 0 only at the start of a forward pass, so after the last step each process holds
    those of its own last batch). No-op in a single process."""
    if _distributed():
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


# How gloo and nccl word a peer that went away, and a collective that ran past the timeout.
_CLOSED = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
           "connection refused")
_TIMED_OUT = ("timed out", "timeout")


def collective_failure(exc: BaseException, timeout: Optional[float] = None) -> Optional[str]:
    """When ``exc`` is a collective operation failing because another process went away or
    stopped responding, say so in plain words (``timeout``: the collective timeout in seconds,
    for the message); otherwise None. gloo raises a bare ``RuntimeError`` for both: "Connection
    closed by peer" at once when the peer's process ended (its sockets closed), "Timed out
    waiting ... for recv" after the timeout when it is alive but stuck (or its machine is gone)."""
    if not _distributed() or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if any(s in text for s in _CLOSED):
        return "another process exited or crashed (its connection closed); its own log says why"
    if any(s in text for s in _TIMED_OUT):
        limit = f"the collective timeout ({timeout:g} s, --ddp-timeout)" if timeout else "the collective timeout"
        return (f"another process did not join a collective operation within {limit}: it is stuck, "
                f"much slower than this one, or died without closing its connection")
    if isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text:
        return "a collective operation failed"
    return None


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
    if _distributed():
        flat = torch.cat([g.reshape(-1) for g in out])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        out = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in out]), out)]
    return out
