"""The ``mhgd-fast`` command (also ``python -m mhgd_fast``).

``mhgd-fast bench`` times the ops and other suites of the benchmark package (:mod:`benchmarks`) and
prints Markdown tables on stdout; ``mhgd-fast info`` prints what was compiled and which backends
are usable, as JSON; ``mhgd-fast demo``, ``train`` and ``study`` run the distillation pipeline
(:mod:`mhgd_fast.training.cli`). Logs and progress go to stderr, so stdout stays clean for redirection.
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

from benchmarks import compression, diagnostics, harness, scaling
from benchmarks import ops as ops_bench

from ._extension import build_info
from .backends import DEVICE_BACKENDS, available_backends
from .training import cli as training_cli

log = logging.getLogger(__name__)

COMPRESSION_BATCH = 128


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
        help=f"{harness.QUICK.warmup} warm-up + {harness.QUICK.repeat} timed calls per job "
             f"(default: {harness.FULL.warmup} + {harness.FULL.repeat})")
    bench_parser.add_argument("--threads", type=_positive_int, default=harness.DEFAULT_THREADS,
                              help="torch CPU threads (default: %(default)s)")
    bench_parser.add_argument("--ops", nargs="+", choices=ops_bench.OPS, default=list(ops_bench.OPS),
                              metavar="OP", help=f"ops to time (default: {' '.join(ops_bench.OPS)})")
    bench_parser.add_argument("--backends", nargs="+", choices=("reference",) + DEVICE_BACKENDS,
                              metavar="BACKEND",
                              help="reference, cpu and/or cuda (default: every backend that can "
                                   "run each op on --device)")
    bench_parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                              help="where the tensors live (default: %(default)s)")
    bench_parser.add_argument("--json", metavar="PATH",
                              help="also write the header and the results to PATH as JSON")
    bench_parser.add_argument(
        "--suite", choices=tuple(BENCH_SUITES), default="ops",
        help="ops: every op on every backend (default); compression: topk_singular_vectors at the "
             f"paper's shapes (B={COMPRESSION_BATCH}) against torch.linalg.svd and Gram + eigh, fwd and fwd+bwd, the "
             "floor of any Gram-based fwd+bwd, and the whole MHGD loss next to ResNet32 fwd and "
             "ResNet8 fwd+bwd (--quick: 3 repeats instead of 7); graph_kl_scaling: fused graph_kl vs the "
             f"eager and torch.compile'd reference, fwd+bwd at H={scaling.HEADS}, "
             f"d={scaling.DIM}, B in {scaling.BATCHES} (+ {scaling.FUSED_ONLY_BATCHES} "
             "fused only), each in a fresh process with its extra peak memory; needs the cpu backend; "
             "diagnostics: one stage-2 step of the demo setting with and without the stage-2 "
             f"diagnostics, interleaved ({diagnostics.FULL_ROUNDS} rounds, --quick: {diagnostics.QUICK_ROUNDS})")
    # Argument errors found after parsing are reported with the bench subcommand's usage.
    bench_parser.set_defaults(handler=functools.partial(_bench, parser=bench_parser))

    info_parser = commands.add_parser(
        "info", help="print build_info() and available_backends() as JSON")
    info_parser.set_defaults(handler=_info)
    training_cli.add_subcommands(commands)
    return parser


def _plan_jobs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[ops_bench.Job]:
    """The jobs the arguments ask for; bad combinations end in ``parser.error`` (exit status 2)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    for backend in args.backends or ():
        if backend not in available_backends():
            parser.error(f"--backends {backend}: not available here "
                         f"(available: {', '.join(available_backends())}; see `mhgd-fast info`)")
        if backend != "reference" and backend != args.device:
            parser.error(f"--backends {backend}: runs on {backend} tensors; add --device {backend}")
    return ops_bench.plan(args.ops, args.backends, args.device)


def _progress(desc: str, unit: str):
    """A tqdm bar on stderr around an iterable, for the case modules' ``progress`` argument."""
    return functools.partial(tqdm, desc=desc, unit=unit, file=sys.stderr)


