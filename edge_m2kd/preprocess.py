"""The one input transform shared by training, evaluation, snapshots and export:
uint8 NHWC RGB -> float NCHW, scaled to [0, 1] and normalised with the model's statistics
(which the exported graph folds in, so a device feeds it [0, 1] RGB)."""

from __future__ import annotations

import numpy as np
import torch

from edge_m2kd.config import IMAGE_MEAN, IMAGE_STD
from edge_m2kd.data.augment import normalize as normalize_with
from edge_m2kd.data.augment import to_float as to_unit

__all__ = ["model_input", "normalize", "to_unit"]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return normalize_with(x, IMAGE_MEAN, IMAGE_STD)


def model_input(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    return normalize(to_unit(images).to(device))
