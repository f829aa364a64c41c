"""Built-in configurations of the pipeline, shared by ``demo``, ``train`` and ``study``.

Each setting lists only what differs from :class:`PipelineConfig`, whose defaults are the authors'
recipe. The recipe itself (8 heads, 4 student vectors, tanh, scale 1, cap 1, lr 0.1, SGD Nesterov,
milestones at 30/60/80 %) is never changed by a setting; the sizes are, by these rules, fixed
before any result was looked at:

* stage 1 : stage 2 epochs = 40 : 100, the authors' ratio;
* the teacher trains as many epochs as the students;
* 10 % of the training images are held out for validation (model choices and the stage-1 held-out
  loss; the test split is only reported);
* sizes chosen from a measured epoch time so that the demo runs in under 5 minutes and each
  setting's whole study (5 seeds, the recipe and its ablations) in about an hour on 2 cores.
"""
from __future__ import annotations

from .config import PipelineConfig

__all__ = ["SETTINGS", "study_config", "setting_config"]

SETTINGS = {
    "authors": {
        "about": "CIFAR-100 from --data-dir, resnet32x4 → resnet8x4, 240 + 40 + 100 epochs (the paper's)",
        "values": {},
    },
    "demo": {
        "about": "built-in synthetic data (3000 images), resnet14 → resnet8 at half width (8/16/32 channels), "
                 "batch 64, 10 teacher epochs, stage 1 : stage 2 = 4 : 10",
        "values": dict(dataset="synthetic", synthetic_train=3000, synthetic_test=1000, teacher="resnet14",
                       student="resnet8", teacher_width=0.5, student_width=0.5, batch_size=64,
                       teacher_epochs=10, student_epochs=10, stage1_epochs=4),
    },
    "wide": {
        "about": "built-in synthetic data (1500 images), resnet14 → resnet8 at full width (16/32/64 channels), "
                 "batch 64, 20 teacher epochs, stage 1 : stage 2 = 8 : 20",
        "values": dict(dataset="synthetic", synthetic_train=1500, synthetic_test=1000, teacher="resnet14",
                       student="resnet8", teacher_width=1.0, student_width=1.0, batch_size=64,
                       teacher_epochs=20, student_epochs=20, stage1_epochs=8),
    },
}

STUDY_DEFAULTS = dict(val_split=0.1, data_seed=0)  # one dataset and split for every seed of a study


def setting_config(setting: str, **overrides) -> PipelineConfig:
    """The built-in ``setting``, with a 10 % validation split, and ``overrides`` on top."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}")
    return PipelineConfig(**{"val_split": 0.1, **SETTINGS[setting]["values"], **overrides})


def study_config(setting: str, **overrides) -> PipelineConfig:
    """Base configuration of a study: ``setting`` with one dataset and split for all seeds."""
    return setting_config(setting, **{**STUDY_DEFAULTS, **overrides})
