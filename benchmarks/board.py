"""The board check: does this project work on this Jetson or CUDA machine, and how fast, in one go.

    python -m benchmarks.board --data cifar10-jpeg.tar.gz     # on the board or GPU machine: < 8 minutes
    python -m benchmarks.board --smoke                        # every part at tiny sizes on a CPU

Parts, each a process of its own (`--part NAME`), the timed ones alone first, the rest side by
side (`--parallel`, default by GPU memory), under one deadline (`--deadline-s`): a part still
running then is stopped and keeps what it had written ("cut"), one not started is "skipped".

- facts: torch, CUDA and cuDNN versions, the GPU, TF32 and cuDNN settings, the Jetson board.
- throughput-resnet32, throughput-mobilenetv2: benchmarks.throughput on the device (a bare loop
  against the learner's step, ResNet-32 at 32 px and MobileNetV2 at 96 px, batch 64).
- overhead: benchmarks.overhead at t = 10: M2KD against iCaRL with the default teacher
  precision (`auto`: which format it chose and its measured logit error) and in fp32.
- memory: `memory`'s predicted peak against the CUDA allocator's measured peak for one step.
- cli-scratch, cli-pretrained: the real commands, one process each (init, three add-classes, eval,
  snapshots --verify, memory, export, predict on torch and onnxruntime, bench; TensorRT where
  installed), each command's seconds and exit code.
- accuracy-*: benchmarks.cil, CIFAR-10 5 steps of 2, `full` schedule (icarl, m2kd-full,
  m2kd-packed) and the pretrained schedule, every training image; the epochs are what the deadline
  allows at the learner's measured images/s (the part says what ran).

Writes OUT/board.json (after every part) and prints a table. Nothing is downloaded: CIFAR-10 from
`--data`, the MobileNetV2 file from `--weights`, $TORCH_HOME or scripts/fetch_test_weights.py's cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    add_device_arg,
    add_output_args,
    cpu_name,
    emit,
    format_table,
    log,
    output_dir,
    write_json,
)

NAME = "board"
DEADLINE_S = 450  # 7.5 minutes: the check, with start-up and the report, within 8
SMOKE_DEADLINE_S = 300
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
CACHED_WEIGHTS = REPO_ROOT / ".cache" / "weights" / WEIGHTS_FILE
ACCURACY_METHODS = ("icarl", "m2kd-full", "m2kd-packed")
ACCURACY_SCHEDULES = {"full": "scratch", "cpu-pretrained": "pretrained"}  # benchmarks.cil schedule -> start
CIFAR_PER_CLASS = 5000  # CIFAR-10's training images per class: "all"
SAFETY = 0.6  # the share of a part's time its planned training may fill
TIMED = ("facts", "throughput-resnet32", "throughput-mobilenetv2", "overhead")  # run alone unless --overlap


@dataclass
class Context:
    """What a part is given: the orchestrator's arguments, resolved once."""

    smoke: bool
    device: str
    data: Path  # a folder with train/<class>/ and test/<class>/
    weights: Path | None
    until: float  # wall-clock time (time.time()) the part must end by
    work: Path  # this part's scratch folder
    threads: int | None
    cli_mode: str  # "subprocess" (a process per command) or "inprocess" (click's runner)
    parts_dir: Path

    def left(self) -> float:
        return self.until - time.time()


