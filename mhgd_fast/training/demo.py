"""``mhgd-fast demo``: the whole method in a few minutes on the built-in synthetic dataset.

The configuration is the ``demo`` setting of :mod:`mhgd_fast.training.settings`, chosen by rules
fixed before its result was seen: the authors' recipe unchanged (8 heads, 4 student vectors,
tanh, scale 1, balancing cap 1, their learning rates and schedule shape); stage 1 : stage 2 epochs
= 40 : 100 (4 : 10); a ResNet-14 teacher and a ResNet-8 student at half width (8/16/32 channels)
on 3000 synthetic images, 10 % held out for validation; sized from a measured epoch time to run
in under 5 minutes on 2 cores. It reports whatever comes out; ``mhgd-fast study --setting demo``
runs the same configuration over seeds, which is what a claim about the method needs.
"""
from __future__ import annotations

import time

from .config import PipelineConfig
from .settings import setting_config
from .stages import run_pipeline

__all__ = ["demo_config", "run_demo"]


def demo_config(run_dir: str = "runs/demo", **overrides) -> PipelineConfig:
    return setting_config("demo", run_dir=run_dir, **overrides)


def run_demo(run_dir: str = "runs/demo", **overrides) -> dict:
    """Train teacher, student alone, KD and MHGD; print the comparison; return the results."""
    start = time.perf_counter()
    out = run_pipeline(demo_config(run_dir, **overrides))
    wall = time.perf_counter() - start
    print(f"\n{out['table']}\n\nwall time {wall:.1f} s; plots, metrics.csv, train.log and results.json "
          f"in {run_dir}/")
    out["wall_seconds"] = wall
    return out
