"""The training pipeline: teacher → graph network → student, with the usual baselines."""
from .checkpoint import CheckpointError
from .config import METHODS, PipelineConfig
from .demo import demo_config, run_demo
from .loop import DistributedFailure, NonFiniteLossError, TrainingInterrupted
from .stages import RunDirMismatch, run_pipeline

__all__ = ["PipelineConfig", "METHODS", "run_pipeline", "demo_config", "run_demo", "NonFiniteLossError",
           "TrainingInterrupted", "RunDirMismatch", "CheckpointError", "DistributedFailure"]
