"""Where a step's time goes: seconds per phase of real `add-classes` steps, at every step count t.

Each step is the command itself (`commands.add_classes` on a workspace): load the workspace, read
and decode the images, check the budget, train (augmentation, the student's forward and backward,
the teachers), prune and fine-tune, herd the exemplars, correct the bias, compute the class means,
commit the snapshot, evaluate on the hold-out, commit the workspace. The learner times its phases
itself (StepReport.phase_seconds, edge_m2kd/phases.py: two clock reads per phase); the command
adds the ones around the step. One class per step, so t runs to the number of classes.

    python -m benchmarks.step_profile                  # CIFAR-10 JPEGs, ResNet-32 at 32 px, t = 1..10
    python -m benchmarks.step_profile --smoke          # digits, ResNet-20 at 16 px, seconds
    python -m benchmarks.step_profile --teacher-precision fp32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import (
    add_device_arg,
    add_output_args,
    device_facts,
    emit,
    exit_on_user_error,
    format_table,
    log,
    output_dir,
    parse_int_list,
    torch_threads,
    write_json,
)
from edge_m2kd import commands
from edge_m2kd.config import TEACHER_PRECISIONS, method_config
from edge_m2kd.data import load_digits
from edge_m2kd.workspace import Workspace

# (label, phase keys summed into it), in step order; what is left over is "other"
COLUMNS = [
    ("load", ["load"]), ("decode", ["decode"]), ("budget", ["budget_check"]),
    ("augment", ["step.train.augment"]), ("student", ["step.train.student"]), ("teachers", ["step.train.teachers"]),
    ("teacher prep", ["step.teachers.prepare"]),
    ("prune+finetune", ["step.consolidate", "step.finetune.augment", "step.finetune.student",
                        "step.finetune.teachers"]),
    ("herding", ["step.herding"]), ("bias+means", ["step.bias_correction", "step.class_means"]),
    ("features+solve", ["step.features", "step.solve"]),  # the analytic head's forward pass and solve
    ("snapshot commit", ["step.commit"]), ("evaluation", ["evaluation"]), ("ws commit", ["workspace_commit"]),
    ("other", ["other", "step.other"]),
]


def cifar_subset(root: Path, per_class: int, classes: int, data: Path | None = None, split: str = "train") -> Path:
    """A folder of `per_class` JPEGs (links) of each of the first `classes` CIFAR-10 classes, from
    `data` (the tarball or its unpacked folder; default benchmarks.cil's DEFAULT_DATA), its
    `split` (train or test)."""
    from benchmarks.cil import (  # unpacks the tarball once, under a lock
        DEFAULT_CACHE,
        DEFAULT_DATA,
        cifar_root,
    )

    train = cifar_root(data or DEFAULT_DATA, DEFAULT_CACHE) / split
    for name in sorted(p.name for p in train.iterdir() if p.is_dir())[:classes]:
        (root / name).mkdir(parents=True)
        for f in sorted((train / name).iterdir())[:per_class]:
            (root / name / f.name).symlink_to(f.resolve())
    return root


def digits_folder(root: Path, per_class: int | None, split: str = "train") -> Path:
    data = load_digits(split, 16)
    for i, name in enumerate(data.class_names):
        (root / name).mkdir(parents=True)
        for j, img in enumerate(data.images[data.labels == i][:per_class]):
            Image.fromarray(img).save(root / name / f"{j:04d}.png")
    return root


def columns(phases: dict[str, float]) -> dict[str, float]:
    return {label: sum(phases.get(k, 0.0) for k in keys) for label, keys in COLUMNS}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="digits at 16 px, ResNet-20: a few seconds a step")
    parser.add_argument("--method", default="m2kd")
    parser.add_argument("--steps", type=int, default=10, help="steps of one class each (at most 10)")
    parser.add_argument("--report", type=parse_int_list, default=None, help="t to print (default 1,2,5,10); JSON has all")
    parser.add_argument("--per-class", type=int, default=None, help="training images per class (default 100; smoke 60)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 3; smoke 2)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="the packed store's fine-tuning after pruning")
    parser.add_argument("--memory", type=int, default=200, help="exemplars kept in all")
    parser.add_argument("--teacher-precision", choices=TEACHER_PRECISIONS, default=None,
                        help="default: the library's (auto)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10: its JPEG tarball or a folder with train/ (default ../shared/data/...)")
    add_device_arg(parser)
    add_output_args(parser, "step_profile")
    args = parser.parse_args(argv)
    per_class = args.per_class or (60 if args.smoke else 100)
    epochs = args.epochs or (2 if args.smoke else 3)
    report = args.report or [t for t in (1, 2, 5, 10) if t <= args.steps]
    model = {"backbone": "resnet20", "input_size": 16} if args.smoke else {"backbone": "resnet32", "input_size": 32}
    train = {"epochs": epochs, "device": args.device, **({"flip": False, "crop_pad": 2} if args.smoke else {})}
    if args.teacher_precision:
        train["teacher_precision"] = args.teacher_precision
    cfg = method_config(args.method, model=model, train=train,
                        snapshots={"prune_finetune_epochs": args.finetune_epochs, "planned_steps": args.steps})
    if cfg.memory.total:
        cfg.memory.total = args.memory
    rows = []
    with exit_on_user_error(), torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        data = digits_folder(Path(tmp) / "data", per_class) if args.smoke else cifar_subset(Path(tmp) / "data", per_class, args.steps, args.data)
        classes = sorted(p.name for p in data.iterdir())[: args.steps]
        Workspace.create(Path(tmp) / "ws", cfg, {"memory_budget": None, "memory_budget_bytes": None})
        for t, name in enumerate(classes, 1):
            entry = commands.add_classes(Path(tmp) / "ws", data, [name])
            phases = entry["phase_seconds"]
            total = sum(phases.values())  # the command's wall time: the phases add up to it
            precision = entry["teacher_precision"]
            rows.append({"step": t, "teachers": len(entry["teachers"]), "train_images": entry["train_images"],
                         "seconds": total, "step_seconds": entry["seconds"], "phase_seconds": phases,
                         "columns": columns(phases), "teacher_precision": precision.get("used"),
                         "teacher_precision_errors": precision.get("errors", {}),
                         "train_images_per_second": entry["train_images_per_second"]})
            log(f"t={t}: {total:.1f}s ({precision.get('used')} teachers), "
                + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1]["columns"].items() if v >= 0.05))
    result = {"benchmark": "step_profile", "smoke": args.smoke, "device": device_facts(args.device),
              "method": args.method, "per_class": per_class,
              "epochs": epochs, "finetune_epochs": args.finetune_epochs, "memory": args.memory,
              "threads": args.threads or torch.get_num_threads(), "config": cfg.to_dict(), "rows": rows}
    write_json(output_dir(args.out) / "step_profile.json", result)
    shown = [r for r in rows if r["step"] in report]
    footer = [f"t={r['step']}: {name} teachers against fp32 on its own batches: max |logit diff| {e['max_abs']:.3f} "
              f"(fp32 scale {e['scale']:.1f}), KL at T={cfg.loss.temperature:g} {e['kl']:.5f}"
              for r in shown for name, e in r["teacher_precision_errors"].items()]
    footer.append("seconds per phase of the add-classes command; 'teacher prep' builds the teachers (int8: "
                  "quantize, calibrate, check against fp32); 'other' is what no phase claimed")
    table = format_table(
        ["t", "teachers", "precision", "images", "total s", *[label for label, _ in COLUMNS], "share teachers"],
        [[r["step"], r["teachers"], r["teacher_precision"], r["train_images"], f"{r['seconds']:.2f}",
          *[f"{r['columns'][label]:.2f}" for label, _ in COLUMNS],
          f"{100 * (r['columns']['teachers'] + r['columns']['teacher prep']) / r['seconds']:.0f}%"] for r in shown],
        title=f"Step profile, {args.method}, {'digits ResNet-20 16 px' if args.smoke else 'CIFAR-10 ResNet-32 32 px'}, "
              f"{per_class} images/class, {epochs} epochs (+{args.finetune_epochs} fine-tuning), memory {args.memory}",
        footer=footer)
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
