"""CIFAR-style (32×32) networks for the pipeline, each naming its MHGD sensing points.

``build_model(name, num_classes, width)`` understands ``resnet{8,14,20,32,56,110}`` (optionally
``x<k>`` for k-times wider stages, e.g. ``resnet32x4``), ``wrn-<depth>-<k>``, ``vgg{8,11,13,16,19}``
and ``mobilenet``. Every model has ``sensing_points``: module paths for
:class:`mhgd_fast.training.features.FeatureCapture`.
"""
from __future__ import annotations

import re

import torch.nn as nn

from .mobilenet import CifarMobileNet
from .resnet import CifarResNet
from .vgg import VGG_BLOCKS, CifarVGG
from .wrn import WideResNet

__all__ = ["build_model", "model_names", "CifarResNet", "WideResNet", "CifarVGG", "CifarMobileNet"]

RESNET_DEPTHS = (8, 14, 20, 32, 56, 110)


def model_names() -> list:
    return ([f"resnet{d}" for d in RESNET_DEPTHS] + [f"resnet{d}x4" for d in RESNET_DEPTHS]
            + ["wrn-16-2", "wrn-40-2", "wrn-22-4", "wrn-10-4"] + [f"vgg{d}" for d in VGG_BLOCKS] + ["mobilenet"])


def build_model(name: str, num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """The network called ``name``; ``width`` multiplies its channel counts (WRN: use ``-k``)."""
    key = name.lower()
    if m := re.fullmatch(r"resnet(\d+)(?:x(\d+))?", key):
        return CifarResNet(int(m[1]), num_classes, width * int(m[2] or 1))
    if m := re.fullmatch(r"wrn[-_](\d+)[-_](\d+)", key):
        if width != 1.0:
            raise ValueError("WRN width is the k in wrn-<depth>-<k>; leave width at 1")
        return WideResNet(int(m[1]), int(m[2]), num_classes)
    if (m := re.fullmatch(r"vgg(\d+)", key)) and int(m[1]) in VGG_BLOCKS:
        return CifarVGG(VGG_BLOCKS[int(m[1])], num_classes, width)
    if key == "mobilenet":
        return CifarMobileNet(num_classes, width)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
