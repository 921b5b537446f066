"""A simulator of the TensorRT Python API surface that edge-m2kd uses, for one chosen version.

``make_tensorrt("8.6.1" | "10.3.0" | "11.0.0", memory)`` returns a module to put on
``sys.modules["tensorrt"]``. It enforces the contract the real library enforces, and the
version differences that break code on a real board:

- names: an attribute a version does not have raises ``AttributeError`` (10.x: ``build_engine``,
  ``num_bindings``, ``get_binding_index``, ``execute_async_v2``, ``max_workspace_size``...;
  11.x: also ``BuilderFlag.FP16``/``INT8``, ``platform_has_fast_fp16``, ``int8_calibrator``,
  ``IInt8EntropyCalibrator2``, ``EXPLICIT_BATCH``). Names that exist but are deprecated in that
  version are recorded in ``state.deprecated_calls`` so tests can require code not to rely on
  them. Setting an attribute the class does not declare raises, as on pybind11 objects.
- building: the 8.x ONNX parser refuses an implicit-batch network; a dynamic input needs an
  optimisation profile whose static dims match and whose min <= opt <= max; INT8 with a
  calibrator runs the calibrator (pointers must be live device memory of the calibration shape,
  the base ``__init__`` must have been called); the parser rejects opsets above the version's
  maximum, custom domains and ops without importers, naming the node index in ``ParserError``.
- the plan: a header plus the ONNX bytes; it deserialises only in the same TensorRT version.
- running: ``set_input_shape`` must be called for dynamic inputs, within the profile; every I/O
  tensor needs an address; addresses must be live allocations of the shared
  :class:`DeviceMemory` and large enough; the stream handle must exist. The arithmetic is done by
  onnxruntime on the embedded ONNX model, so an engine gives the ONNX answers (FP16/INT8 engines
  are emulated by rounding the outputs to FP16; the simulator does not model INT8 error).
"""

from __future__ import annotations

import enum
import json
import struct
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from trt_sim.cuda_memory import DeviceMemory

MAGIC = b"TRTSIM01"

# -- version profiles ---------------------------------------------------------------------------
_BINDING_API_ENGINE = {"num_bindings", "binding_is_input", "get_binding_index", "get_binding_name",
                       "get_binding_shape", "get_binding_dtype", "get_profile_shape", "max_batch_size",
                       "has_implicit_batch_dimension"}
_BINDING_API_CONTEXT = {"execute_async_v2", "execute_async", "execute", "set_binding_shape", "get_binding_shape",
                        "all_binding_shapes_specified"}
# Deprecated in 8.6 (present, recorded when used), removed in 10.0.
_DEPRECATED_86 = {
    "Builder": {"build_engine", "max_batch_size"},
    "IBuilderConfig": {"max_workspace_size"},
    "ICudaEngine": _BINDING_API_ENGINE,
    "IExecutionContext": _BINDING_API_CONTEXT,
}
_REMOVED_10 = {
    **_DEPRECATED_86,
    "ParserError": set(),
}
# Deprecated in 10.x (10.1: calibrators; 10.5: platform_has_fast_*), removed in 11.0.
_DEPRECATED_10_CALIBRATION = {"IBuilderConfig": {"int8_calibrator", "set_calibration_profile", "get_calibration_profile"}}
_REMOVED_11 = {
    "Builder": _REMOVED_10["Builder"] | {"platform_has_fast_fp16", "platform_has_fast_int8", "platform_has_tf32"},
    "IBuilderConfig": _REMOVED_10["IBuilderConfig"] | _DEPRECATED_10_CALIBRATION["IBuilderConfig"],
    "ICudaEngine": _REMOVED_10["ICudaEngine"] | {"device_memory_size"},
    "IExecutionContext": _REMOVED_10["IExecutionContext"],
}
_CALIBRATOR_NAMES = ("IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2",
                     "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator", "CalibrationAlgoType")

# Ops with no importer in the parser, per version (the simulator's own short list, on purpose not
# the preflight table, so the preflight is tested against something independent).
_NO_IMPORTER = {"Det", "Unique", "StringNormalizer", "TfIdfVectorizer", "Compress", "ConvInteger", "MatMulInteger",
                "QLinearConv", "QLinearMatMul", "MaxUnpool", "Multinomial", "SequenceAt", "SequenceConstruct",
                "SplitToSequence", "ConcatFromSequence", "Bernoulli", "BitShift", "DFT"}
_NO_IMPORTER_86_ONLY = {"Hardmax", "BlackmanWindow", "HammingWindow", "HannWindow", "STFT", "DeformConv"}


