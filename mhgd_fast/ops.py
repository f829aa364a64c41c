"""The public ops (README.md, "The ops on their own"): validated, then dispatched to a backend.

``backend="auto"`` takes the compiled kernel for the tensors' device, else the pure-PyTorch
reference (:func:`~mhgd_fast.backends.resolve`). Naming a backend that cannot run raises
:class:`~mhgd_fast.backends.BackendUnavailableError`. ``align_singular_vectors`` has no compiled
kernel and no ``backend`` argument: it is the reference's float64 maths on any device.

Each op's section holds its Python wrapper and, right after it, what makes its compiled
``torch.ops.mhgd_fast.*`` ops (declared and implemented in ``csrc/``) whole on the Python side:
fake (meta) kernels, so that they trace under ``torch.compile(fullgraph=True)`` and pass
``torch.library.opcheck``, and the autograd formulas. They are registered when this module is
imported (``import mhgd_fast`` does), and not at all without the extension, which declares the ops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _extension, reference
from .reference import compute_dtype
from ._validation import (check_all_finite, check_choice, check_dim, check_float_tensor,
                          check_same, check_scale)
from .backends import resolve

__all__ = ["graph_kl", "attention_graph", "topk_singular_vectors", "align_singular_vectors"]

SQUASHES = (None, "tanh")
DIRECTIONS = ("student_teacher", "teacher_student")
REDUCTIONS = ("sum", "mean", "none")
# Sizes the CUDA topk_singular_vectors kernel takes, as compiled (csrc/limits.h); larger ones run
# the reference on the same device. The CPU kernel takes every size.
_LIMITS = _extension.limits()


def _check_heads(q_name, q, k_name, k) -> None:
    check_float_tensor(q_name, q, ndim=3, layout="[H, N, d]")
    check_float_tensor(k_name, k, ndim=3, layout="[H, M, d]")
    check_dim(k_name, k, 0, q.shape[0], f"head count (dim 0; {q_name} has {q.shape[0]})")
    check_dim(k_name, k, 2, q.shape[2], f"feature size (dim 2; {q_name} has {q.shape[2]})")
    if k.shape[1] == 0:
        raise ValueError(f"{k_name} has no columns (M = 0): a graph row needs at least one column")


# ------------------------------------------------------------------------------- attention_graph

def attention_graph(q: torch.Tensor, k: torch.Tensor, *, squash: Optional[str] = None,
                    scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """``[H, N, d], [H, M, d] -> [H, N, M]``: ``softmax_j(squash(scale·q kᵀ))`` (§4).

    float16/bfloat16 inputs accumulate in float32; the result has the input dtype.
    """
    _check_heads("q", q, "k", k)
    check_same(("q", "k"), (q, k))
    check_choice("squash", squash, SQUASHES)
    scale = check_scale(scale)
    impl = resolve("attention_graph", backend, q.device)
    if impl == "reference":
        return reference.attention_graph(q, k, squash, scale)
    return torch.ops.mhgd_fast.attention_graph(q, k, squash == "tanh", scale)


# Fake kernels and autograd of the compiled attention_graph.
if _extension._C is not None:

    @torch.library.register_fake("mhgd_fast::attention_graph")
    def _attention_graph_fake(q, k, squash_tanh, scale):
        return q.new_empty(q.shape[0], q.shape[1], k.shape[1])

    @torch.library.register_fake("mhgd_fast::attention_graph_backward")
    def _attention_graph_backward_fake(grad, q, k, squash_tanh, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _attention_graph_setup(ctx, inputs, output):
        q, k, squash_tanh, scale = inputs
        ctx.save_for_backward(q, k)
        ctx.squash_tanh, ctx.scale = squash_tanh, scale

    def _attention_graph_backward(ctx, grad):
        q, k = ctx.saved_tensors
        dq, dk = torch.ops.mhgd_fast.attention_graph_backward(grad, q, k, ctx.squash_tanh, ctx.scale)
        return dq, dk, None, None

    torch.library.register_autograd("mhgd_fast::attention_graph", _attention_graph_backward,
                                    setup_context=_attention_graph_setup)


# -------------------------------------------------------------------------------------- graph_kl

def graph_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
             squash: Optional[str] = "tanh", scale: float = 1.0,
             direction: str = "student_teacher", reduction: str = "sum",
             backend: str = "auto") -> torch.Tensor:
    """KL divergence between the student's and the teacher's attention graphs (§6–§7).

    ``q_*: [H, N, d]``, ``k_*: [H, M, d]``. Graph rows are ``softmax_j(squash(scale·q kᵀ))``.
    ``direction="student_teacher"`` sums KL(P_s ‖ P_t) over heads and rows (the paper's loss).
    ``reduction``: ``"sum"``, ``"mean"`` over the H·N rows, or ``"none"`` (``[H, N]``).
    float16/bfloat16 inputs are accumulated and returned in float32. NaN/Inf inputs propagate.

    Accuracy of the compiled kernels (``"cpu"``, ``"cuda"``), against the reference in float64 on
    the same inputs, with ε the machine epsilon of the compute dtype and M the row length:

    * The row math subtracts each row's max before anything else, so each row's KL is within
      ``(4 + M/128)·ε·(|KL| + log M + 1)`` of the exact KL of the logits as computed, at any logit
      size up to overflow (measured: below ``2·ε·(…)`` for M ≤ 256, ``32·ε·(…)`` at M = 4000, where
      the reference's cascade sums reach ``5·ε·(…)``). M = 1 gives exactly 0, and zero gradients.
    * Rounding the logits ``scale·q kᵀ`` themselves, which every computation in that dtype does
      (the reference's too), adds at most ``(2·|KL| + 4)·Δ``, Δ the row's largest logit error:
      about ``(d + 1)·ε·|scale|·max_j Σ_k |q_ik·k_jk|`` (``+ 2ε`` with tanh).
    * Gradients: within twice the error of the reference computed in the same dtype, plus the
      rounding of ``dL/dlogits = P·(ℓ − KL)``-like differences, about ``ε·(|KL| + log M + 1)``
      per unit of ``dL/dKL`` in each logit's gradient (the float64 reference has it too).
    * Long rows of logits near the dtype's range stay finite: the row's weighted sum
      ``Σ_j e^{a_j}·(a_j − b_j)`` is accumulated scaled by ``2^-⌈log₂ M⌉`` (exact), so M terms of
      the logits' range cannot overflow where the KL itself does not.
    """
    _check_heads("q_s", q_s, "k_s", k_s)
    _check_heads("q_t", q_t, "k_t", k_t)
    check_same(("q_s", "k_s", "q_t", "k_t"), (q_s, k_s, q_t, k_t))
    check_dim("q_t", q_t, 0, q_s.shape[0], "head count (dim 0, must match q_s)")
    check_dim("q_t", q_t, 1, q_s.shape[1], "row count (dim 1, must match q_s)")
    check_dim("q_t", q_t, 2, q_s.shape[2], "feature size (dim 2, must match q_s)")
    check_dim("k_t", k_t, 1, k_s.shape[1], "column count (dim 1, must match k_s)")
    check_choice("squash", squash, SQUASHES)
    check_choice("direction", direction, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    scale = check_scale(scale)
    if reduction == "mean" and q_s.shape[0] * q_s.shape[1] == 0:
        raise ValueError("reduction='mean' needs at least one graph row (H·N > 0)")
    impl = resolve("graph_kl", backend, q_s.device)
    if impl == "reference":
        return reference.graph_kl(q_s, k_s, q_t, k_t, squash, scale, direction, reduction)
    options = (squash == "tanh", scale, direction == "teacher_student")
    grad_mask = [torch.is_grad_enabled() and t.requires_grad for t in (q_s, k_s, q_t, k_t)]
    if reduction != "none" and any(grad_mask):
        # Scalar loss: gradients come out of the forward sweep (4 GEMMs per head, not 6).
        return torch.ops.mhgd_fast.graph_kl_fused(q_s, k_s, q_t, k_t, *options, reduction == "mean", grad_mask)[0]
    rows = torch.ops.mhgd_fast.graph_kl(q_s, k_s, q_t, k_t, *options)[0]
    return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]


# Fake kernels and autograd of the compiled graph_kl (row, backward and fused ops).
if _extension._C is not None:

    def _rows_like(q_s, *trailing):
        return q_s.new_empty(*q_s.shape[:2], *trailing, dtype=compute_dtype(q_s.dtype))

    @torch.library.register_fake("mhgd_fast::graph_kl")
    def _graph_kl_fake(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student):
        # kl [H, N]; per side [H, N, 2]: each row's logit max and log Σ exp(logit − max).
        return _rows_like(q_s), _rows_like(q_s, 2), _rows_like(q_s, 2)

    @torch.library.register_fake("mhgd_fast::graph_kl_backward")
    def _graph_kl_backward_fake(grad_rows, q_s, k_s, q_t, k_t, kl, stats_s, stats_t, squash_tanh, scale,
                                teacher_student, grad_mask):
        return tuple(x.new_empty(x.shape) for x in (q_s, k_s, q_t, k_t))

    @torch.library.register_fake("mhgd_fast::graph_kl_fused")
    def _graph_kl_fused_fake(q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student, mean, grad_mask):
        loss = q_s.new_empty((), dtype=compute_dtype(q_s.dtype))
        return (loss,) + tuple(x.new_empty(x.shape, dtype=compute_dtype(x.dtype)) for x in (q_s, k_s, q_t, k_t))

    def _graph_kl_setup(ctx, inputs, output):
        q_s, k_s, q_t, k_t, squash_tanh, scale, teacher_student = inputs
        kl, stats_s, stats_t = output
        ctx.mark_non_differentiable(stats_s, stats_t)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, kl, stats_s, stats_t)
        ctx.options = (squash_tanh, scale, teacher_student)

    def _graph_kl_backward(ctx, grad_kl, grad_stats_s, grad_stats_t):
        mask = list(ctx.needs_input_grad[:4])
        grads = torch.ops.mhgd_fast.graph_kl_backward(grad_kl, *ctx.saved_tensors, *ctx.options, mask)
        return tuple(g if needed else None for g, needed in zip(grads, mask)) + (None,) * 3

    torch.library.register_autograd("mhgd_fast::graph_kl", _graph_kl_backward, setup_context=_graph_kl_setup)

    def _graph_kl_fused_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])
        ctx.grad_mask = inputs[-1]
        ctx.dtypes = [t.dtype for t in inputs[:4]]

    def _graph_kl_fused_backward(ctx, grad_loss, *unused):
        if torch.is_grad_enabled():
            # The saved gradients are constants: a second derivative through them would be wrong.
            raise RuntimeError("mhgd_fast graph_kl (fused CPU/CUDA kernel) does not support double "
                               "backward; use backend='reference' for higher-order gradients")
        # Scaled in the accumulation dtype, then rounded to the input's (AMP's loss scale included).
        grads = tuple((grad_loss * g).to(dtype) if needed else None
                      for g, needed, dtype in zip(ctx.saved_tensors, ctx.grad_mask, ctx.dtypes))
        return grads + (None,) * 5

    torch.library.register_autograd("mhgd_fast::graph_kl_fused", _graph_kl_fused_backward,
                                    setup_context=_graph_kl_fused_setup)


# ------------------------------------------------------------------------- topk_singular_vectors

def topk_singular_vectors(fm: torch.Tensor, k: int, *, eps: Optional[float] = None,
                          backend: str = "auto") -> torch.Tensor:
    """``[B, C, *spatial] -> [B, k, C]``: top-k right singular vectors of each sample's
    ``X_b = fm_b.reshape(C, -1).T`` (§3), descending, unit norm, component sum ≥ 0.

    Vectors whose singular value is ≤ ``eps·σ_max`` (or σ_max = 0) are zeros with zero gradient.
    The gradient is the exact eigenvector derivative; couplings with ``|λ_i − λ_j| ≤ eps·λ_max``
    are dropped. ``eps`` defaults to ``max(√ε, 2·√(16·n·ε₆₄))`` (:func:`reference.default_eps
    <mhgd_fast.reference.default_eps>`), ε the machine epsilon of the compute dtype and
    n = min(C, HW) the Gram's size: sqrt(ε) for float32 and 16-bit inputs, and for float64 a
    margin above the rounding noise of the float64 Gram (≈ √(n·ε₆₄)·σ_max), so that the zero tail
    of a rank-deficient map is zero in every backend. It is computed here, once, and every
    backend applies it; a given ``eps`` is used as is. NaN/Inf in ``fm`` raise ``ValueError``.
    """
    check_float_tensor("fm", fm, min_ndim=2, layout="[B, C, *spatial]")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= fm.shape[1]:
        raise ValueError(f"k must be in [1, C={fm.shape[1]}] for fm of shape {tuple(fm.shape)}, got {k}")
    if eps is not None and not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    impl = resolve("topk_singular_vectors", backend, fm.device)
    n = reference.gram_size(fm.shape)
    if impl == "cuda" and (k > _LIMITS["cuda_topk_max_k"] or n > _LIMITS["cuda_topk_max_n"]):
        impl = "reference"  # beyond the one-block-per-sample kernel's sizes (documented)
    # One threshold for every backend (the default depends on the dtype and the Gram's size).
    eps = reference.default_eps(fm.dtype, n) if eps is None else float(eps)
    if impl == "reference":
        check_all_finite("fm", fm)
        return reference.topk_singular_vectors(fm, k, eps)
    # The compiled kernels check the Gram, which any NaN/Inf in fm reaches (a full pass over fm
    # costs as much as the Gram itself), and raise the same ValueError.
    # Without a gradient to come, the op keeps no state (and may take power iteration for k = 1).
    save_state = torch.is_grad_enabled() and fm.requires_grad
    try:
        out = torch.ops.mhgd_fast.topk_singular_vectors(fm, k, eps, save_state)[0]
    except ValueError:
        if torch.compiler.is_compiling() or not bool(torch.isfinite(fm).all()):
            raise
        out = None  # finite, but its Gram overflowed the compute dtype
    if out is None or (fm.shape[0] and _may_have_underflowed(fm, out)):
        out = torch.ops.mhgd_fast.topk_singular_vectors(fm * _power_of_two_scales(fm), k, eps, save_state)[0]
    return out


# Feature maps whose largest |value| lies outside [2^-40, 2^40] are rescaled before the Gram.
_SAFE_EXPONENT = 40


def _power_of_two_scales(fm: torch.Tensor) -> torch.Tensor:
    """Per-sample 2^-e (1 for samples already in range) with max|fm_b|·2^-e in [0.5, 1): exact in
    floating point, and the singular vectors do not change under scaling (their gradient takes the
    same factor, through the product)."""
    with torch.no_grad():
        peak = fm.detach().reshape(fm.shape[0], -1).abs().amax(1).double()
        exponent = torch.frexp(peak).exponent
        out_of_range = (peak > 0) & (exponent.abs() > _SAFE_EXPONENT)
        scale = torch.where(out_of_range, torch.ldexp(torch.ones_like(peak), -exponent), 1.0)
    return scale.to(fm.dtype).view(-1, *([1] * (fm.dim() - 1)))


def _may_have_underflowed(fm: torch.Tensor, out: torch.Tensor) -> bool:
    """A sample whose leading vector is zero although its map is not: its Gram underflowed
    (|values| ≲ 1e-19 in float32). Checks only the samples the kernel found empty."""
    if torch.compiler.is_compiling():
        return False
    empty = (out[:, 0] == 0).all(-1)
    if not bool(empty.any()):
        return False
    return bool((fm.detach()[empty] != 0).any())


# Fake kernels and autograd of the compiled topk_singular_vectors.
if _extension._C is not None:

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors")
    def _topk_singular_vectors_fake(fm, k, eps, save_state=True):
        batch, c = fm.shape[0], fm.shape[1]
        n = torch.sym_min(math.prod(fm.shape[2:]), c)
        kk = torch.sym_min(k, n)
        f64 = dict(dtype=torch.float64)
        if not save_state:
            return (fm.new_empty(batch, k, c),) + tuple(fm.new_empty(0, **f64) for _ in range(4))
        return (fm.new_empty(batch, k, c), fm.new_empty(batch, n, n, **f64), fm.new_empty(batch, 3, n, **f64),
                fm.new_empty(batch, n, kk, **f64), fm.new_empty(batch, torch.sym_min(n, kk + 1), **f64))

    @torch.library.register_fake("mhgd_fast::topk_singular_vectors_backward")
    def _topk_singular_vectors_backward_fake(grad, fm, householder, tridiagonal, gram_vectors, eigenvalues, k, eps):
        return torch.empty_like(fm)

    def _topk_singular_vectors_setup(ctx, inputs, output):
        fm, k, eps = inputs[:3]
        ctx.mark_non_differentiable(*output[1:])
        # No zero gradients for the saved state (the Householder factors alone are B·n²·8 bytes).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(fm, *output[1:])
        ctx.k, ctx.eps = k, eps

    def _topk_singular_vectors_backward(ctx, grad, *_saved_state_grads):
        # Only `vectors` is an output of the public op; the others are saved state.
        if grad is None:
            return None, None, None, None
        grad_fm = torch.ops.mhgd_fast.topk_singular_vectors_backward(grad, *ctx.saved_tensors, ctx.k, ctx.eps)
        return grad_fm, None, None, None

    torch.library.register_autograd("mhgd_fast::topk_singular_vectors", _topk_singular_vectors_backward,
                                    setup_context=_topk_singular_vectors_setup)


# ------------------------------------------------------------------------ align_singular_vectors

def align_singular_vectors(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """``[B, ks, C], [B, C] -> [B, C]``: per sample, the student vector with the largest |cosine|
    to the teacher's vector (first on ties), times that cosine's sign (+1 when 0). The gradient
    flows through the picked student vector only.

    Reference-only, by design: there is no compiled kernel and no ``backend`` argument. The work is
    B·ks·C products, a gather and a sign, done by PyTorch on the inputs' device; the cosines are
    taken in float64 so that tiny or huge vectors cannot flip the sign."""
    check_float_tensor("v_s", v_s, ndim=3, layout="[B, ks, C]")
    check_float_tensor("v_t", v_t, ndim=2, layout="[B, C]")
    check_same(("v_s", "v_t"), (v_s, v_t))
    check_dim("v_t", v_t, 0, v_s.shape[0], "batch size (dim 0, must match v_s)")
    check_dim("v_t", v_t, 1, v_s.shape[2], "channel count (dim 1, must match v_s dim 2)")
    if v_s.shape[1] == 0:
        raise ValueError("v_s has no candidate vectors (ks = 0)")
    return reference.align_singular_vectors(v_s, v_t)  # no resolve(): no kernel to choose