class Recorder:
    """A part's JSON, rewritten (atomically) whenever it learns something: a part cut at the
    deadline keeps what it wrote."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {"status": "running"}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


# ----------------------------------------------------------------------------- parts

def part_facts(ctx: Context, rec: Recorder) -> None:
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_enabled": torch.backends.cudnn.enabled, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "gpus": [], "device_asked": ctx.device,
    }
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        facts["gpus"].append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory), "free_bytes": int(free),
                              "total_bytes": int(total), "capability": f"{p.major}.{p.minor}",
                              "multiprocessors": p.multi_processor_count,
                              "bf16_supported": bool(torch.cuda.is_bf16_supported())})
    rec["facts"] = facts
    facts.update(board_facts())
    facts["runtimes"] = runtime_facts()
    rec["facts"] = facts


def board_facts() -> dict[str, Any]:
    """The Jetson board, where this is one: its model, L4T release, memory and a tegrastats line."""
    from device.probes import TegrastatsReader, board_memory, is_jetson

    out: dict[str, Any] = {"jetson": is_jetson(), "board_model": None, "l4t_release": None,
                           "tegrastats": shutil.which("tegrastats"), "tegrastats_line": None,
                           "board_memory": board_memory()}
    for key, path in (("board_model", "/proc/device-tree/model"), ("l4t_release", "/etc/nv_tegra_release")):
        try:
            out[key] = Path(path).read_text(errors="replace").replace("\x00", "").strip().splitlines()[0]
        except (OSError, IndexError):
            pass
    if out["tegrastats"]:
        try:
            with TegrastatsReader(interval_ms=500, skip_unparsable=True) as reader:
                out["tegrastats_line"] = next(iter(reader)).to_dict()
        except Exception as e:  # noqa: BLE001 - a tegrastats that will not run is a fact, not a failure
            out["tegrastats_line"] = f"unreadable: {type(e).__name__}: {e}"
    return out


def runtime_facts() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import onnxruntime

        out["onnxruntime"] = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    except ImportError:
        out["onnxruntime"] = None
    for name in ("tensorrt", "pycuda"):
        found = importlib.util.find_spec(name) is not None
        out[name] = None
        if found:
            try:
                out[name] = getattr(__import__(name), "__version__", "installed")
            except Exception as e:  # noqa: BLE001 - a broken install is a fact too
                out[name] = f"import failed: {type(e).__name__}: {e}"
    return out


THROUGHPUT = {  # part -> (backbone, input size; smoke input size)
    "throughput-resnet32": ("resnet32", 32, ("resnet20", 16)),
    "throughput-mobilenetv2": ("mobilenetv2", 96, ("mobilenetv2", 32)),
}


def part_throughput(ctx: Context, rec: Recorder, name: str) -> None:
    from benchmarks import throughput

    backbone, size, (smoke_backbone, smoke_size) = THROUGHPUT[name]
    if ctx.smoke:
        argv = ["--smoke", "--backbone", smoke_backbone, "--input-size", str(smoke_size), "--per-class", "16",
                "--epochs", "1", "--rounds", "1", "--batch-size", "16"]
    else:
        argv = ["--backbone", backbone, "--input-size", str(size), "--per-class", "1000", "--epochs", "2",
                "--rounds", "3", "--batch-size", "64", "--data", str(ctx.data)]
    rec["result"] = throughput.main([*argv, *common_argv(ctx, name)])


def part_overhead(ctx: Context, rec: Recorder) -> None:
    from benchmarks import overhead

    sizes = ["--batches", "1", "--batch-size", "4", "--backbone", "resnet20", "--input-size", "8", "--repeats", "1"] \
        if ctx.smoke else ["--batches", "20", "--batch-size", "64", "--backbone", "resnet32", "--input-size", "32",
                           "--repeats", "3"]
    result = overhead.main(["--steps", "10", *sizes, *common_argv(ctx, "overhead")])
    row = result["rows"][0]
    cuda = result["device"]["used"].startswith("cuda")
    rec["result"] = result
    rec["summary"] = {
        "m2kd_over_icarl": row["ratio"], "fp32_m2kd_over_icarl": row["fp32_ratio"],
        "teacher_precision": row["m2kd_precision"], "teacher_precision_error": row["m2kd_precision_error"],
        "checked": row["m2kd_precision_checked"],
        # Under CUDA, auto must run the teachers in fp16 or bf16 (fp32 only if both failed the check).
        "auto_picked_half": (row["m2kd_precision"] in ("fp16", "bf16")) if cuda else None,
    }


def common_argv(ctx: Context, name: str) -> list[str]:
    threads = ["--threads", str(ctx.threads)] if ctx.threads else []
    return ["--device", ctx.device, "--out", str(ctx.work / name), "--no-plot", *threads]


# -- the CLI, as a user runs it

def run_cli(ctx: Context, args: list[str]) -> dict[str, Any]:
    """One `edge-m2kd` command: its exit code, seconds, last stderr line and parsed JSON output."""
    args = [str(a) for a in args]
    start = time.perf_counter()
    if ctx.cli_mode == "inprocess":
        from click.testing import CliRunner

        from edge_m2kd.cli import main

        res = CliRunner().invoke(main, args)
        rc, out, err = res.exit_code, res.stdout, res.stderr
        if res.exception and not isinstance(res.exception, SystemExit):
            err += "".join(traceback.format_exception(res.exception))
    else:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(ctx.threads)} if ctx.threads else {})}
        try:
            proc = subprocess.run([sys.executable, "-m", "edge_m2kd", *args], capture_output=True, text=True,
                                  env=env, timeout=max(1.0, ctx.left()))
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = None, "", "cut: the deadline came"
    row: dict[str, Any] = {"command": "edge-m2kd " + " ".join(args), "exit_code": rc,
                           "seconds": time.perf_counter() - start,
                           "stderr_last_line": (err.strip().splitlines() or [""])[-1][:300]}
    try:
        row["json"] = json.loads(out) if "--json" in args and rc == 0 else None
    except json.JSONDecodeError:
        row["json"] = None
    return row


def folder(ctx: Context, name: str, split: str, classes: list[str], per_class: int) -> Path:
    """`per_class` images (links) of each of `classes` from the data's `split`."""
    root = ctx.work / name
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((ctx.data / split / c).iterdir())[:per_class]:
            (root / c / f.name).symlink_to(f.resolve())
    return root


