"""A small CNN for Fashion-MNIST (28x28x1), sized to adversarially train in minutes on two CPU cores.

Built for any square input of side ``size`` >= 25 (the two stride-2 convolutions give ceil(size/4) at conv3), so every
hookable layer keeps a spatial size of at least 7x7 and the purifier's layerwise encoders (three 3x3 convolutions
without padding) always have room.
"""
from __future__ import annotations

import torch
import torch.nn as nn


MIN_SIZE = 25  # ceil(25 / 4) = 7: conv3 stays 7x7 or more


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=(0.2860,), std=(0.3530,), width: int = 16,
                 size: int = 28):
        super().__init__()
        if size < MIN_SIZE:
            raise ValueError(f"SmallCNN needs inputs of at least {MIN_SIZE}x{MIN_SIZE} (got {size}x{size})")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(in_channels, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(in_channels, 1, 1))
        w = width
        side = -(-size // 4)  # conv3's side: ceil(size / 4)
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1)          # size x size (28x28 on Fashion-MNIST)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)     # ceil(size/2) (14x14)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1)  # ceil(size/4) (7x7)
        self.act3 = nn.ReLU()
        self.fc1 = nn.Linear(4 * w * side * side, 128)
        self.act4 = nn.ReLU()
        self.logits = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x - self.mean) / self.std
        out = self.act1(self.conv1(out))
        out = self.act2(self.conv2(out))
        out = self.act3(self.conv3(out))
        return self.logits(self.act4(self.fc1(out.flatten(1))))

    def hookable_layers(self) -> list[str]:
        return ["conv1", "conv2", "conv3"]

    def default_layers(self) -> list[str]:
        return ["conv1", "conv2", "conv3"]
