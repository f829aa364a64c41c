"""The op benchmark: ``mhgd-fast bench`` (the default suite) and ``benchmarks/test_bench_ops.py``.

Cases: ``graph_kl`` at H=8, N=M=128, d ∈ {96, 192}; ``topk_singular_vectors`` at B=128 on the three
ResNet8 stage maps, k ∈ {1, 4}. Each is timed forward only (``"fwd"``, under ``torch.no_grad``) and
forward + backward of a scalar loss (``"fwd+bwd"``), on every backend that can run the op on the
chosen device: the reference, and the device's compiled backend where it is available (every op
timed here has cpu and cuda kernels). Timing is :mod:`benchmarks.harness`'s: the median and the
min–max over the timed calls, in ms.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from mhgd_fast import available_backends, ops

from . import harness
from .harness import SEED, Device, Repeats, Step

OPS = ("graph_kl", "topk_singular_vectors")
MODES = ("fwd", "fwd+bwd")
GRAPH_KL_HEADS = 8
GRAPH_KL_ROWS = 128  # N = M = the batch size B: one graph node per sample
GRAPH_KL_DIMS = (96, 192)
TOPK_BATCH = 128
TOPK_MAPS = ((64, 32, 32), (128, 16, 16), (256, 8, 8))  # (C, H, W) of ResNet8's stages on CIFAR
TOPK_KS = (1, 4)  # teacher keeps 1 vector, student 4 (docs/method.md §3)


def _step(mode: str, forward: Callable[[], torch.Tensor],
          loss: Callable[[torch.Tensor], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Step:
    """One call to time: ``forward()`` under no_grad ("fwd"), or ``loss(forward()).backward()``."""
    if mode == "fwd":
        def forward_only():
            with torch.no_grad():
                forward()
        return forward_only
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None  # each call starts from empty grads, as after zero_grad(set_to_none=True)
        loss(forward()).backward()
    return forward_backward


def _graph_kl_step(mode: str, backend: str, device: torch.device, *, heads: int, rows: int,
                   dim: int) -> Step:
    generator = torch.Generator().manual_seed(SEED)

    def per_head(requires_grad: bool) -> torch.Tensor:
        return torch.randn(heads, rows, dim, generator=generator).to(device).requires_grad_(requires_grad)

    q_s, k_s = per_head(True), per_head(True)  # the student is trained
    q_t, k_t = per_head(False), per_head(False)  # the teacher is frozen
    forward = functools.partial(ops.graph_kl, q_s, k_s, q_t, k_t, backend=backend)
    return _step(mode, forward, loss=lambda kl: kl, leaves=(q_s, k_s))


def _topk_step(mode: str, backend: str, device: torch.device, *, batch: int, channels: int,
               height: int, width: int, k: int) -> Step:
    generator = torch.Generator().manual_seed(SEED)
    # Post-ReLU maps, like the real sensing points: non-negative, with a dominant top vector.
    fm = torch.relu(torch.randn(batch, channels, height, width, generator=generator))
    fm = fm.to(device).requires_grad_()
    # A fixed random readout, so that every output vector receives a gradient.
    weights = torch.randn(batch, k, channels, generator=generator).to(device)
    forward = functools.partial(ops.topk_singular_vectors, fm, k, backend=backend)
    return _step(mode, forward, loss=lambda vectors: (vectors * weights).sum(), leaves=(fm,))


@dataclass(frozen=True)
class Case:
    """One input configuration of one op."""
    op: str
    shape: str  # e.g. "H8-N128-M128-d96": the table's case column and part of the pytest id
    make_step: Callable[[str, str, torch.device], Step]  # (mode, backend, device) -> call to time


def cases(op_names: Sequence[str] = OPS) -> List[Case]:
    """The benchmark cases of ``op_names``, in a fixed order."""
    unknown = sorted(set(op_names) - set(OPS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; expected some of {list(OPS)}")
    graph_kl_cases = [
        Case("graph_kl", f"H{GRAPH_KL_HEADS}-N{GRAPH_KL_ROWS}-M{GRAPH_KL_ROWS}-d{dim}",
             functools.partial(_graph_kl_step, heads=GRAPH_KL_HEADS, rows=GRAPH_KL_ROWS, dim=dim))
        for dim in GRAPH_KL_DIMS
    ]
    topk_cases = [
        Case("topk_singular_vectors", f"B{TOPK_BATCH}-C{channels}-{height}x{width}-k{k}",
             functools.partial(_topk_step, batch=TOPK_BATCH, channels=channels, height=height,
                               width=width, k=k))
        for channels, height, width in TOPK_MAPS for k in TOPK_KS
    ]
    return [case for case in graph_kl_cases + topk_cases if case.op in op_names]


def runnable_backends(op: str, device: Device) -> List[str]:
    """Backends that can run ``op`` on ``device``: the reference, plus the device's compiled
    backend when it is available here."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")
    device_type = torch.device(device).type
    return [backend for backend in available_backends() if backend in ("reference", device_type)]


@dataclass(frozen=True)
class Job:
    """One case, timed in one mode on one backend."""
    case: Case
    mode: str
    backend: str
    device: str

    @property
    def id(self) -> str:
        return f"{self.case.op}-{self.case.shape}-{self.mode}-{self.device}-{self.backend}"

    def make_step(self) -> Step:
        return self.case.make_step(self.mode, self.backend, torch.device(self.device))


def plan(op_names: Sequence[str] = OPS, backends: Optional[Sequence[str]] = None,
         device: str = "cpu") -> List[Job]:
    """Every job to run, backends side by side per case and mode; ``backends=None`` means all
    runnable ones, otherwise the runnable ones among ``backends``."""
    return [Job(case, mode, backend, device)
            for case in cases(op_names)
            for mode in MODES
            for backend in runnable_backends(case.op, device)
            if backends is None or backend in backends]


@dataclass(frozen=True)
class Result:
    op: str
    case: str
    mode: str
    backend: str
    device: str
    median_ms: float
    min_ms: float  # min_ms..max_ms is the spread over the timed calls
    max_ms: float
    repeats: int
    threads: int


def measure(job: Job, repeats: Repeats) -> Result:
    spread = harness.Spread.of(harness.time_step(job.make_step(), job.device, repeats))
    return Result(op=job.case.op, case=job.case.shape, mode=job.mode, backend=job.backend,
                  device=job.device, median_ms=spread.median_ms, min_ms=spread.min_ms,
                  max_ms=spread.max_ms, repeats=spread.repeats, threads=torch.get_num_threads())


def run(jobs: Sequence[Job], repeats: Repeats, progress: Callable[[Iterable[Job]], Iterable[Job]] = iter
        ) -> List[Result]:
    """Every job measured in turn; ``progress`` wraps the job list (e.g. a tqdm bar)."""
    return [measure(job, repeats) for job in progress(jobs)]


def caption(run_header: Dict[str, object]) -> str:
    """One line saying what the table was measured on, to print above it."""
    return (f"{harness.environment(run_header)}, {run_header['threads']} threads, {run_header['timestamp']}: "
            f"median and min–max of {run_header['repeat']} timed calls after "
            f"{run_header['warmup']} warm-up, in ms.")


def format_markdown(results: Sequence[Result]) -> str:
    """The results as a Markdown table (for the README)."""
    lines = ["| op | case | mode | backend | device | median ms | min–max ms | repeats | threads |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.op} | {r.case} | {r.mode} | {r.backend} | {r.device} | {r.median_ms:.2f} "
              f"| {r.min_ms:.2f}–{r.max_ms:.2f} | {r.repeats} | {r.threads} |" for r in results]
    return "\n".join(lines)
