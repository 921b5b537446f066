"""A small pycuda simulator (``pycuda``, ``pycuda.driver``, ``pycuda.autoinit``,
``pycuda.autoprimaryctx``) on the shared :class:`~trt_sim.cuda_memory.DeviceMemory` registry.

It covers the part of pycuda's driver API that host/device copies use: ``mem_alloc`` (a
``DeviceAllocation`` that converts to its integer address), ``memcpy_htod``/``memcpy_dtoh`` and
their ``_async`` forms, ``Stream``, ``pagelocked_empty``, ``Device``, ``Context.synchronize``. As in
pycuda, nothing works before a context exists: ``import pycuda.autoinit`` (a new context) or
``import pycuda.autoprimaryctx`` (the device's primary context, the one PyTorch and the CUDA runtime
use) creates it (the imports are intercepted by a meta-path finder, so they run every time a test
installs the simulator; ``context_kind`` records which), and calling the driver without one raises
``LogicError`` like the real thing. With ``devices = 0`` (a machine without a GPU) both imports fail
as pycuda's do. Host arrays must be C-contiguous with the exact size of the copy, as pycuda's buffer
interface requires.

Asynchronous copies follow CUDA's rules for page-locked host memory (``pagelocked_empty`` returns a
:class:`PagelockedArray`): a device-to-host copy on a stream lands in the host buffer only when the
stream is synchronised (``Stream.synchronize``, ``Stream.is_done`` returning True, or
``Context.synchronize``). Until then the buffer holds garbage (NaN bytes) and any read of it raises
:class:`PendingCopyError`, as does writing to a host buffer that a pending host-to-device copy still
reads. Copies to or from pageable (ordinary numpy) memory complete before the call returns, as CUDA
documents for pageable memory; they are counted in ``pageable_async_copies``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from trt_sim.cuda_memory import DeviceMemory


class PendingCopyError(RuntimeError):
    """A host buffer used while an asynchronous copy into (or out of) it may still be running."""


class _HostState:
    """Shared by a page-locked buffer and every view of it: what is in flight on it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.pending_dtoh = 0  # async device->host copies into it, not yet synchronised
        self.pending_htod = 0  # async host->device copies reading it, not yet synchronised
        self.freed = False

    def check_read(self, what: str) -> None:
        if self.freed:
            raise PendingCopyError(f"{what}: the page-locked buffer was freed")
        if self.pending_dtoh:
            raise PendingCopyError(f"{what}: a device-to-host copy into this page-locked buffer is still pending; "
                                   "call stream.synchronize() before reading it")

    def check_write(self, what: str) -> None:
        self.check_read(what)
        if self.pending_htod:
            raise PendingCopyError(f"{what}: a host-to-device copy still reads this page-locked buffer; call "
                                   "stream.synchronize() before writing to it")


class HostAllocation(bytearray):
    """The memory behind a page-locked array (``array.base``), with pycuda's ``free()``."""

    state: _HostState | None = None
    owner: PycudaSim | None = None

    def free(self) -> None:
        if self.state is not None and not self.state.freed:
            self.state.freed = True
            if self.owner is not None:
                self.owner.pagelocked_frees += 1

# Methods that read the data (views such as reshape/transpose stay tracked instead).
_READ_METHODS = ("copy", "astype", "tobytes", "tolist", "item", "max", "min", "argmax", "argmin", "sum", "mean",
                 "std", "var", "all", "any", "round", "clip", "dot", "flatten", "cumsum", "prod", "sort", "argsort")
_WRITE_FUNCTIONS = ("copyto", "put", "place", "putmask", "fill_diagonal")


