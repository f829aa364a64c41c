"""The pipeline's configuration. Defaults are the authors' (MHGD_SPEC.md §5–§6): ResNet32x4 →
ResNet8x4 on CIFAR-100, batch 128, stage 1 for 40 epochs at lr 0.1, stage 2 for 100 epochs at
lr 0.1 × 0.1 at 30/60/80 %, SGD Nesterov 0.9, weight decay 5e-4, 8 heads, 4 student vectors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

__all__ = ["PipelineConfig", "METHODS"]

METHODS = ("student", "kd", "mhgd")  # comparable students, trained on one pipeline and one dataset


@dataclass
class PipelineConfig:
    run_dir: str = "runs/mhgd"
    dataset: str = "cifar100"          # cifar10 | cifar100 | synthetic
    data_dir: str = "data"
    synthetic_train: int = 10000
    synthetic_test: int = 2000
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
    balance: bool = True             # §6 gradient balancing; off: plain CE + transfer
    kd_temperature: float = 4.0
    kd_ce_weight: float = 1.0
    kd_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    backend: str = "auto"
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
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if self.dataset not in ("cifar10", "cifar100", "synthetic"):
            raise ValueError(f"dataset must be cifar10, cifar100 or synthetic, got {self.dataset!r}")
        for name in ("batch_size", "eval_batch_size", "heads", "student_vectors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("teacher_epochs", "student_epochs", "stage1_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