@dataclass
class SimState:
    """What a test may inspect after running code against the simulator."""

    version: str = ""
    fast_fp16: bool = True
    fast_int8: bool = True
    builders_created: int = 0
    parses: int = 0
    builds: int = 0
    executions: int = 0
    calibration_batches: int = 0
    calibration_shape: tuple[int, ...] | None = None
    calibration_cache_read: bool = False
    deprecated_calls: list[str] = field(default_factory=list)
    log: list[tuple[int, str]] = field(default_factory=list)
    last_config: dict[str, Any] = field(default_factory=dict)

    def errors(self) -> list[str]:
        return [msg for sev, msg in self.log if sev <= 1]


@dataclass
class Api:
    version: str
    major: int
    minor: int
    removed: dict[str, set[str]]
    deprecated: dict[str, set[str]]
    state: SimState
    memory: DeviceMemory
    classes: dict[str, type] = field(default_factory=dict)
    enums: dict[str, Any] = field(default_factory=dict)

    def log(self, severity: int, msg: str) -> None:
        self.state.log.append((severity, msg))


class _Obj:
    """Base of the simulated API classes: version-gated attribute access, pybind11-like setters."""

    _api: Api
    _public: str

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            cls = type(self)
            api: Api = cls._api
            if name in api.removed.get(cls._public, ()):
                raise AttributeError(f"'tensorrt.tensorrt.{cls._public}' object has no attribute '{name}' "
                                     f"(not in TensorRT {api.version})")
            if name in api.deprecated.get(cls._public, ()):
                api.state.deprecated_calls.append(f"{cls._public}.{name}")
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            cls = type(self)
            if name in cls._api.removed.get(cls._public, ()) or not isinstance(getattr(cls, name, None), property):
                raise AttributeError(f"'tensorrt.tensorrt.{cls._public}' object has no attribute '{name}'")
            if name in cls._api.deprecated.get(cls._public, ()):
                cls._api.state.deprecated_calls.append(f"{cls._public}.{name}")
        object.__setattr__(self, name, value)


class Dims(tuple):  # type: ignore[type-arg]
    """Like trt.Dims: behaves as a tuple of ints; -1 marks a dynamic dimension."""

    def __new__(cls, shape: Iterable[int] = ()) -> Dims:
        return super().__new__(cls, (int(d) for d in shape))


def _as_dims(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in value):
        return tuple(int(d) for d in value)
    raise TypeError(f"{what}: expected Dims, tuple or list of ints, got {value!r}")


def _np_dtype(dt_name: str) -> np.dtype:
    return np.dtype({"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
                     "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}[dt_name])


# -- logger ---------------------------------------------------------------------------------------
class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self) -> None:
        self._trt_init = True

    def log(self, severity: Severity, msg: str) -> None:
        raise NotImplementedError("ILogger.log is pure virtual")


class Logger(ILogger):
    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        super().__init__()
        if not isinstance(min_severity, Severity):
            raise TypeError(f"Logger(): min_severity must be a Logger.Severity, got {min_severity!r}")
        self.min_severity = min_severity

    def log(self, severity: Severity, msg: str) -> None:
        pass  # the simulator keeps messages in state.log instead of printing them


def _check_logger(logger: Any, where: str) -> None:
    if not isinstance(logger, ILogger) or not getattr(logger, "_trt_init", False):
        raise TypeError(f"{where}: incompatible constructor arguments; logger must be a tensorrt.ILogger "
                        "(whose __init__ was called)")


# -- calibrator bases -------------------------------------------------------------------------
class IInt8Calibrator:
    def __init__(self) -> None:
        self._trt_init = True

    def get_batch_size(self) -> int:
        raise NotImplementedError("Tried to call pure virtual function IInt8Calibrator::get_batch_size")

    def get_batch(self, names: list[str]) -> list[int] | None:
        raise NotImplementedError("Tried to call pure virtual function IInt8Calibrator::get_batch")

    def read_calibration_cache(self) -> Any:
        raise NotImplementedError("Tried to call pure virtual function IInt8Calibrator::read_calibration_cache")

    def write_calibration_cache(self, cache: Any) -> None:
        raise NotImplementedError("Tried to call pure virtual function IInt8Calibrator::write_calibration_cache")

    def get_algorithm(self) -> Any:
        raise NotImplementedError


# -- network, parser ------------------------------------------------------------------------------
@dataclass
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # DataType member name


class ITensor(_Obj):
    def __init__(self, spec: _TensorSpec) -> None:
        self._spec = spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def shape(self) -> Dims:
        return Dims(self._spec.shape)

    @property
    def dtype(self) -> Any:
        return self._api.enums["DataType"][self._spec.dtype]


class INetworkDefinition(_Obj):
    def __init__(self, explicit_batch: bool, flags: int) -> None:
        self._explicit_batch = explicit_batch
        self._flags = flags
        self._onnx: bytes | None = None
        self._inputs: list[_TensorSpec] = []
        self._outputs: list[_TensorSpec] = []
        self._num_layers = 0

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def get_input(self, index: int) -> ITensor:
        return self._api.classes["ITensor"](self._inputs[index])

    def get_output(self, index: int) -> ITensor:
        return self._api.classes["ITensor"](self._outputs[index])

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return not self._explicit_batch


class ParserError(_Obj):
    def __init__(self, code: str, desc: str, node: int, node_name: str = "", node_operator: str = "") -> None:
        self._code, self._desc, self._node = code, desc, node
        self._node_name, self._node_operator = node_name, node_operator

    def code(self) -> str:
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._node_name

    def node_operator(self) -> str:
        return self._node_operator

    def file(self) -> str:
        return "ModelImporter.cpp"

    def line(self) -> int:
        return 0

    def func(self) -> str:
        return "parseGraph"

    def __str__(self) -> str:
        return f"In node {self._node} ({self.func()}): {self._code}: {self._desc}"


_ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT32: "INT32",
                onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8",
                onnx.TensorProto.BOOL: "BOOL"}


