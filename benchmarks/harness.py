"""The one timing harness of every benchmark: warm-up then timed calls, a device sync after each
call on a GPU, medians and spreads, the thread count pinned and recorded, an environment header,
and the JSON writer.

The case modules (:mod:`benchmarks.ops`, :mod:`benchmarks.compression`, :mod:`benchmarks.scaling`,
:mod:`benchmarks.diagnostics`) build the calls to time and time them here; ``mhgd-fast bench``,
``tools/gpu_check.py`` and the pytest-benchmark drivers (``benchmarks/test_bench_*.py``) use them.
Times are wall-clock milliseconds per call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Union

import torch

import mhgd_fast as mf

DEFAULT_THREADS = 2
SEED = 0

Step = Callable[[], object]
Device = Union[str, torch.device]


@dataclass(frozen=True)
class Repeats:
    warmup: int  # untimed calls first: allocator, thread pool and caches warm up
    repeat: int  # timed calls


QUICK = Repeats(warmup=1, repeat=3)
FULL = Repeats(warmup=2, repeat=7)


@contextlib.contextmanager
def threads(count: int) -> Iterator[int]:
    """torch's CPU threads set to ``count`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


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
    return round_robin({None: step}, repeats, device)[None]


def round_robin(steps: Mapping[Hashable, Step], repeats: Repeats, device: Device = "cpu") -> Dict[Hashable, List[float]]:
    """Milliseconds of each timed call of every step. The steps take turns (one call of each per
    round), so that a change in the machine's load affects them alike and their ratios hold;
    ``repeats.warmup`` untimed rounds first."""
    calls = {name: synchronized(step, device) for name, step in steps.items()}
    samples: Dict[Hashable, List[float]] = {name: [] for name in calls}
    for _ in range(repeats.warmup):
        for call in calls.values():
            call()
    for _ in range(repeats.repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def medians(samples: Mapping[Hashable, List[float]]) -> Dict[Hashable, float]:
    """The median of each step's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Spread:
    """The median and the min–max of one step's timed calls."""
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, samples: List[float]) -> "Spread":
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


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
        "mhgd_fast_version": mf.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": mf.build_info().get("cpu_capability"),
        "available_backends": mf.available_backends(),
        "warmup": repeats.warmup,
        "repeat": repeats.repeat,
        "spread": "min_ms..max_ms over the timed calls",
    }


def environment(run_header: Dict[str, object]) -> str:
    """``mhgd_fast <version>, torch <version>, <device name>`` from :func:`header`, for a caption."""
    return (f"mhgd_fast {run_header['mhgd_fast_version']}, torch {run_header['torch_version']}, "
            f"{run_header['device_name']}")


def _plain(value):
    """``value`` with dataclasses turned into dicts, for ``json``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def write_json(path: str, run_header: Dict[str, object], results) -> None:
    """``{"header": run_header, "results": results}`` to ``path``; results may hold dataclasses."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump({"header": run_header, "results": _plain(results)}, out, indent=2)
        out.write("\n")
