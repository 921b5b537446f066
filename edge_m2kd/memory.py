"""Byte accounting against the device's budget (DESIGN.md section 2, "Costs to keep in view").

On a Jetson CPU and GPU share one memory, and GPU allocations do not swap, so the budget is
one number. Everything a training step holds has a byte count here; the activation figure
comes from counting, tensor by tensor, what autograd really saves for backward on batches of 2
and 4, which is linear in the batch, so it holds at the configured batch size exactly. What the
allocator keeps beyond that is the one modelled part (HEAP_RETENTION).
"""

from __future__ import annotations

import copy
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_m2kd.errors import UserError
from edge_m2kd.models import IncrementalNet

GiB, MiB = 1 << 30, 1 << 20

# Board -> (physical memory, what the OS, the desktop-less L4T services and the CUDA context
# take before our process allocates anything). The reserve is a planning figure, not measured
# here (no board in this project): about 1.2 GiB for L4T + 0.3 GiB for the CUDA context.
BOARD_PROFILES: dict[str, tuple[int, int]] = {
    "orin-nano-4gb": (4 * GiB, 1536 * MiB),
    "orin-nano-8gb": (8 * GiB, 1536 * MiB),
    "orin-nx-16gb": (16 * GiB, 2 * GiB),
    "agx-orin-32gb": (32 * GiB, 2 * GiB),
    "agx-orin-64gb": (64 * GiB, 2 * GiB),
}

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB}


