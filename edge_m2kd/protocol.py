"""A whole class-incremental protocol: a seeded class order split into steps, one learner
step per group, evaluation on held-out data after each step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_m2kd.config import LearnerConfig
from edge_m2kd.data.sources import ImageSet
from edge_m2kd.data.stream import train_val_split
from edge_m2kd.evaluation import Evaluation, evaluate, summary
from edge_m2kd.learner import Learner, StepReport

# What a step holds out of its new classes' images: add-classes scores, chooses the analytic
# head's regularisation and (under classifier "auto") the deployed classifier on up to
# HOLDOUT_PER_CLASS of them per class.
HOLDOUT_FRACTION = 0.1
HOLDOUT_PER_CLASS = 20


def hold_out(data: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
    """(training images, held-out images) of a step's data: each class's choice depends on its
    name and images alone, so it is the same in any class order and any grouping into steps."""
    return train_val_split(data, HOLDOUT_FRACTION, seed, by_name=True)


def kept_holdout(held: ImageSet, class_names: list[str]) -> dict[int, np.ndarray]:
    """Up to HOLDOUT_PER_CLASS held-out images of each class `held` has images of, keyed by the
    learner's class id (`class_names` in head order)."""
    keep = {}
    for name in held.class_names:
        images = held.images[held.labels == held.class_names.index(name)]
        if name in class_names and len(images):
            keep[class_names.index(name)] = images[:HOLDOUT_PER_CLASS]
    return keep


def holdout_arrays(holdout: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The images of a {class id: images} holdout as one array, with their labels."""
    images = np.concatenate(list(holdout.values()))
    labels = np.concatenate([np.full(len(v), c, np.int64) for c, v in holdout.items()])
    return images, labels


# on_step(learner, report, evaluation) after every step, e.g. to print a table row or commit a workspace
OnStep = Callable[[Learner, StepReport, Evaluation], None]


def run_protocol(
    train: ImageSet,
    test: ImageSet,
    steps: list[list[str]],
    cfg: LearnerConfig,
    on_step: OnStep | None = None,
    learner: Learner | None = None,
) -> dict[str, Any]:
    """Run every step; return a JSON-serialisable result. The headline accuracies are those
    of the classifier the learner deploys (corrected CNN head or NME, by config)."""
    start = time.perf_counter()
    learner = learner or Learner(cfg)
    rows, matrix, overall = [], [], []
    holdout: dict[int, np.ndarray] = {}
    for classes in steps:
        data, held = hold_out(train.only_classes(classes), cfg.train.seed)  # as add-classes does
        report = learner.step(data, classes)
        holdout.update(kept_holdout(held, learner.class_names))
        learner.choose_classifier(*holdout_arrays(holdout))
        ev = evaluate(learner, test.only_classes(learner.class_names))
        matrix.append(ev.accuracy_per_group)
        overall.append(ev.deployed_accuracy)
        rows.append({
            "step": report.step,
            "classes": report.classes,
            "accuracy": ev.deployed_accuracy,
            "cnn_accuracy": ev.accuracy,
            "nme_accuracy": ev.nme_accuracy,
            "analytic_accuracy": ev.analytic_accuracy,
            "analytic_variants": ev.analytic_variants,
            "deployed_classifier": ev.deployed_classifier,
            "accuracy_per_group": ev.accuracy_per_group,
            "train_images": report.train_images,
            "seconds": report.seconds,
            "train_images_per_second": report.train_images_per_second,
            "losses": report.losses,
            "teacher_precision": report.teacher_precision.get("used"),
        })
        if on_step:
            on_step(learner, report, ev)
    return {
        "method": cfg.method,
        "snapshots": cfg.snapshots.policy,
        "classifier": cfg.train.classifier,
        "chosen_classifier": learner.chosen_classifier,
        "deployed_classifier": learner.deployed_head,
        "steps": rows,
        "accuracy_matrix": matrix,
        **summary(matrix, overall),
        "nme_final_accuracy": rows[-1]["nme_accuracy"] if rows else None,
        "cnn_final_accuracy": rows[-1]["cnn_accuracy"] if rows else None,
        "analytic_final_accuracy": rows[-1]["analytic_accuracy"] if rows else None,
        "seconds": time.perf_counter() - start,
    }
