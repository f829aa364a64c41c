"""topk_singular_vectors and align_singular_vectors against independent math (§3)."""
import pytest
import torch

import mhgd_fast as mf
from _helpers import FLOATS, device_of, rel_err


def controlled_map(batch, c, hw, sigmas, dtype=torch.float64):
    """Feature maps [B, C, hw] whose X = fm.T has exactly the singular values ``sigmas``."""
    r = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(batch, hw, r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(batch, c, r, dtype=torch.float64))
    x = u @ torch.diag_embed(torch.tensor(sigmas, dtype=torch.float64).expand(batch, r)) @ v.transpose(-1, -2)
    return x.transpose(-1, -2).to(dtype).contiguous()  # [B, C, HW]


def canonical_svd_vectors(fm, k):
    """Top-k right singular vectors by torch.linalg.svd with the §3 sign convention; differentiable
    through svd's own backward (valid for distinct singular values)."""
    x = fm.reshape(fm.shape[0], fm.shape[1], -1).transpose(-1, -2)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    top = vh[:, :k]  # [B, k, C]
    sign = torch.where(top.detach().sum(-1, keepdim=True) < 0, -1.0, 1.0).to(top.dtype)
    return top * sign


# (C, HW) pairs covering both Gram routes (HW ≥ C and HW < C) with odd sizes.
SHAPES = [(7, 30), (13, 13), (24, 9), (5, 1 * 3)]


@pytest.mark.matrix()
@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_svd_values_and_gradients(backend, c, hw, k):
    r = min(c, hw)
    sigmas = [3.0 * 0.7 ** i for i in range(r)]  # well separated
    fm = controlled_map(5, c, hw, sigmas).to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, k, backend=backend)
    ref = canonical_svd_vectors(fm, k)
    assert out.shape == (5, k, c)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    w = torch.randn_like(ref)
    g, = torch.autograd.grad((out * w).sum(), fm)
    r_g, = torch.autograd.grad((ref * w).sum(), fm)
    assert rel_err(g, r_g) < 1e-8


@pytest.mark.matrix()
@pytest.mark.parametrize("c,hw", [(4, 9), (6, 3)])
def test_gradcheck(backend, c, hw):
    fm = torch.randn(3, c, hw, dtype=torch.float64, device=device_of(backend), requires_grad=True)
    fn = lambda x: mf.ops.topk_singular_vectors(x, 2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (fm,))


@pytest.mark.matrix()
def test_spatial_layouts_and_float32(backend):
    """Any number of spatial dims (including none); float32 close to the float64 answer."""
    dev = device_of(backend)
    fm = torch.relu(torch.randn(6, 11, 5, 7, dtype=torch.float64, device=dev))
    ref = mf.ops.topk_singular_vectors(fm, 3, backend=backend)
    out32 = mf.ops.topk_singular_vectors(fm.float(), 3, backend=backend)
    assert out32.dtype == torch.float32
    assert float((out32.double() * ref).sum(-1).abs().min()) > 1 - 1e-5
    flat = mf.ops.topk_singular_vectors(fm.reshape(6, 11, 35), 3, backend=backend)
    torch.testing.assert_close(flat, ref)
    vec = torch.randn(4, 9, dtype=torch.float64, device=dev)  # [B, C]: HW = 1
    top = mf.ops.topk_singular_vectors(vec, 1, backend=backend)[:, 0]
    expected = vec / vec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(top, expected * torch.where(expected.sum(1, keepdim=True) < 0, -1.0, 1.0))


def test_canonical_sign_and_unit_norm_post_relu_conv():
    """Post-ReLU maps of a real conv layer: unit vectors, component sum ≥ 0, and the top vector
    non-negative (Perron vector of a non-negative Gram)."""
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    fm = torch.relu(conv(torch.randn(8, 3, 12, 12))).detach().double()
    out = mf.ops.topk_singular_vectors(fm, 4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(8, 4, dtype=torch.float64))
    assert (out.sum(-1) >= 0).all()
    assert (out[:, 0] >= -1e-12).all()
    ref = canonical_svd_vectors(fm, 4)
    assert float((out * ref).sum(-1).abs().min()) > 1 - 1e-9


