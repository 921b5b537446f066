"""Test helpers: a small synthetic image set and quick learner configs."""

from __future__ import annotations

import pickle
from pathlib import Path

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


def fake_cifar100(root: Path, n: int = 5, protocol: int = pickle.DEFAULT_PROTOCOL, str_keys: bool = False,
                  classes: int = 100) -> np.ndarray:
    """A tiny release with the real structure (image i has fine label i % classes, meta names all
    100 classes); returns the planar data array written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    # Image 0, row 1, column 2: R=11, G=22, B=33 (planes of 1024 values each).
    data[0, 0 * 1024 + 1 * 32 + 2] = 11
    data[0, 1 * 1024 + 1 * 32 + 2] = 22
    data[0, 2 * 1024 + 1 * 32 + 2] = 33

    def key(k: str) -> str | bytes:
        return k if str_keys else k.encode()

    for split in ("train", "test"):
        batch = {
            key("filenames"): [f"img_{i}.png".encode() for i in range(n)],
            key("batch_label"): f"{split} batch".encode(),
            key("fine_labels"): [i % classes for i in range(n)],
            key("coarse_labels"): [i % 20 for i in range(n)],
            key("data"): data,
        }
        with open(root / split, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    names = [f"class_{i}" for i in range(100)]
    meta = {
        key("fine_label_names"): names if str_keys else [s.encode() for s in names],
        key("coarse_label_names"): [f"super_{i}".encode() for i in range(20)],
    }
    with open(root / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return data
