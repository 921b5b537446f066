"""The deployed classifier to ONNX: one input ``images`` (float32 NCHW RGB in [0, 1], dynamic
batch), one output ``logits`` (float32, batch x classes).

Why these settings:
- Opset 17. TensorRT 8.6 (JetPack 6.0) is the oldest TensorRT we target, and its ONNX parser
  supports operators "up to Opset 17" (onnx-tensorrt, ``docs/operators.md`` on the release/8.6-GA
  branch; the same sentence is in NVIDIA's Deep-Learning-Accelerator-SW operator notes for 8.6).
  TensorRT 10.x parses opsets 9 to 20 and later, so 17 serves both.
- The TorchScript exporter (``dynamo=False``). JetPack 6 ships torch 2.1-2.5, whose default is this
  exporter; torch >= 2.9 defaults to the torch.export-based one, so we ask for the old one by name
  wherever ``torch.onnx.export`` has the ``dynamo`` argument. Both machines then emit the same
  plain operator set (Conv, Relu, Add, ReduceMean, Gemm, ...) that every TensorRT we target parses.
- Constant folding on, so shape arithmetic and folded constants do not reach TensorRT as ops.
"""

from __future__ import annotations

import copy
import inspect
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from exporters.artifacts import sha256_bytes

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
CHANNELS = 3


@dataclass(frozen=True)
class OnnxModel:
    """An exported model in memory: its bytes and what identifies it."""

    data: bytes
    model_hash: str
    input_size: int
    num_classes: int
    opset: int


def model_hash(data: bytes | str | Path) -> str:
    """sha256 of the ONNX bytes (of the file, given a path): the identity of an export."""
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    return sha256_bytes(data)


def _export_kwargs() -> dict[str, Any]:
    # torch 2.1 has no ``dynamo`` argument (passing it would be a TypeError); torch >= 2.9 needs it
    # set to False to keep the TorchScript exporter.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def export_onnx_bytes(model: nn.Module, input_size: int, opset: int = OPSET) -> OnnxModel:
    """Export ``model`` (float NCHW [0, 1] in, logits out) and check the result with onnx.checker."""
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()  # export on the CPU; never move the caller's model
    was_training = model.training
    model.eval()
    # A batch of 2, not 1: a size-1 example could let the tracer specialise a batch-dependent op.
    example = torch.rand(2, CHANNELS, input_size, input_size)
    # Through a file, not a BytesIO: torch types ``f`` as a path, and the torch.export-based
    # exporter of newer torch accepts nothing else.
    tmpdir = tempfile.TemporaryDirectory(prefix="edge-m2kd-onnx-")
    target = Path(tmpdir.name) / "model.onnx"
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (see the module docstring); its
            # deprecation notice on torch >= 2.9 is not news to the user.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    str(target),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                    opset_version=opset,
                    do_constant_folding=True,
                    export_params=True,
                    **_export_kwargs(),
                )
        data = target.read_bytes()
    finally:
        model.train(was_training)
        tmpdir.cleanup()
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    num_classes = _check_contract(proto, input_size)
    return OnnxModel(data, model_hash(data), input_size, num_classes, opset)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _check_contract(proto: onnx.ModelProto, input_size: int) -> int:
    """The exported graph must have exactly the I/O the runtime and metadata promise."""
    graph = proto.graph
    inputs = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise RuntimeError(f"exported graph has inputs {[i.name for i in inputs]} and outputs "
                           f"{[o.name for o in graph.output]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
    float_type = onnx.TensorProto.FLOAT
    if inputs[0].type.tensor_type.elem_type != float_type or graph.output[0].type.tensor_type.elem_type != float_type:
        raise RuntimeError("exported graph input and output must be float32")
    in_dims, out_dims = _dims(inputs[0]), _dims(graph.output[0])
    if in_dims != [BATCH_DIM, CHANNELS, input_size, input_size]:
        raise RuntimeError(f"exported input shape is {in_dims}, expected {[BATCH_DIM, CHANNELS, input_size, input_size]}")
    if len(out_dims) != 2 or out_dims[0] != BATCH_DIM or not isinstance(out_dims[1], int) or out_dims[1] <= 0:
        raise RuntimeError(f"exported output shape is {out_dims}, expected [{BATCH_DIM!r}, classes]")
    return out_dims[1]


def export_onnx(model: nn.Module, path: str | Path, input_size: int, opset: int = OPSET) -> OnnxModel:
    """Export and write ``path`` atomically, without a parity check (see :mod:`exporters.parity`
    and :func:`exporters.export_model` for the gated export)."""
    from exporters.artifacts import write_bytes_atomic

    exported = export_onnx_bytes(model, input_size, opset)
    write_bytes_atomic(path, exported.data, "ONNX model")
    return exported
