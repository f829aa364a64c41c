"""The pipeline's configuration. Defaults are the authors' (docs/method.md §5–§6): ResNet32x4 →
ResNet8x4 on CIFAR-100, batch 128, stage 1 for 40 epochs at lr 0.1, stage 2 for 100 epochs at
lr 0.1 × 0.1 at 30/60/80 %, SGD Nesterov 0.9, weight decay 5e-4, 8 heads, 4 student vectors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import math
from typing import List, Optional, Union

__all__ = ["PipelineConfig", "METHODS", "AMP_CHOICES", "LATER_FIELDS", "parse_scale"]

METHODS = ("student", "kd", "mhgd")  # comparable students, trained on one pipeline and one dataset
AMP_CHOICES = ("off", "bf16", "fp16")
# Fields added after run folders existed, with the value a folder written before them ran with:
# a config.json or results.json without the field is read as having this value.
LATER_FIELDS = {"amp": "off", "tensorboard": False}


@dataclass
class PipelineConfig:
    run_dir: str = "runs/mhgd"
    dataset: str = "cifar100"          # cifar10 | cifar100 | synthetic
    data_dir: str = "data"
    synthetic_train: int = 10000
    synthetic_test: int = 2000
    data_seed: Optional[int] = None    # seed of the synthetic images and of the validation split (None: seed)
    val_split: float = 0.0             # share of the training set held out for validation (never trained on)
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    teacher_width: float = 1.0
    student_width: float = 1.0
    teacher_checkpoint: Optional[str] = None   # load instead of training the teacher
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 128
    eval_batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr: float = 0.1
    milestones: List[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])  # fractions of the epochs
    lr_decay: float = 0.1
    teacher_epochs: int = 200
    student_epochs: int = 100        # stage 2 and the baselines
    stage1_epochs: int = 40
    stage1_lr: float = 0.1
    heads: int = 8
    student_vectors: int = 4
    global_graph: bool = False
    balance: bool = True             # §6 gradient balancing; off: plain CE + transfer_weight · transfer
    transfer_cap: float = 1.0        # balancing clips g_transfer to transfer_cap · ‖g_ce‖ · σ(·) (authors: 1)
    transfer_weight: float = 1.0     # multiplies the transfer loss (what counts without balancing)
    scale: Union[float, str] = 1.0   # logit scale: a number (authors: 1) or "rsqrt-d" (1/√d per pair)
    squash: str = "tanh"             # stage-2 logit squashing: tanh (authors) or none
    diag_every: int = 10             # stage-2 diagnostics every this many steps (0: off)
    kd_temperature: float = 4.0
    kd_ce_weight: float = 1.0
    kd_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    ddp_timeout: float = 600.0       # seconds a collective waits for the other processes before failing
    backend: str = "auto"
    amp: str = "off"                 # mixed precision of the networks' forward: off | bf16 | fp16 (see precision.py)
    tensorboard: bool = False        # also write metrics.csv's scalars as TensorBoard events (optional package)
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {unknown}")
        return cls(**values)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:  # an empty list trains (or loads) the teacher only
            raise ValueError(f"methods must be a subset of {METHODS}, got {self.methods}")
        if self.dataset not in ("cifar10", "cifar100", "synthetic"):
            raise ValueError(f"dataset must be cifar10, cifar100 or synthetic, got {self.dataset!r}")
        for name in ("batch_size", "eval_batch_size", "heads", "student_vectors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("teacher_epochs", "student_epochs", "stage1_epochs", "diag_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("transfer_cap", "transfer_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if isinstance(self.ddp_timeout, bool) or not (isinstance(self.ddp_timeout, (int, float))
                                                      and math.isfinite(self.ddp_timeout) and self.ddp_timeout > 0):
            raise ValueError(f"ddp_timeout must be a finite number of seconds > 0, got {self.ddp_timeout!r}")
        if not 0 <= self.val_split < 1:
            raise ValueError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.squash not in ("tanh", "none"):
            raise ValueError(f"squash must be 'tanh' or 'none', got {self.squash!r}")
        self.scale = parse_scale(self.scale)

    @property
    def effective_data_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


def parse_scale(value) -> Union[float, str]:
    """A logit scale: a finite number, or ``"rsqrt-d"`` (1/√d per pair)."""
    if value == "rsqrt-d":
        return value
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number or 'rsqrt-d', got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 or 'rsqrt-d', got {value!r}")
    return scale