def class_names(ctx: Context) -> list[str]:
    return sorted(p.name for p in (ctx.data / "train").iterdir() if p.is_dir())


CLI_WALKS = {  # part -> init options (the smoke's in brackets)
    "cli-scratch": (["--backbone", "resnet32", "--input-size", "32"], ["--backbone", "resnet20", "--input-size", "16"]),
    "cli-pretrained": (["--backbone", "mobilenetv2", "--input-size", "96", "--pretrained", "{weights}"],
                       ["--backbone", "mobilenetv2", "--input-size", "32", "--pretrained", "{weights}"]),
}


def part_cli(ctx: Context, rec: Recorder, name: str) -> None:
    init = CLI_WALKS[name][ctx.smoke]
    if "{weights}" in init:
        if ctx.weights is None:
            rec["status_reason"] = "no MobileNetV2 weights file (--weights, $TORCH_HOME, .cache/weights)"
            raise Skip(rec["status_reason"])
        init = [str(ctx.weights) if a == "{weights}" else a for a in init]
    per_class, test_per_class = (6, 3) if ctx.smoke else (500, 100)
    names = class_names(ctx)[:6]
    train = folder(ctx, "train", "train", names, per_class)
    test = folder(ctx, "test", "test", names, test_per_class)
    images = sorted(p for c in names[:2] for p in (test / c).iterdir())[:4]
    ws = ctx.work / "ws"
    epochs = ["--epochs", "1"] if ctx.smoke else ["--epochs", "2"]
    iterations = ["--iterations", "3" if ctx.smoke else "30"]
    commands = [["init", ws, *init, *epochs, "--exemplars", "60" if ctx.smoke else "200", "--device", ctx.device,
                 "--planned-steps", "3", "--json"]]
    commands += [["add-classes", ws, train, "--classes", ",".join(names[i : i + 2]), "--json"] for i in (0, 2, 4)]
    commands += [["eval", ws, test, "--json"], ["snapshots", ws, "--verify", "--json"], ["memory", ws, "--json"],
                 ["export", ws, "--json"], ["predict", ws, *images, "--device", ctx.device, "--json"],
                 ["predict", ws, *images, "--backend", "onnxruntime", "--json"], ["bench", ws, *iterations, "--json"]]
    if ctx.device != "cpu" and not ctx.smoke:
        commands.append(["bench", ws, "--backend", "torch", "--batch-size", "32", "--device", ctx.device, *iterations,
                         "--json"])
    if importlib.util.find_spec("tensorrt") is not None:
        commands += [["export", ws, "--tensorrt", ws / "exports" / "model.plan", "--precision", "fp16", "--json"],
                     ["predict", ws, *images, "--backend", "tensorrt", "--json"]]
    else:
        rec["tensorrt"] = "not installed: engine build and predict --backend tensorrt not run"
    rows: list[dict[str, Any]] = []
    for args in commands:
        rows.append(run_cli(ctx, args))
        log(f"{name}: {rows[-1]['command']} -> exit {rows[-1]['exit_code']} in {rows[-1]['seconds']:.1f} s")
        rec["commands"] = rows
    rec["checks"] = cli_checks(rows)


