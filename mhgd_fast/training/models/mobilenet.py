"""A CIFAR MobileNet (Howard et al. 2017): depthwise-separable blocks (3×3 depthwise conv, 1×1
pointwise conv, each with BN + ReLU) in three stages of widths 64/128/256 × ``width`` — the same
widths as resnetx4, so the two pair up for MHGD. Sensing points: the outputs of the three stages."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import scaled

__all__ = ["DepthwiseSeparable", "CifarMobileNet"]


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class CifarMobileNet(nn.Module):
    sensing_points = ("stage1", "stage2", "stage3")

    def __init__(self, num_classes: int = 100, width: float = 1.0, blocks_per_stage: int = 2):
        super().__init__()
        stem = scaled(32, width)
        widths = [scaled(c, width) for c in (64, 128, 256)]
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        c_in, stages = stem, []
        for i, c_out in enumerate(widths):
            stage = []
            for b in range(blocks_per_stage):
                stage.append(DepthwiseSeparable(c_in, c_out, 2 if (i > 0 and b == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
