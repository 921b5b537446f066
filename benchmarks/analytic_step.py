"""What a step costs when it learns without backprop: `add-classes` of 1,000 images on a frozen
pretrained MobileNetV2 (method analytic-frozen: one forward pass and the closed-form solve) at
several input sizes, beside an iCaRL step that trains, all in one process, one after another.

Each row is the second step of a workspace (two classes, then two more: 500 images each, of
which add-classes holds 10% out), so the trained method's step has its teacher, as a device's
every later step does. Seconds per phase come from the command's own report.

    python -m benchmarks.analytic_step --data /tmp/cifar10          # CIFAR-10 JPEG folder (train/)
    python -m benchmarks.analytic_step --smoke                      # digits, ResNet-20, seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.cil import DEFAULT_CACHE, DEFAULT_DATA, cifar_root, offline_imagenet_hub
from benchmarks.common import (
    add_output_args,
    cpu_name,
    emit,
    exit_on_user_error,
    format_table,
    log,
    output_dir,
    torch_threads,
    write_json,
)
from edge_m2kd import commands
from edge_m2kd.data import load_digits

NAME = "analytic_step"
# (method, input size): the frozen method at the sizes it can afford, and one trained step
RUNS = (("analytic-frozen", 96), ("analytic-frozen", 160), ("analytic-frozen", 224), ("icarl", 96))
SMOKE_RUNS = (("analytic-frozen", 16), ("icarl", 16))


def image_folder(root: Path, data: Path | None, per_class: int, smoke: bool) -> tuple[Path, list[str]]:
    """Four classes of `per_class` images each, as an image folder add-classes reads."""
    if smoke:
        digits = load_digits("train", size=16)
        for c, name in enumerate(digits.class_names[:4]):
            (root / name).mkdir(parents=True)
            for i, img in enumerate(digits.images[digits.labels == c][:per_class]):
                Image.fromarray(img).save(root / name / f"{i:04d}.png")
        return root, digits.class_names[:4]
    assert data is not None
    train = cifar_root(data, DEFAULT_CACHE) / "train"
    names = sorted(p.name for p in train.iterdir() if p.is_dir())[:4]
    for name in names:
        (root / name).mkdir(parents=True)
        for f in sorted((train / name).iterdir())[:per_class]:
            shutil.copy(f, root / name / f.name)
    return root, names


def run_one(method: str, size: int, folder: Path, names: list[str], work: Path, smoke: bool) -> dict[str, Any]:
    ws = work / f"{method}-{size}"
    backbone = {"backbone": "resnet20"} if smoke else {"backbone": "mobilenetv2", "pretrained": "imagenet"}
    commands.init_workspace(ws, input_size=size, exemplars=200, device="cpu", **backbone,
                            method=method, **({"epochs": 2} if smoke and method != "analytic-frozen" else {}))
    commands.add_classes(ws, folder, names[:2])
    entry = commands.add_classes(ws, folder, names[2:])
    phases = entry["phase_seconds"]
    train = sum(v for k, v in phases.items() if k.startswith(("step.train", "step.finetune")))
    return {"method": method, "input_size": size, "images": entry["new_images"], "epochs": entry["epochs"],
            "command_seconds": sum(phases.values()), "step_seconds": entry["seconds"],
            "decode_seconds": phases.get("decode", 0.0), "train_seconds": train,
            "forward_seconds": phases.get("step.features", 0.0),
            "forward_images_per_second": entry["forward_images_per_second"], "solve_seconds": entry["solve_seconds"],
            "held_out_accuracy": entry["holdout"].get("deployed_accuracy"),
            "deployed_classifier": entry["deployed_classifier"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.analytic_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 JPEG tarball or its unpacked folder")
    p.add_argument("--smoke", action="store_true", help="digits at 16 px on a ResNet-20: seconds")
    p.add_argument("--per-class", type=int, default=None, help="images per class (default 500; smoke 40)")
    add_output_args(p, NAME)
    args = p.parse_args(argv)
    per_class = args.per_class or (40 if args.smoke else 500)
    out = output_dir(args.out)
    if not args.smoke:
        offline_imagenet_hub("mobilenetv2")
    rows = []
    with torch_threads(args.threads), exit_on_user_error(), tempfile.TemporaryDirectory() as tmp:
        folder, names = image_folder(Path(tmp) / "images", args.data, per_class, args.smoke)
        for method, size in SMOKE_RUNS if args.smoke else RUNS:
            log(f"{method} at {size} px ...")
            rows.append(run_one(method, size, folder, names, Path(tmp), args.smoke))
    result = {"benchmark": NAME, "cpu": cpu_name(), "threads": args.threads, "images_per_class": per_class, "rows": rows}
    write_json(out / "results.json", result)
    body = [[r["method"], r["input_size"], r["images"], f"{r['step_seconds']:.1f}", f"{r['train_seconds']:.1f}",
             f"{r['forward_images_per_second']:.0f}", f"{r['solve_seconds']:.2f}", f"{r['command_seconds']:.1f}"]
            for r in rows]
    text = format_table(["method", "px", "images", "step s", "training s", "forward img/s", "solve s", "command s"],
                        body, title=f"add-classes, second step of 2 classes ({cpu_name()})")
    emit(result, text + f"\n\nJSON: {out / 'results.json'}", args.json)
    return result


if __name__ == "__main__":
    main()
