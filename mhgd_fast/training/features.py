"""Feature capture by forward hooks on module paths (``"layer1"``, ``"features.12"``).

Works on any model without rewriting it, and through ``DistributedDataParallel`` /
``DataParallel`` wrappers (paths are resolved on the wrapped ``.module``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

__all__ = ["unwrap", "FeatureCapture"]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside (possibly nested) DDP / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class FeatureCapture:
    """Records the outputs of the modules at ``paths`` on every forward of ``model``.

    ``capture.features`` lists them in ``paths`` order after each forward; call
    :meth:`remove` (or use ``with``) to detach the hooks. A path that names no submodule raises
    ``ValueError`` listing the model's top-level children.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        inner = unwrap(model)
        self.paths = list(paths)
        self._outputs: Dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            try:
                module = inner.get_submodule(path)
            except AttributeError:
                children = ", ".join(name for name, _ in inner.named_children())
                raise ValueError(f"{type(inner).__name__} has no submodule {path!r} "
                                 f"(top-level children: {children})") from None
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def hook(module, inputs, output):
            self._outputs[path] = output
        return hook

    @property
    def features(self) -> List[torch.Tensor]:
        missing = [p for p in self.paths if p not in self._outputs]
        if missing:
            raise RuntimeError(f"no output captured yet for {missing}: run the model's forward first")
        return [self._outputs[p] for p in self.paths]

    def clear(self) -> None:
        """Drop the stored outputs (and the graphs they keep alive)."""
        self._outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "FeatureCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
