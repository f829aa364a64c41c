"""What the DDP finiteness agreement costs per step.

Under DDP every step agrees on flags: one all-reduce of one number for Ctrl-C, one for a
non-finite loss, and with ``--global-graph`` one more before the gather (every process's features
finite), after a finiteness check of the sensing-point features (a sum per map). Prints the
latency of :func:`mhgd_fast.training.distributed.any_rank` between two gloo processes on this machine, the
feature check on the authors' pair (resnet8x4 student, resnet32x4 teacher, 64 images per
process) and, for scale, each network's no-grad forward pass of those images.

    python tools/ddp_agreement_overhead.py [--calls 1000] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mhgd_fast.training.distributed import any_rank
from mhgd_fast.training.models import build_model


def _worker(rank, port, calls, threads, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for _ in range(calls // 5):  # warm-up
        any_rank(False)
    seconds = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            any_rank(False)
        seconds.append((time.perf_counter() - start) / calls)
    if rank == 0:
        queue.put(seconds)
    dist.destroy_process_group()


def _median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="all-reduces per timed round (5 rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, args.calls, args.threads, queue)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    print(f"any_rank, gloo, 2 processes: median {1e6 * statistics.median(seconds):.0f} µs per call "
          f"(rounds: {', '.join(f'{1e6 * s:.0f}' for s in seconds)})")

    torch.set_num_threads(args.threads)
    images = torch.randn(64, 3, 32, 32)
    for name in ("resnet8x4", "resnet32x4"):
        model, feats = build_model(name, 100).eval(), []
        for point in model.sensing_points:
            model.get_submodule(point).register_forward_hook(lambda module, inputs, out: feats.append(out))

        def forward():
            feats.clear()
            with torch.no_grad():
                model(images)

        forward_ms = _median_ms(forward, 3)
        check_ms = _median_ms(lambda: bool(torch.isfinite(torch.stack([f.sum(dtype=torch.float32)
                                                                        for f in feats])).all()), 20)
        print(f"{name}: finiteness check of {len(feats)} sensing-point maps "
              f"({sum(f.numel() for f in feats) / 1e6:.1f} M values) {check_ms:.2f} ms; "
              f"no-grad forward of 64 images {forward_ms:.0f} ms")


if __name__ == "__main__":
    main()
