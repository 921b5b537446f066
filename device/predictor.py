"""One predictor interface over three runtimes: TensorRT (pycuda buffers), onnxruntime, PyTorch.

Every backend takes uint8 NHWC RGB images at the model's input size and returns logits (float32,
images x classes, in ``class_names`` order), in chunks of at most ``max_batch`` images. What
happens to the pixels is the same everywhere and the same as in training
(:func:`edge_m2kd.preprocess.to_unit`): divide by 255 in float32, transpose to NCHW. The exported
graphs fold the mean/std normalisation in; the metadata says so (``input.normalization.folded``)
and an export that did not fold it is normalised here instead.

- ``tensorrt``: a serialised engine (``edge-m2kd export WS --tensorrt PATH``). One execution
  context, I/O by tensor name (the API TensorRT 8.6 and 10.x share), page-locked host buffers and
  device buffers allocated once for the engine's maximum batch and reused by every call, one
  stream, the device's primary CUDA context (``pycuda.autoprimaryctx``: the context PyTorch and
  the CUDA runtime use, so all three live in one process). TensorRT and pycuda are imported only
  here, when this backend is opened. An engine runs only on the TensorRT that built it: the
  version recorded in its metadata is compared with the installed one before deserialising.
- ``onnxruntime``: the ONNX export (``WS/exports/model.onnx``), on the CUDA execution provider
  where onnxruntime has it, else the CPU.
- ``torch``: the workspace's own deployed model, the reference the others are checked against.

Artifacts are not exported on the fly: an export runs the parity gate and takes a while, so a
missing or out-of-date export is a one-line error naming the command to run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edge_m2kd.config import DEVICES
from edge_m2kd.errors import UserError
from edge_m2kd.files import default_engine_path, default_onnx_path
from edge_m2kd.hashing import sha256

if TYPE_CHECKING:  # annotations only: TensorRT and torch are imported where they are used
    import tensorrt
    import torch

BACKENDS = ("tensorrt", "onnxruntime", "torch")
DEFAULT_MAX_BATCH = 32  # chunk size for onnxruntime and PyTorch (TensorRT: the engine's profile)


# -- the interface ------------------------------------------------------------------------------
@runtime_checkable
class Predictor(Protocol):
    """What every backend offers. ``predict`` takes uint8 NHWC RGB images of ``input_size`` and
    returns float32 logits (images x classes); more images than ``max_batch`` are run in chunks."""

    backend: str
    device: str
    class_names: list[str]
    input_size: int
    max_batch: int

    def predict(self, images: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


# -- shared pieces: pixels in, results out --------------------------------------------------------
def check_images(images: np.ndarray, size: int) -> np.ndarray:
    # The check is the core's (exports check their probe images with it too); imported here,
    # not at the top, because edge_m2kd.data brings torch and the TensorRT path runs without it.
    from edge_m2kd.data.sources import check_images as check

    return check(images, size, hint="read them with device.predictor.read_images")


def preprocess(images: np.ndarray, size: int, normalization: tuple[np.ndarray, np.ndarray] | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1], bit for bit what :func:`edge_m2kd.preprocess.to_unit`
    gives (one correctly rounded float32 division per pixel). ``normalization`` (mean, std per
    channel) only for an export whose graph does not fold it. ``out``: write into this buffer
    (a page-locked host buffer) instead of a new array."""
    images = check_images(images, size)
    nchw = images.transpose(0, 3, 1, 2)
    if out is None:
        out = np.empty(nchw.shape, dtype=np.float32)
    np.divide(nchw, np.float32(255.0), out=out, dtype=np.float32)
    if normalization is not None:
        mean, std = normalization
        np.subtract(out, mean, out=out)
        np.divide(out, std, out=out)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, class_names: Sequence[str], k: int = 1) -> list[list[dict[str, Any]]]:
    """Per image, the ``k`` best classes with their softmax scores, best first (ties: lower index)."""
    if k < 1:
        raise UserError(f"--top-k must be at least 1, got {k}")
    scores = softmax(logits)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[{"class": class_names[int(i)], "score": float(row[i])} for i in idx] for row, idx in zip(scores, order)]