def cli_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the walk must show, read from the commands' JSON."""
    by = {r["command"].split()[1] + (" tensorrt" if "tensorrt" in r["command"] else ""): r.get("json") or {}
          for r in rows}
    return {"all_exit_0": all(r["exit_code"] == 0 for r in rows),
            "failed": [r["command"] for r in rows if r["exit_code"] != 0],
            "snapshots_verified": by.get("snapshots", {}).get("all_verified"),
            "export_parity_passed": (by.get("export", {}).get("parity") or {}).get("passed"),
            "eval_deployed_accuracy": by.get("eval", {}).get("deployed_accuracy")}


def part_memory(ctx: Context, rec: Recorder) -> None:
    """`memory`'s prediction for the next step, then that step: the CUDA allocator's peak (the
    learner's own sampler, max_memory_allocated) against the parts of the prediction that live on
    the GPU (weights, gradients, optimizer state, teachers, activations), and the prediction's
    total (what a Jetson's shared memory holds) against the step's peak RSS."""
    per_class = 10 if ctx.smoke else 2500
    names = class_names(ctx)[:4]
    data = [folder(ctx, f"step{i}", "train", names[2 * i : 2 * i + 2], per_class) for i in (0, 1)]
    ws = ctx.work / "ws"
    model = ["--backbone", "resnet20", "--input-size", "16"] if ctx.smoke else ["--backbone", "resnet32", "--input-size", "32"]
    rows = [run_cli(ctx, ["init", ws, *model, "--snapshots", "full", "--epochs", "1", "--batch-size", "64",
                          "--device", ctx.device, "--json"]),
            run_cli(ctx, ["add-classes", ws, data[0], "--json"]),
            run_cli(ctx, ["memory", ws, "--new-images", 2 * per_class, "--json"]),
            run_cli(ctx, ["add-classes", ws, data[1], "--json"])]
    rec["commands"] = rows
    if any(r["exit_code"] != 0 for r in rows):
        raise RuntimeError("a command failed: " + "; ".join(f"{r['command']}: {r['stderr_last_line']}"
                                                            for r in rows if r["exit_code"] != 0))
    predicted = rows[2]["json"]["next_step"]["predicted_peak"]
    step = rows[3]["json"]
    gpu_parts = ("weights", "gradients", "optimizer_state", "teachers", "activations")
    on_gpu = sum(predicted.get(k, 0) for k in gpu_parts)
    cuda = step["memory"]["measured_peak_cuda"]
    rec["result"] = {
        "step": 2, "train_images": step["train_images"], "batch_size": step["batch_size"],
        "predicted": predicted, "predicted_by_the_step": step["memory"]["predicted_peak"],
        "predicted_gpu_parts": list(gpu_parts), "predicted_gpu_bytes": on_gpu,
        "measured_peak_cuda_bytes": cuda, "measured_peak_rss_bytes": step["memory"]["measured_peak_rss"],
        "gpu_ratio": on_gpu / cuda if cuda else None,  # above 1: the prediction is on the safe side
        "total_over_rss": predicted["total"] / step["memory"]["measured_peak_rss"],
        "note": None if cuda else "no CUDA allocator here: only the RSS comparison",
    }


def accuracy_jobs(smoke: bool) -> list[str]:
    """One part per (schedule, method) on a GPU, side by side; one per schedule in the smoke."""
    if smoke:
        return [f"accuracy-{start}" for start in ACCURACY_SCHEDULES.values()]
    return [f"accuracy-{start}-{m}" for start in ACCURACY_SCHEDULES.values() for m in ACCURACY_METHODS]


