"""A whole class-incremental protocol: a seeded class order split into steps, one learner
step per group, evaluation on held-out data after each step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edge_m2kd.config import LearnerConfig
from edge_m2kd.data.sources import ImageSet
from edge_m2kd.evaluation import Evaluation, evaluate, summary
from edge_m2kd.learner import Learner, StepReport

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
    for classes in steps:
        report = learner.step(train, classes)
        ev = evaluate(learner, test.only_classes(learner.class_names))
        matrix.append(ev.accuracy_per_group)
        overall.append(ev.deployed_accuracy)
        rows.append({
            "step": report.step,
            "classes": report.classes,
            "accuracy": ev.deployed_accuracy,
            "cnn_accuracy": ev.accuracy,
            "nme_accuracy": ev.nme_accuracy,
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
        "steps": rows,
        "accuracy_matrix": matrix,
        **summary(matrix, overall),
        "nme_final_accuracy": rows[-1]["nme_accuracy"] if rows else None,
        "cnn_final_accuracy": rows[-1]["cnn_accuracy"] if rows else None,
        "seconds": time.perf_counter() - start,
    }
