"""Latency and throughput of a predictor, and the memory its backend takes.

``bench_predictor`` times ``predictor.predict`` on one batch of seeded random images (the
pixels do not change the arithmetic): ``warmup`` untimed calls first (allocators, lazy
initialisation, cuDNN/TensorRT tactic caches), then ``iterations`` timed calls, each from
preprocessing to logits on the host. It reports p50/p90/p99 per-call latency and images/s
(images over the summed call times).

``bench`` and ``compare_backends`` open the workspace's predictors and add the memory each
took: the process RSS after opening minus before, the peak RSS while it ran
(:class:`edge_m2kd.memory.PeakMemorySampler`), the PyTorch CUDA allocator's growth where CUDA
exists, the buffers a TensorRT predictor allocated itself, and on a Jetson the peak of
``NvMapMemUsed`` (system-wide) and tegrastats' peak RAM use (the whole shared DRAM) and GPU
load (:class:`device.probes.TegrastatsPeak`). RSS deltas are those of this process: a backend opened after
another shares libraries already loaded (onnxruntime after torch, say), so the first opened
pays for them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device.predictor import BACKENDS, DEFAULT_MAX_BATCH, Predictor, open_predictor
from device.probes import TegrastatsPeak
from edge_m2kd.errors import UserError
from edge_m2kd.memory import PeakMemorySampler, cuda_allocator, process_rss_bytes

DEFAULT_ITERATIONS = 30
DEFAULT_WARMUP = 3
PERCENTILES = (50, 90, 99)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads for the duration (callers get theirs back)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_images(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)


def latency_stats(seconds: Sequence[float], batch_size: int) -> dict[str, float]:
    """p50/p90/p99 and mean in milliseconds, images/s over the summed call times."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    out = {f"p{q}_ms": float(np.percentile(ms, q)) for q in PERCENTILES}
    out["mean_ms"] = float(ms.mean())
    out["images_per_s"] = float(batch_size * len(ms) / (ms.sum() / 1e3))
    return out


