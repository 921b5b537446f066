"""The gated export: model -> ONNX (parity-checked) -> optional TensorRT engine, each with its
metadata JSON. :func:`export_model` takes plain arguments; :func:`export_workspace` is the thin
layer that reads them from a workspace (what ``edge-m2kd export`` calls).

The ONNX file is written to a temporary name beside its destination, checked there by the parity
gate (so the gate runs the very file that will be published), and renamed onto its final name
only when the gate passes or ``force`` says so. A refused export leaves no file behind and an
older export at that path untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edge_m2kd.config import CLASSIFIERS, IMAGE_MEAN, IMAGE_STD
from edge_m2kd.errors import UserError
from edge_m2kd.files import default_onnx_path
from exporters import preflight as _preflight
from exporters.artifacts import (
    prepare_output,
    publish,
    sha256_bytes,
    staged_file,
    tool_versions,
    utc_now,
    write_metadata,
)
from exporters.onnx_export import BATCH_DIM, CHANNELS, INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx_bytes
from exporters.parity import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_MAX_ABS_DIFF,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_MIN_TOP1,
    ParityReport,
    check_parity,
    enforce_parity,
    select_probe,
)
from exporters.tensorrt_build import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WORKSPACE_MIB,
    PRECISIONS,
    EngineBuild,
    build_engine,
    check_precision,
    default_cache_dir,
    require_tensorrt,
)

# What a workspace can deploy (edge_m2kd/heads.py): every classifier but the "auto" choice.
DEPLOYABLE = tuple(c for c in CLASSIFIERS if c != "auto")

# Preflight targets reported for every ONNX export: the TensorRT of JetPack 6.0 and of 6.1/6.2.
PREFLIGHT_TARGETS = ("8.6", "10.3")


@dataclass(frozen=True)
class OnnxExportResult:
    onnx_path: Path
    metadata_path: Path
    model_hash: str
    parity: ParityReport
    parity_passed: bool
    preflight: dict[str, list[str]] = field(default_factory=dict)  # target -> problems (strings)


def _normalization(model: nn.Module) -> dict[str, Any]:
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    mean_list = [float(x) for x in mean.flatten()] if mean is not None else list(IMAGE_MEAN)
    std_list = [float(x) for x in std.flatten()] if std is not None else list(IMAGE_STD)
    return {"folded": True, "mean": mean_list, "std": std_list,
            "formula": "(x - mean) / std per channel, computed inside the graph"}


def onnx_metadata(
    model: nn.Module,
    class_names: Sequence[str],
    input_size: int,
    model_hash: str,
    classifier: str,
    parity: dict[str, Any],
) -> dict[str, Any]:
    """The contract a runtime needs to use the export without reading any Python."""
    n = len(class_names)
    return {
        "kind": "onnx",
        "model_hash": model_hash,
        "class_names": list(class_names),
        "num_classes": n,
        "classifier": classifier,
        "input": {
            "name": INPUT_NAME,
            "shape": [-1, CHANNELS, input_size, input_size],
            "batch_axis": 0,
            "batch_dim_name": BATCH_DIM,
            "dtype": "float32",
            "layout": "NCHW",
            "color": "RGB",
            "range": [0.0, 1.0],
            "from_uint8": "uint8 NHWC RGB image / 255, transposed to NCHW",
            "normalization": _normalization(model),
        },
        "output": {"name": OUTPUT_NAME, "shape": [-1, n], "dtype": "float32",
                   "meaning": "one score per class in class_names order; the highest is the prediction"},
        "opset": OPSET,
        "precision": "fp32",
        "parity": parity,
        "tools": tool_versions(None),
        "created": utc_now(),
    }


def export_model(
    model: nn.Module,
    class_names: Sequence[str],
    input_size: int,
    onnx_path: str | Path,
    *,
    probe_images: np.ndarray | None = None,
    classifier: str | None = None,
    force: bool = False,
    max_abs_diff: float = DEFAULT_MAX_ABS_DIFF,
    min_top1: float = DEFAULT_MIN_TOP1,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    extra_metadata: dict[str, Any] | None = None,
    tamper: Callable[[bytes], bytes] | None = None,
) -> OnnxExportResult:
    """Export ``model`` to ``onnx_path`` through the parity gate and write its metadata.

    ``probe_images``: uint8 NHWC RGB at ``input_size`` (the exemplar store); seeded random images
    when None or empty. ``classifier``: a DEPLOYABLE name; by default "nme" or "cnn", read from the model
    (``normalize_features``). ``tamper`` exists for tests of the gate: it edits the ONNX bytes
    after export and before they are checked and written.
    """
    onnx_path = prepare_output(onnx_path, "ONNX model")
    exported = export_onnx_bytes(model, input_size)
    if exported.num_classes != len(class_names):
        raise ValueError(f"the model has {exported.num_classes} outputs but {len(class_names)} class names were given")
    data = tamper(exported.data) if tamper is not None else exported.data
    model_hash = sha256_bytes(data)
    kind = classifier or ("nme" if getattr(model, "normalize_features", False) else "cnn")
    if kind not in DEPLOYABLE:
        raise ValueError(f"classifier must be one of {', '.join(DEPLOYABLE)}, got {kind!r}")
    probe, source = select_probe(probe_images, input_size, max_samples)

    with staged_file(onnx_path, "ONNX model") as (tmp, f):
        f.write(data)
        f.flush()
        report = check_parity(model, tmp, probe, batch_sizes, source)
        passed = enforce_parity(report, max_abs_diff, min_top1, force)  # raises (and tmp is removed)
        try:
            publish(tmp, onnx_path)
        except OSError as e:
            raise UserError(f"cannot write the ONNX model to {onnx_path}: {e.strerror or e}; choose another path") from e

    parity = {**report.as_dict(), "passed": passed, "forced": not passed,
              "limits": {"max_abs_diff": max_abs_diff, "top1_agreement": min_top1}}
    meta = onnx_metadata(model, class_names, input_size, model_hash, kind, parity)
    meta.update(extra_metadata or {})
    meta_path = write_metadata(onnx_path, meta)
    checks = {t: [str(p) for p in _preflight.preflight(data, t)] for t in PREFLIGHT_TARGETS}
    return OnnxExportResult(onnx_path, meta_path, model_hash, report, passed, checks)


def export_workspace(
    ws_path: str | Path,
    onnx_path: str | Path | None = None,
    tensorrt_path: str | Path | None = None,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    force: bool = False,
    *,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    cache_dir: str | Path | None = None,
    on_build: Callable[[], None] | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """Export a workspace's current classifier: ONNX (parity-gated) and, with ``tensorrt_path``,
    a TensorRT engine. Returns a JSON-serialisable dict for the CLI."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and tensorrt_path is None:
        raise UserError(f"--precision {precision} applies to the TensorRT engine (the ONNX model is always fp32); "
                        "add --tensorrt PATH")
    if tensorrt_path is not None:
        # Before any work: without TensorRT here the answer is "run this on the board", not an ONNX file.
        check_precision(require_tensorrt(), precision)
        prepare_output(tensorrt_path, "TensorRT engine")

    # The workspace pulls in the learner: only when used.
    from edge_m2kd.commands import load_for_reading
    from edge_m2kd.workspace import Workspace

    # Export writes WS/exports and the engine cache: it is a writer, one at a time. It reads the
    # learner as a reader does (on the CPU where the workspace's device is absent).
    with Workspace.writing(ws_path, "export", wait) as ws:
        learner = load_for_reading(ws)
        if learner.steps_done == 0:
            raise UserError(f"{ws_path} has learned no classes yet, so there is nothing to export; "
                            "run `edge-m2kd add-classes` first")
        onnx_target = Path(onnx_path) if onnx_path is not None else default_onnx_path(ws_path)
        prepare_output(onnx_target, "ONNX model")

        model = learner.deployed()
        images, _ = learner.memory.arrays()
        input_size = learner.cfg.model.input_size
        probe_images = images if len(images) else None
        result = export_model(
            model,
            learner.class_names,
            input_size,
            onnx_target,
            probe_images=probe_images,
            classifier=learner.deployed_head,
            force=force,
            extra_metadata={"workspace": {"steps_done": learner.steps_done, "backbone": learner.cfg.model.backbone,
                                          "configured_classifier": learner.cfg.train.classifier,
                                          "deployed_classifier": learner.deployed_head}},
        )

        engine: EngineBuild | None = None
        if tensorrt_path is not None:
            engine = build_engine(
                result.onnx_path,
                tensorrt_path,
                precision=precision,
                max_batch=max_batch,
                workspace_mib=workspace_mib,
                calibration_images=probe_images,
                cache_dir=cache_dir if cache_dir is not None else default_cache_dir(ws_path),
                on_build=on_build,
            )
        parity = result.parity.as_dict()
        parity["passed"] = result.parity_passed
        return {
            "onnx": str(result.onnx_path),
            "parity": parity,
            "tensorrt": str(engine.plan_path) if engine else None,
            "metadata": str(result.metadata_path),
            "tensorrt_metadata": str(engine.metadata_path) if engine else None,
            "model_hash": result.model_hash,
            "precision": precision,
            "engine_cache_hit": engine.cache_hit if engine else None,
            "preflight": result.preflight,
            "forced": not result.parity_passed,
        }
