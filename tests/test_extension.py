"""The compiled extension: build facts, version guard, op registration, opcheck, torch.compile."""
import pytest
import torch

import mhgd_fast as mf
from conftest import REQUIRE_EXTENSION
from mhgd_fast import _extension

compiled = pytest.mark.skipif(not mf.build_info()["extension_loaded"] and not REQUIRE_EXTENSION,
                              reason="extension not built")


def test_reference_always_available():
    assert mf.available_backends()[0] == "reference"


def test_extension_loaded_when_required():
    info = mf.build_info()
    if REQUIRE_EXTENSION:
        assert info["extension_loaded"], info.get("extension_problem")
        assert "cpu" in mf.available_backends()


@compiled
def test_build_info_reports_what_was_compiled():
    info = mf.build_info()
    assert info["package_version"] == mf.__version__
    assert info["torch_version"] == torch.__version__ == info["build_torch_version"]
    assert "cpu" in info["compiled_backends"]
    assert "-fopenmp" in info["build_cxx_flags"] and info["openmp"]
    if "cuda" in info["compiled_backends"]:
        assert info["build_cuda_archs"] and info["cuda_runtime_compiled"] and info["build_nvcc_flags"]
        assert ("cuda" in mf.available_backends()) == torch.cuda.is_available()
    else:
        assert "cuda" not in mf.available_backends()


def test_version_mismatch_names_both_versions(monkeypatch):
    monkeypatch.setattr(_extension, "_read_meta", lambda: {"torch_version": "1.2.3", "backends": ["cpu"]})
    with pytest.raises(ImportError) as info:
        _extension._load()
    assert "1.2.3" in str(info.value) and torch.__version__ in str(info.value)


def test_unbuilt_extension_leaves_reference_backend(monkeypatch):
    monkeypatch.setattr(_extension, "_read_meta", lambda: None)
    module, meta, problem = _extension._load()
    assert module is None and meta is None and "not built" in problem


# ---------------------------------------------------------------------------- registered ops

def attention_samples():
    shapes = [(3, 7, 11, 5), (1, 1, 2, 1), (2, 16, 16, 9)]
    for (h, n, m, d), squash, grad in zip(shapes * 2, [True, False] * 3, [True, True, True, False, False, False]):
        q = torch.randn(h, n, d, requires_grad=grad)
        k = torch.randn(h, m, d, requires_grad=grad)
        yield q, k, squash, 0.7


@compiled
@pytest.mark.parametrize("sample", list(attention_samples()))
def test_opcheck_attention_graph(sample):
    torch.library.opcheck(torch.ops.mhgd_fast.attention_graph.default, sample)


@compiled
def test_opcheck_attention_graph_backward():
    q, k = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    for squash in (True, False):
        torch.library.opcheck(torch.ops.mhgd_fast.attention_graph_backward.default,
                              (torch.randn(2, 5, 4), q, k, squash, 1.5))


@compiled
def test_torch_compile_fullgraph_attention_graph():
    def loss_fn(q, k):
        return (mf.ops.attention_graph(q, k, squash="tanh", scale=0.5, backend="cpu") ** 2).sum()

    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    q = torch.randn(4, 9, 6, requires_grad=True)
    k = torch.randn(4, 13, 6, requires_grad=True)
    out = compiled_fn(q, k)
    dq, dk = torch.autograd.grad(out, (q, k))
    ref = (mf.reference.attention_graph(q, k, "tanh", 0.5) ** 2).sum()
    rdq, rdk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dq, rdq)
    torch.testing.assert_close(dk, rdk)


@compiled
def test_direct_op_call_checks_inputs():
    with pytest.raises(RuntimeError, match="disagree on H or d"):
        torch.ops.mhgd_fast.attention_graph(torch.randn(2, 3, 4), torch.randn(2, 3, 5), False, 1.0)
    with pytest.raises(RuntimeError, match="no columns"):
        torch.ops.mhgd_fast.attention_graph(torch.randn(2, 3, 4), torch.randn(2, 0, 4), False, 1.0)
