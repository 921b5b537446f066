"""The learner's training throughput against a bare PyTorch training loop, side by side in one run.

Learner: the training phase of a real first step (StepReport.train_images_per_second: batches
drawn from uint8 images, cropped and flipped, normalised, the loss with its bookkeeping, masks
and weight decay). Bare loop: the same model (ResNet-32 with its head, channels_last), batch,
input size, SGD with momentum and weight decay and the same number of batches, on float tensors
prepared beforehand, no augmentation, nothing else. Rounds alternate bare / icarl / m2kd and
the medians are compared, so load on a shared machine falls on all alike.

    python -m benchmarks.throughput            # CIFAR-10 JPEGs, 2 classes x 500 images, 2 epochs, 3 rounds
    python -m benchmarks.throughput --smoke    # digits, ResNet-20 at 16 px
    python -m benchmarks.throughput --device cuda --backbone mobilenetv2 --input-size 96

On a GPU both loops keep their images on the device beforehand and the clock stops after a
synchronisation (the bare loop's explicitly, the learner's at the host read of each epoch's loss sums).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    add_device_arg,
    add_output_args,
    device_facts,
    emit,
    exit_on_user_error,
    format_table,
    log,
    output_dir,
    torch_threads,
    write_json,
)
from benchmarks.step_profile import cifar_subset
from edge_m2kd.config import BACKBONE_NAMES, method_config
from edge_m2kd.data import ImageSet, load_digits, load_image_folder
from edge_m2kd.learner import Learner, resolve_device
from edge_m2kd.snapshots import build_model

TARGET = 0.70
METHODS = ("icarl", "m2kd")


def bare_loop(cfg, images: np.ndarray, labels: np.ndarray, epochs: int) -> float:  # noqa: ANN001
    """Images per second of a plain loop: model, SGD, cross-entropy, nothing else."""
    torch.manual_seed(0)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model, int(labels.max()) + 1).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    x_all = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(255).contiguous(
        memory_format=torch.channels_last)
    y_all = torch.from_numpy(labels).to(device)
    b = cfg.train.batch_size
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(images), b):
            loss = F.cross_entropy(model(x_all[i : i + b], with_aux=False).logits, y_all[i : i + b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    synchronize(device)
    return len(images) * epochs / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learner_step(cfg, data: ImageSet) -> float:  # noqa: ANN001
    return Learner(cfg).step(data).train_images_per_second


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="digits at 16 px, ResNet-20")
    parser.add_argument("--per-class", type=int, default=None, help="images per class (default 500; smoke all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", choices=BACKBONE_NAMES, default=None, help="default resnet32 (smoke resnet20)")
    parser.add_argument("--input-size", type=int, default=None, help="pixels (default 32; smoke 16)")
    parser.add_argument("--data", type=Path, default=None,
                        help="CIFAR-10: its JPEG tarball or a folder with train/ (default ../shared/data/...)")
    add_device_arg(parser)
    add_output_args(parser, "throughput")
    args = parser.parse_args(argv)
    model = {"backbone": "resnet20", "input_size": 16} if args.smoke else {"backbone": "resnet32", "input_size": 32}
    model.update({k: v for k, v in (("backbone", args.backbone), ("input_size", args.input_size)) if v})
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device}
    cfgs = {m: method_config(m, model=model, train=train, snapshots={"prune_finetune_epochs": 0}) for m in METHODS}
    with exit_on_user_error(), torch_threads(args.threads):
        if args.smoke:
            data = load_digits("train", model["input_size"]).only_classes(["0", "1"])
            if args.per_class:
                data = ImageSet(data.images[: 2 * args.per_class], data.labels[: 2 * args.per_class], data.class_names)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                data = load_image_folder(cifar_subset(Path(tmp), args.per_class or 500, 2, args.data),
                                         model["input_size"])
        ips: dict[str, list[float]] = {"bare": [], **{m: [] for m in METHODS}}
        bare_loop(cfgs["icarl"], data.images[: 2 * args.batch_size], data.labels[: 2 * args.batch_size], 1)  # warm-up
        for r in range(args.rounds):
            ips["bare"].append(bare_loop(cfgs["icarl"], data.images, data.labels, args.epochs))
            for m in METHODS:
                ips[m].append(learner_step(cfgs[m], data))
            log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in ips.items()))
    med = {k: statistics.median(v) for k, v in ips.items()}
    rows = [{"loop": k, "images_per_second": med[k], "rounds": ips[k], "ratio_to_bare": med[k] / med["bare"]}
            for k in ips]
    result = {"benchmark": "throughput", "smoke": args.smoke, "device": device_facts(args.device),
              "images": len(data.images), "epochs": args.epochs,
              "batch_size": args.batch_size, "backbone": model["backbone"], "input_size": model["input_size"],
              "threads": args.threads or torch.get_num_threads(), "target_ratio": TARGET, "rows": rows}
    write_json(output_dir(args.out) / "throughput.json", result)
    worst = min(med[m] / med["bare"] for m in METHODS)
    table = format_table(
        ["loop", "images/s (median)", "per round", "ratio to bare"],
        [[r["loop"], f"{r['images_per_second']:.1f}", " ".join(f"{v:.0f}" for v in r["rounds"]),
          f"{r['ratio_to_bare']:.2f}"] for r in rows],
        title=f"Training throughput on {result['device']['name']}, {model['backbone']} at {model['input_size']} px, "
              f"batch {args.batch_size}, "
              f"{len(data.images)} images x {args.epochs} epochs, {args.rounds} interleaved rounds",
        footer=[f"target: learner >= {TARGET:.0%} of the bare loop: worst {worst:.0%} -> "
                f"{'met' if worst >= TARGET else 'NOT met'}",
                "learner: StepReport.train_images_per_second of a first step (no teachers)"])
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