def _bench_ops(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    jobs = _plan_jobs(args, parser)
    torch.set_num_threads(args.threads)
    repeats = harness.QUICK if args.quick else harness.FULL
    run_header = harness.header(args.device, repeats)
    log.info("%d jobs on %s (%s), %d threads, %d warm-up + %d timed calls each", len(jobs),
             run_header["device"], run_header["device_name"], run_header["threads"],
             repeats.warmup, repeats.repeat)
    with logging_redirect_tqdm():
        results = ops_bench.run(jobs, repeats, progress=_progress("bench", "job"))
    return _report(args, ops_bench.caption(run_header), ops_bench.format_markdown(results), run_header, results)


def _on_the_cpu(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A CPU-only suite: refuse another --device, set the thread count."""
    if args.device != "cpu":
        parser.error(f"--suite {args.suite} runs on the CPU (--device cpu)")
    torch.set_num_threads(args.threads)


def _bench_scaling(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if "cpu" not in available_backends():
        parser.error("--suite graph_kl_scaling measures the compiled cpu kernel: needs the cpu backend and --device cpu")
    _on_the_cpu(args, parser)
    run_header = harness.header("cpu", harness.QUICK if args.quick else harness.FULL)
    with logging_redirect_tqdm():
        results = scaling.run(args.quick, args.threads, progress=_progress("graph_kl scaling", "case"))
    caption = (f"graph_kl fwd+bwd (sum, tanh), H={scaling.HEADS}, d={scaling.DIM}; {harness.environment(run_header)}, "
               f"{args.threads} threads, {run_header['timestamp']}; median and min–max after warm-up calls (10 up "
               "to B=1024, else 1); extra peak = peak RSS during the timed calls minus RSS before them.")
    return _report(args, caption, scaling.format_markdown(results), run_header, results)


def _bench_compression(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _on_the_cpu(args, parser)
    repeats = 3 if args.quick else 7
    run_header = harness.header("cpu", harness.Repeats(warmup=1, repeat=repeats))
    results = compression.run(COMPRESSION_BATCH, repeats, floor=True, mhgd=True)
    caption = (f"{harness.environment(run_header)}, {args.threads} threads, B={COMPRESSION_BATCH}, float32, medians of "
               f"{repeats} round-robin repeats, {run_header['timestamp']}")
    return _report(args, caption, compression.format_run(results), run_header, results)


def _bench_diagnostics(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _on_the_cpu(args, parser)
    rounds = diagnostics.QUICK_ROUNDS if args.quick else diagnostics.FULL_ROUNDS
    run_header = harness.header("cpu", harness.Repeats(warmup=diagnostics.WARMUP_ROUNDS, repeat=rounds))
    times = diagnostics.run(rounds)
    caption = (f"stage-2 step of the demo setting, batch {diagnostics.BATCH}, {args.threads} threads, {rounds} "
               f"interleaved rounds; median ms; amortised = (sampled/plain − 1)/{diagnostics.DIAG_EVERY}; "
               f"{harness.environment(run_header)}, {run_header['timestamp']}")
    results = [{"balance": balance, "sampled": sampled, "median_ms": ms} for (balance, sampled), ms in times.items()]
    return _report(args, caption, "\n".join(diagnostics.format_markdown(times)), run_header, results)


def _report(args: argparse.Namespace, caption: str, table: str, run_header: dict, results) -> int:
    """The caption, a blank line and the table(s) on stdout; with --json, the header and results too."""
    print(caption)
    print()
    print(table)
    if args.json:
        harness.write_json(args.json, run_header, results)
        log.info("wrote %s", args.json)
    return 0


BENCH_SUITES = {"ops": _bench_ops, "graph_kl_scaling": _bench_scaling, "compression": _bench_compression,
                "diagnostics": _bench_diagnostics}


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist")
    return BENCH_SUITES[args.suite](args, parser)


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
