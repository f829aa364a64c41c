"""Distillation and training, built on the core library (:mod:`mhgd_fast.ops`, :class:`mhgd_fast.MHGD`).

* Distillation in your own loop: :mod:`.distiller` (``Distiller``, ``MHGDDistiller``, ``KDDistiller``),
  :mod:`.features` (feature capture by module path), :mod:`.distributed` (DDP helpers).
* Data and networks: :mod:`.data` (CIFAR folders, the synthetic dataset, the batch loader),
  :mod:`.models` (CIFAR ResNet, WRN, VGG, MobileNet, each naming its sensing points).
* The pipeline, teacher → graph network → student with the usual baselines: :mod:`.config`,
  :mod:`.settings`, :mod:`.stages`, :mod:`.loop`, :mod:`.checkpoint`, :mod:`.precision`,
  :mod:`.records`, :mod:`.faults`, :mod:`.demo`, :mod:`.study`; its ``demo``/``train``/``study``
  commands in :mod:`.cli`. The names below are the pipeline's entry points.
"""
from .checkpoint import CheckpointError
from .config import METHODS, PipelineConfig
from .demo import demo_config, run_demo
from .loop import DistributedFailure, NonFiniteLossError, TrainingInterrupted
from .stages import RunDirMismatch, run_pipeline

__all__ = ["PipelineConfig", "METHODS", "run_pipeline", "demo_config", "run_demo", "NonFiniteLossError",
           "TrainingInterrupted", "RunDirMismatch", "CheckpointError", "DistributedFailure"]
