"""Test helpers: a small synthetic image set and quick learner configs."""

from __future__ import annotations

import numpy as np

from edge_m2kd.config import method_config
from edge_m2kd.data.sources import ImageSet


def blobs(n_per_class: int = 24, n_classes: int = 6, size: int = 16, seed: int = 0) -> ImageSet:
    """Each class is a colour blob at its own place: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, (size, size, 3))
            y, x = (c * 5) % (size - 5), (c * 3) % (size - 5)
            img[y : y + 5, x : x + 5, c % 3] += 180
            images.append(img)
            labels.append(c)
    return ImageSet(np.clip(np.array(images), 0, 255).astype(np.uint8), np.array(labels, np.int64),
                    [f"c{c}" for c in range(n_classes)])


def quick_config(method: str = "m2kd", policy: str | None = None, epochs: int = 2, **sections):
    base = {
        "model": {"backbone": "resnet20", "input_size": 16},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "crop_pad": 2, "seed": 7},
        "snapshots": {"planned_steps": 3, "prune_finetune_epochs": 1},
    }
    for name, overrides in sections.items():
        base.setdefault(name, {}).update(overrides)
    cfg = method_config(method, **base)
    if cfg.memory.total:
        cfg.memory.total = 24
    if policy:
        cfg.snapshots.policy = policy
    return cfg
