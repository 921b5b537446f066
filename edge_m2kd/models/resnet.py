"""Backbones that return the output of every stage (the levels M2KD distills at).

Every backbone has the same small interface: ``stage_channels`` (one entry per stage),
``stage_modules()`` (the modules of each stage, for freezing) and ``forward(x) -> list[Tensor]``
with one feature map per stage, last stage last. ``backbones.BACKBONES`` is the
table of them all.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        # A 1x1 projection (not zero padding) so every op exports to plain ONNX Conv.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride)]
    layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class StagedResNet(nn.Module):
    """A ResNet given by its stem and (channels, blocks, stride) per stage."""

    def __init__(self, stem: nn.Module, stem_ch: int, plan: list[tuple[int, int, int]]) -> None:
        super().__init__()
        self.stem = stem
        stages, in_ch = [], stem_ch
        for out_ch, blocks, stride in plan:
            stages.append(_stage(in_ch, out_ch, blocks, stride))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [out_ch for out_ch, _, _ in plan]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stage_modules(self) -> list[list[nn.Module]]:
        """The modules of each stage; the stem belongs to the first (freezing stage 0 freezes it)."""
        return [[self.stem, self.stages[0]], *([s] for s in self.stages[1:])]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


def resnet32() -> StagedResNet:
    """CIFAR-style ResNet-32 (He et al. 2016) for 32x32 inputs: 3 stages of 5 blocks."""
    return StagedResNet(_conv_bn_relu(3, 16, 3, 1), 16, [(16, 5, 1), (32, 5, 2), (64, 5, 2)])


def resnet20() -> StagedResNet:
    """The same family with 3 blocks per stage: the quick model for demos and tests."""
    return StagedResNet(_conv_bn_relu(3, 16, 3, 1), 16, [(16, 3, 1), (32, 3, 2), (64, 3, 2)])


def resnet18(small_input_stem: bool = False) -> StagedResNet:
    """ImageNet-style ResNet-18 for 224x224; ``small_input_stem`` swaps the 7x7/2 conv and
    max-pool for one 3x3/1 conv so 32x32 inputs keep their resolution."""
    if small_input_stem:
        stem: nn.Module = _conv_bn_relu(3, 64, 3, 1)
    else:
        stem = nn.Sequential(_conv_bn_relu(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
    return StagedResNet(stem, 64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)])
