"""CIFAR VGG with batch norm: five conv blocks (64/128/256/512/512 × ``width``), each closed by
2×2 max pooling, then one linear classifier. Sensing points (docs/method.md §2, five for VGG): the
last ReLU of each block, addressed as ``features.<index>``."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .resnet import scaled

__all__ = ["CifarVGG", "VGG_BLOCKS"]

# Convolutions per block. vgg8 has one per block (the shallow student of VGG pairs).
VGG_BLOCKS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
              19: (2, 2, 4, 4, 4)}


class CifarVGG(nn.Module):
    def __init__(self, blocks: Sequence[int], num_classes: int = 100, width: float = 1.0):
        super().__init__()
        widths = [scaled(c, width) for c in (64, 128, 256, 512, 512)]
        layers, points, c_in = [], [], 3
        for convs, c_out in zip(blocks, widths):
            for _ in range(convs):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            points.append(f"features.{len(layers) - 1}")
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.sensing_points = tuple(points)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))  # 32 px / 2⁵ = 1×1