def format_predictions(names: Sequence[str], logits: np.ndarray, class_names: Sequence[str], k: int = 1,
                       backend: str | None = None) -> dict[str, Any]:
    """The ``predict`` report, one shape for every backend (and for ``edge_m2kd.commands.predict``):
    ``{"backend": ..., "results": [{"image": name, "predictions": [{"class", "score"}, ...]}]}``."""
    if len(names) != len(logits):
        raise ValueError(f"{len(names)} image names for {len(logits)} rows of logits")
    results = [{"image": str(n), "predictions": p} for n, p in zip(names, top_k(logits, class_names, k))]
    return {"backend": backend, "results": results}


def read_images(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Image files -> uint8 (N, size, size, 3) RGB, decoded exactly as training decodes its image
    folders (:func:`edge_m2kd.data.sources.load_image_folder`: EXIF rotation applied, any mode to
    8-bit RGB, PIL bilinear resize). A file that cannot be read is a one-line UserError."""
    from edge_m2kd.data.sources import _decode

    if not paths:
        raise UserError("no images given; name at least one image file")
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"image {str(p)!r} does not exist (or is not a file); check the path")
        try:
            out.append(_decode(str(p), size))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for one meaning: unreadable
            raise UserError(f"cannot read image {str(p)!r} ({type(e).__name__}); check the file") from e
    return np.stack(out)


# -- metadata ---------------------------------------------------------------------------------------
def _input_contract(meta: dict[str, Any], path: Path) -> tuple[str, str, int, tuple[np.ndarray, np.ndarray] | None]:
    """(input name, output name, input size, normalisation to apply or None) from export metadata."""
    inp, outp = meta.get("input") or {}, meta.get("output") or {}
    shape = inp.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]
            and isinstance(shape[2], int) and shape[2] > 0):
        raise UserError(f"{path}.json: input shape {shape!r} is not [-1, 3, S, S]; export the model again")
    if (inp.get("layout"), inp.get("dtype"), inp.get("color")) != ("NCHW", "float32", "RGB") or \
            [float(v) for v in inp.get("range", [])] != [0.0, 1.0]:
        raise UserError(f"{path}.json: the input contract is not float32 NCHW RGB in [0, 1]; export the model again")
    if not isinstance(meta.get("class_names"), list) or not meta["class_names"]:
        raise UserError(f"{path}.json has no class names; export the model again")
    norm = inp.get("normalization") or {}
    to_apply = None
    if not norm.get("folded", False):
        mean = np.asarray(norm.get("mean"), dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(norm.get("std"), dtype=np.float32).reshape(1, 3, 1, 1)
        to_apply = (mean, std)
    return str(inp.get("name")), str(outp.get("name")), int(shape[2]), to_apply


def _read_artifact_metadata(path: Path, kind: str, what: str, how: str) -> dict[str, Any]:
    from exporters.artifacts import metadata_path, read_metadata

    if not path.is_file():
        raise UserError(f"no {what} at {path}; {how}")
    if not metadata_path(path).is_file():
        raise UserError(f"{metadata_path(path)} (class names, input contract) is missing; {how}")
    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise UserError(f"{path} is a {meta.get('kind')!r} export, not {kind!r}; {how}")
    return meta


# -- the chunking every backend shares ----------------------------------------------------------------
class _Base:
    backend = ""
    device = "cpu"
    class_names: list[str]
    input_size: int
    max_batch: int

    def __init__(self) -> None:
        self.runs = 0  # backend invocations (chunks), for tests and benchmarks
        self.device_bytes = 0  # bytes this predictor allocated on the GPU itself (TensorRT buffers)
        self.closed = False

    def _run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> np.ndarray:
        if self.closed:
            raise RuntimeError(f"the {self.backend} predictor was closed")
        images = check_images(images, self.input_size)
        n = len(images)
        if n == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        outs = []
        for start in range(0, n, self.max_batch):
            outs.append(self._run(images[start : start + self.max_batch]))
            self.runs += 1
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _Base:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- PyTorch -------------------------------------------------------------------------------------------
class TorchPredictor(_Base):
    """The deployed PyTorch model itself: the reference, and the fallback without an export."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], input_size: int, *,
                 max_batch: int = DEFAULT_MAX_BATCH, device: str = "cpu") -> None:
        import torch

        super().__init__()
        if max_batch < 1:
            raise UserError(f"max_batch must be at least 1, got {max_batch}")
        self._torch = torch
        from edge_m2kd.learner import resolve_device  # torch is imported only for this backend

        self._device = resolve_device(device)
        self.device = self._device.type
        self.model: torch.nn.Module | None = model.to(self._device).eval()
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        self.max_batch = int(max_batch)

    @classmethod
    def from_workspace(cls, ws: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH, device: str = "auto") -> TorchPredictor:
        from edge_m2kd.commands import open_for_reading

        _, learner = open_for_reading(ws)
        if learner.steps_done == 0:
            raise UserError(f"{ws} has learned no classes yet; run `edge-m2kd add-classes` first")
        return cls(learner.deployed(), learner.class_names, learner.cfg.model.input_size, max_batch=max_batch,
                   device=device)

    def _run(self, images: np.ndarray) -> np.ndarray:
        from edge_m2kd.preprocess import to_unit

        assert self.model is not None
        with self._torch.inference_mode():
            logits = self.model(to_unit(images).to(self._device))
        return logits.float().cpu().numpy()

    def close(self) -> None:
        super().close()
        self.model = None  # a workspace's model is referenced only here: its memory goes back


