"""The built-in demo: scikit-learn's bundled handwritten digits, 5 steps of 2 classes.

Sized for two CPU cores: ResNet-20 on 16x16 inputs, and an exemplar memory of 100 images,
far below the training split (about 1,350 images), so memory-based methods cannot turn
into joint training."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_m2kd.config import LearnerConfig, method_config
from edge_m2kd.data import class_order, load_digits, split_into_steps
from edge_m2kd.protocol import HOLDOUT_PER_CLASS, run_protocol
from edge_m2kd.workspace import Workspace

DEMO_STEPS, DEMO_CLASSES_PER_STEP, DEMO_SEED = 5, 2, 1993


def demo_config(method: str = "m2kd", policy: str | None = None, epochs: int | None = None) -> LearnerConfig:
    sections: dict[str, dict[str, Any]] = {
        "model": {"backbone": "resnet20", "input_size": 16},
        # Digits are not mirror-symmetric: a flipped 2 is not a 2.
        "train": {"epochs": epochs or 12, "batch_size": 32, "lr": 0.05, "crop_pad": 2, "flip": False},
        "snapshots": {"planned_steps": DEMO_STEPS},
    }
    cfg = method_config(method, **sections)
    if cfg.memory.total:
        cfg.memory.total = 100
    if policy:
        cfg.snapshots.policy = policy  # type: ignore[assignment]
    return cfg


def run_demo(cfg: LearnerConfig, workdir: Path, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    train = load_digits("train", size=cfg.model.input_size)
    test = load_digits("test", size=cfg.model.input_size)
    steps = split_into_steps(class_order(train.class_names, DEMO_SEED), DEMO_CLASSES_PER_STEP, DEMO_CLASSES_PER_STEP)
    rows: list[dict[str, Any]] = []

    def on_step(learner, report, ev) -> None:  # noqa: ANN001 - protocol callback
        row = {"step": report.step, "classes": report.classes, "accuracy": ev.deployed_accuracy,
               "nme_accuracy": ev.nme_accuracy, "accuracy_per_group": ev.accuracy_per_group,
               "seconds": report.seconds}
        rows.append(row)
        if on_row:
            on_row(row)

    # The demo leaves a real workspace behind: `edge-m2kd snapshots DIR/workspace --verify`,
    # `history`, `memory` and `predict` work on it like on one built with add-classes.
    workdir.mkdir(parents=True, exist_ok=True)
    ws_path = workdir / "workspace"
    if ws_path.exists():
        shutil.rmtree(ws_path)
    Workspace.create(ws_path, cfg)
    with Workspace.writing(ws_path, "demo") as ws:

        def commit(learner, report, ev) -> None:  # noqa: ANN001 - protocol callback
            on_step(learner, report, ev)
            holdout = {c: test.images[test.labels == test.class_names.index(n)][:HOLDOUT_PER_CLASS]
                       for c, n in enumerate(learner.class_names)}
            ws.commit(learner, {"step": report.step, "classes": report.classes, "train_images": report.train_images,
                                "seconds": report.seconds, "images_per_second": report.images_per_second,
                                "losses": report.losses, "teachers": report.teachers, "holdout": ev.to_dict(),
                                "memory": None}, holdout)

        result = run_protocol(train, test, steps, cfg, on_step=commit)
    result["workspace"] = str(ws_path)
    (workdir / "results.json").write_text(json.dumps(result, indent=2, default=float))
    return result
