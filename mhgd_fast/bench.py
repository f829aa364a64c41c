"""Benchmark cases and timing harness, shared by ``mhgd-fast bench`` and ``benchmarks/`` (pytest-benchmark).

Cases: ``graph_kl`` at H=8, N=M=128, d ∈ {96, 192}; ``topk_singular_vectors`` at B=128 on the three
ResNet8 stage maps, k ∈ {1, 4}. Each is timed forward only (``"fwd"``, under ``torch.no_grad``) and
forward + backward of a scalar loss (``"fwd+bwd"``), on every backend that can run the op on the
chosen device, so compiled kernels are picked up as soon as ``OP_KERNELS`` lists them.
Times are wall-clock milliseconds per call: the median and the min–max over the timed calls.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from . import __version__, ops
from .backends import OP_KERNELS, available_backends

OPS = ("graph_kl", "topk_singular_vectors")
MODES = ("fwd", "fwd+bwd")
DEFAULT_THREADS = 2
SEED = 0

GRAPH_KL_HEADS = 8
GRAPH_KL_ROWS = 128  # N = M = the batch size B: one graph node per sample
GRAPH_KL_DIMS = (96, 192)
TOPK_BATCH = 128
TOPK_MAPS = ((64, 32, 32), (128, 16, 16), (256, 8, 8))  # (C, H, W) of ResNet8's stages on CIFAR
TOPK_KS = (1, 4)  # teacher keeps 1 vector, student 4 (MHGD_SPEC.md §3)

Step = Callable[[], None]
Device = Union[str, torch.device]


@dataclass(frozen=True)
class Repeats:
    warmup: int  # untimed calls first: allocator, thread pool and caches warm up
    repeat: int  # timed calls


QUICK = Repeats(warmup=1, repeat=3)
FULL = Repeats(warmup=2, repeat=7)


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
    backend once ``OP_KERNELS`` lists a kernel for ``op``."""
    device_type = torch.device(device).type
    return [backend for backend in available_backends()
            if backend == "reference" or (backend == device_type and backend in OP_KERNELS[op])]


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


def synchronized(step: Step, device: Device) -> Step:
    """``step``, then a device sync on CUDA, so that a timer around it sees the kernels finish."""
    if torch.device(device).type != "cuda":
        return step

    def step_then_sync():
        step()
        torch.cuda.synchronize(device)
    return step_then_sync


def time_step(step: Step, device: Device, repeats: Repeats) -> List[float]:
    """Milliseconds taken by each of ``repeats.repeat`` calls of ``step``, after the warm-up calls."""
    call = synchronized(step, device)
    for _ in range(repeats.warmup):
        call()
    samples = []
    for _ in range(repeats.repeat):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


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
    samples = time_step(job.make_step(), job.device, repeats)
    return Result(op=job.case.op, case=job.case.shape, mode=job.mode, backend=job.backend,
                  device=job.device, median_ms=statistics.median(samples), min_ms=min(samples),
                  max_ms=max(samples), repeats=len(samples), threads=torch.get_num_threads())


def cpu_model() -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` reports, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def header(device: Device, repeats: Repeats) -> Dict[str, object]:
    """Where and how the results were measured; call it after setting the thread count."""
    device = torch.device(device)
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mhgd_fast_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "available_backends": available_backends(),
        "warmup": repeats.warmup,
        "repeat": repeats.repeat,
        "spread": "min_ms..max_ms over the timed calls",
    }


def caption(run_header: Dict[str, object]) -> str:
    """One line saying what the table was measured on, to print above it."""
    return (f"mhgd_fast {run_header['mhgd_fast_version']}, torch {run_header['torch_version']}, "
            f"{run_header['device_name']}, {run_header['threads']} threads, {run_header['timestamp']}: "
            f"median and min–max of {run_header['repeat']} timed calls after "
            f"{run_header['warmup']} warm-up, in ms.")


def format_markdown(results: Sequence[Result]) -> str:
    """The results as a Markdown table (for the README)."""
    lines = ["| op | case | mode | backend | device | median ms | min–max ms | repeats | threads |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.op} | {r.case} | {r.mode} | {r.backend} | {r.device} | {r.median_ms:.2f} "
              f"| {r.min_ms:.2f}–{r.max_ms:.2f} | {r.repeats} | {r.threads} |" for r in results]
    return "\n".join(lines)


def write_json(path: str, run_header: Dict[str, object], results: Sequence[Result]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump({"header": run_header, "results": [asdict(r) for r in results]}, out, indent=2)
        out.write("\n")
