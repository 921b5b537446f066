"""ONNX -> TensorRT engine (a serialised plan), for TensorRT 8.6 (JetPack 6.0) and 10.x (JetPack
6.1/6.2).

``tensorrt`` is imported lazily, inside the functions that need it: it exists only on the board
(or in the Dockerfile.jetson image), and the rest of edge-m2kd must import and run without it.
Each function imports it by name (``import tensorrt as trt``) so that mypy, given the
tensorrt-stubs (scripts/typecheck.sh), checks every TensorRT call made here.

API choices, all available in 8.6 and 10.x (8.6 already has the name-based API and 10.0
removed the binding-based one):
- ``Builder.build_serialized_network`` (``build_engine`` is deprecated in 8.x, gone in 10.0);
- ``BuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`` (``max_workspace_size``
  is deprecated in 8.x, gone in 10.0); on a Jetson the GPU shares the board's DRAM with the CPU,
  so the workspace is capped (256 MiB by default) rather than left to take what it finds;
- ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` only before 10.0: the 8.x ONNX parser needs an
  explicit-batch network, 10.x networks always are (the flag is deprecated and ignored) and 11.x
  removed it;
- one optimisation profile, batch 1..max_batch, for the dynamic batch axis of ``images``.
TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``, ``platform_has_fast_fp16`` and the INT8
calibrators (networks are strongly typed: precision comes from the ONNX model itself), so on
11.x and newer only ``fp32`` is built here; FP16/INT8 are refused with a message saying why.

Engines are specific to the TensorRT version and the GPU they were built on, and building one on a
Jetson takes minutes, so plans are cached under a key of (model hash, TensorRT version, GPU name,
precision, and the build settings that change the plan); a rebuild with the same key copies the
cached plan and never starts the builder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edge_m2kd.errors import UserError
from edge_m2kd.files import EXPORTS
from edge_m2kd.preprocess import to_unit
from exporters import preflight as _preflight
from exporters.artifacts import (
    metadata_path,
    prepare_output,
    read_metadata,
    sha256_bytes,
    tool_versions,
    utc_now,
    write_bytes_atomic,
    write_metadata,
)

if TYPE_CHECKING:  # for annotations only; at run time TensorRT is imported where it is used
    import tensorrt

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MIB = 256
DEFAULT_MAX_BATCH = 32
DEFAULT_CALIBRATION_SAMPLES = 512  # TensorRT's guidance: a few hundred representative images
DEFAULT_CALIBRATION_BATCH = 16

WHERE_TENSORRT_RUNS = ("build the engine on the Jetson (JetPack ships TensorRT) or in the image built from "
                       "Dockerfile.jetson")
MISSING_TENSORRT = f"TensorRT is not installed here (no `tensorrt` Python module); {WHERE_TENSORRT_RUNS}"


# -- the installed TensorRT ------------------------------------------------------------------
@dataclass(frozen=True)
class TrtVersion:
    major: int
    minor: int
    patch: int
    text: str

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> TrtVersion:
    m = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise UserError(f"cannot read the TensorRT version {text!r}; reinstall TensorRT")
    return TrtVersion(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), text.strip())


def require_tensorrt(missing: str = MISSING_TENSORRT, api: str = "Builder") -> TrtVersion:
    """The installed TensorRT's version, or the one-line UserError `missing` (where to run instead).
    `api` is a name the caller needs: the builder to export, the runtime on a device."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UserError(missing) from e
    version = getattr(trt, "__version__", None)
    # A directory named tensorrt holding only type stubs imports as an empty namespace package.
    if not isinstance(version, str) or not hasattr(trt, api):
        raise UserError(f"{missing} (the `tensorrt` found has no API: type stubs only?)")
    v = parse_version(version)
    if (v.major, v.minor) < (8, 6):
        raise UserError(f"TensorRT {v} is too old; edge-m2kd builds with TensorRT 8.6 (JetPack 6.0) or 10.x "
                        "(JetPack 6.1/6.2)")
    return v


