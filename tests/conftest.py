"""Shared fixtures: which backends exist here, and deterministic seeds."""
import os
import tempfile

# A fresh inductor cache per run: a cache shared across builds can serve graphs compiled against
# an older fake kernel of the same op.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mhgd_fast_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

import mhgd_fast as mf  # noqa: E402

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