class OnnxParser(_Obj):
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        if not isinstance(network, INetworkDefinition):
            raise TypeError("OnnxParser(): network must be a tensorrt.INetworkDefinition")
        _check_logger(logger, "OnnxParser()")
        self._network = network
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def clear_errors(self) -> None:
        self._errors.clear()

    def _fail(self, code: str, desc: str, node: int = -1, proto: onnx.ModelProto | None = None) -> bool:
        name = op = ""
        if proto is not None and 0 <= node < len(proto.graph.node):
            name, op = proto.graph.node[node].name, proto.graph.node[node].op_type
        self._errors.append(self._api.classes["ParserError"](code, desc, node, name, op))
        self._api.log(1, f"ModelImporter: {desc}")
        return False

    def parse_from_file(self, model: str) -> bool:
        with open(model, "rb") as f:
            return self.parse(f.read())

    def parse(self, model: Any, path: str | None = None) -> bool:
        api = self._api
        if not isinstance(model, (bytes, bytearray, memoryview)):
            raise TypeError(f"parse(): incompatible function arguments; model must be a buffer (bytes), got "
                            f"{type(model).__name__}")
        api.state.parses += 1
        if not self._network._explicit_batch:
            return self._fail("INVALID_GRAPH", "This version of the ONNX parser only supports TensorRT "
                              "INetworkDefinitions with an explicit batch dimension. Please ensure the network was "
                              "initialized with the EXPLICIT_BATCH NetworkDefinitionCreationFlag.")
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception:
            return self._fail("MODEL_DESERIALIZE_FAILED", "Failed to parse ONNX model: the buffer is not a "
                              "serialized ModelProto")
        max_opset = {8: 17, 9: 19, 10: 20}.get(api.major, 25)
        for imp in proto.opset_import:
            if imp.domain in ("", "ai.onnx") and imp.version > max_opset:
                return self._fail("UNSUPPORTED_GRAPH", f"Unsupported ONNX opset {imp.version}; this parser "
                                  f"supports up to opset {max_opset}")
        no_importer = _NO_IMPORTER | (_NO_IMPORTER_86_ONLY if api.major < 10 else set())
        for i, node in enumerate(proto.graph.node):
            if node.domain not in ("", "ai.onnx") or node.op_type in no_importer:
                return self._fail("UNSUPPORTED_NODE", f"No importer registered for op: {node.op_type}. Attempting "
                                  f"to import as plugin. Plugin not found: {node.op_type}", i, proto)
        inits = {t.name for t in proto.graph.initializer}

        def spec(v: onnx.ValueInfoProto) -> _TensorSpec | None:
            tt = v.type.tensor_type
            dtype = _ONNX_TO_TRT.get(tt.elem_type)
            if dtype is None:
                return None
            if dtype == "INT64" and api.major < 9:
                dtype = "INT32"  # 8.x casts INT64 down to INT32
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
            return _TensorSpec(v.name, dims, dtype)

        inputs = [spec(v) for v in proto.graph.input if v.name not in inits]
        outputs = [spec(v) for v in proto.graph.output]
        for j, s in enumerate([*inputs, *outputs]):
            if s is None:
                return self._fail("UNSUPPORTED_GRAPH", f"graph input/output #{j} has a type TensorRT does not support")
        net = self._network
        net._inputs = [s for s in inputs if s is not None]
        net._outputs = [s for s in outputs if s is not None]
        net._onnx = bytes(model)
        net._num_layers = len(proto.graph.node)
        return True


