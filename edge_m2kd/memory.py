"""Byte accounting against the device's budget (DESIGN.md section 2, "Costs to keep in view").

On a Jetson CPU and GPU share one memory, and GPU allocations do not swap, so the budget is
one number. Everything a training step holds has a byte count here; the activation figure
comes from counting what autograd really saves for backward on a small batch, scaled to the
configured batch size.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

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


ACTIVATION_OVERHEAD = 1.5


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes_per_image(model: IncrementalNet, input_size: int, with_aux: bool) -> int:
    """Bytes autograd saves for backward per image, counted on a batch of 2 in training mode."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    # A copy, so the probe neither moves BatchNorm statistics nor leaves gradients behind.
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    x = torch.zeros(2, 3, input_size, input_size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x, with_aux=with_aux)
        (out.logits.sum() + sum(a.sum() for a in out.aux_logits)).backward()
    return sum(seen.values()) // 2


@dataclass
class TrainingPeak:
    """What a step holds at its peak, in bytes, split by what holds it."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, int]:
        return {**self.parts, "total": self.total}


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
) -> TrainingPeak:
    params = tensor_bytes(model.parameters())
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)  # frozen stages: neither
    buffers = tensor_bytes(model.buffers())
    image = input_size * input_size * 3
    per_image = activation_bytes_per_image(model, input_size, with_aux)  # frozen stages save none
    return TrainingPeak({
        "runtime": runtime_bytes,  # interpreter, torch and its allocator, measured
        "weights": params + buffers,
        "gradients": trainable,
        "optimizer_state": trainable,  # SGD momentum: one buffer per trained parameter
        "teachers": teachers * snapshot_model_bytes,  # rebuilt, fp32, for the whole step
        # uint8 new data, twice: the images the step was given and the training set (new
        # images and exemplars) it trains on
        "training_images": 2 * train_images * image,
        "exemplars": exemplar_bytes,
        # Saved activations, plus what the allocator holds beyond them: backward's gradient
        # buffers, the last partial batch, oneDNN scratch. 1.5x is calibrated on this machine
        # (CPU, glibc malloc) against the measured peak RSS of ResNet-32 and ResNet-18 steps.
        "activations": int(per_image * batch_size * ACTIVATION_OVERHEAD),
    })


def largest_batch_that_fits(peak_at: Callable[[int], int], budget: int, upper: int = 1024) -> int:
    """Largest batch size b <= upper with peak_at(b) <= budget (0 when even 1 does not fit);
    the peak grows linearly with b, so two evaluations are enough."""
    p1, p2 = peak_at(1), peak_at(2)
    if p1 > budget:
        return 0
    slope = max(p2 - p1, 1)
    return int(min(upper, 1 + (budget - p1) // slope))

