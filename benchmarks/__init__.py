"""Benchmarks of mhgd_fast, on one harness.

* :mod:`benchmarks.harness`: the timing loop (warm-up, timed calls, round-robin, a device sync on a
  GPU), medians and spreads, the thread count pinned and recorded, the environment header and the
  JSON writer.
* Case modules built on it: :mod:`benchmarks.ops` (every op, fwd and fwd+bwd, on every backend),
  :mod:`benchmarks.compression` (topk_singular_vectors against torch.linalg.svd and Gram + eigh,
  the whole MHGD loss next to the networks), :mod:`benchmarks.scaling` (fused graph_kl against the
  eager and compiled reference at growing B, with peak memory) and :mod:`benchmarks.diagnostics`
  (the cost of the stage-2 diagnostics).

``mhgd-fast bench --suite ops|compression|graph_kl_scaling|diagnostics`` and ``tools/gpu_check.py``
call these functions; ``benchmarks/test_bench_*.py`` run the same cases under pytest-benchmark
(``make bench``). The package is installed with mhgd_fast (setup.py) so that the command works
after ``pip install .``; in a source checkout it is imported from the repository root.
"""
