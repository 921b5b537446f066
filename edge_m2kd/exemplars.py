"""Exemplar memory: iCaRL herding under a fixed total size, stored as uint8 images.

Each class keeps its exemplars in herding order, so shrinking a class when new classes
arrive is a truncation that keeps the best-ranked images (Rebuffi et al. 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from edge_m2kd.config import MemoryConfig
from edge_m2kd.errors import UserError


def class_arrays(per_class: dict[int, np.ndarray]) -> dict[str, torch.Tensor]:
    """Images per class id as safetensors-ready tensors ("class.<id>"), and back."""
    return {f"class.{c}": torch.from_numpy(np.ascontiguousarray(v)) for c, v in per_class.items()}


def from_class_arrays(tensors: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    return {int(k.split(".")[1]): v.numpy() for k, v in tensors.items()}


def herding(features: torch.Tensor, m: int) -> list[int]:
    """Indices of m samples whose running mean best approaches the class mean, in order.

    `features` are L2-normalised rows. At each pick, choose the sample that brings the mean
    of the chosen set closest to the class mean; no sample is picked twice."""
    mu = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(m, len(features)) + 1):
        candidate_means = (running.unsqueeze(0) + features) / k
        dist = (candidate_means - mu).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return chosen


def class_means(features: Mapping[int, torch.Tensor], n_classes: int) -> torch.Tensor | None:
    """Normalised mean of the normalised exemplar features of each class (NME), or None when
    some class has no exemplars (methods without memory have no NME)."""
    if any(c not in features or len(features[c]) == 0 for c in range(n_classes)):
        return None
    means = [F.normalize(features[c], dim=1).mean(dim=0) for c in range(n_classes)]
    return F.normalize(torch.stack(means), dim=1)


class ExemplarMemory:
    def __init__(self, cfg: MemoryConfig) -> None:
        self.cfg = cfg
        self.images: dict[int, np.ndarray] = {}  # class id -> (m, H, W, 3) uint8, herding order

    @property
    def enabled(self) -> bool:
        return self.cfg.keep_all or self.cfg.total > 0

    def per_class(self, n_classes: int) -> int:
        return self.cfg.total // max(n_classes, 1)

    def refuse_too_small(self, n_classes: int) -> None:
        """A memory with less than one image per class cannot rehearse every class. Callers ask
        before training, so the refusal does not come after the whole run."""
        if self.enabled and not self.cfg.keep_all and self.per_class(n_classes) == 0:
            raise UserError(f"an exemplar memory of {self.cfg.total} images cannot keep one image for each of "
                            f"{n_classes} classes; create the workspace with --exemplars {n_classes} or more")

    def update(self, new: dict[int, np.ndarray], features: Mapping[int, torch.Tensor]) -> None:
        """Shrink old classes, then pick exemplars of the new classes by herding over `features`
        (each new class's, in the order of its images; the caller's one forward pass)."""
        if not self.enabled:
            return
        if self.cfg.keep_all:  # copies: `new` may be views of a larger array (the training set)
            self.images.update({c: imgs.copy() for c, imgs in new.items()})
            return
        self.refuse_too_small(len(self.images) + len(new))
        m = self.per_class(len(self.images) + len(new))
        # copies, so the larger arrays they were cut from are freed
        self.images = {c: imgs[:m].copy() if len(imgs) > m else imgs for c, imgs in self.images.items()}
        for c, imgs in new.items():
            self.images[c] = imgs[herding(F.normalize(features[c], dim=1), m)]

    def labels(self) -> np.ndarray:
        """The labels of `arrays()`, without copying an image."""
        return np.concatenate([np.zeros(0, np.int64), *(np.full(len(self.images[c]), c, np.int64) for c in sorted(self.images))])

    def write_images(self, out: np.ndarray) -> None:
        """The images of `arrays()`, written into `out` (as many rows as `count`)."""
        i = 0
        for c in sorted(self.images):
            out[i : i + len(self.images[c])] = self.images[c]
            i += len(self.images[c])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All exemplars as (images, labels), class by class."""
        if not self.images:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
        classes = sorted(self.images)
        images = np.concatenate([self.images[c] for c in classes])
        labels = np.concatenate([np.full(len(self.images[c]), c, np.int64) for c in classes])
        return images, labels

    def state(self) -> dict[str, torch.Tensor]:
        return class_arrays(self.images)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.images = from_class_arrays(tensors)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.images.values())
