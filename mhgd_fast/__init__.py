"""mhgd_fast: multi-head attention graph knowledge distillation (Lee & Song, BMVC 2019), fast.

Public API (README.md, "The ops on their own")::

    import mhgd_fast as mf
    mf.available_backends(); mf.build_info()
    mf.ops.graph_kl / attention_graph / topk_singular_vectors / align_singular_vectors
    mf.MHGD(channels, heads=8, student_vectors=4, ...)
"""
__version__ = "0.1.0"

from ._extension import ExtensionVersionError, build_info  # noqa: E402  (needs __version__)
from . import ops, reference  # noqa: E402  (ops registers the compiled ops' fake kernels and autograd)
from .backends import BackendUnavailableError, available_backends  # noqa: E402
from .balancing import balanced_backward, clip_by_norm, transfer_clip_factor, weighted_backward  # noqa: E402
from .module import MHGD  # noqa: E402

__all__ = [
    "__version__", "available_backends", "build_info", "ops", "reference", "MHGD",
    "balanced_backward", "weighted_backward", "clip_by_norm", "transfer_clip_factor",
    "BackendUnavailableError", "ExtensionVersionError",
]
