"""A small pycuda simulator (``pycuda``, ``pycuda.driver``, ``pycuda.autoinit``) on the shared
:class:`~trt_sim.cuda_memory.DeviceMemory` registry.

It covers the part of pycuda's driver API that host/device copies use: ``mem_alloc`` (a
``DeviceAllocation`` that converts to its integer address), ``memcpy_htod``/``memcpy_dtoh`` and
their ``_async`` forms, ``Stream``, ``pagelocked_empty``, ``Device``. As in pycuda, nothing works
before a context exists: ``import pycuda.autoinit`` creates it (the import is intercepted by a
meta-path finder, so it runs every time a test installs the simulator), and calling the driver
without one raises ``LogicError`` like the real thing. Host arrays must be C-contiguous with the
exact size of the copy, as pycuda's buffer interface requires.
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


class PycudaSim:
    def __init__(self, memory: DeviceMemory, device_name: str = "Simulated Orin (trt_sim)") -> None:
        self.memory = memory
        self.device_name = device_name
        self.context_ready = False
        self.copies_htod = 0
        self.copies_dtoh = 0
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

        def memcpy_htod(dest: Any, src: np.ndarray) -> None:
            need_context()
            sim.memory.write(_ptr(dest), _host(src))
            sim.copies_htod += 1

        def memcpy_dtoh(dest: np.ndarray, src: Any) -> None:
            need_context()
            host = _host(dest)
            host.view(np.uint8).reshape(-1)[:] = np.frombuffer(sim.memory.read(_ptr(src), host.nbytes), np.uint8)
            sim.copies_dtoh += 1

        class Stream:
            def __init__(self, flags: int = 0) -> None:
                need_context()
                self.handle = sim.memory.new_stream()

            def synchronize(self) -> None:
                pass  # copies and launches complete synchronously in the simulator

            def is_done(self) -> bool:
                return True

        def _check_stream(stream: Stream | None) -> None:
            if stream is not None and not isinstance(stream, Stream):
                raise TypeError(f"stream must be a pycuda Stream, got {type(stream).__name__}")

        def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Stream | None = None) -> None:
            _check_stream(stream)
            memcpy_htod(dest, src)

        def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Stream | None = None) -> None:
            _check_stream(stream)
            memcpy_dtoh(dest, src)

        def pagelocked_empty(shape: int | Sequence[int], dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
            need_context()
            return np.empty(shape, dtype=dtype, order=order)  # type: ignore[call-overload]

        class Device:
            def __init__(self, ordinal: int) -> None:
                if ordinal != 0:
                    raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")

            def name(self) -> str:
                return sim.device_name

            @staticmethod
            def count() -> int:
                return 1

            def compute_capability(self) -> tuple[int, int]:
                return (8, 7)  # Orin

        def init(flags: int = 0) -> None:
            pass

        for name, obj in dict(Error=Error, LogicError=LogicError, DeviceAllocation=DeviceAllocation,
                              mem_alloc=mem_alloc, memcpy_htod=memcpy_htod, memcpy_dtoh=memcpy_dtoh,
                              memcpy_htod_async=memcpy_htod_async, memcpy_dtoh_async=memcpy_dtoh_async,
                              Stream=Stream, pagelocked_empty=pagelocked_empty, Device=Device, init=init).items():
            setattr(drv, name, obj)
        return drv

    def _make_autoinit(self) -> types.ModuleType:
        mod = types.ModuleType("pycuda.autoinit")
        self.context_ready = True
        mod.device = self.driver.Device(0)  # type: ignore[attr-defined]
        mod.context = object()  # type: ignore[attr-defined]
        return mod

    # -- installing -------------------------------------------------------------------------
    def finder(self) -> importlib.abc.MetaPathFinder:
        sim = self

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
                return sim._make_autoinit()

            def exec_module(self, module: types.ModuleType) -> None:
                pass

        class _Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
                if fullname == "pycuda.autoinit":
                    return importlib.machinery.ModuleSpec(fullname, _Loader())
                return None

        return _Finder()

    def install(self, monkeypatch: Any) -> None:
        monkeypatch.setitem(sys.modules, "pycuda", self.package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.driver)
        # Make sure ``import pycuda.autoinit`` runs our loader now and is forgotten afterwards.
        monkeypatch.setitem(sys.modules, "pycuda.autoinit", types.ModuleType("pycuda.autoinit"))
        monkeypatch.delitem(sys.modules, "pycuda.autoinit")
        monkeypatch.setattr(sys, "meta_path", [self.finder(), *sys.meta_path])
