"""Teacher overhead: wall time of a training step with one teacher (iCaRL-style) against an
M2KD step with t-1 teachers, same data and same batches, side by side in one run.

    python -m benchmarks.overhead            # t = 2, 5, 10, 20 on ResNet-32
    python -m benchmarks.overhead --quick    # t = 2, 10, few batches

Timings per t: `icarl` (M_{t-1} over all old classes, no auxiliary heads) and `m2kd` (t-1
own-group teachers plus the auxiliary levels, each teacher BatchNorm-folded: the shipped path),
both with the library's defaults (teacher precision `auto`: int8 on a CPU when its logits pass
the check; M2KD asks a random `teacher_subset` of its teachers per batch); `m2kd_all` (the same,
every teacher at every batch); icarl and m2kd_all in fp32 (`icarl_fp32`, `m2kd_fp32`); and, in
fp32 with every teacher, `m2kd_stacked` (all teachers in
one grouped convolution) and `m2kd_naive` (each teacher as trained), so the ratios show the cost
of M2KD and what each teacher path saves. Every variant is built first, warmed up once, then
timed in `--repeats` interleaved rounds (median), so load on a shared machine falls on all alike.
Preparing the teachers (building, int8 calibration, the auto check) happens once per step and
is not in these timings; `benchmarks.step_profile` shows it as `teachers.prepare`. `--device`
(default auto: CUDA where present): under CUDA, `auto` teachers run in fp16 or bf16, not int8;
every timed run ends with a host read of its loss sums, so GPU work is inside the clock.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    add_device_arg,
    add_output_args,
    device_facts,
    emit,
    format_table,
    log,
    output_dir,
    plot_lines,
    torch_threads,
    write_json,
)
from edge_m2kd.config import TrainConfig, method_config
from edge_m2kd.learner import Learner
from edge_m2kd.losses import teacher_terms
from edge_m2kd.snapshots import build_model

CLASSES_PER_STEP = 2


def _snapshot(learner: Learner, n_classes: int, seed: int, images: np.ndarray) -> torch.nn.Module:
    """A frozen model whose BatchNorm statistics are its own activations' on `images`, as a
    trained model's are on its data (random statistics blow activations up to logits of 50 to
    100, which no trained teacher has and which int8 then rightly refuses)."""
    torch.manual_seed(seed)
    net = build_model(learner.cfg.model, n_classes).to(learner.device)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches below
    net.train()
    with torch.no_grad():
        for i in range(0, min(len(images), 256), 64):
            net(learner._batch(images[i : i + 64], augment=True))
    return net.eval()


ALL = {"teacher_subset": 0}  # every teacher asked at every batch
FP32 = {"teacher_precision": "fp32", **ALL}
# name -> (method, train options over the library's defaults)
VARIANTS: dict[str, tuple[str, dict]] = {
    "icarl": ("icarl", {}), "m2kd": ("m2kd", {}), "m2kd_all": ("m2kd", ALL),
    "icarl_fp32": ("icarl", FP32), "m2kd_fp32": ("m2kd", FP32),
    "m2kd_stacked": ("m2kd", {**FP32, "teacher_mode": "stacked"}),
    "m2kd_naive": ("m2kd", {**FP32, "teacher_mode": "separate"}),
}


def prepare_step(method: str, t: int, batches: int, batch_size: int, backbone: str, size: int,
                 train: dict | None = None) -> tuple[Callable[[], float], dict]:
    """A function timing `batches` training batches of step t, and what was set up: the teacher
    precision the step chose (with its measured error) and the FLOPs of one batch (teachers'
    forwards, the student's forward and backward; counted in fp32, whatever runs)."""
    cfg = method_config(method, model={"backbone": backbone, "input_size": size},
                        train={"batch_size": batch_size, **(train or {})},
                        snapshots={"policy": "full"})
    learner = Learner(cfg)
    learner.groups = [list(range(k * CLASSES_PER_STEP, (k + 1) * CLASSES_PER_STEP)) for k in range(t)]
    learner.model.add_classes(t * CLASSES_PER_STEP)
    learner.model.to(learner.device)  # the new head's weights, where Learner.step would put them
    terms = teacher_terms(t, learner.groups, cfg.loss)
    rng = np.random.default_rng(0)
    n = batch_size * batches
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, t * CLASSES_PER_STEP, n).astype(np.int64)
    snapshots = {k: _snapshot(learner, k * CLASSES_PER_STEP, k, images) for k in sorted({k for k, _ in terms})}
    # The teachers as a step of `cpu-short` size prepares them (1,200 images, 30 + 5 epochs), not
    # as for the few timed batches, which auto would rightly keep in fp32 (INT8_MIN_IMAGES).
    teachers, choice = learner._teachers(snapshots, images, teacher_images=1200 * 35)
    info = {"precision": choice.to_dict(), "flops": None}
    if choice.used == "fp32":  # quantized kernels are not in FlopCounterMode's table
        with FlopCounterMode(display=False) as counter:
            learner._train(learner.model, images[:batch_size], labels[:batch_size], teachers, terms, {}, 1, 0.01, None)
        info["flops"] = float(counter.get_total_flops())

    def run() -> float:
        start = time.perf_counter()
        learner._train(learner.model, images, labels, teachers, terms, {}, 1, 0.01, None)
        return time.perf_counter() - start

    run()  # warm-up: the allocator and oneDNN's primitive cache
    return run, info