@pytest.mark.matrix(dtypes=FLOATS)
def test_zero_map_gives_zero_vectors_and_zero_gradient(backend, dtype, device):
    fm = torch.zeros(3, 5, 4, 4, dtype=dtype, device=device, requires_grad=True)
    out = mf.ops.topk_singular_vectors(fm, 3, backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    assert (fm.grad == 0).all()


@pytest.mark.matrix()
@pytest.mark.parametrize("c,hw", [(8, 20), (8, 5)])
def test_rank_deficient_tail_is_zero_and_finite(backend, c, hw):
    fm = controlled_map(4, c, hw, [2.0, 1.0], dtype=torch.float32).to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, 4, backend=backend)
    assert (out[:, 2:] == 0).all()
    torch.testing.assert_close(out[:, :2].norm(dim=-1), torch.ones(4, 2, device=fm.device))
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(fm.grad).all()


@pytest.mark.matrix()
@pytest.mark.parametrize("c,hw", [(6, 10), (10, 6)])
def test_repeated_singular_values_are_finite(backend, c, hw):
    fm = controlled_map(3, c, hw, [1.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float32)
    fm = fm.to(device_of(backend)).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, 4, backend=backend)
    assert torch.isfinite(out).all()
    # Whatever basis of the repeated subspace is returned, it is orthonormal and spans it.
    gram = out[:, :3] @ out[:, :3].transpose(-1, -2)
    torch.testing.assert_close(gram, torch.eye(3, device=fm.device).expand(3, 3, 3), atol=1e-4, rtol=0)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(fm.grad).all()


def test_repeated_top_pair_only_drops_its_coupling():
    """With σ1 = σ2 the gradient of v3 (distinct) still matches svd's, which is finite there."""
    fm = controlled_map(2, 7, 12, [2.0, 2.0, 1.0, 0.5], dtype=torch.float64).requires_grad_()
    out = mf.ops.topk_singular_vectors(fm, 3)
    ref = canonical_svd_vectors(fm, 3)
    torch.testing.assert_close(out[:, 2], ref[:, 2])
    g, = torch.autograd.grad(out[:, 2].sum(), fm)
    r_g, = torch.autograd.grad(ref[:, 2].sum(), fm)
    assert rel_err(g, r_g) < 1e-8


def test_half_inputs_and_empty_batch():
    fm = torch.relu(torch.randn(4, 8, 6, 6)).to(torch.bfloat16)
    out = mf.ops.topk_singular_vectors(fm, 2)
    assert out.dtype == torch.bfloat16
    ref = mf.ops.topk_singular_vectors(fm.double(), 2)
    assert float((out.double() * ref).sum(-1).abs().min()) > 0.99
    assert mf.ops.topk_singular_vectors(torch.zeros(0, 8, 3, 3), 2).shape == (0, 2, 8)


# ---------------------------------------------------------------------------- alignment

def test_align_picks_largest_abs_cosine_with_sign():
    v_t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    v_s = torch.tensor([[[0.0, 1.0, 0.0], [-0.9, 0.1, 0.0], [0.5, 0.5, 0.0]],
                        [[0.0, 0.6, 0.8], [0.0, 0.6, -0.8], [1.0, 0.0, 0.0]]], requires_grad=True)
    out = mf.ops.align_singular_vectors(v_s, v_t)
    torch.testing.assert_close(out, torch.tensor([[0.9, -0.1, 0.0], [0.0, 0.6, 0.8]]))
    out.sum().backward()
    expected = torch.zeros(2, 3, 3)
    expected[0, 1] = -1.0  # picked index 1 with sign -1
    expected[1, 0] = 1.0  # tie between 0 and 1: first index, sign +1
    torch.testing.assert_close(v_s.grad, expected)


def test_align_zero_cosine_keeps_sign_and_first_index():
    v_t = torch.tensor([[1.0, 0.0]])
    v_s = torch.tensor([[[0.0, -1.0], [0.0, 1.0]]])
    torch.testing.assert_close(mf.ops.align_singular_vectors(v_s, v_t), torch.tensor([[0.0, -1.0]]))


def test_align_zero_vectors_are_finite():
    v_s, v_t = torch.zeros(3, 4, 5), torch.zeros(3, 5)
    assert (mf.ops.align_singular_vectors(v_s, v_t) == 0).all()
