"""PEP 517 build backend of mhgd_fast: setuptools' own, plus torch as a build requirement.

The extension must be compiled against the torch that will import it, and no static entry in
pyproject.toml can say "the torch already installed": ``torch`` alone makes an isolated build
install the newest torch the index offers, whatever the target environment holds. So the torch
requirement is computed here, when pip asks for the build requirements: ``torch==<version>`` when
the environment being installed into already has torch (found by asking its interpreter without
the isolation, see _installed_torch), else plain ``torch`` (the newest, which is also what pip then
installs as the runtime dependency). Where that cannot be found out (pip's opt-in venv isolation,
other frontends, ``pip wheel`` for another environment), the package's version guard still names
both versions at import and the command that rebuilds (mhgd_fast/_extension.py).
"""
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_wheel, build_sdist, prepare_metadata_..., ...)

_PROBE = "import importlib.metadata as m; print(m.version('torch'))"


def _installed_torch():
    """The torch version installed for the interpreter running this build, or None.

    pip runs the backend with the target environment's interpreter and hides that environment's
    site-packages behind a sitecustomize.py passed in PYTHONPATH. ``-I`` ignores PYTHONPATH and
    the PYTHON* variables, so a child interpreter sees the environment's own packages again (and
    under --no-build-isolation it sees the same ones as this process).
    """
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", _PROBE], capture_output=True, text=True,
                               timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = probe.stdout.strip()
    return version if probe.returncode == 0 and version else None


def torch_requirement():
    """``torch==X`` for the installed torch X (without its local label: ``2.14.1+cu130`` pins
    ``torch==2.14.1``, which the index resolves to its build of that release), else ``torch``."""
    version = _installed_torch()
    requirement = f"torch=={version.split('+')[0]}" if version else "torch"
    print(f"mhgd_fast: building against {requirement} "
          f"({'installed in ' + sys.prefix if version else 'no torch installed in ' + sys.prefix})",
          file=sys.stderr)
    return requirement


# setuptools' own hooks would run setup.py to collect setup_requires (there are none), and
# setup.py needs torch: the requirements are listed here instead.
def get_requires_for_build_wheel(config_settings=None):
    return [torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return [torch_requirement()]


def get_requires_for_build_sdist(config_settings=None):
    # setup.py imports torch to describe the extension, even for an sdist.
    return [torch_requirement()]


__all__ = _setuptools.__all__
