"""Pure-PyTorch reference backend: the readable statement of MHGD's math (docs/method.md §3–§7).

Every fast path of this package is tested against the functions here. They assume validated
inputs (see :mod:`mhgd_fast.ops` for the public, checked entry points) and compute in the
accumulation dtype returned by :func:`compute_dtype`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "gram_size",
    "null_floor",
    "default_eps",
    "topk_singular_vectors",
    "align_singular_vectors",
    "attention_graph",
    "graph_kl",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit floats accumulate in float32; float32/float64 compute in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gram_size(shape) -> int:
    """n = min(C, HW) for a ``[B, C, *spatial]`` map: the size of the smaller Gram (§3)."""
    return min(shape[1], math.prod(shape[2:]))


# Rounding noise of a Gram eigenvalue, per Gram row, in units of float64's ε (·λ_max).
GRAM_NOISE_PER_ROW = 16


def null_floor(n: int) -> float:
    """Eigenvalues of an n×n Gram below ``null_floor(n)·λ_max`` are rounding noise (numerically 0).

    Every backend forms the Gram and its eigensystem in float64, whatever the input dtype, so
    the floor is float64's: 16·n·ε₆₄, a bound on the rounding of the Gram's product (its
    entries carry ≈ ε₆₄·λ_max each) and of the eigen-solver (≈ n·ε₆₄·λ_max for Householder and
    bisection). Measured on exactly rank-deficient maps (Gaussian, positive and badly scaled
    factors, n = 2…2000, HW up to 10⁵, both routes, compiled and ``eigh``): the zero tail sat
    at ≤ 4·ε₆₄·λ_max, so the floor is ≥ 8× above it. The compiled backward uses this floor for
    float64 maps (float32's ε in its place for float32 data) to send samples with a numerical
    null space to its exact route.
    """
    return GRAM_NOISE_PER_ROW * n * torch.finfo(torch.float64).eps


def default_eps(dtype: torch.dtype, n: int) -> float:
    """Default relative threshold of §3 for an n×n Gram: σ ≤ eps·σ_max is zero,
    |λ_i − λ_j| ≤ eps·λ_max is uncoupled.

    ``max(√ε, 2·√null_floor(n))``, ε the machine epsilon of the compute dtype: sqrt(ε) because
    the Gram route squares the condition number, so singular values below that fraction of
    σ_max carry no reliable direction in the input's precision; and a margin above the Gram's
    rounding noise, which decides nothing: a singular value computed from the Gram is
    √(λ_max·noise) ≈ √(n·ε₆₄)·σ_max at best, and with the bare √ε₆₄ of float64 the zero tail of
    a rank-deficient map was on either side of the threshold by chance, backend by backend.
    Twice the floor's σ (4× in λ) keeps a zero tail ≥ 5× below the threshold in σ (≥ 30× in λ)
    in the worst case measured. For float32 and 16-bit inputs √ε of float32 is the larger term
    for every n a kernel takes; for float64 the floor is (n = 2: 1.7e-7, n = 2048: 5.4e-6).

    Computed once per call (:func:`mhgd_fast.ops.topk_singular_vectors`) and passed to whichever
    backend runs, so that all of them apply the same threshold.
    """
    return max(torch.finfo(compute_dtype(dtype)).eps ** 0.5, 2.0 * null_floor(n) ** 0.5)


# --------------------------------------------------------------------------------------------
# §3 Compression: top-k right singular vectors
# --------------------------------------------------------------------------------------------


def _gram_eigensystem(x: torch.Tensor, eps: float):
    """Eigenpairs of XᵀX (X: [B, HW, C]) from the smaller Gram, in descending order.

    Returns ``lam [B, R]``, ``vecs [B, C, R]`` and ``complete``. When
    HW ≥ C, R = C and the eigenbasis is complete. Otherwise XXᵀ ([HW, HW]) is decomposed,
    ``v = Xᵀu/σ``, and the missing C − HW directions (plus any with σ ≤ eps·σ_max, returned as
    zero columns) span the null space of XᵀX, whose eigenvalue is 0.

    ``x`` is float64 (see :func:`topk_singular_vectors`), as the compiled kernels' Gram and
    eigensolvers are for k ≥ 2 (for k = 1 the one decision, σ_1 > eps·σ_1, is σ_1 > 0 in any
    precision), so that every backend compares the same values against eps (:func:`default_eps`):
    a float32 Gram's rounding would put the singular values of a rank-deficient map at
    ≈ √(n·ε)·σ_max, at the ``eps = √ε`` of float32, so its zero tail would not be zero.
    """
    hw, c = x.shape[-2], x.shape[-1]
    if hw >= c:
        lam, vecs = torch.linalg.eigh(x.transpose(-1, -2) @ x)
        return lam.flip(-1), vecs.flip(-1), True
    lam, u = torch.linalg.eigh(x @ x.transpose(-1, -2))
    lam, u = lam.flip(-1), u.flip(-1)
    sigma = lam.clamp_min(0).sqrt()
    in_range = sigma > eps * sigma[:, :1]
    vecs = (x.transpose(-1, -2) @ u) / torch.where(in_range, sigma, 1.0).unsqueeze(-2)
    vecs = vecs * in_range.unsqueeze(-2)
    lam = lam * in_range
    return lam, vecs, False


class _TopkSingularVectors(torch.autograd.Function):
    """Top-k right singular vectors of X with the exact eigenvector derivative of §3."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, eps: float):
        batch, _, c = x.shape
        lam, vecs, complete = _gram_eigensystem(x, eps)
        kk = min(k, lam.shape[-1])
        sigma = lam.clamp_min(0).sqrt()
        # Zero vectors where σ_i ≤ eps·σ_max (covers σ_max = 0 too), decided on float64 σ.
        valid = sigma[:, :kk] > eps * sigma[:, :1]
        top = vecs[:, :, :kk]
        # Canonical sign: component sum ≥ 0.
        sign = torch.where(top.sum(-2) < 0, -1.0, 1.0).to(x.dtype)
        scale = sign * valid
        out = x.new_zeros(batch, k, c)
        out[:, :kk] = (top * scale.unsqueeze(-2)).transpose(-1, -2)
        ctx.save_for_backward(x, lam, vecs, scale)
        ctx.complete, ctx.kk, ctx.eps = complete, kk, eps
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, lam64, vecs, scale = ctx.saved_tensors
        kk, eps = ctx.kk, ctx.eps
        # Gradient w.r.t. the unsigned eigenvectors v_i (the flip and the mask are constants).
        g = grad_out[:, :kk].transpose(-1, -2) * scale.unsqueeze(-2)  # [B, C, kk]
        top = vecs[:, :, :kk]
        # Which couplings are dropped is decided on the float64 eigenvalues (as in forward).
        thresh = (eps * lam64[:, :1]).unsqueeze(-1)  # eps·λ_max, [B, 1, 1]
        gap64 = lam64[:, :kk].unsqueeze(-2) - lam64.unsqueeze(-1)  # [B, R, kk]: λ_i − λ_j
        kept = gap64.abs() > thresh
        lam = lam64.to(x.dtype)
        lam_top = lam[:, :kk]
        # w_i = Σ_{j≠i} v_j (v_jᵀ g_i) / (λ_i − λ_j), terms with |λ_i − λ_j| ≤ eps·λ_max dropped.
        gap = lam_top.unsqueeze(-2) - lam.unsqueeze(-1)
        coupling = torch.where(kept, 1.0 / torch.where(gap == 0, 1.0, gap), 0.0)
        proj = vecs.transpose(-1, -2) @ g  # [B, R, kk]
        w = vecs @ (coupling * proj)
        if not ctx.complete:
            # The unlisted eigenvectors all have λ_j = 0: their block is the projector residual.
            resid = g - vecs @ proj
            above = (lam64[:, :kk].unsqueeze(-2) > thresh)
            lam_i = lam_top.unsqueeze(-2)
            w = w + torch.where(above, resid / torch.where(lam_i == 0, 1.0, lam_i), 0.0)
        # ∂L/∂(XᵀX) = W = Σ_i w_i v_iᵀ, so ∂L/∂X = X (W + Wᵀ).
        grad_x = (x @ w) @ top.transpose(-1, -2) + (x @ top) @ w.transpose(-1, -2)
        return grad_x, None, None


def topk_singular_vectors(fm: torch.Tensor, k: int, eps: Optional[float] = None) -> torch.Tensor:
    """``[B, C, *spatial] -> [B, k, C]``: per sample, the top-k right singular vectors of
    ``X_b = fm_b.reshape(C, -1).T`` in descending singular value, unit norm, canonical sign;
    ``eps`` defaults to :func:`default_eps` of the map's dtype and Gram size.

    Computed in float64 whatever the input dtype (the result is rounded to it): the eigenvalues
    σ² of a float32 map of |values| ≈ 1e30 (or 1e-30) would overflow (underflow) float32, and the
    singular vectors do not depend on the map's scale.
    """
    eps = default_eps(fm.dtype, gram_size(fm.shape)) if eps is None else eps
    batch, c = fm.shape[0], fm.shape[1]
    if batch == 0:
        return fm.new_zeros(0, k, c)
    x = fm.reshape(batch, c, -1).transpose(-1, -2).to(torch.float64)
    return _TopkSingularVectors.apply(x, k, eps).to(fm.dtype)


def align_singular_vectors(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """``[B, ks, C], [B, C] -> [B, C]``: per sample the student vector with the largest |cosine|
    to the teacher's (first on ties), multiplied by the sign of that cosine (+1 when 0)."""
    with torch.no_grad():
        # float64: B·ks·C products are cheap, and the cosines of tiny (or huge) float32 vectors
        # must not underflow (overflow) to 0 and flip the sign.
        vs, vt = v_s.double(), v_t.double()
        dots = (vs * vt.unsqueeze(1)).sum(-1)
        norms = vs.norm(dim=-1) * vt.norm(dim=-1, keepdim=True)
        cos = dots / torch.where(norms > 0, norms, 1.0)
        idx = cos.abs().argmax(dim=1)
        picked_cos = cos.gather(1, idx.unsqueeze(1)).squeeze(1)
        sign = torch.where(picked_cos < 0, -1.0, 1.0).to(v_s.dtype)
    picked = v_s.gather(1, idx.view(-1, 1, 1).expand(-1, 1, v_s.shape[-1])).squeeze(1)
    return picked * sign.unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# §4, §7 Attention graph and the KL relation loss
# --------------------------------------------------------------------------------------------


def attention_logits(q: torch.Tensor, k: torch.Tensor, squash: Optional[str], scale: float):
    """``scale · q kᵀ`` per head, optionally squashed by tanh (stage 2)."""
    s = scale * (q @ k.transpose(-1, -2))
    return torch.tanh(s) if squash == "tanh" else s


def attention_graph(q, k, squash: Optional[str] = None, scale: float = 1.0) -> torch.Tensor:
    """``[H, N, d], [H, M, d] -> [H, N, M]``: row-softmax of the (squashed) logits."""
    acc = compute_dtype(q.dtype)
    s = attention_logits(q.to(acc), k.to(acc), squash, scale)
    return torch.softmax(s, dim=-1).to(q.dtype)


def graph_kl(q_s, k_s, q_t, k_t, squash: Optional[str] = "tanh", scale: float = 1.0,
             direction: str = "student_teacher", reduction: str = "sum") -> torch.Tensor:
    """Σ over heads and rows of KL between the student's and the teacher's graph rows (§6–§7).

    ``direction="student_teacher"`` is KL(P_s ‖ P_t); ``"teacher_student"`` is KL(P_t ‖ P_s).
    ``reduction``: ``"sum"``, ``"mean"`` (over H·N rows) or ``"none"`` (``[H, N]``). 16-bit
    inputs are computed and returned in float32.
    """
    acc = compute_dtype(q_s.dtype)
    log_ps = F.log_softmax(attention_logits(q_s.to(acc), k_s.to(acc), squash, scale), dim=-1)
    log_pt = F.log_softmax(attention_logits(q_t.to(acc), k_t.to(acc), squash, scale), dim=-1)
    if direction == "student_teacher":
        rows = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
