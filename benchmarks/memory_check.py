"""A training step's predicted peak memory against the measured one, through the CLI.

    python -m benchmarks.memory_check                        # the three configurations below
    python -m benchmarks.memory_check --configs resnet32-32 --images 1000

Every configuration is two fresh processes, exactly as a user runs them: `edge-m2kd init`, then
`edge-m2kd add-classes --json` on a folder of `--images` CIFAR-10 JPEGs of two classes (the
step's own hold-out takes 10% of them). The prediction is the one the step checked against the
budget (`memory.predicted_peak` in the step report). Two measurements:

- `step peak RSS`: the step's own sampler (resident size every 50 ms while `Learner.step` runs);
- `process peak RSS`: the kernel's high-water mark of the whole `add-classes` process
  (`ru_maxrss` from `wait4`): decoding, the step, the hold-out evaluation and the commit, and no
  sample can miss it. This is the figure a budget has to cover.

The ratio is predicted / process peak: above 1 the prediction is on the safe side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, add_output_args, emit, format_table, log, output_dir, write_json

MiB = 1 << 20
MOBILENET_PTH = REPO_ROOT / ".cache" / "weights" / "mobilenet_v2-b0353104.pth"

# name -> `init` options (every one: full snapshots, 1 epoch, batch 64, CPU)
CONFIGS: dict[str, list[str]] = {
    "resnet32-32": ["--backbone", "resnet32", "--input-size", "32"],
    "resnet18-224": ["--backbone", "resnet18", "--input-size", "224"],
    "mobilenetv2-96": ["--backbone", "mobilenetv2", "--input-size", "96", "--pretrained", str(MOBILENET_PTH),
                       "--frozen-stages", "0"],
}
CLASSES = ("airplane", "automobile")


def class_folder(source: Path, images: int, dest: Path) -> Path:
    """`images` JPEGs of two CIFAR-10 classes (half each), linked from `source`/<class>/."""
    per_class = images // len(CLASSES)
    for name in CLASSES:
        files = sorted((source / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            raise SystemExit(f"error: {source / name} has {len(files)} JPEGs, {per_class} needed")
        (dest / name).mkdir(parents=True)
        for f in files:
            (dest / name / f.name).symlink_to(f.resolve())
    return dest


def _cli(args: list[str]) -> tuple[str, int]:
    """Run `edge-m2kd ARGS` in a fresh process; its stdout and its peak RSS in bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edge_m2kd", *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"error: edge-m2kd {' '.join(args)} exited {proc.returncode}:\n{err.read()[-2000:]}")
        return out.read(), int(usage.ru_maxrss) * 1024  # Linux: kB


def measure(name: str, data: Path, workdir: Path, batch_size: int) -> dict[str, Any]:
    ws = workdir / f"ws-{name}"
    _cli(["init", str(ws), *CONFIGS[name], "--snapshots", "full", "--epochs", "1", "--batch-size", str(batch_size),
          "--device", "cpu", "--json"])
    start = time.perf_counter()
    out, process_peak = _cli(["add-classes", str(ws), str(data), "--json"])
    step = json.loads(out)
    predicted = step["memory"]["predicted_peak"]
    return {"config": name, "train_images": step["train_images"], "batch_size": step["batch_size"],
            "predicted": predicted["total"], "parts": predicted,
            "step_peak_rss": step["memory"]["measured_peak_rss"], "process_peak_rss": process_peak,
            "ratio": predicted["total"] / process_peak, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/cifar10/train"),
                        help="CIFAR-10 JPEG training folder (<class>/*.jpg; default /tmp/cifar10/train)")
    parser.add_argument("--images", type=int, default=5000, help="images in the step, two classes (default 5000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    add_output_args(parser, "memory_check")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-check-") as tmp:
        data = class_folder(args.data, args.images, Path(tmp) / "data")
        for name in names:
            log(f"{name}: init, then add-classes on {args.images} images ...")
            row = measure(name, data, Path(tmp), args.batch_size)
            log(f"{name}: predicted {row['predicted'] / MiB:.0f} MiB, process peak {row['process_peak_rss'] / MiB:.0f} MiB "
                f"({row['ratio']:.2f}), {row['seconds']:.0f} s")
            rows.append(row)
    result = {"images": args.images, "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS", "1"),
              "rows": rows}
    write_json(output_dir(args.out) / "results.json", result)
    table = format_table(
        ["configuration", "train images", "predicted MiB", "step peak RSS MiB", "process peak RSS MiB",
         "predicted / process peak"],
        [[r["config"], r["train_images"], round(r["predicted"] / MiB), round(r["step_peak_rss"] / MiB),
          round(r["process_peak_rss"] / MiB), f"{r['ratio']:.2f}"] for r in rows],
        title=f"one first step, 1 epoch, batch {args.batch_size}, full snapshots, CPU",
    )
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
