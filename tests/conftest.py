"""Shared fixtures: which backends exist here, and deterministic seeds."""
import os

import pytest
import torch

import mhgd_fast as mf

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