def parse_budget(text: str) -> int:
    """'orin-nano-8gb' (a board profile: its memory less the reserve), '512MiB', '2.5GB', '1e9'."""
    key = text.strip().lower()
    if key in BOARD_PROFILES:
        total, reserve = BOARD_PROFILES[key]
        return total - reserve
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", key)
    if not m or m.group(2) not in _UNITS:
        raise UserError(f"cannot read the memory budget {text!r}; give a size like 2GiB or 512MB, "
                        f"or a board profile: {', '.join(BOARD_PROFILES)}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


# glibc malloc serves an allocation above its mmap threshold with its own mapping, returned to the
# kernel when freed; below it, from the heap, which keeps freed chunks. The threshold starts at
# 128 KiB and rises with every freed mapping, up to this maximum (64-bit glibc).
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB
# How much more than its live peak the heap may hold: its freed chunks are reused only where a
# later tensor fits. 1.0 (the heap up to twice its live peak) puts short steps (4 batches) of
# ResNet-32 and ResNet-18 within 9% of their measured peak; MobileNetV2's heap keeps less (0.4 of
# its share), so its prediction is up to 29% high. docs/benchmarks.md has the table.
HEAP_RETENTION = 1.0
# What a refusal adds to the prediction before comparing it with the budget. The heap's growth
# over a long step is what the model does not follow: the largest shortfall measured was 14%
# (ResNet-18 at 224 px, 4,500 training images: its heap kept growing over 70 batches;
# benchmarks/memory_check.py, docs/benchmarks.md), so a step that is allowed still fits when the
# prediction is as far off as that.
PREDICTION_MARGIN = 0.20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_storages(model: IncrementalNet, input_size: int, with_aux: bool, batch: int) -> list[int]:
    """Bytes of every storage autograd saves for backward in one training forward of `batch`
    images, in the order they are saved; the model's own parameters and buffers (saved by
    every layer, but held once whatever the batch) are left out."""
    probe = copy.deepcopy(model).train()  # a copy: BatchNorm statistics and gradients stay as they are
    own = {t.untyped_storage().data_ptr() for t in [*probe.parameters(), *probe.buffers()]}
    seen: dict[int, int] = {}  # insertion-ordered: the order of saving

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    device = next(probe.parameters()).device
    x = torch.zeros(batch, 3, input_size, input_size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x, with_aux=with_aux)
        (out.logits.sum() + sum(a.sum() for a in out.aux_logits)).backward()
    return list(seen.values())


@dataclass(frozen=True)
class ActivationProfile:
    """What one training batch saves for backward, tensor by tensor, as a function of the batch
    size: tensor i holds ``fixed[i] + per_image[i] * b`` bytes at batch b. Counted exactly on
    batches of 2 and 4 (a saved tensor is linear in the batch), so no calibration enters here."""

    fixed: tuple[int, ...]
    per_image: tuple[int, ...]

    def sizes(self, batch_size: int) -> list[int]:
        return [f + p * batch_size for f, p in zip(self.fixed, self.per_image)]

    def saved_bytes(self, batch_size: int) -> int:
        return sum(self.sizes(batch_size))

    def heap_bytes(self, batch_size: int) -> int:
        """The share glibc serves from its heap (tensors at or below its largest mmap threshold)."""
        return sum(s for s in self.sizes(batch_size) if s <= GLIBC_MMAP_THRESHOLD_MAX)


def activation_profile(model: IncrementalNet, input_size: int, with_aux: bool) -> ActivationProfile:
    two, four = (_saved_storages(model, input_size, with_aux, b) for b in (2, 4))
    if len(two) != len(four):  # a graph that changes with the batch size: keep the total exact
        slope = (sum(four) - sum(two)) // 2
        return ActivationProfile((max(0, sum(two) - 2 * slope),), (slope,))
    per_image = tuple(max(0, (f - t) // 2) for t, f in zip(two, four))
    return ActivationProfile(tuple(max(0, t - 2 * p) for t, p in zip(two, per_image)), per_image)


def activation_bytes_per_image(model: IncrementalNet, input_size: int, with_aux: bool) -> int:
    """Bytes autograd saves for backward per image (the model's own weights excluded)."""
    return sum(activation_profile(model, input_size, with_aux).per_image)


@dataclass
class TrainingPeak:
    """What a step holds at its peak, in bytes, split by what holds it."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def with_margin(self) -> int:
        """What must fit in the budget: the prediction plus PREDICTION_MARGIN."""
        return int(self.total * (1 + PREDICTION_MARGIN))

    def to_dict(self) -> dict[str, int]:
        return {**self.parts, "total": self.total, "with_margin": self.with_margin}


def predict_training_peak(
    model: IncrementalNet,
    input_size: int,
    batch_size: int,
    train_images: int,
    teachers: int,
    snapshot_model_bytes: int,
    exemplar_bytes: int,
    runtime_bytes: int,
    with_aux: bool = True,
    held_out_images: int = 0,
    activations: ActivationProfile | None = None,
) -> TrainingPeak:
    """The step's peak, at its training batches. `runtime_bytes` is the process without any of
    the parts below: the caller subtracts from its resident size what it already holds of them
    (see `commands._PeakModel`), so nothing is counted twice. `activations` is
    `activation_profile(model, ...)`, computed once when several batch sizes are asked."""
    params = tensor_bytes(model.parameters())
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)  # frozen stages: neither
    buffers = tensor_bytes(model.buffers())
    image = input_size * input_size * 3
    act = activations or activation_profile(model, input_size, with_aux)  # frozen stages save none
    return TrainingPeak({
        "runtime": runtime_bytes,  # interpreter, torch, the snapshot store: measured
        "weights": params + buffers,
        "gradients": trainable,
        "optimizer_state": trainable,  # SGD momentum: one buffer per trained parameter
        "teachers": teachers * snapshot_model_bytes,  # rebuilt, fp32, for the whole step
        # uint8, held through the step: the decoded images (what it trains on and its hold-out)...
        "images": (train_images + held_out_images) * image,
        # ... and the training set built from them: the new images and a copy of the exemplars
        "training_set": train_images * image + exemplar_bytes,
        "exemplars": exemplar_bytes,
        # What one batch saves for backward, exactly; backward frees it as it goes, faster than it
        # allocates gradients (the allocator's live peak is the saved bytes, measured).
        "activations": act.saved_bytes(batch_size),
        # Freed heap chunks glibc keeps (HEAP_RETENTION); mapped tensors are returned.
        "allocator": int(act.heap_bytes(batch_size) * HEAP_RETENTION),
    })


def largest_batch_that_fits(peak_at: Callable[[int], int], budget: int, upper: int = 1024) -> int:
    """Largest batch size b <= upper with peak_at(b) <= budget (0 when even 1 does not fit), by
    bisection: the peak grows with b, though not quite linearly (a tensor that outgrows glibc's
    mmap threshold leaves the heap), and the answer is always a batch size that was checked."""
    if peak_at(1) > budget:
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_at(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- measuring: the process's resident size, the kernel's meminfo, the CUDA allocator ------------
# They live in the core, not in device/, because a step measures its own peak (commands.add_classes)
# and the core imports nothing from device/; device/probes.py builds the board's picture on them.


def read_meminfo(path: str | os.PathLike[str] = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as bytes (``kB`` values times 1024); unitless counts (HugePages_*) as is.

    On a Jetson this includes ``NvMapMemUsed`` / ``NvMapMemFree``.
    """
    out: dict[str, int] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit() or len(parts) > 2:
            raise ValueError(f"{path}:{lineno}: unreadable meminfo line {line!r}")
        value = int(parts[0])
        if len(parts) == 2:
            if parts[1] != "kB":
                raise ValueError(f"{path}:{lineno}: unexpected unit {parts[1]!r} in {line!r}")
            value *= 1024
        out[key.strip()] = value
    return out


def process_rss_bytes(status_path: str | os.PathLike[str] = "/proc/self/status") -> int:
    """Resident set size of this process now (``VmRSS``).

    Without ``/proc`` (not Linux) it falls back to ``getrusage``'s ``ru_maxrss``, which is the
    peak since the process started, not the current figure.
    """
    try:
        text = Path(status_path).read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # darwin: bytes, Linux: kB
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) * 1024
    raise ValueError(f"{status_path}: no VmRSS line")


def cuda_allocator() -> dict[str, int] | None:
    """The PyTorch CUDA caching allocator's figures for the current device, or ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated()),
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "reserved_bytes": int(torch.cuda.memory_reserved()),
    }


@dataclass(frozen=True)
class MemorySample:
    """One reading of the sampler; ``t`` is seconds since the sampler was entered."""

    t: float
    rss_bytes: int
    cuda_max_allocated_bytes: int | None
    nvmap_used_bytes: int | None


class PeakMemorySampler:
    """Record the peak memory of a block of code by sampling in a daemon thread.

    >>> with PeakMemorySampler() as s:
    ...     step()
    >>> s.peak_rss_bytes, s.peak_cuda_bytes, s.peak_nvmap_bytes

    It samples on entry (the baseline), every ``interval`` seconds, and once more on exit so a
    step shorter than the interval still gets a figure. With CUDA, the allocator's peak counter is
    reset on entry (``reset_cuda_peak``) so ``peak_cuda_bytes`` is this block's peak, not the
    process's. ``NvMapMemUsed`` is system-wide: other processes' GPU buffers count too.
    """

    def __init__(
        self,
        interval: float = 0.05,
        *,
        reset_cuda_peak: bool = True,
        meminfo_path: str | os.PathLike[str] = "/proc/meminfo",
        status_path: str | os.PathLike[str] = "/proc/self/status",
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.reset_cuda_peak = reset_cuda_peak
        self._meminfo_path = meminfo_path
        self._status_path = status_path
        self.samples: list[MemorySample] = []
        self.baseline_rss_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.peak_nvmap_bytes: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._cuda = False
        self._nvmap = False

    @property
    def peak_rss_delta_bytes(self) -> int | None:
        """How far RSS rose above the value on entry."""
        if self.peak_rss_bytes is None or self.baseline_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def _cuda_max_allocated(self) -> int | None:
        if not self._cuda:
            return None
        return int(torch.cuda.max_memory_allocated())

    def _nvmap_used(self) -> int | None:
        if not self._nvmap:
            return None
        try:
            return read_meminfo(self._meminfo_path).get("NvMapMemUsed")
        except (OSError, ValueError):
            return None

    def sample(self) -> MemorySample:
        """Take one reading now and fold it into the peaks."""
        s = MemorySample(
            t=time.monotonic() - self._t0,
            rss_bytes=process_rss_bytes(self._status_path),
            cuda_max_allocated_bytes=self._cuda_max_allocated(),
            nvmap_used_bytes=self._nvmap_used(),
        )
        with self._lock:
            self.samples.append(s)
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, s.rss_bytes)
            if s.cuda_max_allocated_bytes is not None:
                self.peak_cuda_bytes = max(self.peak_cuda_bytes or 0, s.cuda_max_allocated_bytes)
            if s.nvmap_used_bytes is not None:
                self.peak_nvmap_bytes = max(self.peak_nvmap_bytes or 0, s.nvmap_used_bytes)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemorySampler:
        if self._thread is not None:
            raise RuntimeError("PeakMemorySampler is already running")
        self.samples = []  # a sampler entered again measures the new block only
        self.peak_rss_bytes = self.peak_cuda_bytes = self.peak_nvmap_bytes = None
        self._t0 = time.monotonic()
        self._cuda = cuda_allocator() is not None
        if self._cuda and self.reset_cuda_peak:
            torch.cuda.reset_peak_memory_stats()
        try:
            self._nvmap = "NvMapMemUsed" in read_meminfo(self._meminfo_path)
        except (OSError, ValueError):
            self._nvmap = False
        self.baseline_rss_bytes = self.sample().rss_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_delta_bytes": self.peak_rss_delta_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "peak_nvmap_bytes": self.peak_nvmap_bytes,
            "n_samples": len(self.samples),
            "interval_s": self.interval,
        }