# -- builder ------------------------------------------------------------------------------------------
class IOptimizationProfile(_Obj):
    def __init__(self) -> None:
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        self._valid = True

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        lo, mid, hi = (_as_dims(v, f"set_shape({input!r})") for v in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi)) or any(not (0 < a <= b <= c) for a, b, c in zip(lo, mid, hi)):
            self._api.log(1, f"IOptimizationProfile::setDimensions: {input}: need 0 < min <= opt <= max per axis, "
                          f"got {lo} {mid} {hi}")
            self._valid = False
            return
        self._shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:  # noqa: A002
        if input not in self._shapes:
            return []
        return [Dims(s) for s in self._shapes[input]]

    def __bool__(self) -> bool:
        return self._valid


class IBuilderConfig(_Obj):
    def __init__(self) -> None:
        self._pools: dict[Any, int] = {}
        self._flags: set[Any] = set()
        self._profiles: list[IOptimizationProfile] = []
        self._calibrator: Any = None
        self._calibration_profile: IOptimizationProfile | None = None

    def _check_enum(self, value: Any, enum_name: str) -> None:
        enum_cls = self._api.enums[enum_name]
        if not isinstance(value, enum_cls):
            raise TypeError(f"incompatible function arguments: expected tensorrt.{enum_name}, got {value!r}")

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self._check_enum(pool, "MemoryPoolType")
        if not isinstance(pool_size, (int, np.integer)) or pool_size < 0:
            raise TypeError(f"set_memory_pool_limit(): pool_size must be a non-negative int, got {pool_size!r}")
        self._pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool: Any) -> int:
        self._check_enum(pool, "MemoryPoolType")
        return self._pools.get(pool, 1 << 40)

    def set_flag(self, flag: Any) -> None:
        self._check_enum(flag, "BuilderFlag")
        self._flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self._check_enum(flag, "BuilderFlag")
        self._flags.discard(flag)

    def get_flag(self, flag: Any) -> bool:
        self._check_enum(flag, "BuilderFlag")
        return flag in self._flags

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError("add_optimization_profile(): expected tensorrt.IOptimizationProfile")
        if not profile._valid or not profile._shapes:
            self._api.log(1, "IBuilderConfig::addOptimizationProfile: the profile is invalid")
            return -1
        self._profiles.append(profile)
        return len(self._profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    @property
    def int8_calibrator(self) -> Any:
        return self._calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, calibrator: Any) -> None:
        if calibrator is not None and not isinstance(calibrator, IInt8Calibrator):
            raise TypeError("int8_calibrator must be a tensorrt.IInt8Calibrator")
        self._calibrator = calibrator

    def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
        if not isinstance(profile, IOptimizationProfile) or not profile._valid or not profile._shapes:
            return False
        self._calibration_profile = profile
        return True

    def get_calibration_profile(self) -> IOptimizationProfile | None:
        return self._calibration_profile

    @property
    def max_workspace_size(self) -> int:  # deprecated in 8.x, removed in 10.0
        return self._pools.get(self._api.enums["MemoryPoolType"].WORKSPACE, 0)

    @max_workspace_size.setter
    def max_workspace_size(self, value: int) -> None:
        self._pools[self._api.enums["MemoryPoolType"].WORKSPACE] = int(value)


class IHostMemory(bytes):
    """The serialised plan. The real one exposes the buffer protocol; bytes does too."""

    @property
    def nbytes(self) -> int:
        return len(self)


