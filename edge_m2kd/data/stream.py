"""The class-incremental stream: which classes arrive at which step, and the per-step splits.

Every random choice here is seeded, and seeded per class where it can be (`[seed, label]`), so a
class's validation samples and kept samples do not change when other classes are added or
removed from the set: a step run alone picks the same images as the same step in a full run.
"""

from __future__ import annotations

import zlib

import numpy as np

from edge_m2kd.data.sources import ImageSet


def class_order(class_names: list[str], seed: int | None) -> list[str]:
    """The order in which classes arrive: as given (seed None) or a fixed seeded permutation.

    Papers fix the order with a seed (iCaRL uses seed 1993 on CIFAR-100); the same seed gives the
    same order on every machine because numpy's default_rng (PCG64) is platform-independent.
    """
    names = list(class_names)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"class {dup!r} appears twice in the class list")
    if seed is None:
        return names
    return [names[i] for i in np.random.default_rng(seed).permutation(len(names))]


def split_into_steps(order: list[str], first_step: int, per_step: int) -> list[list[str]]:
    """Cut the class order into steps: `first_step` classes, then `per_step` classes per step.

    "B50 then 10 per step" on CIFAR-100 is split_into_steps(order, 50, 10) -> 6 steps.
    A short last step is refused rather than silently made smaller, since it would make the
    protocol differ from the one the user asked for.
    """
    n = len(order)
    if n == 0:
        raise ValueError("no classes to split into steps")
    if first_step < 1 or first_step > n:
        raise ValueError(f"first step must have between 1 and {n} classes, got {first_step}")
    if per_step < 1:
        raise ValueError(f"classes per step must be at least 1, got {per_step}")
    rest = n - first_step
    if rest % per_step:
        raise ValueError(
            f"{rest} classes after a first step of {first_step} do not divide into steps of {per_step}; "
            f"choose a per-step count that divides {rest}"
        )
    steps = [list(order[:first_step])]
    steps += [list(order[i : i + per_step]) for i in range(first_step, n, per_step)]
    return steps


def _class_indices(data: ImageSet) -> list[tuple[int, np.ndarray]]:
    """(label, indices of its samples in data order) for each label present."""
    return [(int(c), np.flatnonzero(data.labels == c)) for c in np.unique(data.labels)]


def train_val_split(data: ImageSet, fraction: float, seed: int, by_name: bool = False) -> tuple[ImageSet, ImageSet]:
    """Stratified split: `fraction` of each class goes to validation.

    A class with >= 2 samples gets at least one validation sample when fraction > 0 (so every
    class is validated) and keeps at least one training sample. Both parts keep the data order.
    `by_name`: seed each class by its name, not its label, so a class holds out the same images
    whatever other classes its step brings and whichever step it comes in (a step's hold-out,
    which the analytic head's order-free sums rely on).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    val_mask = np.zeros(len(data), dtype=bool)
    if fraction > 0:
        for label, idx in _class_indices(data):
            if len(idx) < 2:
                continue
            n_val = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
            key = zlib.crc32(data.class_names[label].encode()) if by_name else label
            chosen = np.random.default_rng([seed, key]).permutation(len(idx))[:n_val]
            val_mask[idx[chosen]] = True
    return data.subset(~val_mask), data.subset(val_mask)


def per_class_limit(data: ImageSet, limit: int | None, seed: int) -> ImageSet:
    """At most `limit` samples per class, chosen at random (seeded), in data order; None keeps all.

    Used for short schedules and few-shot runs, where taking the first `limit` files would bias
    toward whatever order the files were named in.
    """
    if limit is None:
        return data
    if limit < 1:
        raise ValueError(f"per-class limit must be at least 1, got {limit}")
    keep = np.zeros(len(data), dtype=bool)
    for label, idx in _class_indices(data):
        if len(idx) <= limit:
            keep[idx] = True
        else:
            keep[idx[np.random.default_rng([seed, label]).permutation(len(idx))[:limit]]] = True
    return data.subset(keep)
