"""TensorRT preflight: would TensorRT's ONNX parser take this graph?

Run where TensorRT is not installed (any laptop, CI), this catches the failures that otherwise
show up only on the board, one slow engine build later: an operator the parser has no importer
for, a custom-domain op, a data type TensorRT has no type for, a dynamic dimension other than
the batch, an opset newer than the parser knows. Each problem names the offending node (name and
op type) or tensor.

Sources for the tables below (read, summarised, not copied):
- onnx-tensorrt ``docs/operators.md``: the 8.5 table ("TensorRT 8.5 supports operators up to
  Opset 17"; data types DOUBLE (cast down to FLOAT), FLOAT32, FLOAT16, INT8, BOOL, limited INT32 /
  INT64 with INT64 cast down to INT32), the 10.x tables ("opset 9 to opset 20" for 10.0; BFLOAT16,
  FP8, INT4, INT64 added; UINT8 only as network input or output).
- onnx-tensorrt ``docs/Changelog.md``: 8.6 EA added GroupNormalization, LayerNormalization and
  IsInf; 9.0 added native INT64 plus FP8/BF16; 9.2 Hardmax; 10.1 DeformConv; 10.4 the window
  functions; 10.5 STFT; 10.14 Attention; 10.15 RotaryEmbedding, RMSNormalization, TensorScatter.
- TensorRT 8.6 developer guide: the parser is backward compatible to opset 7; the TensorRT 11.x
  ONNX opset guide: opsets 9 to 25.
Ops whose first 10.x release we could not pin down (CastLike, Gelu, Mish) are credited to 10.15,
the release whose table lists them: a false alarm on an older 10.x beats a failed build.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnx import TensorProto

Severity = Literal["error", "warning"]

# Supported by the ONNX parser of TensorRT 8.6 (the 8.5 table plus the 8.6 additions).
_OPS_86 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GRU HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
GroupNormalization LayerNormalization IsInf
""".split())

# Added after 8.6: op -> first (major, minor) whose parser imports it.
_ADDED_AFTER_86: dict[str, tuple[int, int]] = {
    "Hardmax": (9, 2),
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4),
    "HammingWindow": (10, 4),
    "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),
    "CastLike": (10, 15),
    "Gelu": (10, 15),
    "Mish": (10, 15),
}


def _types(*names: str) -> frozenset[int]:
    # By name, because onnx releases older than the types (onnx 1.14 has no INT4) lack the constants.
    return frozenset(getattr(TensorProto, n) for n in names if hasattr(TensorProto, n))


# No TensorRT type at all, in any version we target.
_NEVER_TYPES = _types("STRING", "COMPLEX64", "COMPLEX128", "UINT16", "UINT32", "UINT64", "INT16",
                      "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4", "FLOAT8E8M0")
# Types that gained TensorRT support after 8.6: type -> first (major, minor).
_TYPES_ADDED: dict[int, tuple[int, int]] = {
    t: version
    for name, version in [("BFLOAT16", (9, 0)), ("FLOAT8E4M3FN", (9, 0)), ("INT4", (10, 0)), ("FLOAT4E2M1", (10, 8))]
    if (t := getattr(TensorProto, name, None)) is not None
}


@dataclass(frozen=True)
class Target:
    major: int
    minor: int
    min_opset: int
    max_opset: int

    @property
    def label(self) -> str:
        return f"TensorRT {self.major}.{self.minor}" if self.major < 10 else f"TensorRT {self.major}.x"

    def has_op(self, op_type: str) -> bool:
        if op_type in _OPS_86:
            return True
        added = _ADDED_AFTER_86.get(op_type)
        return added is not None and (self.major, self.minor) >= added

    def has_type(self, elem_type: int) -> bool:
        if elem_type in _NEVER_TYPES:
            return False
        added = _TYPES_ADDED.get(elem_type)
        return added is None or (self.major, self.minor) >= added


