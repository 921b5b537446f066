"""What cheaper teachers cost in accuracy: M2KD on digits, 10 steps of one class (so the last
step has 9 teachers), with every teacher in fp32, every teacher at the default precision (auto),
and asking a random subset of them per batch (TrainConfig.teacher_subset; the library's default
is the subset row), over a few seeds.

    python -m benchmarks.teacher_cost                        # seeds 1,2,3; subset: the default
    python -m benchmarks.teacher_cost --seeds 1 --subset 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import (
    add_output_args,
    emit,
    format_table,
    log,
    output_dir,
    parse_int_list,
    torch_threads,
    write_json,
)
from edge_m2kd.config import TrainConfig, method_config
from edge_m2kd.data import class_order, load_digits
from edge_m2kd.protocol import run_protocol


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=parse_int_list, default=[1, 2, 3])
    parser.add_argument("--subset", type=int, default=TrainConfig.teacher_subset,
                        help="teacher terms asked per batch in the subset rows (default: the library's default)")
    parser.add_argument("--epochs", type=int, default=2)
    add_output_args(parser, "teacher_cost")
    args = parser.parse_args(argv)
    train, test = load_digits("train", 16), load_digits("test", 16)
    steps = [[c] for c in class_order(train.class_names, 1993)]
    variants = {"fp32, every teacher": {"teacher_precision": "fp32", "teacher_subset": 0},
                "auto, every teacher": {"teacher_subset": 0},
                f"auto, subset {args.subset}": {"teacher_subset": args.subset}}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with torch_threads(args.threads or 1):
        for seed in args.seeds:
            for name, train_opts in variants.items():
                cfg = method_config("m2kd", model={"backbone": "resnet20", "input_size": 16},
                                    train={"epochs": args.epochs, "batch_size": 32, "lr": 0.05, "crop_pad": 2,
                                           "flip": False, "seed": seed, **train_opts},
                                    snapshots={"prune_finetune_epochs": 1, "planned_steps": len(steps)})
                cfg.memory.total = 100
                used: list[str] = []
                r = run_protocol(train, test, steps, cfg, on_step=lambda _l, rep, _e, used=used: used.append(
                    rep.teacher_precision.get("used", "-")))
                runs[name].append({"seed": seed, "final_accuracy": r["final_accuracy"],
                                   "average_incremental_accuracy": r["average_incremental_accuracy"],
                                   "nme_final_accuracy": r["nme_final_accuracy"], "seconds": r["seconds"],
                                   "precision_per_step": used})
                log(f"seed {seed}, {name}: final {100 * r['final_accuracy']:.1f}%, {r['seconds']:.0f}s, teachers {used}")
    rows = [{"variant": name, "runs": v, "final_mean": statistics.mean(x["final_accuracy"] for x in v),
             "average_incremental_mean": statistics.mean(x["average_incremental_accuracy"] for x in v),
             "nme_final_mean": statistics.mean(x["nme_final_accuracy"] for x in v),
             "seconds_mean": statistics.mean(x["seconds"] for x in v)} for name, v in runs.items()]
    result = {"benchmark": "teacher_cost", "seeds": args.seeds, "epochs": args.epochs,
              "threads": args.threads or 1, "torch": torch.__version__, "rows": rows}
    write_json(output_dir(args.out) / "teacher_cost.json", result)
    table = format_table(
        ["teachers", *[f"final, seed {s}" for s in args.seeds], "final mean", "avg inc mean", "NME final mean",
         "seconds mean"],
        [[r["variant"], *[f"{100 * x['final_accuracy']:.1f}" for x in r["runs"]], f"{100 * r['final_mean']:.1f}",
          f"{100 * r['average_incremental_mean']:.1f}", f"{100 * r['nme_final_mean']:.1f}",
          f"{r['seconds_mean']:.0f}"] for r in rows],
        title="M2KD (packed) on digits, 10 steps of 1 class, ResNet-20 at 16 px, memory 100: accuracy in %",
        footer=["the seeds differ in weights, batches and augmentation; the class order is fixed (seed 1993)"])
    emit(result, table, args.json)
    return result


if __name__ == "__main__":
    main()
