"""Inference latency and throughput per runtime: PyTorch eager, onnxruntime, and TensorRT where it
is installed, for the two deployed backbones: ResNet-32 at 32x32 (CIFAR) and ResNet-18 at 224x224.

The models are built directly (no training): a ``DeployedClassifier`` with random weights whose
BatchNorm statistics are measured on random images, so activations and logits have a trained
model's scale (random init with unit running statistics lets activations grow layer after
layer), 100 classes. Each is exported with ``exporters.export_model`` (the parity-gated ONNX
export ``edge-m2kd export`` uses) to a temporary folder and, with TensorRT present, built into an
engine with ``exporters.build_engine``. Every backend is then timed through the same
``device.predictor`` interface a device uses (uint8 images in, logits out, preprocessing
included) by ``device.bench.bench_predictor``: warm-up calls, then timed calls; p50/p99
latency per call and images/s.

    python -m benchmarks.inference                 # batch 1 and 32, 30 timed calls each
    python -m benchmarks.inference --quick         # a few calls each, 1 thread: under a minute on 2 cores
    python -m benchmarks.inference --models resnet32 --batch-sizes 1,8,32 --json
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    add_output_args,
    cpu_name,
    emit,
    format_table,
    human_bytes,
    log,
    output_dir,
    parse_int_list,
    parse_names,
    torch_threads,
    write_json,
)
from device.bench import bench_predictor
from device.predictor import (
    OnnxRuntimePredictor,
    Predictor,
    TensorRTPredictor,
    TorchPredictor,
    tensorrt_unavailable,
)
from edge_m2kd.config import IMAGE_MEAN, IMAGE_STD
from edge_m2kd.memory import process_rss_bytes
from edge_m2kd.models import DeployedClassifier, build_backbone

NAME = "inference"
MODELS = {"resnet32": ("ResNet-32", 32), "resnet18": ("ResNet-18", 224)}
BACKENDS = ("torch", "onnxruntime", "tensorrt")
CLASSES = 100


def realistic_model(backbone: str, size: int, classes: int = CLASSES, seed: int = 0) -> DeployedClassifier:
    """Random weights at a trained model's scale: BatchNorm statistics measured on random images,
    a head with small weights (the recipe of tests/test_export.py)."""
    torch.manual_seed(seed)
    bb = build_backbone(backbone, False)
    dim = bb.stage_channels[-1]
    model = DeployedClassifier(bb, torch.randn(classes, dim) * 0.1, torch.randn(classes) * 0.1, False,
                               IMAGE_MEAN, IMAGE_STD)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batch
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, size, size))
    return model.eval()


def open_backend(backend: str, model: DeployedClassifier, names: list[str], size: int, onnx_path: Path,
                 workdir: Path, args: argparse.Namespace) -> Predictor:
    max_batch = max(args.batch_sizes)
    if backend == "torch":
        return TorchPredictor(model, names, size, max_batch=max_batch, device=args.device)
    if backend == "onnxruntime":
        return OnnxRuntimePredictor(onnx_path, max_batch=max_batch, device=args.device, threads=args.threads)
    from exporters import build_engine

    plan = workdir / "model.plan"
    build_engine(onnx_path, plan, precision=args.precision, max_batch=max_batch, cache_dir=workdir / "engine-cache")
    return TensorRTPredictor(plan)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from exporters import export_model

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    if "tensorrt" in args.backends:
        reason = tensorrt_unavailable()
        if reason:
            reason = reason.split(";")[0]
            skipped["tensorrt"] = reason
            log(f"tensorrt: skipped ({reason})")
    backends = [b for b in args.backends if b not in skipped]
    for key in args.models:
        label, size = MODELS[key]
        model = realistic_model(key, size)
        names = [f"class_{i:03d}" for i in range(CLASSES)]
        with tempfile.TemporaryDirectory(prefix="edge-m2kd-inference-") as tmp:
            workdir = Path(tmp)
            t0 = time.perf_counter()
            probe = np.random.default_rng(1).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
            export = export_model(model, names, size, workdir / "model.onnx", probe_images=probe,
                                  batch_sizes=(1, 2), max_samples=4)
            log(f"{label}: exported in {time.perf_counter() - t0:.1f} s (parity max |diff| "
                f"{export.parity.max_abs_diff:.1e})")
            for backend in backends:
                rss_before = process_rss_bytes()
                predictor = open_backend(backend, model, names, size, export.onnx_path, workdir, args)
                rss_taken = process_rss_bytes() - rss_before
                try:
                    for batch in args.batch_sizes:
                        row = bench_predictor(predictor, batch, iterations=args.iterations, warmup=args.warmup,
                                              max_seconds=args.max_seconds)
                        row.update({"model": key, "label": label, "input_size": size, "rss_load_delta_bytes": rss_taken,
                                    "device_buffer_bytes": getattr(predictor, "device_bytes", 0) or None})
                        rows.append(row)
                        log(f"{label} {backend:<11} batch {batch:>3}: p50 {row['p50_ms']:.2f} ms, "
                            f"{row['images_per_s']:.1f} images/s ({row['iterations']} calls)")
                finally:
                    predictor.close()
    base = {(r["model"], r["batch_size"]): r["images_per_s"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        torch_rate = base.get((r["model"], r["batch_size"]))
        r["speedup_vs_torch"] = r["images_per_s"] / torch_rate if torch_rate else None
    return rows, skipped


def table(rows: list[dict[str, Any]], skipped: dict[str, str], threads: int) -> str:
    body = [[r["label"], f"{r['input_size']}x{r['input_size']}", r["backend"], r["device"], r["batch_size"],
             f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.1f}",
             "-" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x",
             human_bytes(r["rss_load_delta_bytes"])] for r in rows]
    footer = [f"(torch threads: {threads}; each call includes preprocessing uint8 -> float; 'RSS on open': process "
              "memory taken by opening the backend)"]
    footer += [f"{b}: skipped - {why}" for b, why in skipped.items()]
    return format_table(["model", "input", "backend", "device", "batch", "p50 ms", "p99 ms", "images/s", "vs torch",
                         "RSS on open"], body, title="Inference latency and throughput", footer=footer)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=parse_names, default=list(MODELS), help="resnet32,resnet18 (default both)")
    p.add_argument("--backends", type=parse_names, default=list(BACKENDS),
                   help="torch,onnxruntime,tensorrt (default all; tensorrt only where installed)")
    p.add_argument("--batch-sizes", type=parse_int_list, default=[1, 32])
    p.add_argument("--iterations", type=int, default=30, help="timed calls per backend and batch size")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--max-seconds", type=float, default=None, help="stop timing a (backend, batch) after this long")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="for torch and onnxruntime")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="TensorRT engine precision")
    p.add_argument("--quick", action="store_true", help="5 timed calls (at most ~3 s) after 1 warm-up, 1 thread")
    add_output_args(p, NAME)
    args = p.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if args.quick:
        args.iterations, args.warmup = min(args.iterations, 5), min(args.warmup, 1)
        args.max_seconds = args.max_seconds or 3.0
        args.threads = args.threads or 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with torch_threads(args.threads):
        threads = torch.get_num_threads()
        rows, skipped = run(args)
    out = output_dir(args.out)
    result = {
        "benchmark": NAME,
        "settings": {"models": args.models, "backends": args.backends, "batch_sizes": args.batch_sizes,
                     "iterations": args.iterations, "warmup": args.warmup, "max_seconds": args.max_seconds,
                     "device": args.device, "precision": args.precision, "threads": threads, "quick": args.quick},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu": cpu_name(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "rows": rows,
        "skipped": skipped,
    }
    write_json(out / "results.json", result)
    emit(result, table(rows, skipped, threads) + f"\n\nJSON: {out / 'results.json'}", args.json)
    return result


if __name__ == "__main__":
    main()
