"""Tensor-side preprocessing and augmentation, batched and without torchvision.

torchvision's wheels are tied to one torch build, and JetPack ships its own torch, so the
learner depends on torch alone. Augmenting a whole batch at once on tensors also keeps the
per-sample Python loop out of training, which on a 2-core board is a visible cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) -> float32 NCHW in [0, 1], contiguous."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if not images.flags.writeable:
            images = images.copy()  # torch.from_numpy warns on read-only arrays
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel for NCHW `x`; a new tensor, `x` is left untouched."""
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW, got shape {tuple(x.shape)}")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean and std need {x.shape[1]} values (one per channel), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image back to H x W, then a per-sample
    horizontal flip with p = 0.5 (the standard CIFAR augmentation), for NCHW `x`.

    Vectorised: the batch is padded once and every sample's window is read with one gather over
    the flattened padded image, using its own row/column offsets; the flip is folded into the
    column indices, so it costs nothing extra. With pad=0 and flip=False `x` itself is returned.
    Random numbers come from `generator` (on its own device) so a run is reproducible.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW, got shape {tuple(x.shape)}")
    if pad == 0 and not flip:
        return x
    return random_crop_flip_nhwc(x.permute(0, 2, 3, 1), pad, flip, generator).permute(0, 3, 1, 2).contiguous()


def random_crop_flip_nhwc(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """random_crop_flip for NHWC `x` of any dtype (uint8 images before they become floats: a
    quarter of the bytes to move, and zero padding is the same zero as in [0, 1]). The same
    random numbers give the same windows as random_crop_flip."""
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC, got shape {tuple(x.shape)}")
    n, h, w, c = x.shape
    index = _window_index(n, h, w, pad, flip, generator, x.device)
    if index is None:
        return x
    x = F.pad(x, (0, 0, pad, pad, pad, pad)) if pad else x
    # One gather over the flattened padded images (two gathers or 4-way indexing: 6x slower on CPU).
    flat = x.reshape(n, x.shape[1] * x.shape[2], c)
    return flat.gather(1, index[:, :, None].expand(n, h * w, c)).view(n, h, w, c)


def _window_index(n: int, h: int, w: int, pad: int, flip: bool, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor | None:
    """(N, H*W) positions in each flattened (H+2pad) x (W+2pad) padded image of its random
    window (crop offsets first, then flips, from `generator`); None when nothing changes."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return None
    gen_device = generator.device if generator is not None else device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gen_device).to(device)
        rows = rows + offsets[0, :, None]
        cols = cols + offsets[1, :, None]
    if flip:
        flipped = (torch.rand(n, generator=generator, device=gen_device) < 0.5).to(device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    return (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(n, h * w)
