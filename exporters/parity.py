"""The parity gate: the ONNX file must compute what the PyTorch model computes.

The probe set is real images (the exemplar store) as the product stores them, uint8 NHWC RGB,
turned into the model input by the same ``to_unit`` the learner uses. The ONNX side runs in
onnxruntime from the very bytes (or file) that will be written, at batch sizes 1, 7 and 32: the
batch axis is dynamic, and an export that is right at one batch size and wrong at another is a
classic (a batch size baked into a Reshape). Every batch is filled to its full size by cycling
through the probe images, so "batch 32" really runs 32 images even with a small probe set.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_m2kd.data.sources import check_images
from edge_m2kd.errors import UserError
from edge_m2kd.preprocess import to_unit
from exporters.onnx_export import INPUT_NAME

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 7, 32)
DEFAULT_MAX_ABS_DIFF = 1e-4
DEFAULT_MIN_TOP1 = 1.0
DEFAULT_MAX_SAMPLES = 64
RANDOM_PROBE_SAMPLES = 32


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    top1_agreement: float
    samples: int  # distinct probe images; each ran once per batch size
    batch_sizes: tuple[int, ...]
    probe: str  # where the images came from: "exemplars" (or what the caller said) or "random"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def select_probe(
    images: np.ndarray | None,
    input_size: int,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    source: str = "exemplars",
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """Up to ``max_samples`` probe images, spread evenly over the given ones (the exemplar store
    is stored class by class, so even spacing covers every class); seeded random images when
    none are given (a workspace whose method keeps no exemplars)."""
    if images is None or len(images) == 0:
        rng = np.random.default_rng(seed)
        n = min(max_samples, RANDOM_PROBE_SAMPLES)
        return rng.integers(0, 256, (n, input_size, input_size, 3), dtype=np.uint8), "random"
    check_images(images, input_size, "probe images", "they must match the model's input size")
    if len(images) > max_samples:
        idx = np.unique(np.linspace(0, len(images) - 1, max_samples).round().astype(np.int64))
        images = images[idx]
    return np.ascontiguousarray(images), source


def _cycled_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    """Index arrays of exactly ``batch_size`` that together cover 0..n-1 (wrapping around)."""
    for start in range(0, n, batch_size):
        yield (start + np.arange(batch_size)) % n


def torch_logits(model: nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = [model(torch.from_numpy(inputs[i : i + batch_size])).float().numpy()
                   for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(out)


def onnx_session(onnx_source: bytes | str | Path) -> Any:
    import onnxruntime as ort

    src = onnx_source if isinstance(onnx_source, bytes) else str(onnx_source)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def check_parity(
    model: nn.Module,
    onnx_source: bytes | str | Path,
    images: np.ndarray,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    probe: str = "exemplars",
) -> ParityReport:
    """Compare PyTorch and onnxruntime logits on uint8 NHWC ``images`` at each batch size."""
    if len(images) == 0:
        raise ValueError("the probe set is empty; use select_probe() to get one")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"probe images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, H, W, 3) RGB")
    inputs = np.ascontiguousarray(to_unit(images).numpy(), dtype=np.float32)
    reference = torch_logits(model, inputs)
    session = onnx_session(onnx_source)
    max_diff, agree, total = 0.0, 0, 0
    for bs in batch_sizes:
        for idx in _cycled_batches(len(inputs), bs):
            got = session.run(None, {INPUT_NAME: inputs[idx]})[0]
            want = reference[idx]
            if got.shape != want.shape:
                raise UserError(f"the ONNX model returns logits of shape {got.shape} at batch size {bs}, "
                                f"PyTorch {want.shape}; export the model again")
            # NaN anywhere is a failure, not a silently ignored maximum.
            diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
            max_diff = max(max_diff, diff if np.isfinite(diff) else float("inf"))
            agree += int(np.sum(got.argmax(axis=1) == want.argmax(axis=1)))
            total += len(idx)
    return ParityReport(max_diff, agree / total, len(inputs), tuple(batch_sizes), probe)


def parity_passes(report: ParityReport, max_abs_diff: float = DEFAULT_MAX_ABS_DIFF,
                  min_top1: float = DEFAULT_MIN_TOP1) -> bool:
    return report.max_abs_diff <= max_abs_diff and report.top1_agreement >= min_top1


def enforce_parity(
    report: ParityReport,
    max_abs_diff: float = DEFAULT_MAX_ABS_DIFF,
    min_top1: float = DEFAULT_MIN_TOP1,
    force: bool = False,
) -> bool:
    """Return True when the gate passes; when it fails raise a one-line UserError, or return
    False when ``force`` says to write the export anyway."""
    if parity_passes(report, max_abs_diff, min_top1):
        return True
    if force:
        return False
    sizes = ", ".join(str(b) for b in report.batch_sizes)
    raise UserError(
        f"ONNX parity check failed: max abs logit difference {report.max_abs_diff:.3g} (limit {max_abs_diff:.3g}), "
        f"top-1 agreement {report.top1_agreement:.2%} (limit {min_top1:.2%}) over {report.samples} "
        f"{report.probe} samples at batch sizes {sizes}; the export was not written "
        f"(--force writes it anyway)"
    )