def time_variants(t: int, batches: int, batch_size: int, backbone: str, size: int, repeats: int,
                  variants: dict[str, tuple[str, dict]],
                  device: str = TrainConfig.device) -> tuple[dict[str, float], dict[str, dict]]:
    """Median seconds per variant over `repeats` interleaved rounds, and each variant's setup info."""
    prepared = {name: prepare_step(method, t, batches, batch_size, backbone, size, {"device": device, **train})
                for name, (method, train) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (run, _) in prepared.items():
            times[name].append(run())
    return {name: statistics.median(v) for name, v in times.items()}, {name: info for name, (_, info) in prepared.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="t in {2, 10}, few batches")
    parser.add_argument("--steps", default=None, help="comma list of t (default 2,5,10,20)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per measurement (default 20, quick 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per variant (median)")
    parser.add_argument("--teacher-subset", type=int, default=0, metavar="K",
                        help="also time m2kd asking a random K of its teacher terms per batch (TrainConfig.teacher_subset)")
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--input-size", type=int, default=32)
    add_device_arg(parser)
    add_output_args(parser, "overhead")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else ([2, 10] if args.quick else [2, 5, 10, 20])
    batches = args.batches or (5 if args.quick else 20)
    rows = []
    with torch_threads(args.threads):
        for t in steps:
            variants = dict(VARIANTS)
            if args.teacher_subset:
                variants["m2kd_subset"] = ("m2kd", {"teacher_subset": args.teacher_subset})
            sec, info = time_variants(t, batches, args.batch_size, args.backbone, args.input_size, args.repeats,
                                      variants, args.device)
            icarl_flops, m2kd_flops = info["icarl_fp32"]["flops"], info["m2kd_fp32"]["flops"]
            used = info["m2kd"]["precision"]
            rows.append({"teachers": t - 1, "step": t, "icarl_seconds": sec["icarl"], "m2kd_seconds": sec["m2kd"],
                         "teacher_subset": TrainConfig.teacher_subset, "m2kd_all_seconds": sec["m2kd_all"],
                         "all_ratio": sec["m2kd_all"] / sec["icarl"],
                         "m2kd_stacked_seconds": sec["m2kd_stacked"], "m2kd_naive_seconds": sec["m2kd_naive"],
                         "ratio": sec["m2kd"] / sec["icarl"],
                         "stacked_ratio": sec["m2kd_stacked"] / sec["icarl_fp32"],
                         "naive_ratio": sec["m2kd_naive"] / sec["icarl_fp32"],
                         "icarl_gflop_per_batch": icarl_flops / 1e9, "m2kd_gflop_per_batch": m2kd_flops / 1e9,
                         "flop_ratio": m2kd_flops / icarl_flops,
                         "icarl_fp32_seconds": sec["icarl_fp32"], "m2kd_fp32_seconds": sec["m2kd_fp32"],
                         "fp32_ratio": sec["m2kd_fp32"] / sec["icarl_fp32"],
                         "m2kd_precision": used["used"], "icarl_precision": info["icarl"]["precision"]["used"],
                         "m2kd_precision_error": used["errors"].get(used["used"]),
                         "m2kd_precision_checked": used["errors"]})
            if args.teacher_subset:
                rows[-1].update({"extra_subset": args.teacher_subset, "m2kd_subset_seconds": sec["m2kd_subset"],
                                 "subset_ratio": sec["m2kd_subset"] / sec["icarl"]})
            r = rows[-1]
            log(f"t={t}: icarl {r['icarl_seconds']:.2f}s ({r['icarl_precision']}), m2kd {r['m2kd_seconds']:.2f}s "
                f"({r['m2kd_precision']}) x{r['ratio']:.2f}; every teacher x{r['all_ratio']:.2f}; fp32 x{r['fp32_ratio']:.2f} (FLOPs x{r['flop_ratio']:.2f}), "
                f"stacked x{r['stacked_ratio']:.2f}, naive x{r['naive_ratio']:.2f}")
    result = {"device": device_facts(args.device), "backbone": args.backbone, "batch_size": args.batch_size, "batches": batches, "repeats": args.repeats,
              "threads": torch.get_num_threads() if not args.threads else args.threads, "rows": rows}
    out = output_dir(args.out)
    write_json(out / "overhead.json", result)
    if not args.no_plot:
        xs = [r["teachers"] for r in rows]
        plot_lines(out / "overhead.png", {
            "m2kd (defaults) / icarl": (xs, [r["ratio"] for r in rows]),
            "m2kd (every teacher) / icarl": (xs, [r["all_ratio"] for r in rows]),
            "m2kd (stacked) / icarl": (xs, [r["stacked_ratio"] for r in rows]),
            "m2kd (naive) / icarl": (xs, [r["naive_ratio"] for r in rows]),
        }, xlabel="teachers (t-1)", ylabel="step time ratio", title="Teacher overhead", hlines={"target 1.5x": 1.5})
    ten = next((r for r in rows if r["step"] == 10), None)
    footer = [f"target: m2kd at t = 10 <= 1.5x icarl (defaults: teacher precision auto, teacher_subset "
              f"{TrainConfig.teacher_subset}): measured x{ten['ratio']:.2f} -> "
              f"{'met' if ten['ratio'] <= 1.5 else 'NOT met'}; every teacher x{ten['all_ratio']:.2f}"] if ten else []
    if ten and args.teacher_subset:
        footer.append(f"  with teacher_subset={args.teacher_subset}: x{ten['subset_ratio']:.2f} -> "
                      f"{'met' if ten['subset_ratio'] <= 1.5 else 'NOT met'}")
    footer += [f"t={r['step']}: {name} teachers' logits against fp32: max |diff| {e['max_abs']:.3f} (fp32 scale "
               f"{e['scale']:.1f}), KL at T=2 {e['kl']:.5f} -> {'used' if name == r['m2kd_precision'] else 'refused'}"
               for r in rows for name, e in r["m2kd_precision_checked"].items()]
    footer.append("FLOPs: counted in fp32 on one batch (teachers' forwards, the student's forward and backward); an "
                  "fp32 time ratio near the FLOP ratio means the teachers cost arithmetic, not overhead. Stacked and "
                  "naive run in fp32, against icarl in fp32.")
    subset = [f"subset {args.teacher_subset} s", "subset ratio"] if args.teacher_subset else []
    table = format_table(
        ["t", "teachers", "precision", "icarl s", "m2kd s", "ratio", "all s", "all ratio", *subset, "icarl fp32 s",
         "m2kd fp32 s",
         "fp32 ratio", "FLOP ratio", "stacked ratio", "naive ratio"],
        [[r["step"], r["teachers"], r["m2kd_precision"], f"{r['icarl_seconds']:.2f}", f"{r['m2kd_seconds']:.2f}",
          f"{r['ratio']:.2f}", f"{r['m2kd_all_seconds']:.2f}", f"{r['all_ratio']:.2f}",
          *([f"{r['m2kd_subset_seconds']:.2f}", f"{r['subset_ratio']:.2f}"] if args.teacher_subset else []),
          f"{r['icarl_fp32_seconds']:.2f}", f"{r['m2kd_fp32_seconds']:.2f}",
          f"{r['fp32_ratio']:.2f}", f"{r['flop_ratio']:.2f}", f"{r['stacked_ratio']:.2f}",
          f"{r['naive_ratio']:.2f}"] for r in rows],
        title=f"Teacher overhead on {result['device']['name']}, {args.backbone}, {batches} batches of {args.batch_size}, median of {args.repeats} "
              "interleaved rounds", footer=footer)
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