class Builder(_Obj):
    def __init__(self, logger: ILogger) -> None:
        _check_logger(logger, "Builder()")
        self._logger = logger
        self._api.state.builders_created += 1

    @property
    def platform_has_fast_fp16(self) -> bool:
        return self._api.state.fast_fp16

    @property
    def platform_has_fast_int8(self) -> bool:
        return self._api.state.fast_int8

    @property
    def platform_has_tf32(self) -> bool:
        return False

    @property
    def max_batch_size(self) -> int:  # implicit batch only; deprecated in 8.x
        return 1

    def create_network(self, flags: int = 0) -> INetworkDefinition | None:
        api = self._api
        if not isinstance(flags, (int, np.integer)) or isinstance(flags, bool):
            raise TypeError(f"create_network(): flags must be an int bit mask, got {flags!r}")
        known = 0
        for member in api.enums["NetworkDefinitionCreationFlag"]:
            known |= 1 << int(member)
        if flags & ~known:
            api.log(1, f"createNetworkV2: unknown flags 0x{flags:x} for TensorRT {api.version}")
            return None
        explicit = True
        if api.major < 10:
            explicit = bool(flags & (1 << 0))  # EXPLICIT_BATCH is bit 0
            if not explicit:
                api.state.deprecated_calls.append("implicit-batch network")
        elif flags & 1 and "EXPLICIT_BATCH" in api.enums["NetworkDefinitionCreationFlag"].__members__:
            api.state.deprecated_calls.append("NetworkDefinitionCreationFlag.EXPLICIT_BATCH")
        return api.classes["INetworkDefinition"](explicit, int(flags))

    def create_builder_config(self) -> IBuilderConfig:
        return self._api.classes["IBuilderConfig"]()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return self._api.classes["IOptimizationProfile"]()

    def build_engine(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:  # 8.x only
        plan = self.build_serialized_network(network, config)
        return None if plan is None else _deserialize(self._api, plan)

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        api = self._api
        if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
            raise TypeError("build_serialized_network(): expected (INetworkDefinition, IBuilderConfig)")
        api.state.builds += 1
        if network._onnx is None:
            api.log(1, "Builder: the network has no inputs (was the ONNX model parsed successfully?)")
            return None
        dynamic = [t for t in network._inputs if -1 in t.shape]
        if dynamic and not config._profiles:
            api.log(1, f"Network has dynamic or shape inputs, but no optimization profile has been defined "
                    f"({', '.join(t.name for t in dynamic)})")
            return None
        profiles = []
        for k, profile in enumerate(config._profiles):
            shapes = {}
            for t in network._inputs:
                if t.name not in profile._shapes:
                    if -1 in t.shape:
                        api.log(1, f"Optimization profile {k}: dynamic input {t.name} has no dimensions set")
                        return None
                    shapes[t.name] = [list(t.shape)] * 3
                    continue
                lo, mid, hi = profile._shapes[t.name]
                if len(lo) != len(t.shape) or any(d != -1 and not (a == b == c == d)
                                                   for a, b, c, d in zip(lo, mid, hi, t.shape)):
                    api.log(1, f"Optimization profile {k}: {t.name} profile {lo}/{mid}/{hi} does not match the "
                            f"network's dims {t.shape}")
                    return None
                shapes[t.name] = [list(lo), list(mid), list(hi)]
            unknown = set(profile._shapes) - {t.name for t in network._inputs}
            if unknown:
                api.log(1, f"Optimization profile {k}: {sorted(unknown)} are not network inputs")
                return None
            profiles.append(shapes)
        flags = api.enums["BuilderFlag"]
        fp16 = "FP16" in flags.__members__ and config._flags.__contains__(flags.FP16)
        int8 = "INT8" in flags.__members__ and config._flags.__contains__(flags.INT8)
        calibrated = False
        if int8 and config._calibrator is not None:
            if not _calibrate(api, network, config, profiles):
                return None
            calibrated = True
        wsp = api.enums["MemoryPoolType"].WORKSPACE
        api.state.last_config = {"fp16": fp16, "int8": int8, "workspace": config._pools.get(wsp),
                                 "profiles": profiles, "calibrated": calibrated}
        header = {
            "version": api.version,
            "fp16": fp16,
            "int8": int8,
            "calibrated": calibrated,
            "profiles": profiles,
            "inputs": [vars(t) for t in network._inputs],
            "outputs": [vars(t) for t in network._outputs],
        }
        head = json.dumps(header).encode()
        return IHostMemory(MAGIC + struct.pack("<I", len(head)) + head + network._onnx)


def _calibrate(api: Api, network: INetworkDefinition, config: IBuilderConfig, profiles: list[dict[str, Any]]) -> bool:
    calibrator = config._calibrator
    if not getattr(calibrator, "_trt_init", False):
        raise TypeError(f"{type(calibrator).__name__}.__init__() must call the base class __init__ "
                        "(tensorrt.IInt8EntropyCalibrator2.__init__(self))")
    if config._calibration_profile is not None:
        shapes = {name: s[1] for name, s in config._calibration_profile._shapes.items()}
    else:
        shapes = {name: tuple(s[1]) for name, s in profiles[0].items()}
    api.state.calibration_shape = tuple(shapes[network._inputs[0].name])
    cache = calibrator.read_calibration_cache()
    if cache:
        api.state.calibration_cache_read = True
        return True
    names = [t.name for t in network._inputs]
    amax = 0.0
    for _ in range(100_000):
        pointers = calibrator.get_batch(names)
        if not pointers:
            break
        if len(pointers) != len(names):
            api.log(1, f"Calibrator returned {len(pointers)} pointers for {len(names)} inputs")
            return False
        for name, ptr in zip(names, pointers):
            spec = next(t for t in network._inputs if t.name == name)
            batch = api.memory.view(int(ptr), _np_dtype(spec.dtype), tuple(shapes[name]))
            amax = max(amax, float(np.abs(batch).max()))
        api.state.calibration_batches += 1
    if api.state.calibration_batches == 0:
        api.log(1, "Calibration failure: the calibrator returned no batches")
        return False
    table = f"TRT-{api.major}{api.minor}0-EntropyCalibration2\n{names[0]}: {np.float32(amax / 127).view(np.uint32):08x}\n"
    calibrator.write_calibration_cache(table.encode())
    return True


# -- runtime ------------------------------------------------------------------------------------------
class Runtime(_Obj):
    def __init__(self, logger: ILogger) -> None:
        _check_logger(logger, "Runtime()")

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        if not isinstance(serialized_engine, (bytes, bytearray, memoryview)):
            raise TypeError("deserialize_cuda_engine(): expected a buffer")
        return _deserialize(self._api, bytes(serialized_engine))


def _deserialize(api: Api, plan: bytes) -> ICudaEngine | None:
    if not plan.startswith(MAGIC) or len(plan) < len(MAGIC) + 4:
        api.log(1, "Serialization assertion magicTagRead == kMAGIC_TAG failed. Magic tag does not match")
        return None
    (n,) = struct.unpack("<I", plan[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(plan[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    if header["version"] != api.version:
        api.log(1, f"The engine plan file is not compatible with this version of TensorRT, expecting library "
                f"version {api.version} got {header['version']}, please rebuild.")
        return None
    return api.classes["ICudaEngine"](header, plan[len(MAGIC) + 4 + n :])


class ICudaEngine(_Obj):
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes) -> None:
        self._header = header
        self._onnx = onnx_bytes
        self._io = [_TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in header["inputs"]] + \
                   [_TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in header["outputs"]]
        self._n_in = len(header["inputs"])
        self._session: Any = None

    def _spec(self, name: str) -> _TensorSpec | None:
        return next((t for t in self._io if t.name == name), None)

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    def get_tensor_name(self, index: int) -> str:
        if not 0 <= index < len(self._io):
            raise IndexError(f"get_tensor_name: index {index} out of range")
        return self._io[index].name

    def get_tensor_mode(self, name: str) -> Any:
        mode = self._api.enums["TensorIOMode"]
        i = next((k for k, t in enumerate(self._io) if t.name == name), None)
        if i is None:
            return mode.NONE
        return mode.INPUT if i < self._n_in else mode.OUTPUT

    def get_tensor_shape(self, name: str) -> Dims:
        spec = self._spec(name)
        if spec is None:
            self._api.log(1, f"getTensorShape: no tensor named {name}")
            return Dims(())
        return Dims(spec.shape)

    def get_tensor_dtype(self, name: str) -> Any:
        spec = self._spec(name)
        return self._api.enums["DataType"][spec.dtype if spec else "FLOAT"]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        return [Dims(s) for s in self._header["profiles"][profile_index][name]]

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._header["profiles"])

    @property
    def device_memory_size(self) -> int:
        return 1 << 20

    def create_execution_context(self) -> IExecutionContext:
        return self._api.classes["IExecutionContext"](self)

    # -- the binding-based API (8.x, deprecated; removed in 10.0) --------------------------------
    @property
    def num_bindings(self) -> int:
        return len(self._io)

    def binding_is_input(self, index: int) -> bool:
        return index < self._n_in

    def get_binding_index(self, name: str) -> int:
        return next((k for k, t in enumerate(self._io) if t.name == name), -1)

    def get_binding_name(self, index: int) -> str:
        return self._io[index].name

    def get_binding_shape(self, index: int) -> Dims:
        return Dims(self._io[index].shape)

    def get_binding_dtype(self, index: int) -> Any:
        return self._api.enums["DataType"][self._io[index].dtype]

    def get_profile_shape(self, profile_index: int, binding: int) -> list[Dims]:
        return self.get_tensor_profile_shape(self._io[binding].name, profile_index)

    @property
    def max_batch_size(self) -> int:
        return 1

    @property
    def has_implicit_batch_dimension(self) -> bool:
        return False

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(self._onnx, providers=["CPUExecutionProvider"])
        outs = self._session.run(None, feeds)
        if self._header["fp16"] or self._header["int8"]:
            outs = [o.astype(np.float16).astype(o.dtype) if o.dtype == np.float32 else o for o in outs]
        return list(outs)


class IExecutionContext(_Obj):
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._profile = 0

    @property
    def engine(self) -> ICudaEngine:
        return self._engine

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            return False
        self._profile = profile_index
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        api, eng = self._api, self._engine
        dims = _as_dims(shape, f"set_input_shape({name!r})")
        spec = eng._spec(name)
        if spec is None or eng.get_tensor_mode(name) != api.enums["TensorIOMode"].INPUT:
            api.log(1, f"setInputShape: {name} is not an input tensor of the engine")
            return False
        lo, _, hi = eng._header["profiles"][self._profile][name]
        if len(dims) != len(spec.shape) or any(not (a <= d <= c) or (s != -1 and d != s)
                                                for d, a, c, s in zip(dims, lo, hi, spec.shape)):
            api.log(1, f"setInputShape: {name} {dims} is outside the optimization profile [{tuple(lo)}, {tuple(hi)}]")
            return False
        self._shapes[name] = dims
        return True

    def _output_shape(self, spec: _TensorSpec) -> tuple[int, ...]:
        # Classifier engines: the only dynamic output axis is the batch, taken from the inputs.
        batch = next((s[0] for s in self._shapes.values()), -1)
        return tuple(batch if d == -1 else d for d in spec.shape)

    def get_tensor_shape(self, name: str) -> Dims:
        spec = self._engine._spec(name)
        if spec is None:
            return Dims(())
        if name in self._shapes:
            return Dims(self._shapes[name])
        if self._engine.get_tensor_mode(name) == self._api.enums["TensorIOMode"].OUTPUT:
            return Dims(self._output_shape(spec))
        return Dims(spec.shape)

    def infer_shapes(self) -> list[str]:
        return [t.name for t in self._engine._io[: self._engine._n_in] if -1 in t.shape and t.name not in self._shapes]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self._engine._spec(name) is None:
            self._api.log(1, f"setTensorAddress: {name} is not an I/O tensor of the engine")
            return False
        if not isinstance(memory, (int, np.integer)) or isinstance(memory, bool):
            raise TypeError(f"set_tensor_address(): memory must be an int device pointer, got {type(memory).__name__}")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        api, eng = self._api, self._engine
        if not isinstance(stream_handle, (int, np.integer)) or isinstance(stream_handle, bool):
            raise TypeError(f"execute_async_v3(): stream_handle must be an int, got {type(stream_handle).__name__}")
        if not api.memory.is_stream(int(stream_handle)):
            api.log(1, f"enqueueV3: invalid stream handle 0x{int(stream_handle):x}")
            return False
        missing = self.infer_shapes()
        if missing:
            api.log(1, f"Not all shapes are specified. Following input tensors' dimensions are not specified: "
                    f"{', '.join(missing)}")
            return False
        for t in eng._io:
            if self._addresses.get(t.name, 0) == 0:
                kind = "input" if eng.get_tensor_mode(t.name) == api.enums["TensorIOMode"].INPUT else "output"
                api.log(1, f"Neither address or allocator is set for {kind} tensor {t.name}. Call "
                        "setInputTensorAddress, setTensorAddress or setOutputAllocator before enqueue/execute.")
                return False
        feeds = {}
        for t in eng._io[: eng._n_in]:
            shape = self._shapes.get(t.name, t.shape)
            feeds[t.name] = api.memory.view(self._addresses[t.name], _np_dtype(t.dtype), shape).copy()
        outs = eng._run(feeds)
        for t, value in zip(eng._io[eng._n_in :], outs):
            want = self._output_shape(t)
            if tuple(value.shape) != want:
                raise AssertionError(f"simulator: output {t.name} computed as {value.shape}, engine says {want}")
            api.memory.write(self._addresses[t.name], value.astype(_np_dtype(t.dtype)))
        api.state.executions += 1
        return True

    def execute_v2(self, bindings: Sequence[int]) -> bool:
        for t, ptr in zip(self._engine._io, bindings):
            self._addresses[t.name] = int(ptr)
        return self.execute_async_v3(0)

    # -- the binding-based API (8.x, deprecated; removed in 10.0) --------------------------------
    def execute_async_v2(self, bindings: Sequence[int], stream_handle: int) -> bool:
        for t, ptr in zip(self._engine._io, bindings):
            self._addresses[t.name] = int(ptr)
        return self.execute_async_v3(stream_handle)

    def set_binding_shape(self, binding: int, shape: Any) -> bool:
        return self.set_input_shape(self._engine._io[binding].name, shape)

    def get_binding_shape(self, binding: int) -> Dims:
        return self.get_tensor_shape(self._engine._io[binding].name)

    @property
    def all_binding_shapes_specified(self) -> bool:
        return not self.infer_shapes()


# -- the module -----------------------------------------------------------------------------------
def _volume(shape: Iterable[int]) -> int:
    return int(np.prod(list(shape), dtype=np.int64))


def make_tensorrt(version: str, memory: DeviceMemory, state: SimState | None = None) -> types.ModuleType:
    """A ``tensorrt`` module simulating ``version`` (major 8 (8.6), 10 or 11)."""
    parts = [int(p) for p in version.split(".")[:2]]
    major, minor = parts[0], parts[1] if len(parts) > 1 else 0
    if (major, minor) < (8, 6) or major == 9:
        raise ValueError(f"the simulator covers TensorRT 8.6, 10.x and 11.x, not {version}")
    state = state or SimState()
    state.version = version
    if major == 8:
        removed: dict[str, set[str]] = {"ParserError": {"node_name", "node_operator"}}
        deprecated = {k: set(v) for k, v in _DEPRECATED_86.items()}
    elif major == 10:
        removed = {k: set(v) for k, v in _REMOVED_10.items()}
        deprecated = {k: set(v) for k, v in _DEPRECATED_10_CALIBRATION.items()} if minor >= 1 else {}
        if minor >= 5:
            deprecated.setdefault("Builder", set()).update({"platform_has_fast_fp16", "platform_has_fast_int8"})
    else:
        removed = {k: set(v) for k, v in _REMOVED_11.items()}
        deprecated = {}
    api = Api(version, major, minor, removed, deprecated, state, memory)

    # Enums, with the members this version has.
    builder_flags = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                     "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                     "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8"]
    if major >= 10:
        builder_flags += ["BF16", "INT4", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING"]
    if major >= 11:
        gone = {"FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"}
        builder_flags = [f for f in builder_flags if f not in gone]
    if major == 8:
        creation = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}
    elif major == 10:
        creation = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
    else:
        creation = {"STRONGLY_TYPED": 0}
    dtypes = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8"] + (["BF16", "INT64", "INT4"] if major >= 10 else [])
    api.enums = {
        "BuilderFlag": enum.IntEnum("BuilderFlag", {f: i for i, f in enumerate(builder_flags)}),  # type: ignore[misc]
        "MemoryPoolType": enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1,  # type: ignore[misc]
                                                           "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3,
                                                           "TACTIC_DRAM": 4}),
        "NetworkDefinitionCreationFlag": enum.IntEnum("NetworkDefinitionCreationFlag", creation),  # type: ignore[misc]
        "TensorIOMode": enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2}),  # type: ignore[misc]
        "DataType": enum.IntEnum("DataType", {d: i for i, d in enumerate(dtypes)}),  # type: ignore[misc]
    }
    classes = [ITensor, INetworkDefinition, ParserError, OnnxParser, IOptimizationProfile, IBuilderConfig, Builder,
               Runtime, ICudaEngine, IExecutionContext]
    for base in classes:
        api.classes[base.__name__] = type(base.__name__, (base,), {"_api": api, "_public": base.__name__,
                                                                    "__module__": "tensorrt"})

    mod = types.ModuleType("tensorrt")
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.__file__ = __file__
    for name, obj in {**api.classes, **api.enums}.items():
        setattr(mod, name, obj)
    mod.ILogger = ILogger  # type: ignore[attr-defined]
    mod.Logger = Logger  # type: ignore[attr-defined]
    mod.Dims = Dims  # type: ignore[attr-defined]
    mod.IHostMemory = IHostMemory  # type: ignore[attr-defined]
    mod.volume = _volume  # type: ignore[attr-defined]
    mod.nptype = lambda dt: _np_dtype(dt.name).type  # type: ignore[attr-defined]
    if major < 11:
        algo = enum.IntEnum("CalibrationAlgoType", {"LEGACY_CALIBRATION": 0, "ENTROPY_CALIBRATION": 1,  # type: ignore[misc]
                                                    "ENTROPY_CALIBRATION_2": 2, "MINMAX_CALIBRATION": 3})

        def calibrator_class(name: str, algorithm: Any) -> type:
            return type(name, (IInt8Calibrator,), {"get_algorithm": lambda self: algorithm, "__module__": "tensorrt"})

        mod.CalibrationAlgoType = algo  # type: ignore[attr-defined]
        mod.IInt8Calibrator = IInt8Calibrator  # type: ignore[attr-defined]
        mod.IInt8EntropyCalibrator2 = calibrator_class("IInt8EntropyCalibrator2", algo.ENTROPY_CALIBRATION_2)  # type: ignore[attr-defined]
        mod.IInt8EntropyCalibrator = calibrator_class("IInt8EntropyCalibrator", algo.ENTROPY_CALIBRATION)  # type: ignore[attr-defined]
        mod.IInt8MinMaxCalibrator = calibrator_class("IInt8MinMaxCalibrator", algo.MINMAX_CALIBRATION)  # type: ignore[attr-defined]
        if major == 10 and minor >= 1:
            _record_module_access(mod, api, set(_CALIBRATOR_NAMES))
    mod._sim = api  # type: ignore[attr-defined]
    return mod


def _record_module_access(mod: types.ModuleType, api: Api, names: set[str]) -> None:
    """Module-level deprecation (10.1+: the calibrator classes): record each use."""
    values = {n: mod.__dict__.pop(n) for n in names if n in mod.__dict__}

    def __getattr__(name: str) -> Any:
        if name in values:
            api.state.deprecated_calls.append(name)
            return values[name]
        raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]


def install(monkeypatch: Any, version: str, memory: DeviceMemory) -> types.ModuleType:
    mod = make_tensorrt(version, memory)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod
