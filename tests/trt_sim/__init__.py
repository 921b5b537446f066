"""Simulators of TensorRT and pycuda for tests on machines without either (see DESIGN.md section 4).

    sim = trt_sim.install(monkeypatch, "10.3.0")   # sys.modules["tensorrt"], ["pycuda"...]
    ...code under test imports tensorrt / pycuda as usual...
    sim.state.builds, sim.state.deprecated_calls, sim.memory.live, ...

``tensorrt_sim`` simulates the TensorRT API (versions 8.6, 10.x, 11.x), ``pycuda_sim`` the pycuda
driver, both over one ``cuda_memory.DeviceMemory`` registry of fake device addresses, so device
pointers made by one are valid in the other. ``runner.run_engine`` runs a plan the way a device
runtime does (name-based I/O, ``execute_async_v3``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from trt_sim.cuda_memory import DeviceMemory, InvalidAddress
from trt_sim.pycuda_sim import PagelockedArray, PendingCopyError, PycudaSim
from trt_sim.tensorrt_sim import SimState, make_tensorrt

VERSIONS = ("8.6.1", "10.3.0", "11.0.0")

__all__ = ["VERSIONS", "DeviceMemory", "InvalidAddress", "PagelockedArray", "PendingCopyError", "PycudaSim", "Sim",
           "SimState", "install", "make_tensorrt"]


@dataclass
class Sim:
    trt: ModuleType
    state: SimState
    memory: DeviceMemory
    pycuda: PycudaSim | None


def install(monkeypatch: Any, version: str, with_pycuda: bool = True) -> Sim:
    """Put a simulated TensorRT ``version`` (and pycuda) on sys.modules for one test."""
    memory = DeviceMemory()
    state = SimState()
    trt = make_tensorrt(version, memory, state)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda = None
    if with_pycuda:
        cuda = PycudaSim(memory)
        cuda.install(monkeypatch)
    else:
        hide_modules(monkeypatch, "pycuda", "pycuda.driver", "pycuda.autoinit", "pycuda.autoprimaryctx")
    return Sim(trt, state, memory, cuda)


def hide_modules(monkeypatch: Any, *names: str) -> None:
    """Make ``import name`` fail with ImportError, as on a machine without the package."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError on import
