"""Accuracy per class group, the accuracy matrix, and the summary metrics of the
class-incremental literature (final accuracy, average incremental accuracy, forgetting)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edge_m2kd.data.sources import ImageSet
from edge_m2kd.errors import UserError
from edge_m2kd.heads import linear_scores


@dataclass
class Evaluation:
    accuracy: float  # CNN (corrected main head), over every known class
    nme_accuracy: float | None
    deployed_accuracy: float  # the classifier the workspace deploys
    accuracy_per_group: list[float]  # deployed classifier, one entry per step's group
    samples: int
    analytic_accuracy: float | None = None  # the closed-form head (heads.py)
    deployed_classifier: str = "cnn"  # a heads.HEADS name
    # A benchmark's comparison (Learner.compare_old_statistics): the analytic head per way of
    # treating a trained backbone's old classes.
    analytic_variants: dict[str, float | None] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def group_accuracy(pred: np.ndarray, labels: np.ndarray, groups: list[list[int]]) -> list[float]:
    """Accuracy on the samples of each group (over all known classes, not within the group)."""
    out = []
    for group in groups:
        mask = np.isin(labels, group)
        out.append(float((pred[mask] == labels[mask]).mean()) if mask.any() else float("nan"))
    return out


def to_learner_labels(data: ImageSet, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the samples of known classes and relabel them to the learner's class ids."""
    unknown = sorted({data.class_names[i] for i in np.unique(data.labels)} - set(class_names))
    if unknown and len(unknown) == len(np.unique(data.labels)):
        raise UserError(f"none of the test classes is known to the model (e.g. {unknown[0]!r}); "
                        "the folder names must match the learned class names")
    remap = np.array([class_names.index(n) if n in class_names else -1 for n in data.class_names])
    labels = remap[data.labels]
    keep = labels >= 0
    return data.images[keep], labels[keep]


def evaluate(learner, data: ImageSet) -> Evaluation:
    images, labels = to_learner_labels(data, learner.class_names)
    scores = learner.scores(images)
    right = {name: s.argmax(1).numpy() == labels for name, s in scores.items()}
    accuracy = {name: float(r.mean()) for name, r in right.items()}
    name = learner.deployed_head
    variants = None
    if len(learner.analytic_variants) > 1:
        feats = learner.normalized_features(images).cpu()
        variants = {mode: None if fit is None else float((linear_scores(feats, fit.linear()).argmax(1).numpy() == labels).mean())
                    for mode, fit in learner.analytic_variants.items()}
    return Evaluation(
        accuracy=accuracy["cnn"],
        nme_accuracy=accuracy.get("nme"),
        deployed_accuracy=accuracy[name],
        accuracy_per_group=group_accuracy(scores[name].argmax(1).numpy(), labels, learner.groups),
        samples=len(labels),
        analytic_accuracy=accuracy.get("analytic"),
        deployed_classifier=name,
        analytic_variants=variants,
    )


def summary(matrix: list[list[float]], overall: list[float]) -> dict[str, float]:
    """`matrix[t][g]`: accuracy on group g after step t (g <= t); `overall[t]` over all
    classes seen by step t. Forgetting: mean over old groups of best-ever minus final."""
    final_row = matrix[-1]
    drops = [max(row[g] for row in matrix[g:-1]) - final_row[g] for g in range(len(matrix) - 1)] if len(matrix) > 1 else []
    return {
        "final_accuracy": overall[-1],
        "average_incremental_accuracy": float(np.mean(overall)),
        "forgetting": float(np.mean(drops)) if drops else 0.0,
    }

