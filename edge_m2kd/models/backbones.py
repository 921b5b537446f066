"""The table of backbones: name -> constructor. Every entry has the same small interface
(``stage_channels``, ``stage_modules()``, ``forward(x) -> [one feature map per stage]``);
the CLI's ``--backbone`` choices come from here."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edge_m2kd.models.mobilenetv2 import MobileNetV2
from edge_m2kd.models.resnet import resnet18, resnet20, resnet32

# small_input_stem: ResNet-18 only (a 3x3/1 stem that keeps 32 px inputs at full resolution)
BACKBONES: dict[str, Callable[[bool], nn.Module]] = {
    "resnet20": lambda small_input_stem: resnet20(),
    "resnet32": lambda small_input_stem: resnet32(),
    "resnet18": resnet18,
    "mobilenetv2": lambda small_input_stem: MobileNetV2(),
}


def build_backbone(name: str, small_input_stem: bool = False) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](small_input_stem)