def target(version: str) -> Target:
    """'8.6', '8.6.1', '10', '10.3.0.30', '11.0' -> the parser we check against."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    if major < 8 or (major == 8 and minor < 6):
        raise ValueError(f"TensorRT {version} is not supported; edge-m2kd targets TensorRT 8.6 and 10.x")
    if major == 8:
        return Target(8, minor, 7, 17)
    if major == 9:
        return Target(9, minor, 9, 19)
    if major == 10:
        return Target(10, minor, 9, 20)  # 10.0's table; later 10.x parse more, never less
    return Target(major, minor, 9, 25)


@dataclass(frozen=True)
class Problem:
    severity: Severity
    message: str
    node: str | None = None  # node name (or "#index" when unnamed), with subgraph path
    op_type: str | None = None
    tensor: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            where = f"node {self.node!r} ({self.op_type}): "
        elif self.tensor is not None:
            where = f"tensor {self.tensor!r}: "
        return f"{self.severity}: {where}{self.message}"


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def summary(problems: list[Problem], limit: int = 3) -> str:
    """One line: the first ``limit`` problems and how many more."""
    head = "; ".join(str(p) for p in problems[:limit])
    more = len(problems) - limit
    return head + (f"; and {more} more" if more > 0 else "")


def _load(model: onnx.ModelProto | bytes | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model))


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto, onnx.GraphProto]]:
    """Every node, subgraphs (If/Loop/Scan bodies) included, with a readable path."""
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"#{i}")
        yield name, node, graph
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk(sub, f"{name}/{attr.name}/")


def _type_name(elem_type: int) -> str:
    try:
        return str(TensorProto.DataType.Name(elem_type))
    except ValueError:
        return f"type {elem_type}"


def preflight(model: onnx.ModelProto | bytes | str | Path, tensorrt: str = "8.6") -> list[Problem]:
    """Problems TensorRT ``tensorrt``'s ONNX parser would have with ``model``; errors first."""
    tgt = target(tensorrt)
    proto = _load(model)
    problems: list[Problem] = []

    # -- opsets ---------------------------------------------------------------------------
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx") and not tgt.min_opset <= imp.version <= tgt.max_opset:
            problems.append(Problem("error", f"the model uses ONNX opset {imp.version}; {tgt.label}'s parser "
                                    f"supports opsets {tgt.min_opset} to {tgt.max_opset} (export with opset 17)"))

    # -- operators (and the restrictions that matter for image classifiers) -----------------
    nodes = list(_walk(proto.graph))
    for name, node, _ in nodes:
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem("error", f"custom-domain op {node.domain}::{node.op_type} has no TensorRT "
                                    "importer (it would need a TensorRT plugin of that name)", name, node.op_type))
        elif not tgt.has_op(node.op_type):
            problems.append(Problem("error", f"{tgt.label}'s ONNX parser does not support {node.op_type}",
                                    name, node.op_type))
        elif node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(Problem("error", "the Indices output of MaxPool is not supported", name, node.op_type))
        elif node.op_type in ("MaxPool", "AveragePool", "LpPool"):
            kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
            if len(kernel) not in (2, 3):
                problems.append(Problem("error", f"{len(kernel)}-D pooling; TensorRT pools in 2-D or 3-D only",
                                        name, node.op_type))

    # -- data types ---------------------------------------------------------------------------
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # inference is best-effort: a graph it chokes on is still checked as given
        inferred = proto
    graph = inferred.graph
    initializers = {t.name for t in graph.initializer}
    graph_io = {v.name for v in graph.input} | {v.name for v in graph.output}
    producer: dict[str, tuple[str, onnx.NodeProto]] = {}
    consumer: dict[str, tuple[str, onnx.NodeProto]] = {}
    for name, node, _ in nodes:
        for out in node.output:
            producer.setdefault(out, (name, node))
        for inp in node.input:
            consumer.setdefault(inp, (name, node))

    typed: list[tuple[str, int]] = [(t.name, t.data_type) for t in graph.initializer]
    typed += [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.value_info, *graph.output]
              if v.type.HasField("tensor_type")]
    for name, node, _ in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                typed.append((node.output[0] if node.output else name, attr.t.data_type))
            if node.op_type in ("Cast", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike") and \
                    attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
                typed.append((node.output[0] if node.output else name, attr.i))

    seen: set[tuple[str, int]] = set()
    for tensor, elem_type in typed:
        if elem_type == TensorProto.UNDEFINED or (tensor, elem_type) in seen:
            continue
        seen.add((tensor, elem_type))
        where = producer.get(tensor) or consumer.get(tensor)
        node_name, op = (where[0], where[1].op_type) if where and tensor not in graph_io else (None, None)
        tname = _type_name(elem_type)
        if not tgt.has_type(elem_type):
            problems.append(Problem("error", f"{tname} tensor {tensor!r}: {tgt.label} has no {tname} type",
                                    node_name, op, tensor))
        elif elem_type == TensorProto.DOUBLE:
            problems.append(Problem("warning", f"DOUBLE tensor {tensor!r} is cast down to FLOAT by TensorRT "
                                    "(values clamped to the float range)", node_name, op, tensor))
        elif elem_type == TensorProto.UINT8 and tensor not in graph_io and tensor not in initializers:
            problems.append(Problem("error", f"UINT8 tensor {tensor!r} inside the network; TensorRT takes UINT8 "
                                    "only as a network input or output", node_name, op, tensor))
        elif elem_type == TensorProto.INT64 and tensor in graph_io and tgt.major < 9:
            problems.append(Problem("warning", f"INT64 network input/output {tensor!r}: {tgt.label} casts it to "
                                    "INT32, so its buffers must be INT32", None, None, tensor))

    # -- dynamic dimensions: only the batch axis of an input may be dynamic --------------------
    for value in proto.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if not value.type.tensor_type.HasField("shape"):
            problems.append(Problem("error", "input has no shape; TensorRT needs static dims except the batch",
                                    tensor=value.name))
            continue
        for axis, dim in enumerate(shape.dim):
            dynamic = dim.HasField("dim_param") or not dim.HasField("dim_value") or dim.dim_value <= 0
            if dynamic and axis != 0:
                label = dim.dim_param or "?"
                problems.append(Problem("error", f"input axis {axis} is dynamic ({label!r}); only the batch axis "
                                        "(0) may be dynamic, the build's optimisation profile varies the batch only",
                                        tensor=value.name))

    problems.sort(key=lambda p: p.severity != "error")  # stable: errors first, in graph order
    return problems
