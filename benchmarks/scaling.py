"""The graph-KL scaling benchmark (``mhgd-fast bench --suite graph_kl_scaling``, ``tools/gpu_check.py``,
``benchmarks/test_bench_graph_kl_scaling.py``): graph_kl at growing batch sizes, the fused kernel
against the eager reference and against ``torch.compile`` of the reference, forward+backward, time
(:mod:`benchmarks.harness`) and extra peak memory.

On the CPU every (implementation, B) is measured in a fresh subprocess: the peak memory is the
process's peak resident set during the timed calls minus its resident set just before them (Linux
``/proc/self/clear_refs`` resets the peak), so compilation, imports and other cases never count.
On a GPU (``device="cuda"``, as ``tools/gpu_check.py`` runs it) it is the peak of torch's CUDA
allocator during the timed calls minus what was allocated before them, so one process serves.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch

import mhgd_fast as mf

from . import harness

HEADS, DIM = 8, 96
BATCHES = (128, 1024, 4096)
FUSED_ONLY_BATCHES = (16384,)
IMPLEMENTATIONS = ("fused", "eager", "compiled")


@dataclass(frozen=True)
class ScalingResult:
    impl: str
    batch: int
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    extra_peak_mib: float
    gemm_gflop: float  # the four B²·d products per head that any exact method needs
    threads: int


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def loss_fn(impl: str, device: str = "cpu", compile_backend: str = "inductor"):
    """The loss of ``impl``: the fused op on ``device``'s compiled backend, the eager reference, or
    the reference through ``torch.compile(backend=compile_backend)``."""
    if impl == "fused":
        return lambda *t: mf.ops.graph_kl(*t, backend=torch.device(device).type)
    eager = lambda *t: mf.reference.graph_kl(*t, "tanh", 1.0, "student_teacher", "sum")  # noqa: E731
    return eager if impl == "eager" else torch.compile(eager, fullgraph=True, backend=compile_backend)


def make_step(impl: str, batch: int, device: str = "cpu", compile_backend: str = "inductor") -> Callable[[], None]:
    """One fwd+bwd call of ``impl`` at H=HEADS, N=M=``batch``, d=DIM (seeded inputs, the student's
    two tensors trained)."""
    gen = torch.Generator().manual_seed(harness.SEED)
    inputs = [(torch.randn(HEADS, batch, DIM, generator=gen) / DIM ** 0.25).to(device) for _ in range(4)]
    for t in inputs[:2]:
        t.requires_grad_()
    loss = loss_fn(impl, device, compile_backend)

    def step():
        for t in inputs[:2]:
            t.grad = None
        loss(*inputs).backward()
    return step


def warmup_calls(batch: int) -> int:
    """Untimed calls first (the first also compiles): many for millisecond-sized cases, whose first
    calls still pay for thread-pool and allocator warm-up."""
    return 10 if batch <= 1024 else 1


def measure_in_this_process(impl: str, batch: int, repeats: int, threads: int, device: str = "cpu",
                            compile_backend: str = "inductor") -> ScalingResult:
    """Times ``repeats`` fwd+bwd calls after :func:`warmup_calls` untimed ones, on ``device``."""
    torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    step = make_step(impl, batch, device, compile_backend)
    harness.time_step(step, device, harness.Repeats(warmup=warmup_calls(batch), repeat=0))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
    else:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # peak RSS := current RSS
        before = _rss_kib("VmRSS") / 1024
    spread = harness.Spread.of(harness.time_step(step, device, harness.Repeats(warmup=0, repeat=repeats)))
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else _rss_kib("VmHWM") / 1024
    return ScalingResult(impl, batch, spread.median_ms, spread.min_ms, spread.max_ms, spread.repeats,
                         peak - before, 4 * 2 * HEADS * batch * batch * DIM / 1e9, torch.get_num_threads())


def _import_path() -> str:
    """PYTHONPATH for a fresh interpreter that imports the same ``mhgd_fast`` and ``benchmarks`` as
    this one (a source checkout or an installed copy) whatever its working directory."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(module.__file__))) for module in (mf, harness)]
    return os.pathsep.join(dict.fromkeys(roots + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def measure(impl: str, batch: int, repeats: int, threads: int) -> ScalingResult:
    """:func:`measure_in_this_process` in a fresh interpreter."""
    code = ("import json, sys; from dataclasses import asdict; from benchmarks import scaling as s; "
            f"print(json.dumps(asdict(s.measure_in_this_process({impl!r}, {batch}, {repeats}, {threads}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.sep,
                          env=dict(os.environ, PYTHONPATH=_import_path()))
    if done.returncode != 0:
        raise RuntimeError(f"{impl} B={batch} failed:\n{done.stderr}")
    return ScalingResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def run(quick: bool, threads: int, progress: Callable[[Iterable[tuple]], Iterable[tuple]] = iter
        ) -> List[ScalingResult]:
    """Every case of :func:`plan`, each in a fresh interpreter; ``progress`` wraps the case list."""
    return [measure(impl, batch, count, threads) for impl, batch, count in progress(plan(quick))]


def plan(quick: bool) -> List[tuple]:
    """(impl, batch, repeats) in run order; the largest sizes get fewer repeats."""
    jobs = []
    for batch in BATCHES:
        repeats = 3 if quick or batch >= 4096 else 50 if batch <= 128 else 7
        jobs += [(impl, batch, repeats) for impl in IMPLEMENTATIONS]
    jobs += [("fused", batch, 1 if quick else 3) for batch in FUSED_ONLY_BATCHES]
    return jobs


def format_markdown(results: Sequence[ScalingResult]) -> str:
    """The table, with each implementation's speed-up of the fused op at the same B."""
    by_key = {(r.impl, r.batch): r for r in results}
    lines = ["| B | impl | median ms | min–max ms | GEMM GFLOP/s | fused speed-up | extra peak MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        fused: Optional[ScalingResult] = by_key.get(("fused", r.batch))
        speedup = f"{r.median_ms / fused.median_ms:.2f}×" if fused and r.impl != "fused" else "—"
        lines.append(f"| {r.batch} | {r.impl} | {r.median_ms:.1f} | {r.min_ms:.1f}–{r.max_ms:.1f} "
                     f"| {r.gemm_gflop / (r.median_ms / 1e3):.1f} | {speedup} | {r.extra_peak_mib:.1f} |")
    return "\n".join(lines)
