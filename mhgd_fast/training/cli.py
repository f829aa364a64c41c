"""The ``demo``, ``train`` and ``study`` subcommands of ``mhgd-fast`` (wired into :mod:`mhgd_fast.cli`).

``train`` exposes every :class:`~mhgd_fast.training.config.PipelineConfig` field as a flag whose
default is the authors' value; the config is saved as ``<run-dir>/config.json``. Running the same
command again resumes the run. Under ``torchrun`` it trains with DDP.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from tqdm import tqdm

from . import (METHODS, DistributedFailure, NonFiniteLossError, PipelineConfig, RunDirMismatch,
               TrainingInterrupted, run_demo, run_pipeline)
from .checkpoint import CheckpointError
from .config import AMP_CHOICES, parse_scale
from .data import DataFolderError
from .distributed import collective_failure
from .records import TensorBoardUnavailable
from .settings import SETTINGS, study_config
from .study import run_study

__all__ = ["add_subcommands", "config_from_args", "cmd_train", "cmd_demo"]

FLAG_HELP = {
    "run_dir": "folder for the log, metrics.csv, plots, checkpoints and results.json (resumes if it exists)",
    "dataset": "cifar10, cifar100 (from --data-dir) or synthetic (built in)",
    "data_dir": "folder holding the extracted python archive (cifar-100-python/ or cifar-10-batches-py/)",
    "synthetic_train": "training images of the synthetic dataset",
    "synthetic_test": "test images of the synthetic dataset",
    "data_seed": "seed of the synthetic images and of the validation split (default: --seed)",
    "val_split": "share of the training set held out for validation: never trained on, reported as val acc, "
                 "and the held-out set of the stage-1 estimator loss",
    "teacher": "teacher network (resnet8..110[x4], wrn-D-K, vgg8..19, mobilenet)",
    "student": "student network (same names)",
    "teacher_width": "channel multiplier of the teacher",
    "student_width": "channel multiplier of the student",
    "teacher_checkpoint": "load this teacher (a checkpoint of this pipeline or a state_dict) instead of training it",
    "methods": f"students to train, any of {' '.join(METHODS)}",
    "batch_size": "global batch size (split over processes under torchrun)",
    "eval_batch_size": "batch size for evaluation",
    "momentum": "SGD Nesterov momentum",
    "weight_decay": "weight decay of the teacher and students",
    "lr": "initial learning rate of the teacher and students",
    "milestones": "fractions of the epochs at which the learning rate is decayed",
    "lr_decay": "learning-rate factor at each milestone",
    "teacher_epochs": "epochs of teacher training",
    "student_epochs": "epochs of stage 2 and of each baseline",
    "stage1_epochs": "epochs of stage 1 (graph network on the teacher)",
    "stage1_lr": "constant learning rate of stage 1",
    "heads": "attention heads per pair of sensing points",
    "student_vectors": "singular vectors kept per student map before alignment",
    "global_graph": "build each graph over the global batch (rows local, columns gathered from all processes)",
    "balance": "the authors' gradient balancing in stage 2 (--no-balance: plain CE + transfer-weight · transfer)",
    "transfer_cap": "balancing clips each tensor's transfer gradient to this times ‖g_ce‖·σ(epoch − stage-1 epochs)",
    "transfer_weight": "weight of the transfer loss (it only matters where the clip does not bind, e.g. --no-balance)",
    "scale": "logit scale of the attention graphs: a number, or rsqrt-d for 1/√d per pair",
    "squash": "stage-2 logit squashing before the softmax: tanh (authors) or none",
    "diag_every": "sample the stage-2 diagnostics every this many steps (0: off)",
    "kd_temperature": "temperature of classic KD",
    "kd_ce_weight": "cross-entropy weight of classic KD",
    "kd_weight": "soft-target weight of classic KD",
    "seed": "seed of the data order, the augmentation and the initial weights",
    "device": "auto, cpu, cuda",
    "threads": "torch CPU threads (default: torch's choice)",
    "ddp_timeout": "under torchrun: seconds a collective operation waits for the other processes before the "
                   "run stops with an error (a process that died or hangs; keep it above the slowest gap "
                   "between steps, e.g. rank 0 writing a checkpoint)",
    "backend": "mhgd_fast backend: auto, reference, cpu, cuda",
    "amp": "mixed precision of the teacher's and student's forward: off (float32), bf16 (autocast, also on the "
           "CPU) or fp16 (autocast and a loss scaler; steps with inf/NaN gradients are skipped and counted). "
           "Weights and the graph network stay float32; it changes the results, so a run folder keeps its value",
    "tensorboard": "also write the metrics (every column of metrics.csv) as TensorBoard events under "
                   "<run-dir>/tensorboard/<phase>/ (needs the optional tensorboard package)",
    "progress": "tqdm progress bars",
}


def _add_config_flags(parser: argparse.ArgumentParser, defaults: PipelineConfig, skip=(),
                      suppress: bool = False) -> None:
    """One flag per config field. ``suppress``: absent flags stay out of the namespace (the
    caller layers the given ones over a preset); the help still shows the authors' value."""
    for f in dataclasses.fields(PipelineConfig):
        if f.name in skip:
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        help_text = f"{FLAG_HELP[f.name]} (default: %(default)s)"
        if suppress:
            help_text = f"{FLAG_HELP[f.name]} (authors': {default})".replace("%", "%%")
            default = argparse.SUPPRESS
        if isinstance(getattr(defaults, f.name), bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(getattr(defaults, f.name), list):
            kind = type(getattr(defaults, f.name)[0])
            parser.add_argument(flag, nargs="+", type=kind, default=default, help=help_text,
                                **({"choices": METHODS} if f.name == "methods" else {}))
        elif f.name == "dataset":
            parser.add_argument(flag, choices=("cifar10", "cifar100", "synthetic"), default=default, help=help_text)
        elif f.name == "squash":
            parser.add_argument(flag, choices=("tanh", "none"), default=default, help=help_text)
        elif f.name == "amp":
            parser.add_argument(flag, choices=AMP_CHOICES, default=default, help=help_text)
        else:
            kind = {"threads": int, "teacher_checkpoint": str, "data_seed": int,
                    "scale": _scale_arg}.get(f.name, type(getattr(defaults, f.name)))
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def _scale_arg(text: str):
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig)})


