"""Shared fixtures: the ``backend × dtype`` matrix of the op tests, which backends exist here, and
deterministic seeds."""
import os
import tempfile

# A fresh inductor cache per run: a cache shared across builds can serve graphs compiled against
# an older fake kernel of the same op.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mhgd_fast_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

import mhgd_fast as mf  # noqa: E402
from _helpers import TOLERANCES, device_of, matrix_params  # noqa: E402

# `make test` sets MHGD_REQUIRE_EXTENSION=1: a missing build must fail, not skip the kernel tests.
REQUIRE_EXTENSION = os.environ.get("MHGD_REQUIRE_EXTENSION") == "1"


def pytest_report_header(config):
    info = mf.build_info()
    return [f"mhgd_fast {mf.__version__}: backends {mf.available_backends()}, "
            f"compiled {info['compiled_backends']}, torch {torch.__version__}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_generate_tests(metafunc):
    """``@pytest.mark.matrix(dtypes=None, reference=True)``: run the test once per backend (the
    reference unless ``reference=False``, the compiled ones, CUDA marked ``cuda`` and skipped with
    the reason where it cannot run) and, when ``dtypes`` is given, per dtype: the test takes
    ``backend`` (and ``dtype``) arguments."""
    marker = metafunc.definition.get_closest_marker("matrix")
    if marker is None:
        return
    dtypes = marker.kwargs.get("dtypes")
    names = "backend" if dtypes is None else "backend,dtype"
    metafunc.parametrize(names, matrix_params(dtypes, marker.kwargs.get("reference", True)))


@pytest.fixture
def device(backend):
    """The device the matrix's backend runs on (its tensors live there)."""
    return device_of(backend)


@pytest.fixture
def tol(dtype):
    """The matrix dtype's tolerances against the float64 answer (``_helpers.TOLERANCES``)."""
    return TOLERANCES[dtype]