def part_accuracy(ctx: Context, rec: Recorder, name: str, concurrent: int) -> None:
    from benchmarks import cil

    start_kind = name.split("-")[1]
    schedule = next(s for s, k in ACCURACY_SCHEDULES.items() if k == start_kind)
    methods = name.split("-", 2)[2] if name.count("-") >= 2 else ",".join(ACCURACY_METHODS)
    if ctx.smoke and start_kind == "pretrained":
        methods = ACCURACY_METHODS[-1]  # a MobileNetV2 step costs seconds on a CPU: one method shows the path
    argv = ["--schedule", schedule, "--methods", methods, "--data", str(ctx.data), "--cache", str(ctx.work / "cache")]
    if start_kind == "pretrained":
        if ctx.weights is None:
            raise Skip("no MobileNetV2 weights file (--weights, $TORCH_HOME, .cache/weights)")
        argv += ["--pretrained", str(ctx.weights)]
    if ctx.smoke:
        small = ["--backbone", "resnet20", "--input-size", "16"] if start_kind == "scratch" else ["--input-size", "32"]
        plan = {"per_class": 8, "epochs": 1, "why": "smoke: tiny sizes"}
        argv += [*small, "--test-per-class", "4", "--memory", "20", "--prune-finetune-epochs", "1"]
    else:
        plan = plan_accuracy(ctx, schedule, methods.split(","), concurrent)
    rec["plan"] = plan
    argv += ["--per-class", str(plan["per_class"]), "--epochs", str(plan["epochs"])]
    result = cil.main([*argv, *common_argv(ctx, name)])
    rec["result"] = {k: result[k] for k in ("title", "schedule", "settings", "rows", "complete")}
    rec["summary"] = [{"method": r["method"], "final_accuracy": r["final_accuracy"],
                       "average_incremental_accuracy": r["average_incremental_accuracy"], "seconds": r["seconds"]}
                      for r in result["rows"]]


def plan_accuracy(ctx: Context, schedule: str, methods: list[str], concurrent: int) -> dict[str, Any]:
    """Every training image, and the most epochs (up to the schedule's) that fit the time left at
    the learner's images/s that the throughput part measured (shared by the parts running side
    by side); fewer images per class only where not even one epoch fits."""
    from benchmarks.cil import PROTOCOLS, SCHEDULES

    sched = SCHEDULES[schedule]
    throughput_part = "throughput-resnet32" if sched.backbone == "resnet32" else "throughput-mobilenetv2"
    try:
        rows = json.loads((ctx.parts_dir / f"{throughput_part}.json").read_text())["result"]["rows"]
        ips = next(r["images_per_second"] for r in rows if r["loop"] == "m2kd")
    except (OSError, KeyError, StopIteration, json.JSONDecodeError):
        return {"per_class": CIFAR_PER_CLASS, "epochs": 1,
                "why": f"no throughput measured ({throughput_part} did not finish): one epoch"}
    first, per_step = PROTOCOLS["5x2"]
    classes = first + 4 * per_step
    finetune = sched.prune_finetune_epochs if any(m.endswith("packed") for m in methods) else 0
    share = ips / max(1, concurrent)  # conservative: as if the GPU were the bottleneck of every part
    budget = max(0.0, ctx.left()) * SAFETY
    images = classes * CIFAR_PER_CLASS + 4 * sched.memory  # per epoch, over the five steps
    fit = budget * share / images - finetune  # training epochs affordable at all images
    epochs = int(max(1, min(sched.epochs, fit)))
    per_class = CIFAR_PER_CLASS if fit >= 1 else max(100, int(CIFAR_PER_CLASS * max(fit + finetune, 0)
                                                              / (1 + finetune)))
    return {"per_class": per_class, "epochs": epochs, "schedule_epochs": sched.epochs,
            "measured_images_per_second": ips, "parts_side_by_side": concurrent, "seconds_planned": budget,
            "why": f"{epochs} of the schedule's {sched.epochs} epochs at {per_class} images per class fit "
                   f"{budget:.0f} s at {share:.0f} images/s"}


class Skip(Exception):
    """A part that cannot run here (no weights file, ...): said, not failed."""


PARTS: dict[str, Callable[..., None]] = {
    "facts": part_facts, "overhead": part_overhead, "memory": part_memory,
    **{n: partial(part_throughput, name=n) for n in THROUGHPUT},
    **{n: partial(part_cli, name=n) for n in CLI_WALKS},
}


def all_parts(smoke: bool) -> list[str]:
    return [*TIMED, "memory", *CLI_WALKS, *accuracy_jobs(smoke)]


