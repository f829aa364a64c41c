"""Where the stage-2 transfer gradient comes from, sample by sample.

Loads one MHGD run of a study (its teacher, its trained graph network, and the student at the start
of stage 2 or at its end), takes training batches as the pipeline makes them, and for every sample
and sensing point measures ‖∂L_transfer/∂fm_b‖ (the gradient that reaches the student's feature map)
next to the relative eigen-gap of the picked student vector, ``(λ_pick − λ_next) / λ_1`` with
``λ = σ²`` of that sample's map. The singular-vector derivative carries ``1/(λ_i − λ_j)``, so a
sample whose picked vector is nearly degenerate gets a huge, ill-conditioned gradient.

Prints, per sensing point: the share of the batch's squared gradient norm carried by the top 10 %
of samples, the median gap of those samples against the others', and the rank correlation of
gradient norm with 1/gap.

    python tools/transfer_gradient_anatomy.py runs/study-demo/runs/mhgd-seed0-<hash> [--batches 4] [--at end|start]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import mhgd_fast as mf
from mhgd_fast.training.data import BatchLoader, channel_stats
from mhgd_fast.training.distiller import MHGDDistiller
from mhgd_fast.training.models import build_model
from mhgd_fast.training import PipelineConfig, checkpoint
from mhgd_fast.training.stages import load_datasets


def rank_correlation(a, b) -> float:
    """Spearman's ρ (no ties expected: continuous values)."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def picked_gap(fm: torch.Tensor, v_t: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample, (λ_pick − λ_next)/λ_1 of the student vector that alignment picks."""
    b, c = fm.shape[:2]
    x = fm.detach().reshape(b, c, -1).double()
    gram = x @ x.transpose(1, 2)  # C×C; its eigenvalues are σ² (plus zeros when HW < C)
    lam, vecs = torch.linalg.eigh(gram)
    lam, vecs = lam.flip(-1), vecs.flip(-1)
    kk = min(k, c)
    cos = (vecs[:, :, :kk].transpose(1, 2) @ v_t.double().unsqueeze(-1)).squeeze(-1).abs()
    pick = cos.argmax(1)
    idx = torch.arange(b)
    here = lam[idx, pick]
    above = torch.where(pick > 0, lam[idx, (pick - 1).clamp_min(0)], torch.full_like(here, float("inf")))
    below = lam[idx, (pick + 1).clamp_max(c - 1)]
    gap = torch.minimum(above - here, here - below)
    return gap / lam[:, 0].clamp_min(1e-300)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an MHGD run folder of a study (holds config.json and checkpoints/)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--at", choices=("start", "end"), default="end",
                        help="the student at the start of stage 2 (its initial weights) or at its end")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.run_dir, "config.json")) as f:
        cfg = PipelineConfig.from_dict(json.load(f))
    train, _, _ = load_datasets(cfg)
    classes = train.num_classes
    teacher = build_model(cfg.teacher, classes, cfg.teacher_width)
    teacher.load_state_dict(checkpoint.load(cfg.teacher_checkpoint)["modules"]["model"])
    torch.manual_seed(cfg.seed + 1)
    student = build_model(cfg.student, classes, cfg.student_width)
    if args.at == "end":
        student.load_state_dict(checkpoint.load(os.path.join(args.run_dir, "checkpoints", "mhgd-stage2.pt"))["modules"]["model"])
    distiller = MHGDDistiller(student, teacher, student.sensing_points, teacher.sensing_points, heads=cfg.heads,
                              student_vectors=cfg.student_vectors, squash=None if cfg.squash == "none" else cfg.squash,
                              scale=cfg.scale)
    distiller.mhgd.load_state_dict(checkpoint.load(os.path.join(args.run_dir, "checkpoints", "mhgd-stage1.pt"))["modules"]["mhgd"])
    distiller.mhgd.eval().requires_grad_(False)
    distiller.train()
    mean, std = channel_stats(train.images)
    loader = BatchLoader(train, cfg.batch_size, train=True, seed=cfg.seed, mean=mean, std=std)
    points = len(student.sensing_points)
    norms, gaps = [[] for _ in range(points)], [[] for _ in range(points)]
    for step, (x, _) in enumerate(loader.batches(0)):
        if step == args.batches:
            break
        t_feats = distiller.teacher_features(x)
        student(x)
        s_feats = [f.detach().requires_grad_() for f in distiller.student_capture.features]
        loss = distiller.mhgd(s_feats, t_feats)
        grads = torch.autograd.grad(loss, s_feats)
        v_t = distiller.mhgd.teacher_vectors(t_feats)
        for m in range(points):
            norms[m] += grads[m].flatten(1).norm(dim=1).tolist()
            gaps[m] += picked_gap(s_feats[m], v_t[m], cfg.student_vectors).tolist()
        distiller.student_capture.clear()
        distiller.teacher_capture.clear()
    print(f"{args.run_dir}: student at the {args.at} of stage 2, {len(norms[0])} training samples")
    print()
    print("| point | channels | top-10 % samples' share of ‖g‖² | median gap, top 10 % | median gap, rest "
          "| Spearman ρ(‖g‖, 1/gap) |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in range(points):
        order = sorted(range(len(norms[m])), key=lambda i: -norms[m][i])
        top = order[: max(1, len(order) // 10)]
        rest = order[len(top):]
        total = sum(n * n for n in norms[m])
        share = sum(norms[m][i] ** 2 for i in top) / total if total > 0 else float("nan")
        inv_gap = [1 / max(g, 1e-300) for g in gaps[m]]
        print(f"| {m} | {s_feats[m].shape[1]} | {100 * share:.1f} % | {statistics.median(gaps[m][i] for i in top):.2e} "
              f"| {statistics.median(gaps[m][i] for i in rest):.2e} | {rank_correlation(norms[m], inv_gap):+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
