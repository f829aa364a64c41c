"""Plug-ins for other training frameworks. Each submodule needs its framework installed:

* :mod:`mhgd_fast.contrib.torchdistill` — MHGD for torchdistill's YAML configs
  (``pip install .[torchdistill]``).
"""