# -- onnxruntime ---------------------------------------------------------------------------------------
class OnnxRuntimePredictor(_Base):
    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH, device: str = "auto",
                 threads: int | None = None, export_hint: str = "export the model with `edge-m2kd export WS`") -> None:
        import onnxruntime as ort

        super().__init__()
        if max_batch < 1:
            raise UserError(f"max_batch must be at least 1, got {max_batch}")
        if device not in DEVICES:  # onnxruntime picks providers, not a CUDA index
            raise UserError(f"unknown device {device!r}; choose auto, cpu or cuda")
        path = Path(onnx_path)
        meta = _read_artifact_metadata(path, "onnx", "ONNX export", export_hint)
        if meta.get("model_hash") not in (None, sha256(path)):
            raise UserError(f"{path} does not match its metadata (model hash differs): the file changed after "
                            f"export; {export_hint}")
        self.meta = meta
        self._in, self._out, self.input_size, self._norm = _input_contract(meta, path)
        self.class_names = list(meta["class_names"])
        self.max_batch = int(max_batch)

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UserError(f"onnxruntime here has no CUDA execution provider (it has {', '.join(available)}); "
                            "install onnxruntime-gpu, or use --device cpu")
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        # onnxruntime falls back to the CPU quietly when the CUDA provider fails to load; say what runs.
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise UserError("onnxruntime could not start its CUDA execution provider (CUDA/cuDNN libraries?); "
                            "use --device cpu")
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != ([self._in], [self._out]):
            raise UserError(f"{path} has inputs/outputs {names}, its metadata says {self._in!r}/{self._out!r}; "
                            f"{export_hint}")

    def _run(self, images: np.ndarray) -> np.ndarray:
        x = preprocess(images, self.input_size, self._norm)
        return np.asarray(self.session.run([self._out], {self._in: x})[0], dtype=np.float32)

    def close(self) -> None:
        super().close()
        self.session = None


# -- TensorRT ----------------------------------------------------------------------------------------
NO_TENSORRT = ("--backend tensorrt needs TensorRT, which is not installed here (no `tensorrt` Python module); run it "
               "on the Jetson (JetPack ships TensorRT) or in the Dockerfile.jetson image, or use --backend onnxruntime")