def run_part(name: str, ctx: Context, out: Path, concurrent: int) -> int:
    """The body of `--part NAME`: run it, record it; exit 0 done or skipped, 1 failed."""
    rec = Recorder(out)
    start = time.perf_counter()
    try:
        if name.startswith("accuracy-"):
            part_accuracy(ctx, rec, name, concurrent)
        else:
            PARTS[name](ctx, rec)
        rec.data["status"] = "done"
    except Skip as e:
        rec.data.update(status="skipped", reason=str(e))
    except BaseException as e:  # noqa: BLE001 - recorded, then the exit code says it
        rec.data.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    rec["seconds"] = time.perf_counter() - start
    return 1 if rec.data["status"] == "failed" else 0


# ----------------------------------------------------------------------------- the orchestrator

@dataclass
class Job:
    name: str
    timed: bool
    proc: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    beside: set[str] = field(default_factory=set)  # the parts that ran at the same time


def schedule_jobs(jobs: list[Job], command: Callable[[Job, int], list[str]], deadline: float, parallel: int,
                  overlap: bool, logs: Path, on_end: Callable[[Job, str], None], poll: float = 0.2) -> None:
    """Start the jobs in order, at most `parallel` at once; a timed job only with nothing else
    running, and the untimed ones only once no timed job is left (unless `overlap`). At
    `deadline` (time.monotonic()) stop what runs (its process group) and skip what is left;
    `on_end(job, status)` hears of each: done, failed, cut or skipped."""
    pending, running = list(jobs), []
    while pending or running:
        now = time.monotonic()
        for job in list(running):
            if job.proc is not None and job.proc.poll() is not None:
                running.remove(job)
                job.ended = now
                on_end(job, "done" if job.proc.returncode == 0 else "failed")
        if now >= deadline:
            for job in running:
                stop(job.proc)
                job.ended = time.monotonic()
                on_end(job, "cut")
            for job in pending:
                on_end(job, "skipped")
            return
        while pending and len(running) < parallel:
            job = pending[0]
            if not overlap and running and (job.timed or any(j.timed for j in running)):
                break
            if not overlap and not job.timed and any(j.timed for j in pending):
                break
            pending.pop(0)
            concurrent = min(parallel, len(running) + 1 + len([j for j in pending if not j.timed]))
            with open(logs / f"{job.name}.log", "w") as fh:
                job.proc = subprocess.Popen(command(job, concurrent), stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO_ROOT)
            job.started = time.monotonic()
            for other in running:
                other.beside.add(job.name)
                job.beside.add(other.name)
            running.append(job)
            log(f"board: started {job.name}" + (f" beside {', '.join(j.name for j in running[:-1])}"
                                               if len(running) > 1 else ""))
        time.sleep(poll)


