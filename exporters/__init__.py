"""Exporters: the current student to ONNX (parity-gated against PyTorch) and to a TensorRT engine.

Nothing here imports TensorRT or pycuda at import time: both exist only on the board.
"""

from exporters.artifacts import metadata_path, read_metadata
from exporters.export import OnnxExportResult, export_model, export_workspace
from exporters.onnx_export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    OnnxModel,
    export_onnx,
    export_onnx_bytes,
    model_hash,
)
from exporters.parity import ParityReport, check_parity, enforce_parity, select_probe
from exporters.preflight import Problem, preflight
from exporters.tensorrt_build import (
    EngineBuild,
    EngineCache,
    EngineKey,
    build_engine,
    gpu_name,
    require_tensorrt,
)

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "EngineBuild",
    "EngineCache",
    "EngineKey",
    "OnnxExportResult",
    "OnnxModel",
    "ParityReport",
    "Problem",
    "build_engine",
    "check_parity",
    "enforce_parity",
    "export_model",
    "export_onnx",
    "export_onnx_bytes",
    "export_workspace",
    "gpu_name",
    "metadata_path",
    "model_hash",
    "preflight",
    "read_metadata",
    "require_tensorrt",
    "select_probe",
]