def _tensorrt_version() -> str:
    """The installed TensorRT's version, or the one-line error for a machine without it."""
    from exporters.tensorrt_build import require_tensorrt

    return require_tensorrt(NO_TENSORRT, api="Runtime").text


def _import_pycuda() -> Any:
    """pycuda's driver with the device's primary context current (autoprimaryctx: the context the
    CUDA runtime, TensorRT and PyTorch use; autoinit would make a second one)."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise UserError(f"--backend tensorrt copies images to the GPU through pycuda, which cannot be imported "
                        f"({e}); install edge-m2kd[jetson] on the board (the Dockerfile.jetson image has it), or use "
                        "--backend onnxruntime") from e
    try:
        import pycuda.autoprimaryctx  # noqa: F401 - importing it makes the primary context current
    except ImportError as e:
        raise UserError(f"this pycuda has no autoprimaryctx ({e}); install pycuda >= 2021.1 "
                        "(edge-m2kd[jetson])") from e
    except Exception as e:  # pycuda.driver.Error and friends: no driver, no device
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--backend tensorrt needs a CUDA GPU and CUDA could not start here ({first}); check the "
                        "GPU driver, or use --backend onnxruntime") from e
    return cuda


def tensorrt_unavailable() -> str | None:
    """None when the TensorRT backend can run here (TensorRT, pycuda and a GPU), else why not, in
    one line. Imports pycuda.autoprimaryctx when they are all there."""
    try:
        _tensorrt_version()
        _import_pycuda()
    except UserError as e:
        return str(e)
    return None


def rebuild_command(ws: str | Path | None, plan: Path) -> str:
    return f"edge-m2kd export {ws if ws is not None else 'WS'} --tensorrt {plan}"


class TensorRTPredictor(_Base):
    """A TensorRT engine behind :class:`Predictor`. Buffers for ``max_batch`` images (the engine's
    optimisation profile maximum) are allocated once, page-locked on the host and on the device,
    and reused: a call copies its chunk in on the stream, runs, copies the logits back on the same
    stream and synchronises before the host buffer is read."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, plan_path: str | Path, *, workspace: str | Path | None = None) -> None:
        super().__init__()
        plan_path = Path(plan_path)
        hint = f"build it on the board with `{rebuild_command(workspace, plan_path)}`"
        installed = _tensorrt_version()
        cuda = _import_pycuda()
        meta = _read_artifact_metadata(plan_path, "tensorrt", "TensorRT engine", hint)
        built = str((meta.get("tools") or {}).get("tensorrt")).strip()
        # Before deserialising: a plan from another TensorRT fails there with a long log, or worse.
        if built != installed:
            raise UserError(f"{plan_path} was built by TensorRT {built} and this is TensorRT {installed}; an engine runs "
                            f"only on the TensorRT that built it: rebuild it here with "
                            f"`{rebuild_command(workspace, plan_path)}`")
        plan = plan_path.read_bytes()
        want = (meta.get("engine") or {}).get("plan_sha256")
        if want is not None and hashlib.sha256(plan).hexdigest() != want:
            raise UserError(f"{plan_path} does not match its metadata (the plan changed after it was built); "
                            f"rebuild it with `{rebuild_command(workspace, plan_path)}`")
        self.meta = meta
        self._in, self._out, self.input_size, self._norm = _input_contract(meta, plan_path)
        self.class_names = list(meta["class_names"])
        self.tensorrt_version = installed
        self._cuda = cuda
        self._allocations: list[Any] = []  # pycuda DeviceAllocations, freed by close()
        self._host: list[np.ndarray] = []  # page-locked host buffers, freed by close()
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        try:
            self._setup(plan, plan_path)
        except BaseException:
            self.close()
            raise

    def _setup(self, plan: bytes, plan_path: Path) -> None:
        import tensorrt as trt

        cuda = self._cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(f"TensorRT could not deserialise {plan_path} (its log above says why); rebuild it")
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if (inputs, outputs) != ([self._in], [self._out]):
            raise UserError(f"{plan_path} has inputs {inputs} and outputs {outputs}, its metadata says {self._in!r} "
                            f"and {self._out!r}; rebuild it")
        in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._in)))
        if in_dtype != np.float32:
            raise UserError(f"{plan_path}: input {self._in!r} is {in_dtype}, expected float32; rebuild it")
        out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._out)))
        profile_max = engine.get_tensor_profile_shape(self._in, 0)[2]  # [min, opt, max] of profile 0
        chw = (3, self.input_size, self.input_size)
        if len(profile_max) != 4 or tuple(profile_max[i] for i in range(1, 4)) != chw:
            raise UserError(f"{plan_path}: the engine's input is {[profile_max[i] for i in range(len(profile_max))]}, "
                            f"its metadata says (N, {', '.join(map(str, chw))}); rebuild it")
        self.max_batch = int(profile_max[0])
        out_shape = engine.get_tensor_shape(self._out)
        classes = int(out_shape[len(out_shape) - 1])
        if classes != len(self.class_names):
            raise UserError(f"{plan_path}: the engine has {classes} outputs for {len(self.class_names)} class names; "
                            "rebuild it")
        self._context = engine.create_execution_context()

        # Once, for the largest batch the engine accepts: page-locked host memory (what makes the
        # copies asynchronous) and device memory, reused by every call.
        self._h_in = cuda.pagelocked_empty((self.max_batch, *chw), np.float32)
        self._host.append(self._h_in)
        self._h_out = cuda.pagelocked_empty((self.max_batch, classes), out_dtype)
        self._host.append(self._h_out)
        self._d_in = cuda.mem_alloc(self._h_in.nbytes)
        self._allocations.append(self._d_in)
        self._d_out = cuda.mem_alloc(self._h_out.nbytes)
        self._allocations.append(self._d_out)
        self.device_bytes = int(self._h_in.nbytes + self._h_out.nbytes)
        self.host_pinned_bytes = self.device_bytes
        self.engine_device_bytes = _engine_device_memory(engine)
        self._stream = cuda.Stream()
        for name, buffer in ((self._in, self._d_in), (self._out, self._d_out)):
            if not self._context.set_tensor_address(name, int(buffer)):
                raise RuntimeError(f"TensorRT refused the device address of {name!r}")
        self._batch = 0  # the batch of the input shape last set on the context

    def _run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        cuda, context, stream = self._cuda, self._context, self._stream
        assert context is not None
        if n != self._batch:
            if not context.set_input_shape(self._in, (n, 3, self.input_size, self.input_size)):
                raise RuntimeError(f"TensorRT refused the input shape ({n}, 3, {self.input_size}, {self.input_size})")
            self._batch = n
        h_in, h_out = self._h_in[:n], self._h_out[:n]
        preprocess(images, self.input_size, self._norm, out=h_in)
        cuda.memcpy_htod_async(self._d_in, h_in, stream)
        if not context.execute_async_v3(stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (TensorRT's log says why)")
        cuda.memcpy_dtoh_async(h_out, self._d_out, stream)
        stream.synchronize()  # only now has the copy into h_out landed
        return h_out.astype(np.float32, copy=True)  # a copy: the next call reuses the buffer

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for buffer in self._allocations:
            buffer.free()
        self._allocations = []
        for array in self._host:
            free = getattr(array.base, "free", None)  # pycuda's HostAllocation
            if callable(free):
                free()
        self._host = []
        self._context = None
        self._engine = None
        self._runtime = None


def _engine_device_memory(engine: Any) -> int | None:
    """The activation memory TensorRT allocates for an execution context (10.1+: ``_v2``)."""
    for name in ("device_memory_size_v2", "device_memory_size"):
        try:
            value = getattr(engine, name)
        except AttributeError:
            continue
        return int(value)
    return None


# -- the workspace-level entry points ----------------------------------------------------------------------
def check_export_is_current(ws: str | Path, meta: dict[str, Any], artifact: Path, command: str) -> None:
    """An export made before the last ``add-classes`` has the old classes: refuse it."""
    from edge_m2kd.workspace import Workspace

    manifest = Workspace.open(ws).manifest
    steps = len(manifest["history"])
    if steps == 0:
        raise UserError(f"{ws} has learned no classes yet; run `edge-m2kd add-classes` first")
    names = [c["name"] for c in manifest["classes"]]
    exported = (meta.get("workspace") or {}).get("steps_done")
    if exported != steps or meta.get("class_names") != names:
        raise UserError(f"{artifact} was exported at step {exported} with {len(meta.get('class_names') or [])} "
                        f"classes, but {ws} is at step {steps} with {len(names)}; export it again: `{command}`")


def open_predictor(
    ws: str | Path,
    backend: str = "torch",
    *,
    engine: str | Path | None = None,
    onnx: str | Path | None = None,
    max_batch: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    check_current: bool = True,
) -> Predictor:
    """The predictor for workspace ``ws`` on ``backend`` (tensorrt | onnxruntime | torch).

    ``engine``/``onnx``: artifact paths (default ``WS/exports/model.plan`` / ``model.onnx``).
    ``max_batch``: chunk size for onnxruntime and PyTorch (TensorRT uses its engine's maximum).
    ``device``: auto | cpu | cuda for onnxruntime and PyTorch. ``threads``: onnxruntime intra-op
    threads. ``check_current``: refuse an export older than the workspace's last step.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    chunk = DEFAULT_MAX_BATCH if max_batch is None else int(max_batch)
    if backend == "torch":
        return TorchPredictor.from_workspace(ws, max_batch=chunk, device=device)
    if backend == "onnxruntime":
        path = Path(onnx) if onnx is not None else default_onnx_path(ws)
        command = f"edge-m2kd export {ws}" + (f" --onnx {path}" if onnx is not None else "")
        ort_predictor = OnnxRuntimePredictor(path, max_batch=chunk, device=device, threads=threads,
                                             export_hint=f"export it first: `{command}`")
        if check_current:
            check_export_is_current(ws, ort_predictor.meta, path, command)
        return ort_predictor
    plan = Path(engine) if engine is not None else default_engine_path(ws)
    trt_predictor = TensorRTPredictor(plan, workspace=ws)
    if check_current:
        try:
            check_export_is_current(ws, trt_predictor.meta, plan, rebuild_command(ws, plan))
        except UserError:
            trt_predictor.close()
            raise
    return trt_predictor


def predict_images(
    ws: str | Path,
    images: Sequence[str | Path],
    backend: str = "torch",
    top_k: int = 1,
    *,
    engine: str | Path | None = None,
    onnx: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """``edge-m2kd predict WS IMAGE... --backend B``: class names and softmax scores per image,
    best first: ``{"backend", "device", "results": [{"image", "predictions": [{"class", "score"}]}]}``."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    predictor = open_predictor(ws, backend, engine=engine, onnx=onnx, device=device)
    try:
        pixels = read_images(list(images), predictor.input_size)
        logits = predictor.predict(pixels)
        report = format_predictions([str(p) for p in images], logits, predictor.class_names, top_k, backend)
        report["device"] = predictor.device
        return report
    finally:
        predictor.close()


def open_preferred_predictor(ws: str | Path, *, device: str = "auto") -> tuple[Predictor, list[str]]:
    """The fastest predictor this device can run for ``ws`` now: TensorRT where it is installed
    and the workspace has a current engine, else onnxruntime on a current ONNX export, else the
    workspace's own PyTorch model (always current). Also why each faster one was passed over, one
    line each (e.g. an export made before the last step). For ``serve``, which must answer with
    whatever is there rather than ask the user to pick a backend."""
    passed_over = []
    for backend in BACKENDS[:-1]:
        if backend == "tensorrt" and (why := tensorrt_unavailable()) is not None:
            passed_over.append(f"tensorrt: {why}")
            continue
        try:
            return open_predictor(ws, backend, device=device), passed_over
        except UserError as e:
            passed_over.append(f"{backend}: {e}")
    return open_predictor(ws, "torch", device=device), passed_over
