"""The ``mhgd-fast`` command (also ``python -m mhgd_fast``).

``mhgd-fast bench`` times the ops (see :mod:`mhgd_fast.bench`) and prints a Markdown table on stdout;
``mhgd-fast info`` prints what was compiled and which backends are usable, as JSON;
``mhgd-fast demo`` and ``mhgd-fast train`` run the distillation pipeline (:mod:`mhgd_fast.training.cli`).
Logs and progress go to stderr, so stdout stays clean for redirection.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import bench, bench_compression, bench_scaling
from .training import cli as training_cli
from ._extension import build_info
from .backends import DEVICE_BACKENDS, OP_KERNELS, available_backends

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhgd-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench_parser = commands.add_parser(
        "bench", help="time the ops on every runnable backend; print a Markdown table",
        description="Time graph_kl and topk_singular_vectors (fwd and fwd+bwd) on every backend "
                    "that can run them; print a Markdown table on stdout.")
    bench_parser.add_argument(
        "--quick", action="store_true",
        help=f"{bench.QUICK.warmup} warm-up + {bench.QUICK.repeat} timed calls per job "
             f"(default: {bench.FULL.warmup} + {bench.FULL.repeat})")
    bench_parser.add_argument("--threads", type=_positive_int, default=bench.DEFAULT_THREADS,
                              help="torch CPU threads (default: %(default)s)")
    bench_parser.add_argument("--ops", nargs="+", choices=bench.OPS, default=list(bench.OPS),
                              metavar="OP", help=f"ops to time (default: {' '.join(bench.OPS)})")
    bench_parser.add_argument("--backends", nargs="+", choices=("reference",) + DEVICE_BACKENDS,
                              metavar="BACKEND",
                              help="reference, cpu and/or cuda (default: every backend that can "
                                   "run each op on --device)")
    bench_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                              help="where the tensors live (default: %(default)s)")
    bench_parser.add_argument("--json", metavar="PATH",
                              help="also write the header and the results to PATH as JSON")
    bench_parser.add_argument(
        "--suite", choices=("ops", "graph_kl_scaling", "compression"), default="ops",
        help="ops: every op on every backend (default); compression: topk_singular_vectors at the "
             "paper's shapes (B=128) against torch.linalg.svd and Gram + eigh, fwd and fwd+bwd, the "
             "floor of any Gram-based fwd+bwd, and the whole MHGD loss next to ResNet32 fwd and "
             "ResNet8 fwd+bwd (--quick: 3 repeats instead of 7); graph_kl_scaling: fused graph_kl vs the "
             f"eager and torch.compile'd reference, fwd+bwd at H={bench_scaling.HEADS}, "
             f"d={bench_scaling.DIM}, B in {bench_scaling.BATCHES} (+ {bench_scaling.FUSED_ONLY_BATCHES} "
             "fused only), each in a fresh process with its extra peak memory; needs the cpu backend")
    # Argument errors found after parsing are reported with the bench subcommand's usage.
    bench_parser.set_defaults(handler=functools.partial(_bench, parser=bench_parser))

    info_parser = commands.add_parser(
        "info", help="print build_info() and available_backends() as JSON")
    info_parser.set_defaults(handler=_info)
    training_cli.add_subcommands(commands)
    return parser


def _plan_jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[bench.Job]:
    """The jobs the arguments ask for; bad combinations end in ``parser.error`` (exit status 2)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    for backend in args.backends or ():
        if backend not in available_backends():
            parser.error(f"--backends {backend}: not available here "
                         f"(available: {', '.join(available_backends())}; see `mhgd-fast info`)")
        if backend != "reference" and backend != args.device:
            parser.error(f"--backends {backend}: runs on {backend} tensors; add --device {backend}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist")
    for op in args.ops:
        for backend in args.backends or ():
            if backend not in bench.runnable_backends(op, args.device):
                log.warning("%s has no %s kernel yet (kernels: %s): skipped on that backend",
                            op, backend, ", ".join(OP_KERNELS[op]) or "none")
    jobs = bench.plan(args.ops, args.backends, args.device)
    if not jobs:
        parser.error(f"nothing to run: none of --backends {' '.join(args.backends)} has a kernel "
                     f"for {' '.join(args.ops)}")
    return jobs


def _bench_scaling(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if "cpu" not in available_backends() or args.device != "cpu":
        parser.error("--suite graph_kl_scaling measures the compiled cpu kernel: needs the cpu backend and --device cpu")
    torch.set_num_threads(args.threads)
    repeats = bench.QUICK if args.quick else bench.FULL
    run_header = bench.header("cpu", repeats)
    results = []
    with logging_redirect_tqdm():
        for impl, batch, count in tqdm(bench_scaling.plan(args.quick), desc="graph_kl scaling", unit="case",
                                       file=sys.stderr):
            log.info("graph_kl fwd+bwd, %s, B=%d, %d timed calls in a fresh process", impl, batch, count)
            results.append(bench_scaling.measure(impl, batch, count, args.threads))
    print(f"graph_kl fwd+bwd (sum, tanh), H={bench_scaling.HEADS}, d={bench_scaling.DIM}; "
          f"mhgd_fast {run_header['mhgd_fast_version']}, torch {run_header['torch_version']}, "
          f"{run_header['cpu_model']}, {args.threads} threads, {run_header['timestamp']}; median and min–max "
          "after warm-up calls (10 up to B=1024, else 1); extra peak = peak RSS during the timed calls minus RSS before them.")
    print()
    print(bench_scaling.format_markdown(results))
    if args.json:
        bench_scaling.write_json(args.json, run_header, results)
    return 0


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.suite == "graph_kl_scaling":
        return _bench_scaling(args, parser)
    if args.suite == "compression":
        if args.device != "cpu":
            parser.error("--suite compression runs on the CPU (--device cpu)")
        bench_compression.main(["--threads", str(args.threads), "--repeats", "3" if args.quick else "7", "--mhgd",
                                "--floor"])
        return 0
    jobs = _plan_jobs(args, parser)
    torch.set_num_threads(args.threads)
    repeats = bench.QUICK if args.quick else bench.FULL
    run_header = bench.header(args.device, repeats)
    log.info("%d jobs on %s (%s), %d threads, %d warm-up + %d timed calls each", len(jobs),
             run_header["device"], run_header["device_name"], run_header["threads"],
             repeats.warmup, repeats.repeat)
    results = []
    with logging_redirect_tqdm():
        for job in tqdm(jobs, desc="bench", unit="job", file=sys.stderr):
            log.info("timing %s", job.id)
            results.append(bench.measure(job, repeats))
    print(bench.caption(run_header))
    print()
    print(bench.format_markdown(results))
    if args.json:
        bench.write_json(args.json, run_header, results)
        log.info("wrote %s", args.json)
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps({"build_info": build_info(), "available_backends": available_backends()},
                     indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)
