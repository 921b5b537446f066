"""The one input transform shared by training, evaluation, snapshots and export:
uint8 NHWC RGB -> float NCHW, scaled to [0, 1] and normalised per channel."""

from __future__ import annotations

import numpy as np
import torch

from edge_m2kd.config import IMAGE_MEAN, IMAGE_STD

_MEAN = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def model_input(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    return normalize(to_unit(images).to(device))