def bench_predictor(
    predictor: Predictor,
    batch_size: int,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    warmup: int = DEFAULT_WARMUP,
    max_seconds: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``predictor.predict`` on ``batch_size`` images. ``max_seconds`` stops the timed loop
    early (after at least 3 calls) on a slow machine; ``iterations`` in the result is what ran."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if iterations < 1 or warmup < 0:
        raise UserError(f"need at least 1 iteration and no negative warm-up, got {iterations} and {warmup}")
    images = bench_images(batch_size, predictor.input_size, seed)
    for _ in range(warmup):
        predictor.predict(images)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        predictor.predict(images)
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return {
        "backend": predictor.backend,
        "device": predictor.device,
        "batch_size": batch_size,
        "chunks_per_call": -(-batch_size // predictor.max_batch),
        "iterations": len(times),
        "warmup": warmup,
        **latency_stats(times, batch_size),
    }


def _cuda_allocated() -> int | None:
    figures = cuda_allocator()
    return figures["allocated_bytes"] if figures else None


def _memory(rss_before: int, rss_loaded: int, cuda_before: int | None, sampler: PeakMemorySampler,
            predictor: Predictor) -> dict[str, int | None]:
    cuda_after = _cuda_allocated()
    return {
        "rss_load_delta_bytes": rss_loaded - rss_before,
        "peak_rss_delta_bytes": None if sampler.peak_rss_bytes is None else sampler.peak_rss_bytes - rss_before,
        "cuda_allocated_delta_bytes": None if cuda_before is None or cuda_after is None else cuda_after - cuda_before,
        "cuda_peak_bytes": sampler.peak_cuda_bytes,
        "device_buffer_bytes": getattr(predictor, "device_bytes", None) or None,
        "engine_device_bytes": getattr(predictor, "engine_device_bytes", None),
        "nvmap_peak_bytes": sampler.peak_nvmap_bytes,
    }


def compare_backends(
    ws: str | Path,
    batch_sizes: Sequence[int] = (1, 32),
    backends: Sequence[str] = ("torch", "onnxruntime"),
    *,
    iterations: int = DEFAULT_ITERATIONS,
    warmup: int = DEFAULT_WARMUP,
    max_seconds: float | None = None,
    device: str = "cpu",
    threads: int | None = None,
    engine: str | Path | None = None,
    onnx: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One row per (backend, batch size): latency percentiles, images/s and the backend's memory.

    Each backend is opened once (its memory measured from before opening to the end of its last
    batch) and closed before the next. ``device`` (default cpu: the CPU comparison) applies to
    PyTorch and onnxruntime; ``threads`` sets torch's and onnxruntime's intra-op threads.
    """
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if not batch_sizes:
        raise UserError("no batch sizes given; give at least one --batch-size")
    if min(batch_sizes) < 1:
        raise UserError(f"--batch-size must be at least 1, got {min(batch_sizes)}")
    rows: list[dict[str, Any]] = []
    with torch_threads(threads):
        for backend in backends:
            rss_before, cuda_before = process_rss_bytes(), _cuda_allocated()
            with PeakMemorySampler() as sampler, TegrastatsPeak() as tegrastats:
                predictor = open_predictor(ws, backend, engine=engine, onnx=onnx, device=device, threads=threads,
                                           max_batch=max(DEFAULT_MAX_BATCH, *batch_sizes))
                try:
                    rss_loaded = process_rss_bytes()
                    found = [bench_predictor(predictor, b, iterations=iterations, warmup=warmup,
                                             max_seconds=max_seconds) for b in batch_sizes]
                finally:
                    predictor.close()
            memory = {**_memory(rss_before, rss_loaded, cuda_before, sampler, predictor), **tegrastats.to_dict()}
            rows += [{**row, "threads": threads, "memory": memory} for row in found]
    return rows


def bench(
    ws: str | Path,
    backend: str = "torch",
    batch_size: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """``edge-m2kd bench WS --backend B --batch-size N``: one row of :func:`compare_backends`
    (same keyword options: iterations, warmup, max_seconds, device, threads, engine, onnx)."""
    options.setdefault("device", "auto")
    return compare_backends(ws, (batch_size,), (backend,), **options)[0]


# -- tables ----------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """One line per row: what ``bench`` prints."""
    header = ["backend", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "RSS open MiB", "RSS peak MiB",
              "GPU MiB"]
    lines = []
    for r in rows:
        m = r.get("memory") or {}
        gpu = m.get("cuda_allocated_delta_bytes") or m.get("device_buffer_bytes")
        lines.append([r["backend"], r["device"], str(r["batch_size"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['images_per_s']:.1f}", _mib(m.get("rss_load_delta_bytes")),
                      _mib(m.get("peak_rss_delta_bytes")), _mib(gpu)])
    if any((r.get("memory") or {}).get("tegrastats_ram_peak_bytes") for r in rows):  # on a Jetson
        header.append("board RAM peak MiB")
        for line, r in zip(lines, rows):
            line.append(_mib((r.get("memory") or {}).get("tegrastats_ram_peak_bytes")))
    return _table(header, lines)


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """The backends side by side, one line per batch size: images/s and p50/p99 ms of each, and
    each backend's throughput relative to the first. What ``bench --compare`` prints."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    by = {(r["backend"], r["batch_size"]): r for r in rows}
    header = ["batch"]
    for b in backends:
        header += [f"{b} images/s", f"{b} p50/p99 ms"]
    header += [f"{b}/{backends[0]}" for b in backends[1:]]
    lines = []
    for n in batches:
        line = [str(n)]
        for b in backends:
            r = by.get((b, n))
            line += ["-", "-"] if r is None else [f"{r['images_per_s']:.1f}", f"{r['p50_ms']:.2f}/{r['p99_ms']:.2f}"]
        base = by.get((backends[0], n))
        for b in backends[1:]:
            r = by.get((b, n))
            line.append("-" if r is None or base is None else f"{r['images_per_s'] / base['images_per_s']:.2f}x")
        lines.append(line)
    devices = ", ".join(f"{b} on {by[(b, batches[0])]['device']}" for b in backends if (b, batches[0]) in by)
    first = {b: next(r for r in rows if r["backend"] == b)["memory"] for b in backends}
    memory = ", ".join(f"{b} +{_mib(m['rss_load_delta_bytes'])} MiB on open, +{_mib(m['peak_rss_delta_bytes'])} MiB "
                       "peak" for b, m in first.items())
    return _table(header, lines) + f"\n({devices}; process RSS: {memory})"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

    text_cols = {i for i, h in enumerate(header) if h in ("backend", "device")}
    out = ["  ".join(h.ljust(w) if i in text_cols else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
           "  ".join("-" * w for w in widths)]
    for line in lines:
        out.append("  ".join(c.ljust(w) if i in text_cols else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))).rstrip())
    return "\n".join(out)
