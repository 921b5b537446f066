"""Step time alone and beside a busy process, per thread setting: why the CLI runs torch
with OpenMP's passive wait policy.

    python -m benchmarks.threads            # ResNet-32, 2 classes of digits, 2 epochs
    python -m benchmarks.threads --quick    # ResNet-20, 1 epoch

Every measurement is a fresh process (OpenMP reads its settings once, when torch loads):
one class-incremental step (`Learner.step`, the first, so no teachers) timed with

- `default`: torch's default intra-op threads (one per core), OpenMP's default wait policy
  (threads spin at every barrier, waiting for the slowest);
- `1 thread`: `torch.set_num_threads(1)`;
- `passive`: default threads, `OMP_WAIT_POLICY=PASSIVE` (a thread that waits sleeps).

each alone and beside a busy process: a PyTorch inference loop with its own default
threads, like `edge-m2kd bench` or the camera service's `predict` on the board.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import add_output_args, emit, format_table, log, output_dir, write_json

# label -> (extra environment, torch threads or None for torch's default)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "default": ({"OMP_WAIT_POLICY": ""}, None),
    "1 thread": ({"OMP_WAIT_POLICY": ""}, 1),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
}
# The measuring process must not inherit the caller's thread settings (the tests and CI set
# OMP_NUM_THREADS=1), or every row would be the 1-thread row.
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update({k: v for k, v in extra.items() if v})
    return env


def time_step(backbone: str, epochs: int, threads: int | None) -> dict[str, Any]:
    """In this process: seconds of one first step on two digit classes."""
    import torch

    from edge_m2kd.config import method_config
    from edge_m2kd.data import load_digits
    from edge_m2kd.learner import Learner

    if threads:
        torch.set_num_threads(threads)
    data = load_digits("train", size=32)
    cfg = method_config("m2kd", model={"backbone": backbone, "input_size": 32},
                        train={"epochs": epochs, "batch_size": 64, "device": "cpu"},
                        snapshots={"policy": "full"})
    learner = Learner(cfg)
    start = time.perf_counter()
    report = learner.step(data, data.class_names[:2])
    return {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "images": report.train_images}


def busy_loop() -> None:
    """Forever: batch-32 inference, torch's default threads (killed by the parent)."""
    import torch

    from edge_m2kd.config import ModelConfig
    from edge_m2kd.snapshots import build_model

    model = build_model(ModelConfig("resnet32", 32), 10).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.inference_mode():
        while True:
            model(x, with_aux=False)


def measure(setting: str, busy: bool, backbone: str, epochs: int) -> dict[str, Any]:
    extra, threads = SETTINGS[setting]
    other = None
    if busy:
        other = subprocess.Popen([sys.executable, "-m", "benchmarks.threads", "--busy-loop"], env=_env({}))
        time.sleep(3)  # let it import torch and reach its loop
    try:
        cmd = [sys.executable, "-m", "benchmarks.threads", "--worker", "--backbone", backbone,
               "--epochs", str(epochs), *(["--threads", str(threads)] if threads else [])]
        out = subprocess.run(cmd, env=_env(extra), capture_output=True, text=True, check=True)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-20 and one epoch")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per cell (the fastest is kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--busy-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    add_output_args(parser, "threads")
    args = parser.parse_args(argv)
    backbone = args.backbone or ("resnet20" if args.quick else "resnet32")
    epochs = args.epochs or (1 if args.quick else 2)
    if args.busy_loop:
        busy_loop()
    if args.worker:
        print(json.dumps(time_step(backbone, epochs, args.threads)))
        return {}

    rows = []
    for setting in SETTINGS:
        cells = {}
        for busy in (False, True):
            runs = [measure(setting, busy, backbone, epochs) for _ in range(args.repeats)]
            cells[busy] = min(r["seconds"] for r in runs)
            log(f"{setting:<9} {'beside busy' if busy else 'alone':<11} {cells[busy]:6.2f}s "
                f"({runs[0]['threads']} threads, {runs[0]['images']} images)")
        rows.append({"setting": setting, "threads": runs[0]["threads"], "alone_s": cells[False],
                     "beside_busy_s": cells[True], "slowdown": cells[True] / cells[False]})
    default = rows[0]
    for r in rows:
        r["beside_busy_vs_default"] = default["beside_busy_s"] / r["beside_busy_s"]
    result = {"backbone": backbone, "epochs": epochs, "cpus": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "rows": rows}
    write_json(output_dir(args.out) / "results.json", result)
    table = format_table(
        ["setting", "threads", "alone s", "beside busy s", "busy/alone", "speed-up beside busy"],
        [[r["setting"], r["threads"], r["alone_s"], r["beside_busy_s"], f"{r['slowdown']:.2f}x",
          f"{r['beside_busy_vs_default']:.2f}x"] for r in rows],
        title=f"one first step, {backbone}, {epochs} epoch(s), {os.cpu_count()} CPUs; busy = a torch inference loop",
    )
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
