"""``mhgd-fast demo``: the whole method in a few minutes on the built-in synthetic dataset.

Small networks (a ResNet-14 teacher and a ResNet-8 student at half width, 8/16/32 channels),
few epochs; the learning rates and the rest of the recipe are the authors'.
"""
from __future__ import annotations

import time

from .config import PipelineConfig
from .stages import run_pipeline

__all__ = ["demo_config", "run_demo"]


def demo_config(run_dir: str = "runs/demo", **overrides) -> PipelineConfig:
    values = dict(run_dir=run_dir, dataset="synthetic", synthetic_train=3000, synthetic_test=1000,
                  teacher="resnet14", student="resnet8", teacher_width=0.5, student_width=0.5,
                  batch_size=64, teacher_epochs=10, student_epochs=10, stage1_epochs=2, heads=4)
    values.update(overrides)
    return PipelineConfig(**values)


def run_demo(run_dir: str = "runs/demo", **overrides) -> dict:
    """Train teacher, student alone, KD and MHGD; print the comparison; return the results."""
    start = time.perf_counter()
    out = run_pipeline(demo_config(run_dir, **overrides))
    wall = time.perf_counter() - start
    print(f"\n{out['table']}\n\nwall time {wall:.1f} s; plots, metrics.csv, train.log and results.json "
          f"in {run_dir}/")
    out["wall_seconds"] = wall
    return out
