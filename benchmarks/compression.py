"""The compression benchmark (``mhgd-fast bench --suite compression``, ``tools/gpu_check.py``,
``benchmarks/test_bench_svd.py``): per feature map, the fast op against torch.linalg.svd and
against smaller-side Gram + torch.linalg.eigh (the reference backend), fwd and fwd+bwd, in ONE run
so the ratios share the machine's load; the floor of any Gram-based fwd+bwd; and the whole MHGD
transfer loss next to a ResNet32 fwd and a ResNet8 fwd+bwd (:mod:`mhgd_fast.training.models` at
width 4: stage widths 64/128/256). The functions take a ``device``: the command times the CPU,
``tools/gpu_check.py`` the GPU.

Methods are timed round-robin (:func:`benchmarks.harness.round_robin`: one call of each in turn,
each followed by a device sync on a GPU, one warm-up round) and reported as medians; the inputs are
post-ReLU Gaussian maps, whose flat bulk spectrum is the hard case for the iteration.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

import mhgd_fast as mf
from mhgd_fast.training.features import FeatureCapture
from mhgd_fast.training.models import build_model

from . import harness

PAPER_SHAPES = [(64, 32), (128, 16), (256, 8)]  # (C, side): ResNet stage outputs on CIFAR


def svd_path(fm: torch.Tensor, k: int) -> torch.Tensor:
    """What a faithful port does: torch.linalg.svd of X, top-k rows of Vᴴ, canonical sign."""
    x = fm.reshape(fm.shape[0], fm.shape[1], -1).transpose(-1, -2)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    top = vh[:, :k]
    return top * torch.where(top.detach().sum(-1, keepdim=True) < 0, -1.0, 1.0)


def compression_methods(backend: str) -> Dict[str, Callable]:
    return {
        "torch.linalg.svd": svd_path,
        "Gram + eigh": lambda fm, k: mf.ops.topk_singular_vectors(fm, k, backend="reference"),
        f"fast ({backend})": lambda fm, k: mf.ops.topk_singular_vectors(fm, k, backend=backend),
    }


def _rounds(repeats: int) -> harness.Repeats:
    """One warm-up round, then ``repeats`` timed ones."""
    return harness.Repeats(warmup=1, repeat=repeats)


def compression_times(batch: int, repeats: int, backend: str, device: str = "cpu",
                      shapes: Sequence[Tuple[int, int]] = PAPER_SHAPES) -> List[dict]:
    """Median ms of every method, one row per (map, k, pass): ``{"map", "k", "pass", "ms": {method: ms}}``."""
    methods = compression_methods(backend)
    rows = []
    for c, side in shapes:
        fm = torch.relu(torch.randn(batch, c, side, side)).to(device)
        for k in (1, 4):
            fm_g = fm.clone().requires_grad_()
            w = torch.randn(batch, k, c).to(device)
            fns = {}
            for name, method in methods.items():
                fns[("fwd", name)] = (lambda m=method: m(fm, k))
                fns[("fwd+bwd", name)] = (lambda m=method: torch.autograd.grad((m(fm_g, k) * w).sum(), fm_g))
            times = harness.medians(harness.round_robin(fns, _rounds(repeats), device))
            rows += [{"map": f"{c}×{side}×{side}", "k": k, "pass": stage,
                      "ms": {m: times[(stage, m)] for m in methods}} for stage in ("fwd", "fwd+bwd")]
    return rows


def format_compression(rows: Sequence[dict], backend: str) -> List[str]:
    """:func:`compression_times` as Markdown table lines, with the fast op's speed-ups."""
    methods = list(compression_methods(backend))
    fast = f"fast ({backend})"
    lines = ["| map (C×H×W) | k | pass | " + " | ".join(f"{m} ms" for m in methods)
             + " | svd / fast | Gram+eigh / fast |",
             "|---|---|---|" + "---|" * len(methods) + "---|---|"]
    for row in rows:
        ms, t_fast = row["ms"], row["ms"][fast]
        lines.append(f"| {row['map']} | {row['k']} | {row['pass']} | " + " | ".join(f"{ms[m]:.1f}" for m in methods)
                     + f" | {ms['torch.linalg.svd'] / t_fast:.1f}× | {ms['Gram + eigh'] / t_fast:.2f}× |")
    return lines


def floor_times(batch: int, repeats: int, backend: str) -> List[dict]:
    """What any Gram-based fwd+bwd must spend at k = 4, per map: the Gram GEMM and writing a fresh
    gradient of fm's size (allocation + first touch), next to the svd path and the fast op, in one
    run on the CPU. One row per map: ``{"map", "ms": {"gram", "grad", "fast", "svd"}}``."""
    rows = []
    for c, side in PAPER_SHAPES:
        fm = torch.relu(torch.randn(batch, c, side, side))
        flat = fm.reshape(batch, c, -1)
        fm_g = fm.clone().requires_grad_()
        w = torch.randn(batch, 4, c)
        fns = {
            "gram": (lambda: flat @ flat.transpose(1, 2)) if side * side >= c else (lambda: flat.transpose(1, 2) @ flat),
            "grad": lambda: torch.empty_like(fm).fill_(0.0),
            "fast": lambda: torch.autograd.grad(
                (mf.ops.topk_singular_vectors(fm_g, 4, backend=backend) * w).sum(), fm_g),
            "svd": lambda: torch.autograd.grad((svd_path(fm_g, 4) * w).sum(), fm_g),
        }
        rows.append({"map": f"{c}×{side}×{side}", "ms": harness.medians(harness.round_robin(fns, _rounds(repeats)))})
    return rows