def check_precision(v: TrtVersion, precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if v.major >= 11 and precision != "fp32":
        raise UserError(f"TensorRT {v} cannot build {precision.upper()} here: TensorRT 11 removed BuilderFlag.FP16/INT8 "
                        "and the INT8 calibrators (networks are strongly typed); build --precision fp32, or convert "
                        "the ONNX model to reduced precision first (ModelOpt AutoCast / Q-DQ quantization)")


def gpu_name() -> str:
    """What identifies the GPU an engine is built for: CUDA's device name and, on a Jetson, the
    board model (every Orin reports the GPU as "Orin", but a Nano and an AGX differ in SMs)."""
    names: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            names.append(torch.cuda.get_device_name(0))
    except Exception:  # a broken CUDA install must not stop an export; the board model still says a lot
        pass
    board = Path("/proc/device-tree/model")
    try:
        names.append(board.read_bytes().rstrip(b"\x00").decode(errors="replace").strip())
    except OSError:
        pass
    return " / ".join(n for n in names if n) or "unknown-gpu"


# -- engine cache ----------------------------------------------------------------------------
def default_cache_dir(ws: str | Path | None = None) -> Path:
    """A workspace's engines are cached inside it (they go where the workspace goes); an engine
    built from a bare ONNX file goes to $EDGE_M2KD_ENGINE_CACHE, else the user's cache."""
    if ws is not None:
        return Path(ws) / EXPORTS / "engine-cache"
    if os.environ.get("EDGE_M2KD_ENGINE_CACHE"):
        return Path(os.environ["EDGE_M2KD_ENGINE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-m2kd" / "engines"


@dataclass(frozen=True)
class EngineKey:
    model_hash: str
    tensorrt_version: str
    gpu: str
    precision: str
    max_batch: int
    opt_batch: int
    workspace_bytes: int
    calibration_hash: str | None  # INT8 only: other calibration images give other scales

    def digest(self) -> str:
        return sha256_bytes(json.dumps(asdict(self), sort_keys=True).encode())


class EngineCache:
    """``<root>/<key digest>.plan`` with ``<digest>.key.json`` (the key and the plan's sha256)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.root / f"{d}.plan", self.root / f"{d}.key.json"

    def get(self, key: EngineKey) -> bytes | None:
        plan_path, key_path = self._paths(key)
        try:
            record = json.loads(key_path.read_text())
            plan = plan_path.read_bytes()
        except (OSError, ValueError):
            return None
        # A truncated or edited plan (a power cut mid-copy) is a miss, never a crash on the board.
        if record.get("key") != asdict(key) or record.get("plan_sha256") != sha256_bytes(plan):
            return None
        return plan

    def put(self, key: EngineKey, plan: bytes) -> None:
        plan_path, key_path = self._paths(key)
        try:
            write_bytes_atomic(plan_path, plan, "engine cache")
            record = {"key": asdict(key), "plan_sha256": sha256_bytes(plan), "created": utc_now()}
            write_bytes_atomic(key_path, json.dumps(record, indent=2).encode(), "engine cache")
        except UserError:
            pass  # the cache is an optimisation: an unwritable cache must not fail the build

    def calibration_path(self, model_hash: str, v: TrtVersion, calibration_hash: str) -> Path:
        return self.root / f"{model_hash[:16]}-trt{v.major}.{v.minor}-{calibration_hash[:16]}.calib"


# -- the build -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineBuild:
    plan_path: Path
    metadata_path: Path
    cache_hit: bool
    cache_key: str
    tensorrt_version: str
    precision: str
    gpu: str
    model_hash: str


@dataclass(frozen=True)
class _Input:
    name: str
    channels: int
    height: int
    width: int


def _read_onnx(onnx_path: Path) -> tuple[bytes, onnx.ModelProto]:
    try:
        data = onnx_path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the ONNX model {onnx_path}: {e.strerror or e}") from e
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as e:  # protobuf DecodeError, onnx ValidationError, ...: all mean "not a model"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{onnx_path} is not a valid ONNX model ({first_line}); export it again with "
                        "`edge-m2kd export`") from e
    return data, proto


def _graph_input(proto: onnx.ModelProto, onnx_path: Path) -> _Input:
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path} has {len(inputs)} inputs; an edge-m2kd classifier has exactly one (images)")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{onnx_path}: input {inputs[0].name!r} has rank {len(dims)}, expected NCHW (rank 4)")
    if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        raise UserError(f"{onnx_path}: the batch axis of {inputs[0].name!r} is fixed at {dims[0].dim_value}; "
                        "export with a dynamic batch (`edge-m2kd export` does)")
    c, h, w = (d.dim_value for d in dims[1:])
    return _Input(inputs[0].name, c, h, w)


def _parse_errors(parser: tensorrt.OnnxParser, proto: onnx.ModelProto) -> str:
    """TensorRT's parser errors, each with the ONNX node it names (``ParserError.node()`` is an
    index into the graph's nodes; ``node_name()`` exists only from 10.x)."""
    messages = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        try:
            index = int(err.node())
        except Exception:
            index = -1
        if 0 <= index < len(proto.graph.node):
            node = proto.graph.node[index]
            where = f"node {node.name or '#' + str(index)!r} ({node.op_type}): "
        messages.append(where + str(err.desc()).strip())
    return "; ".join(messages) or "no error reported"


def _cuda_driver() -> Any:
    """pycuda's driver module, with a CUDA context made current on device 0."""
    try:
        import pycuda.autoinit  # noqa: F401 - importing it creates the context
        import pycuda.driver as cuda
    except ImportError as e:
        raise UserError("INT8 calibration copies the exemplar images to the GPU through pycuda, which is not "
                        "installed: install edge-m2kd[jetson] on the board (the Dockerfile.jetson image has it), "
                        "or build --precision fp16") from e
    except Exception as e:  # pycuda present, CUDA not: no driver, no device
        raise UserError(f"CUDA could not start for INT8 calibration ({e}); check the GPU driver, or build "
                        "--precision fp16") from e
    return cuda


def _make_calibrator(images: np.ndarray, batch_size: int, cache_file: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 that feeds the exemplars (uint8 NHWC, converted batch by batch
    so a large store never sits in memory as float32) through one device buffer."""
    import tensorrt as trt

    cuda = _cuda_driver()
    per_image = int(np.prod(to_unit(images[:1]).shape[1:])) * 4

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            # pybind11 trampolines: the base __init__ must be called explicitly.
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.position = 0
            self.batches = 0
            self.device_input = cuda.mem_alloc(batch_size * per_image)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int]:
            if self.position >= len(images):
                return []  # no more batches
            # Exactly batch_size images (the calibration profile's shape), wrapping at the end.
            idx = (self.position + np.arange(batch_size)) % len(images)
            self.position += batch_size
            self.batches += 1
            batch = np.ascontiguousarray(to_unit(images[idx]).numpy(), dtype=np.float32)
            cuda.memcpy_htod(self.device_input, batch)
            return [int(self.device_input)]

        # TensorRT's documented contract: the cache, or None when there is none (calibrate).
        def read_calibration_cache(self) -> bytes | None:
            if cache_file is not None and cache_file.is_file():
                return cache_file.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_file is not None:
                try:
                    write_bytes_atomic(cache_file, bytes(cache), "INT8 calibration cache")
                except UserError:
                    pass  # a cache we cannot write only costs a recalibration next time

        def free(self) -> None:
            self.device_input.free()

    return EntropyCalibrator()


def _build_plan(
    v: TrtVersion,
    data: bytes,
    proto: onnx.ModelProto,
    inp: _Input,
    precision: str,
    max_batch: int,
    opt_batch: int,
    workspace_bytes: int,
    calibration: tuple[np.ndarray, int, Path | None] | None,
) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if v.major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        raise UserError(f"TensorRT {v}'s ONNX parser rejected the model: {_parse_errors(parser, proto)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    chw = (inp.channels, inp.height, inp.width)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, trt.Dims([1, *chw]), trt.Dims([opt_batch, *chw]), trt.Dims([max_batch, *chw]))
    if config.add_optimization_profile(profile) < 0:
        raise UserError(f"TensorRT rejected the optimisation profile batch 1/{opt_batch}/{max_batch} for "
                        f"{inp.name} {chw}; check --max-batch")

    calibrator: Any = None
    if precision in ("fp16", "int8"):
        if builder.platform_has_fast_fp16:
            # Also for INT8: layers TensorRT cannot run in INT8 then fall back to FP16, not FP32.
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "fp16":
            raise UserError("this GPU has no fast FP16 (TensorRT's platform_has_fast_fp16 is false); "
                            "build --precision fp32")
    if precision == "int8":
        if not builder.platform_has_fast_int8:
            raise UserError("this GPU has no fast INT8 (TensorRT's platform_has_fast_int8 is false); "
                            "build --precision fp16")
        assert calibration is not None
        images, calib_batch, cache_file = calibration
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _make_calibrator(images, calib_batch, cache_file)
        config.int8_calibrator = calibrator
        # With a dynamic batch, calibration runs at the calibration profile's shape; the
        # calibrator hands over batches of exactly that many images.
        calib_profile = builder.create_optimization_profile()
        shape = [calib_batch, *chw]
        calib_profile.set_shape(inp.name, trt.Dims(shape), trt.Dims(shape), trt.Dims(shape))
        if not config.set_calibration_profile(calib_profile):
            raise UserError(f"TensorRT rejected the INT8 calibration profile {tuple(shape)}")

    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if plan is None:
        raise UserError(f"TensorRT {v} could not build the engine (its log above says why); try a larger "
                        "--workspace or a smaller --max-batch")
    return bytes(plan)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    calibration_images: np.ndarray | None = None,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    cache_dir: str | Path | None = None,
    gpu: str | None = None,
    metadata: dict[str, Any] | None = None,
    on_build: Callable[[], None] | None = None,
) -> EngineBuild:
    """Build (or fetch from the cache) the engine for ``onnx_path`` and write ``plan_path`` with
    ``<plan_path>.json`` beside it.

    ``metadata`` is the ONNX export's metadata; by default it is read from ``<onnx_path>.json``.
    ``calibration_images`` (uint8 NHWC, the exemplar store) are required for ``int8``.
    ``on_build`` is called just before a real build starts (never on a cache hit): progress output.
    """
    v = require_tensorrt()
    check_precision(v, precision)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}")
    opt = opt_batch if opt_batch is not None else max(1, max_batch // 2)
    if not 1 <= opt <= max_batch:
        raise UserError(f"the optimisation batch {opt} must lie in 1..{max_batch}")
    if workspace_mib < 1:
        raise UserError(f"the workspace must be at least 1 MiB, got {workspace_mib}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    plan_path = prepare_output(plan_path, "TensorRT engine")

    data, proto = _read_onnx(onnx_path)
    problems = _preflight.preflight(proto, v.text)
    if _preflight.errors(problems):
        raise UserError(f"{onnx_path} would not build with TensorRT {v}: "
                        f"{_preflight.summary(_preflight.errors(problems))}")
    inp = _graph_input(proto, onnx_path)
    model_hash = sha256_bytes(data)

    base = dict(metadata) if metadata is not None else (
        read_metadata(onnx_path) if metadata_path(onnx_path).is_file() else None)
    if base is None:
        raise UserError(f"{metadata_path(onnx_path)} is missing (class names, input contract); export the model "
                        "again with `edge-m2kd export`")
    if base.get("model_hash") not in (None, model_hash):
        raise UserError(f"{onnx_path} does not match its metadata (model hash differs): the file changed after "
                        "export; export the model again")

    calibration: tuple[np.ndarray, int, Path | None] | None = None
    calibration_hash: str | None = None
    cache = EngineCache(cache_dir if cache_dir is not None else default_cache_dir())
    if precision == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise UserError("INT8 needs calibration images and the exemplar store is empty; build --precision fp16")
        expected = (inp.height, inp.width, inp.channels)
        if calibration_images.ndim != 4 or calibration_images.shape[1:] != expected or \
                calibration_images.dtype != np.uint8:
            raise UserError(f"calibration images are {calibration_images.dtype} {tuple(calibration_images.shape)}, "
                            f"expected uint8 (N, {expected[0]}, {expected[1]}, {expected[2]})")
        images = calibration_images
        if len(images) > calibration_samples:
            images = images[np.unique(np.linspace(0, len(images) - 1, calibration_samples).round().astype(np.int64))]
        calibration_hash = sha256_bytes(np.ascontiguousarray(images).tobytes())
        calib_batch = min(DEFAULT_CALIBRATION_BATCH, max_batch, len(images))
        calibration = (images, calib_batch, cache.calibration_path(model_hash, v, calibration_hash))

    gpu = gpu or gpu_name()
    key = EngineKey(model_hash, v.text, gpu, precision, max_batch, opt, workspace_mib * 2**20, calibration_hash)
    plan = cache.get(key)
    cache_hit = plan is not None
    if plan is None:
        if on_build is not None:
            on_build()
        plan = _build_plan(v, data, proto, inp, precision, max_batch, opt, workspace_mib * 2**20, calibration)
        cache.put(key, plan)
    write_bytes_atomic(plan_path, plan, "TensorRT engine")

    meta = {k: val for k, val in base.items() if k not in ("format", "format_version", "artifact", "parity")}
    meta.update({
        "kind": "tensorrt",
        "model_hash": model_hash,
        "onnx": onnx_path.name,
        "onnx_parity": base.get("parity"),
        "precision": precision,
        "engine": {
            "batch": {"min": 1, "opt": opt, "max": max_batch},
            "workspace_mib": workspace_mib,
            "gpu": gpu,
            "cache_key": key.digest(),
            "plan_sha256": sha256_bytes(plan),
            "calibration": None if calibration is None else {
                "samples": len(calibration[0]), "batch": calibration[1], "images_sha256": calibration_hash},
        },
        "tools": tool_versions(v.text),
        "created": utc_now(),
    })
    meta_path = write_metadata(plan_path, meta)
    return EngineBuild(plan_path, meta_path, cache_hit, key.digest(), v.text, precision, gpu, model_hash)