def _plain(value: Any) -> Any:
    """PagelockedArrays (also inside lists/tuples/dicts) as plain ndarray views of the same memory."""
    if isinstance(value, PagelockedArray):
        return np.ndarray.view(value, np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _pagelocked_in(value: Any) -> list[PagelockedArray]:
    if isinstance(value, PagelockedArray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _pagelocked_in(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _pagelocked_in(v)]
    return []


class PagelockedArray(np.ndarray):
    """What the simulated ``pagelocked_empty`` returns: an ndarray that refuses to be read while a
    device-to-host copy into it is pending, or written while a host-to-device copy reads it.
    Results computed from it (ufuncs, copies) are plain ndarrays; views of it stay tracked."""

    _pl: _HostState | None

    def __array_finalize__(self, obj: Any) -> None:
        self._pl = getattr(obj, "_pl", None)

    def _check_read(self, what: str) -> None:
        if self._pl is not None:
            self._pl.check_read(what)

    def _check_write(self, what: str) -> None:
        if self._pl is not None:
            self._pl.check_write(what)

    def __getitem__(self, key: Any) -> Any:
        self._check_read("indexing")
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check_write("assignment")
        super().__setitem__(key, _plain(value))

    def __iter__(self) -> Any:
        self._check_read("iteration")
        return iter(np.ndarray.view(self, np.ndarray))

    def __repr__(self) -> str:
        self._check_read("repr")
        return f"PagelockedArray({np.ndarray.view(self, np.ndarray)!r})"

    def __str__(self) -> str:
        self._check_read("str")
        return str(np.ndarray.view(self, np.ndarray))

    def __float__(self) -> float:
        self._check_read("float()")
        return float(np.ndarray.view(self, np.ndarray))

    def __int__(self) -> int:
        self._check_read("int()")
        return int(np.ndarray.view(self, np.ndarray))

    def __bool__(self) -> bool:
        self._check_read("bool()")
        return bool(np.ndarray.view(self, np.ndarray))

    def fill(self, value: Any) -> None:
        self._check_write("fill")
        np.ndarray.view(self, np.ndarray).fill(value)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        for a in _pagelocked_in(inputs):
            a._check_read(f"np.{ufunc.__name__}")
        for a in _pagelocked_in(kwargs.get("out", ())):
            a._check_write(f"np.{ufunc.__name__}(out=...)")
        return getattr(ufunc, method)(*_plain(inputs), **_plain(kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__name__", str(func))
        written = _pagelocked_in(args[:1]) if name in _WRITE_FUNCTIONS else []
        written += _pagelocked_in(kwargs.get("out", ()))
        for a in _pagelocked_in((args, kwargs)):
            (a._check_write if any(a is w for w in written) else a._check_read)(f"np.{name}")
        return func(*_plain(args), **_plain(kwargs))


def _reading_method(name: str) -> Any:
    def method(self: PagelockedArray, *args: Any, **kwargs: Any) -> Any:
        self._check_read(f".{name}()")
        return getattr(np.ndarray.view(self, np.ndarray), name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in _READ_METHODS:
    setattr(PagelockedArray, _name, _reading_method(_name))


class PycudaSim:
    def __init__(self, memory: DeviceMemory, device_name: str = "Simulated Orin (trt_sim)") -> None:
        self.memory = memory
        self.device_name = device_name
        self.devices = 1  # set to 0 before the context import to simulate a machine without a GPU
        self.context_ready = False
        self.context_kind: str | None = None  # "autoinit" (a new context) or "primary" (autoprimaryctx)
        self.copies_htod = 0
        self.copies_dtoh = 0
        self.pageable_async_copies = 0  # async copies from/to ordinary (not page-locked) host memory
        self.pagelocked_allocations = 0
        self.pagelocked_bytes = 0
        self.pagelocked_frees = 0
        self.streams_created = 0
        self.synchronizations = 0
        self._streams: list[Any] = []
        self.driver = self._make_driver()
        self.package = types.ModuleType("pycuda")
        self.package.__path__ = []  # a package, so ``import pycuda.driver`` resolves
        self.package.driver = self.driver  # type: ignore[attr-defined]

    # -- the modules ------------------------------------------------------------------------
    def _make_driver(self) -> types.ModuleType:
        sim = self
        drv = types.ModuleType("pycuda.driver")

        class Error(Exception):
            pass

        class LogicError(Error):
            pass

        class RuntimeError_(Error):  # pycuda.driver.RuntimeError
            pass

        RuntimeError_.__name__ = RuntimeError_.__qualname__ = "RuntimeError"

        def need_context() -> None:
            if not sim.context_ready:
                raise LogicError("cuMemAlloc failed: invalid device context - no currently active context?")

        class DeviceAllocation:
            def __init__(self, nbytes: int) -> None:
                self.ptr = sim.memory.alloc(nbytes)
                self.nbytes = nbytes
                self.freed = False

            def __int__(self) -> int:
                if self.freed:
                    raise LogicError("cannot use a freed DeviceAllocation")
                return self.ptr

            __index__ = __int__

            def free(self) -> None:
                if not self.freed:
                    sim.memory.free(self.ptr)
                    self.freed = True

        def _ptr(dest: Any) -> int:
            if isinstance(dest, (int, np.integer)):
                return int(dest)
            if isinstance(dest, DeviceAllocation):
                return int(dest)
            raise TypeError(f"expected a device pointer (int or DeviceAllocation), got {type(dest).__name__}")

        def _host(array: Any) -> np.ndarray:
            if not isinstance(array, np.ndarray):
                raise TypeError(f"expected a numpy array, got {type(array).__name__}")
            if not array.flags.c_contiguous:
                raise ValueError("host array must be C-contiguous (pycuda copies a flat buffer)")
            return array

        def mem_alloc(nbytes: int) -> DeviceAllocation:
            need_context()
            return DeviceAllocation(int(nbytes))

        def _bytes(host: np.ndarray) -> np.ndarray:
            return np.ndarray.view(host, np.ndarray).view(np.uint8).reshape(-1)

        def memcpy_htod(dest: Any, src: np.ndarray) -> None:
            need_context()
            host = _host(src)
            if isinstance(host, PagelockedArray):
                host._check_read("memcpy_htod source")
            sim.memory.write(_ptr(dest), np.ndarray.view(host, np.ndarray))
            sim.copies_htod += 1

        def memcpy_dtoh(dest: np.ndarray, src: Any) -> None:
            need_context()
            host = _host(dest)
            if isinstance(host, PagelockedArray):
                host._check_write("memcpy_dtoh destination")
            _bytes(host)[:] = np.frombuffer(sim.memory.read(_ptr(src), host.nbytes), np.uint8)
            sim.copies_dtoh += 1

        class Stream:
            def __init__(self, flags: int = 0, _handle: int | None = None) -> None:
                if _handle is None:
                    need_context()
                    sim.streams_created += 1
                self.handle = sim.memory.new_stream() if _handle is None else _handle
                self._dtoh: list[tuple[np.ndarray, np.ndarray, _HostState]] = []
                self._htod: list[_HostState] = []
                sim._streams.append(self)

            def _complete(self) -> None:
                for raw, data, state in self._dtoh:
                    state.pending_dtoh -= 1
                    if not state.freed:
                        raw[:] = data
                for state in self._htod:
                    state.pending_htod -= 1
                self._dtoh.clear()
                self._htod.clear()

            def synchronize(self) -> None:
                need_context()
                sim.synchronizations += 1
                self._complete()

            def is_done(self) -> bool:
                self._complete()  # polled until done: by then the work has finished
                return True

        default_stream = Stream(_handle=0)  # the legacy default stream (stream=None)

        def _check_stream(stream: Stream | None) -> Stream:
            if stream is not None and not isinstance(stream, Stream):
                raise TypeError(f"stream must be a pycuda Stream, got {type(stream).__name__}")
            return stream if stream is not None else default_stream

        def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream | None = None) -> None:
            s = _check_stream(stream)
            memcpy_htod(dest, src)  # the device sees the data in stream order: at once, here
            if isinstance(src, PagelockedArray) and src._pl is not None:
                src._pl.pending_htod += 1  # ...but the source must stay untouched until a synchronise
                s._htod.append(src._pl)
            else:
                sim.pageable_async_copies += 1  # pageable memory: CUDA copies it before returning

        def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream | None = None) -> None:
            s = _check_stream(stream)
            if not (isinstance(dest, PagelockedArray) and dest._pl is not None):
                sim.pageable_async_copies += 1  # pageable memory: the call returns once the copy is done
                memcpy_dtoh(dest, src)
                return
            need_context()
            host = _host(dest)
            host._check_write("memcpy_dtoh_async destination")
            raw = _bytes(host)
            data = np.frombuffer(sim.memory.read(_ptr(src), host.nbytes), np.uint8).copy()
            raw[:] = 0xFF  # until the stream is synchronised the buffer holds garbage (NaN as float)
            assert dest._pl is not None
            dest._pl.pending_dtoh += 1
            s._dtoh.append((raw, data, dest._pl))
            sim.copies_dtoh += 1

        def pagelocked_empty(shape: int | Sequence[int], dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
            need_context()
            dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
            nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
            buffer = HostAllocation(max(nbytes, 1))
            buffer.owner = sim
            array = np.ndarray.__new__(PagelockedArray, dims, dtype=dtype, buffer=buffer, order=order)
            array._pl = buffer.state = _HostState(nbytes)
            sim.pagelocked_allocations += 1
            sim.pagelocked_bytes += nbytes
            return array

        class Context:
            @staticmethod
            def synchronize() -> None:
                need_context()
                sim.synchronizations += 1
                for stream in sim._streams:
                    stream._complete()

        class Device:
            def __init__(self, ordinal: int) -> None:
                if ordinal != 0:
                    raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")

            def name(self) -> str:
                return sim.device_name

            @staticmethod
            def count() -> int:
                return sim.devices

            def compute_capability(self) -> tuple[int, int]:
                return (8, 7)  # Orin

        def init(flags: int = 0) -> None:
            pass

        for name, obj in dict(Error=Error, LogicError=LogicError, RuntimeError=RuntimeError_,
                              DeviceAllocation=DeviceAllocation, mem_alloc=mem_alloc, memcpy_htod=memcpy_htod,
                              memcpy_dtoh=memcpy_dtoh, memcpy_htod_async=memcpy_htod_async,
                              memcpy_dtoh_async=memcpy_dtoh_async, Stream=Stream, Context=Context,
                              pagelocked_empty=pagelocked_empty, PagelockedArray=PagelockedArray,
                              PendingCopyError=PendingCopyError, Device=Device, init=init).items():
            setattr(drv, name, obj)
        return drv

    def _make_context_module(self, name: str, kind: str) -> types.ModuleType:
        if self.devices < 1:
            # What pycuda raises on a machine whose driver finds no GPU (cuInit in both modules).
            raise self.driver.RuntimeError("cuInit failed: no CUDA-capable device is detected")  # type: ignore[attr-defined]
        mod = types.ModuleType(name)
        self.context_ready = True
        self.context_kind = kind
        mod.device = self.driver.Device(0)  # type: ignore[attr-defined]
        mod.context = object()  # type: ignore[attr-defined]
        return mod

    def _make_autoinit(self) -> types.ModuleType:
        return self._make_context_module("pycuda.autoinit", "autoinit")

    # -- installing -------------------------------------------------------------------------
    def finder(self) -> importlib.abc.MetaPathFinder:
        sim = self

        kinds = {"pycuda.autoinit": "autoinit", "pycuda.autoprimaryctx": "primary"}

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
                return sim._make_context_module(spec.name, kinds[spec.name])

            def exec_module(self, module: types.ModuleType) -> None:
                pass

        class _Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
                if fullname in kinds:
                    return importlib.machinery.ModuleSpec(fullname, _Loader())
                return None

        return _Finder()

    def install(self, monkeypatch: Any) -> None:
        monkeypatch.setitem(sys.modules, "pycuda", self.package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.driver)
        # Make sure ``import pycuda.autoinit`` / ``pycuda.autoprimaryctx`` run our loader now and are
        # forgotten afterwards.
        for name in ("pycuda.autoinit", "pycuda.autoprimaryctx"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [self.finder(), *sys.meta_path])