def format_floor(rows: Sequence[dict]) -> List[str]:
    """:func:`floor_times` as Markdown table lines."""
    lines = ["| map (C×H×W) | Gram GEMM ms | fresh fm-sized gradient ms | floor = sum ms | fast fwd+bwd ms "
             "| svd fwd+bwd ms | svd / floor | svd / fast |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        t = row["ms"]
        floor = t["gram"] + t["grad"]
        lines.append(f"| {row['map']} | {t['gram']:.1f} | {t['grad']:.1f} | {floor:.1f} | {t['fast']:.1f} "
                     f"| {t['svd']:.1f} | {t['svd'] / floor:.1f}× | {t['svd'] / t['fast']:.1f}× |")
    return lines


# ---------------------------------------------------------------------------- MHGD vs ResNets

TEACHER, STUDENT = "resnet32", "resnet8"


def mhgd_parts(batch: int, device: str = "cpu", width: float = 4) -> Dict[str, Callable[[], object]]:
    """One training step's parts at B=batch: teacher ResNet32 fwd, student ResNet8 fwd+bwd, and the
    whole MHGD transfer loss fwd+bwd (3 maps, teacher k=1, student k=4, 2 pairs, fastest backend).
    The networks are :func:`mhgd_fast.training.models.build_model`'s at ``width`` (4: stages 64/128/256)."""
    teacher = build_model(TEACHER, 100, width).to(device).eval()
    student = build_model(STUDENT, 100, width).to(device)
    images = torch.rand(batch, 3, 32, 32).to(device)
    labels = torch.randint(0, 100, (batch,)).to(device)
    with torch.no_grad(), FeatureCapture(teacher, teacher.sensing_points) as capture:
        teacher(images)
        t_feats = capture.features
    with torch.no_grad(), FeatureCapture(student, student.sensing_points) as capture:
        student(images)
        s_feats = [f.detach().requires_grad_() for f in capture.features]
    # "auto": the fastest backend each op has here (compiled where it exists, else the reference).
    loss_mod = mf.MHGD([f.shape[1] for f in t_feats], backend="auto").to(device).eval()

    def teacher_fwd():
        with torch.no_grad():
            teacher(images)

    def student_fwd_bwd():
        torch.nn.functional.cross_entropy(student(images), labels).backward()

    def mhgd():
        torch.autograd.grad(loss_mod(s_feats, t_feats), s_feats)

    return {"teacher ResNet32 fwd": teacher_fwd, "student ResNet8 fwd+bwd": student_fwd_bwd,
            "MHGD loss fwd+bwd (auto)": mhgd}


def mhgd_times(batch: int, repeats: int, device: str = "cpu", width: float = 4) -> Dict[str, float]:
    """Median ms of each of :func:`mhgd_parts`, timed round-robin."""
    return harness.medians(harness.round_robin(mhgd_parts(batch, device, width), _rounds(repeats), device))


def format_mhgd(times: Dict[str, float]) -> List[str]:
    nets = times["teacher ResNet32 fwd"] + times["student ResNet8 fwd+bwd"]
    lines = ["| part | ms | % of teacher fwd + student fwd+bwd |", "|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t:.1f} | {100 * t / nets:.1f} % |")
    return lines


def fast_backend() -> str:
    """The backend of the "fast" column on the CPU: the compiled one, else the reference."""
    return "cpu" if "cpu" in mf.available_backends() else "reference"


def run(batch: int, repeats: int, floor: bool = True, mhgd: bool = True) -> Dict[str, object]:
    """The whole suite on the CPU, seeded: ``{"backend", "compression", "floor", "mhgd"}`` (the last
    two None when not asked for)."""
    torch.manual_seed(harness.SEED)
    backend = fast_backend()
    return {"backend": backend, "compression": compression_times(batch, repeats, backend),
            "floor": floor_times(batch, repeats, backend) if floor else None,
            "mhgd": mhgd_times(batch, repeats) if mhgd else None}


def format_run(results: Dict[str, object]) -> str:
    """:func:`run`'s tables, blank-line separated."""
    tables = [format_compression(results["compression"], results["backend"])]
    if results["floor"] is not None:
        tables.append(format_floor(results["floor"]))
    if results["mhgd"] is not None:
        tables.append(format_mhgd(results["mhgd"]))
    return "\n\n".join("\n".join(lines) for lines in tables)
