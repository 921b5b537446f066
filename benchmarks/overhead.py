"""Teacher overhead: wall time of a training step with one teacher (iCaRL-style) against an
M2KD step with t-1 teachers, same data and same batches, side by side in one run.

    python -m benchmarks.overhead            # t = 2, 5, 10, 20 on ResNet-32
    python -m benchmarks.overhead --quick    # t = 2, 10, few batches

Four timings per t: `icarl` (M_{t-1} over all old classes, no auxiliary heads), `m2kd`
(t-1 own-group teachers plus the auxiliary levels, each teacher BatchNorm-folded: the shipped
path), `m2kd_stacked` (all teachers in one grouped convolution) and `m2kd_naive` (each teacher
as trained), so the ratios show the cost of M2KD and what each teacher path saves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    add_output_args,
    emit,
    format_table,
    log,
    output_dir,
    plot_lines,
    torch_threads,
    write_json,
)
from edge_m2kd.config import method_config
from edge_m2kd.learner import Learner
from edge_m2kd.losses import teacher_terms
from edge_m2kd.snapshots import build_model
from edge_m2kd.teachers import build_teachers

CLASSES_PER_STEP = 2


def _snapshot(cfg, n_classes: int, seed: int):  # noqa: ANN001, ANN202 - a trained-looking frozen model
    torch.manual_seed(seed)
    net = build_model(cfg.model, n_classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def time_step(method: str, t: int, batches: int, batch_size: int, mode: str, backbone: str,
              size: int) -> tuple[float, float]:
    """Seconds for `batches` training batches of step t (after one warm-up epoch), and the
    floating-point operations of one batch (teachers, student forward and backward)."""
    cfg = method_config(method, model={"backbone": backbone, "input_size": size},
                        train={"batch_size": batch_size, "teacher_mode": mode}, snapshots={"policy": "full"})
    learner = Learner(cfg)
    learner.groups = [list(range(k * CLASSES_PER_STEP, (k + 1) * CLASSES_PER_STEP)) for k in range(t)]
    learner.model.add_classes(t * CLASSES_PER_STEP)
    terms = teacher_terms(t, learner.groups, cfg.loss)
    snapshots = {k: _snapshot(cfg, k * CLASSES_PER_STEP, k) for k in sorted({k for k, _ in terms})}
    teachers = build_teachers(snapshots, mode)
    rng = np.random.default_rng(0)
    n = batch_size * batches
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, t * CLASSES_PER_STEP, n).astype(np.int64)
    # The same epoch twice: the first warms up the allocator and oneDNN's primitive cache.
    learner._train(learner.model, images, labels, teachers, terms, {}, 1, 0.01, None)
    start = time.perf_counter()
    learner._train(learner.model, images, labels, teachers, terms, {}, 1, 0.01, None)
    seconds = time.perf_counter() - start
    # Counted, not timed: whether the extra time is arithmetic the teachers must do, or waste.
    with FlopCounterMode(display=False) as counter:
        learner._train(learner.model, images[:batch_size], labels[:batch_size], teachers, terms, {}, 1, 0.01, None)
    return seconds, float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="t in {2, 10}, few batches")
    parser.add_argument("--steps", default=None, help="comma list of t (default 2,5,10,20)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per measurement (default 20, quick 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--input-size", type=int, default=32)
    add_output_args(parser, "overhead")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else ([2, 10] if args.quick else [2, 5, 10, 20])
    batches = args.batches or (5 if args.quick else 20)
    rows = []
    with torch_threads(args.threads):
        for t in steps:
            common = (t, batches, args.batch_size)
            icarl, icarl_flops = time_step("icarl", *common, "folded", args.backbone, args.input_size)
            m2kd, m2kd_flops = time_step("m2kd", *common, "folded", args.backbone, args.input_size)
            stacked, _ = time_step("m2kd", *common, "stacked", args.backbone, args.input_size)
            naive, _ = time_step("m2kd", *common, "separate", args.backbone, args.input_size)
            rows.append({"teachers": t - 1, "step": t, "icarl_seconds": icarl, "m2kd_seconds": m2kd,
                         "m2kd_stacked_seconds": stacked, "m2kd_naive_seconds": naive, "ratio": m2kd / icarl,
                         "stacked_ratio": stacked / icarl, "naive_ratio": naive / icarl,
                         "icarl_gflop_per_batch": icarl_flops / 1e9, "m2kd_gflop_per_batch": m2kd_flops / 1e9,
                         "flop_ratio": m2kd_flops / icarl_flops})
            log(f"t={t}: icarl {icarl:.2f}s, m2kd {m2kd:.2f}s (x{m2kd / icarl:.2f}, FLOPs x{m2kd_flops / icarl_flops:.2f}), "
                f"stacked x{stacked / icarl:.2f}, naive x{naive / icarl:.2f}")
    result = {"backbone": args.backbone, "batch_size": args.batch_size, "batches": batches,
              "threads": torch.get_num_threads() if not args.threads else args.threads, "rows": rows}
    out = output_dir(args.out)
    write_json(out / "overhead.json", result)
    if not args.no_plot:
        xs = [r["teachers"] for r in rows]
        plot_lines(out / "overhead.png", {
            "m2kd (folded, shipped) / icarl": (xs, [r["ratio"] for r in rows]),
            "m2kd (stacked) / icarl": (xs, [r["stacked_ratio"] for r in rows]),
            "m2kd (naive) / icarl": (xs, [r["naive_ratio"] for r in rows]),
        }, xlabel="teachers (t-1)", ylabel="step time ratio", title="Teacher overhead", hlines={"target 1.5x": 1.5})
    ten = next((r for r in rows if r["step"] == 10), None)
    footer = [f"target: m2kd at t = 10 <= 1.5x icarl: measured x{ten['ratio']:.2f} -> "
              f"{'met' if ten['ratio'] <= 1.5 else 'NOT met'}"] if ten else []
    footer.append("FLOPs: counted on one batch (teachers' forwards, the student's forward and backward); a time "
                  "ratio near the FLOP ratio means the teachers cost arithmetic, not overhead.")
    table = format_table(
        ["t", "teachers", "icarl s", "m2kd s", "ratio", "FLOP ratio", "stacked s", "stacked ratio", "naive s",
         "naive ratio"],
        [[r["step"], r["teachers"], f"{r['icarl_seconds']:.2f}", f"{r['m2kd_seconds']:.2f}", f"{r['ratio']:.2f}",
          f"{r['flop_ratio']:.2f}",
          f"{r['m2kd_stacked_seconds']:.2f}", f"{r['stacked_ratio']:.2f}",
          f"{r['m2kd_naive_seconds']:.2f}", f"{r['naive_ratio']:.2f}"] for r in rows],
        title=f"Teacher overhead, {args.backbone}, {batches} batches of {args.batch_size}", footer=footer)
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
