"""MobileNetV2 (Sandler et al. 2018, width 1.0) with torchvision's parameter names.

Written here rather than imported from torchvision (which does not import beside the CPU
torch these machines use), with exactly the module tree of ``torchvision.models.mobilenet_v2``
so its published ImageNet weights load with ``strict=True``: ``features.0`` is the stem,
``features.1`` to ``features.17`` the inverted residual blocks, ``features.18`` the last 1x1
convolution to 1280 channels. The ImageNet classifier (``classifier.1``) is not kept: the
incremental heads replace it.

The Jetson-friendly choice: depthwise convolutions and ReLU6 (exported as ONNX Clip), both
native TensorRT layers.

Stages (the levels M2KD distills at) end at the strides 8, 16 and 32 of the input:

    stage 0: features.0  - features.6    32 channels, stride 8
    stage 1: features.7  - features.13   96 channels, stride 16
    stage 2: features.14 - features.18 1280 channels, stride 32
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, blocks n, first stride s), as in the paper's Table 2.
INVERTED_RESIDUALS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1)]
STAGE_ENDS = (6, 13, 18)  # index in `features` of the last module of each stage
LAST_CHANNELS = 1280


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (BatchNorm), 2 (ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_ch, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """The same small interface as every backbone here: ``stage_channels`` and
    ``forward(x) -> [one feature map per stage]``; ``stage_modules()`` lists each stage's modules."""

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        in_ch = 32
        for t, c, n, s in INVERTED_RESIDUALS:
            for i in range(n):
                features.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        features.append(ConvBNReLU6(in_ch, LAST_CHANNELS, kernel=1))
        self.features = nn.Sequential(*features)
        self.stage_channels = [self._out_channels(end) for end in STAGE_ENDS]
        # torchvision's initialisation, for a start from random weights
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _out_channels(self, index: int) -> int:
        convs = [m for m in self.features[index].modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def stage_modules(self) -> list[list[nn.Module]]:
        starts = (0, *(end + 1 for end in STAGE_ENDS[:-1]))
        return [list(self.features[a : b + 1]) for a, b in zip(starts, STAGE_ENDS)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in STAGE_ENDS:
                outputs.append(x)
        return outputs
