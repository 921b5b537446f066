"""Simulated CUDA device memory and streams: integer addresses mapped to numpy byte buffers.

One registry is shared by every simulator that deals in device pointers: the TensorRT
simulator reads inputs from and writes outputs to these addresses, the pycuda simulator
allocates them and copies host arrays in and out. A device runtime test can therefore allocate
with (simulated) pycuda, bind the pointers to a (simulated) TensorRT context, and get the
answers back through pycuda, exactly as on the board.

Addresses behave like real ones where it matters for catching bugs: they are large, aligned
integers; a pointer may point inside an allocation (base + offset); reading or writing past the
end of an allocation, or through a freed or never-allocated address, raises ``InvalidAddress``
instead of silently corrupting something.
"""

from __future__ import annotations

import bisect

import numpy as np


class InvalidAddress(RuntimeError):
    """An access through a device pointer that no live allocation covers."""


class DeviceMemory:
    BASE = 0x7F00_0000_0000  # where "device" addresses start (far from small ints like 0 or 1)
    ALIGN = 256  # cudaMalloc's alignment guarantee

    def __init__(self) -> None:
        self._buffers: dict[int, np.ndarray] = {}
        self._starts: list[int] = []  # sorted bases, for pointer-inside-allocation lookups
        self._next = self.BASE
        self._streams: set[int] = {0}  # 0: the legacy default stream
        self._next_stream = 0x5000
        self.allocations = 0
        self.frees = 0

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        if not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes!r} bytes")
        ptr = self._next
        self._next += -(-int(nbytes) // self.ALIGN) * self.ALIGN + self.ALIGN  # a guard gap between buffers
        self._buffers[ptr] = np.zeros(int(nbytes), dtype=np.uint8)
        bisect.insort(self._starts, ptr)
        self.allocations += 1
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self._buffers:
            raise InvalidAddress(f"free of 0x{ptr:x}, which is not the start of a live allocation (double free?)")
        del self._buffers[ptr]
        self._starts.remove(ptr)
        self.frees += 1

    @property
    def live(self) -> int:
        return len(self._buffers)

    @property
    def bytes_in_use(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    # -- access -------------------------------------------------------------------------------
    def _locate(self, ptr: int, nbytes: int) -> tuple[np.ndarray, int]:
        ptr = int(ptr)
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            raise InvalidAddress(f"0x{ptr:x} is not a device address")
        base = self._starts[i]
        buf = self._buffers[base]
        offset = ptr - base
        if offset >= buf.nbytes:
            raise InvalidAddress(f"0x{ptr:x} is not a device address (freed, or past an allocation's end)")
        if offset + nbytes > buf.nbytes:
            raise InvalidAddress(f"access of {nbytes} bytes at 0x{ptr:x} runs {offset + nbytes - buf.nbytes} bytes "
                                 f"past the end of its {buf.nbytes}-byte allocation")
        return buf, offset

    def size_at(self, ptr: int) -> int:
        """Bytes from ``ptr`` to the end of its allocation."""
        buf, offset = self._locate(ptr, 0)
        return buf.nbytes - offset

    def write(self, ptr: int, array: np.ndarray) -> None:
        src = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        buf, offset = self._locate(ptr, src.nbytes)
        buf[offset : offset + src.nbytes] = src

    def read(self, ptr: int, nbytes: int) -> bytes:
        buf, offset = self._locate(ptr, nbytes)
        return buf[offset : offset + nbytes].tobytes()

    def view(self, ptr: int, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        """A writable array over device memory (what a kernel would see at ``ptr``)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        buf, offset = self._locate(ptr, nbytes)
        return buf[offset : offset + nbytes].view(dt).reshape(shape)

    # -- streams ------------------------------------------------------------------------------
    def new_stream(self) -> int:
        self._next_stream += 0x10
        self._streams.add(self._next_stream)
        return self._next_stream

    def is_stream(self, handle: int) -> bool:
        return isinstance(handle, (int, np.integer)) and int(handle) in self._streams

    def destroy_stream(self, handle: int) -> None:
        if handle == 0 or handle not in self._streams:
            raise InvalidAddress(f"stream 0x{handle:x} does not exist")
        self._streams.discard(handle)
