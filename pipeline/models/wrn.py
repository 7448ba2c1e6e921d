"""WideResNet-D-W (WRN-28-10 by default) with the module names and state_dict keys of RobustBench's ``DMWideResNet``.

Every name matters: a RobustBench checkpoint (e.g. ``Cui2023Decoupled_WRN-28-10``) loads with
``strict=True``, and the paper's Table 5 hooks layers by these names (``layer.1.block.0.shortcut``).
Inputs are in [0, 1]; the normalisation by the ``mean``/``std`` buffers happens inside ``forward``.

One deliberate difference: the final pooling is adaptive (global average), which equals DeepMind's
``avg_pool2d(out, 8)`` on 32x32 inputs and also works for TinyImageNet's 64x64 inputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU}


class _Block(nn.Module):
    """Pre-activation residual block with DeepMind's explicit 'SAME' padding."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if self.has_shortcut else None
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        if self.has_shortcut:
            x = pre  # DeepMind's block feeds the activated input to both paths when shapes change
        out = self.conv_0(F.pad(pre, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act)
            for i in range(num_blocks)])

    def forward(self, x):
        return self.block(x)


class WideResNet(nn.Module):
    """DMWideResNet-compatible WideResNet (depth 28, width 10 by default; any depth 6n+4 and width >= 1).

    On Fashion-MNIST's 28x28 inputs the three groups run at 28x28, 14x14 and 7x7 (DeepMind's stride-2 'SAME'
    padding), and the adaptive pooling averages the last 7x7 map."""

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "swish",
                 mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465), std: tuple[float, ...] = (0.2471, 0.2435, 0.2616),
                 num_input_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        act = ACTIVATIONS[activation]
        # Not in the state_dict (persistent=False), as in RobustBench's DMWideResNet: its checkpoints carry no
        # normalisation, which comes from the dataset here (pipeline/data.py).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(num_input_channels, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(num_input_channels, 1, 1),
                             persistent=False)
        ch = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(num_input_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(_BlockGroup(n, ch[0], ch[1], 1, act), _BlockGroup(n, ch[1], ch[2], 2, act),
                                   _BlockGroup(n, ch[2], ch[3], 2, act))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = act()
        self.logits = nn.Linear(ch[3], num_classes)
        self.num_channels = ch[3]
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.logits(out)

    def hookable_layers(self) -> list[str]:
        """Every convolution's output (the (pre)activations a purifier may condition on)."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]

    def default_layers(self) -> list[str]:
        """Table 5's pattern for any depth: both convolutions of every block of the three groups, plus the
        shortcuts of the first block of groups 1 and 2 (Table 5 lists exactly these two; group 0's shortcut, which
        exists when width > 1, is left out as Table 5 leaves it out). For WRN-28-10 (4 blocks per group) this is
        Table 5 itself, 26 layers; for depth 6n+4 it is 6n + 2 layers."""
        names = []
        for g in range(3):
            for b in range((self.depth - 4) // 6):
                names += [f"layer.{g}.block.{b}.conv_0", f"layer.{g}.block.{b}.conv_1"]
                if b == 0 and g > 0:
                    names.append(f"layer.{g}.block.0.shortcut")
        return names