def _run(fn, *a, **kw) -> int:
    """Run a pipeline call; turn its expected failures into one clear message and an exit code."""
    try:
        fn(*a, **kw)
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except (NonFiniteLossError, DistributedFailure, DataFolderError, RunDirMismatch, CheckpointError,
            TensorBoardUnavailable) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a collective outside the training loop (e.g. DDP's set-up)
        reason = collective_failure(exc)
        if reason is None:
            raise
        print(f"\nerror: {reason}. Run the same command again to resume. ({exc})", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _run(lambda: print(run_pipeline(config_from_args(args))["table"]))


def cmd_study(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig) if hasattr(args, f.name)}
    base = study_config(args.setting, **given)
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    return _run(lambda: run_study(base, args.study_dir or f"runs/study-{args.setting}", name=args.name,
                                  seeds=seeds, teacher_seed=args.teacher_seed,
                                  log=lambda message: tqdm.write(message, file=sys.stderr)))


def cmd_demo(args: argparse.Namespace) -> int:
    return _run(run_demo, args.run_dir, seed=args.seed, threads=args.threads, progress=args.progress,
                amp=args.amp, tensorboard=args.tensorboard)


def add_subcommands(subparsers) -> None:
    """Register ``demo`` and ``train`` on an ``argparse`` subparsers object (``mhgd-fast``'s);
    each sets ``handler`` (called with the parsed args, returns the exit code)."""
    demo = subparsers.add_parser(
        "demo", help="the whole method in a few minutes on built-in synthetic data",
        description="Train a teacher, the student alone, a KD student and an MHGD student on the built-in "
                    "synthetic dataset with small networks; print the comparison table and write plots.")
    demo.add_argument("--run-dir", default="runs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    demo.add_argument("--amp", choices=AMP_CHOICES, default="off", help=f"{FLAG_HELP['amp']} (default: %(default)s)")
    demo.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                      help=f"{FLAG_HELP['tensorboard']} (default: %(default)s)")
    demo.set_defaults(handler=cmd_demo)

    train = subparsers.add_parser(
        "train", help="teacher → graph network → student, with the student-alone and KD baselines",
        description="Run MHGD (and baselines) end to end. Defaults are the authors' (CIFAR-100, "
                    "ResNet32x4 → ResNet8x4). Run the same command again to resume; use torchrun for DDP.")
    _add_config_flags(train, PipelineConfig())
    train.set_defaults(handler=cmd_train)

    study = subparsers.add_parser(
        "study", help="one configuration over several seeds: mean ± std, paired differences to the student alone",
        description="Train one teacher, then the student alone, KD and MHGD for every seed; report per method "
                    "mean ± std of the test accuracy and the paired difference to the student alone with a 95 %% "
                    "t-interval (study.json, study.md, study.png under --study-dir/--name, and summary.md over "
                    "every study in --study-dir). Runs are shared between the studies of one folder; run the "
                    "same command again to resume.")
    study.add_argument("--setting", choices=sorted(SETTINGS), default="authors",
                       help="built-in base configuration the flags below modify: " +
                            "; ".join(f"{k}: {v['about']}" for k, v in sorted(SETTINGS.items())) +
                            " (default: %(default)s)")
    study.add_argument("--study-dir", default=None, help="folder of the study's runs and reports "
                       "(default: runs/study-<setting>)")
    study.add_argument("--name", default="recipe", help="name of this configuration's report folder (default: %(default)s)")
    study.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default: %(default)s)")
    study.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead of --seeds")
    study.add_argument("--teacher-seed", type=int, default=0, help="seed of the shared teacher (default: %(default)s)")
    _add_config_flags(study, PipelineConfig(), skip=("run_dir", "seed"), suppress=True)
    study.set_defaults(handler=cmd_study)