def stop(proc: subprocess.Popen | None) -> None:
    """End a part's process and whatever it started (its own session), politely first."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def default_parallel(device: str) -> int:
    """Side by side where the GPU has room: one part per 16 GiB free, up to 4 (and the CPU cores)."""
    import torch

    from edge_m2kd.learner import resolve_device

    used = resolve_device(device)
    if used.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(used)
    return max(1, min(4, free // (16 << 30), (os.cpu_count() or 1) // 2))


def find_weights(given: Path | None) -> Path | None:
    """The MobileNetV2 file, never downloaded: --weights, torch's hub cache, or the tests' cache."""
    if given is not None:
        return given if given.is_file() else None
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    for path in (home / "hub" / "checkpoints" / WEIGHTS_FILE, CACHED_WEIGHTS):
        if path.is_file():
            return path
    return None


def prepare_data(args: argparse.Namespace, work: Path) -> Path:
    """A folder with train/ and test/: the smoke's digits, written once, or CIFAR-10 (unpacked once)."""
    if args.smoke:
        from benchmarks.step_profile import digits_folder

        root = work / "digits"
        if not (root / "test").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            digits_folder(root / "train", 20)
            digits_folder(root / "test", 8, split="test")
        return root
    from benchmarks.cil import DEFAULT_CACHE, cifar_root

    return cifar_root(args.data, DEFAULT_CACHE).resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.cil import DEFAULT_DATA

    p = argparse.ArgumentParser(prog="python -m benchmarks.board", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes, digits, CPU-sized: seconds")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="CIFAR-10 JPEGs: the tarball or a folder with train/ and test/ (default ../shared/data/...)")
    p.add_argument("--weights", type=Path, default=None,
                   help=f"torchvision's {WEIGHTS_FILE} (default: $TORCH_HOME's hub cache, then .cache/weights/)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help=f"stop what still runs after this many seconds (default {DEADLINE_S}; smoke {SMOKE_DEADLINE_S})")
    p.add_argument("--parallel", type=int, default=None,
                   help="parts side by side (default: one per 16 GiB of free GPU memory, up to 4; 1 on a CPU)")
    p.add_argument("--overlap", action="store_true", help="run the timed parts beside the others too")
    p.add_argument("--parts", default=None, help="comma list of parts (default all)")
    p.add_argument("--cli-mode", choices=["subprocess", "inprocess"], default=None,
                   help="each command a process of its own (default) or click's runner (smoke default)")
    add_device_arg(p)
    add_output_args(p, NAME)
    # A part, as the orchestrator starts it.
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--concurrent", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cli_mode = args.cli_mode or ("inprocess" if args.smoke else "subprocess")
    args.deadline_s = args.deadline_s if args.deadline_s is not None else (SMOKE_DEADLINE_S if args.smoke else DEADLINE_S)
    known = all_parts(args.smoke)
    args.parts = [n.strip() for n in args.parts.split(",")] if args.parts else known
    if unknown := [n for n in args.parts if n not in known]:
        p.error(f"unknown part {unknown[0]!r}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = output_dir(args.out).resolve()
    if args.part:  # a child: one part
        ctx = Context(args.smoke, args.device, args.data, args.weights, args.until, out / "work" / args.part,
                      args.threads, args.cli_mode, out / "parts")
        shutil.rmtree(ctx.work, ignore_errors=True)
        ctx.work.mkdir(parents=True)
        sys.exit(run_part(args.part, ctx, out / "parts" / f"{args.part}.json", args.concurrent))
    return orchestrate(args, out)


def orchestrate(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    start_wall, start = time.time(), time.monotonic()
    for sub in ("parts", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    data = prepare_data(args, out / "work")
    weights = find_weights(args.weights.resolve() if args.weights else None)
    parallel = args.parallel or default_parallel(args.device)
    until = start_wall + args.deadline_s
    result: dict[str, Any] = {
        "benchmark": NAME, "smoke": args.smoke, "device": args.device, "deadline_s": args.deadline_s,
        "parallel": parallel, "overlap": args.overlap, "cli_mode": args.cli_mode, "data": str(data),
        "weights": str(weights) if weights else None, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "parts": {}, "complete": False,
    }
    threads = args.threads or (max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None)

    def command(job: Job, concurrent: int) -> list[str]:
        return [sys.executable, "-m", "benchmarks.board", "--part", job.name, "--until", str(until),
                "--concurrent", str(concurrent), "--device", args.device, "--data", str(data), "--out", str(out),
                "--cli-mode", args.cli_mode, *(["--smoke"] if args.smoke else []),
                *(["--weights", str(weights)] if weights else []), *(["--threads", str(threads)] if threads else [])]

    def on_end(job: Job, status: str) -> None:
        path = out / "parts" / f"{job.name}.json"
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            part = {}
        if status == "done" and part.get("status") == "skipped":
            status = "skipped"  # the part itself found it cannot run here
        part.update(status=status, log=str(out / "logs" / f"{job.name}.log"), beside=sorted(job.beside),
                    started_s=None if job.started is None else job.started - start,
                    wall_seconds=None if job.started is None or job.ended is None else job.ended - job.started)
        if status == "cut":
            part["note"] = f"stopped at the {args.deadline_s:.0f} s deadline: what it had written is kept"
            if (cil_json := out / "work" / job.name / job.name / "results.json").is_file():  # methods cil finished
                rows = json.loads(cil_json.read_text())["rows"]
                part["summary"] = [{"method": r["method"], "final_accuracy": r["final_accuracy"]} for r in rows]
        if status == "failed" and "error" not in part:
            part["error"] = tail(out / "logs" / f"{job.name}.log")
        result["parts"][job.name] = part
        result["seconds"] = time.monotonic() - start
        write_json(out / "board.json", result)
        log(f"board: {job.name} {status}" + (f" ({part.get('reason') or part.get('error', '')})"
                                            if status in ("failed", "skipped") else ""))

    jobs = [Job(n, n in TIMED) for n in args.parts]
    schedule_jobs(jobs, command, start + args.deadline_s, parallel, args.overlap, out / "logs", on_end)
    result["parts"] = {n: result["parts"][n] for n in args.parts}
    result["complete"] = all(p["status"] in ("done", "skipped") for p in result["parts"].values())
    result["seconds"] = time.monotonic() - start
    write_json(out / "board.json", result)
    emit(result, report(result) + f"\n\nJSON: {out / 'board.json'}", args.json)
    return result


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- the report

def report(result: dict[str, Any]) -> str:
    rows = [[name, p["status"], p.get("wall_seconds"), headline(name, p)] for name, p in result["parts"].items()]
    facts = (result["parts"].get("facts") or {}).get("facts") or {}
    gpus = ", ".join(f"{g['name']} {g['memory_bytes'] / 2**30:.0f} GiB" for g in facts.get("gpus", [])) or "no GPU"
    title = (f"Board check{' (smoke)' if result['smoke'] else ''}: torch {facts.get('torch', '?')}, CUDA "
             f"{facts.get('cuda_build') or '-'}, {gpus}{', ' + facts['board_model'] if facts.get('board_model') else ''}; "
             f"{result['parallel']} side by side, deadline {result['deadline_s']:.0f} s, {result['seconds']:.0f} s in all")
    return format_table(["part", "status", "seconds", "what it measured"], rows, title=title)


def headline(name: str, part: dict[str, Any]) -> str:
    """One line per part, from its JSON; '-' where it has nothing (yet)."""
    if part["status"] in ("failed", "skipped") and not part.get("result") and not part.get("commands"):
        return (part.get("reason") or part.get("error") or "")[:100]
    try:
        if name == "facts":
            f = part["facts"]
            return (f"TF32 matmul {f['tf32_matmul']}, cudnn TF32 {f['tf32_cudnn']}, cudnn {f['cudnn']} "
                    f"benchmark {f['cudnn_benchmark']}; jetson {f.get('jetson')}")
        if name.startswith("throughput"):
            r = {x["loop"]: x for x in part["result"]["rows"]}
            return (f"{part['result']['backbone']} {part['result']['input_size']} px on {part['result']['device']['used']}: "
                    + ", ".join(f"{k} {v['images_per_second']:.0f} img/s" for k, v in r.items())
                    + f" (m2kd {r['m2kd']['ratio_to_bare']:.2f} of bare)")
        if name == "overhead":
            s = part["summary"]
            err = s["teacher_precision_error"] or {}
            return (f"t=10 m2kd/icarl x{s['m2kd_over_icarl']:.2f} ({s['teacher_precision']} teachers, KL "
                    f"{err.get('kl', float('nan')):.5f}, max |logit diff| {err.get('max_abs', float('nan')):.3f}); "
                    f"fp32 x{s['fp32_m2kd_over_icarl']:.2f}")
        if name == "memory":
            r = part["result"]
            gpu = (f"predicted GPU parts {r['predicted_gpu_bytes'] / 2**20:.0f} MiB vs CUDA peak "
                   f"{r['measured_peak_cuda_bytes'] / 2**20:.0f} MiB (x{r['gpu_ratio']:.2f})"
                   if r["measured_peak_cuda_bytes"] else "no CUDA peak")
            return f"{gpu}; predicted total / RSS peak x{r['total_over_rss']:.2f}"
        if name.startswith("cli"):
            cmds = part["commands"]
            ok = sum(c["exit_code"] == 0 for c in cmds)
            failed = [c["command"].split()[1] for c in cmds if c["exit_code"] != 0]
            return (f"{ok}/{len(cmds)} commands exit 0 in {sum(c['seconds'] for c in cmds):.0f} s"
                    + (f"; failed: {', '.join(failed)}" if failed else ""))
        if name.startswith("accuracy"):
            plan = part.get("plan", {})
            accs = ", ".join(f"{s['method']} {100 * s['final_accuracy']:.1f}%" for s in part.get("summary", [])) or "-"
            return f"final {accs}; ran {plan.get('epochs')} epochs, {plan.get('per_class')} images/class"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "-"
    return "-"


if __name__ == "__main__":
    main()
