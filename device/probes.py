"""Memory probes on the board: tegrastats, /proc/meminfo, the PyTorch CUDA allocator, process RSS.

A Jetson has one pool of DRAM shared by the CPU and the integrated GPU. CUDA buffers there are
NvMap allocations: they show up in ``NvMapMemUsed`` (``/proc/meminfo``) and in tegrastats' RAM
figure, not necessarily in the process RSS. So a peak that matters on the board is read from all
three: RSS, NvMap, and the allocator's own books. Every figure here is in bytes; a figure the
platform does not have is ``None``, never 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

# The core owns these (a step measures its own peak, and the core imports nothing from device/).
from edge_m2kd.memory import cuda_allocator, process_rss_bytes, read_meminfo

__all__ = [
    "board_memory",
    "TegraStats",
    "TegrastatsPeak",
    "parse_tegrastats",
    "is_jetson",
    "MemoryPicture",
    "memory_picture",
    "TegrastatsReader",
]

# tegrastats computes its MB from the kernel's kB counters divided by 1024, so its units are binary.
_UNIT_BYTES = {"k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}

_TIMESTAMP_RE = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM_RE = re.compile(
    r"\bRAM (\d+)/(\d+)([kKMG])B"
    r"(?:\s*\(lfb (?:(\d+)x)?(\d+)([kKMG])B\))?"
)
_SWAP_RE = re.compile(r"\bSWAP (\d+)/(\d+)([kKMG])B(?:\s*\(cached (\d+)([kKMG])B\))?")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_CPU_CORE_RE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC_RE = re.compile(r"\bEMC(?:_FREQ)? (\d+)%(?:@(\d+))?")
_GR3D_RE = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%(?:@\[?(\d+(?:,\d+)*)\]?)?")
_TEMP_RE = re.compile(r"(?<![\w.@%])([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
# "VDD_IN 5017mW/5017mW" (JetPack 5/6) or "POM_5V_IN 3012/3012" (JetPack 4): current/average mW.
# The negative look-ahead keeps "RAM 2449/7620MB" and "IRAM 0/252kB" out.
_RAIL_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/.])")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})


@dataclass(frozen=True)
class TegraStats:
    """One tegrastats line. Sizes in bytes, frequencies in MHz, power in mW.

    Optional fields the line did not carry are ``None`` (or an empty dict / tuple), never 0.
    """

    ram_used_bytes: int
    ram_total_bytes: int
    #: "(lfb NxZ)": N free blocks of the largest free size Z (Z is at most 4 MB).
    lfb_blocks: int | None = None
    lfb_block_bytes: int | None = None
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_cached_bytes: int | None = None
    #: One entry per core; a core tegrastats shows as "off" is ``None`` in both tuples.
    cpu_load_percent: tuple[int | None, ...] = ()
    cpu_freq_mhz: tuple[int | None, ...] = ()
    emc_percent: int | None = None
    emc_freq_mhz: int | None = None
    gr3d_percent: int | None = None
    #: One frequency per GPC ("GR3D_FREQ 0%@[305,305]"), or one for older boards ("@76").
    gr3d_freq_mhz: tuple[int, ...] | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    #: rail name -> (current mW, average mW).
    power_mw: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: JetPack 5.1.2+ and 6 prefix each line with "MM-DD-YYYY HH:MM:SS" (board local time).
    timestamp: datetime | None = None

    @property
    def lfb_bytes(self) -> int | None:
        """Largest contiguous free block, in bytes."""
        return self.lfb_block_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timestamp"] = self.timestamp.isoformat() if self.timestamp else None
        d["power_mw"] = {k: list(v) for k, v in self.power_mw.items()}
        return d


def _bytes(value: str, unit: str) -> int:
    return int(value) * _UNIT_BYTES[unit]


def parse_tegrastats(line: str) -> TegraStats:
    """Parse one line of ``tegrastats`` output (JetPack 4, 5 and 6 formats).

    Raises ``ValueError`` naming the problem when the line has no ``RAM used/total`` field or a
    field it does have cannot be read; it never fills in zeros.
    """
    text = line.strip()
    if not text:
        raise ValueError("empty tegrastats line")

    timestamp: datetime | None = None
    ts = _TIMESTAMP_RE.match(text)
    if ts:
        try:
            timestamp = datetime.strptime(ts.group(1), "%m-%d-%Y %H:%M:%S")
        except ValueError as exc:
            raise ValueError(f"tegrastats line has an unreadable timestamp {ts.group(1)!r}") from exc

    ram = _RAM_RE.search(text)
    if ram is None:
        raise ValueError(f"not a tegrastats line (no 'RAM used/total' field): {text[:80]!r}")
    ram_used = _bytes(ram.group(1), ram.group(3))
    ram_total = _bytes(ram.group(2), ram.group(3))
    if ram_total == 0:
        raise ValueError(f"tegrastats line reports a RAM total of 0: {ram.group(0)!r}")
    lfb_blocks: int | None = None
    lfb_block_bytes: int | None = None
    if ram.group(5) is not None:
        lfb_blocks = int(ram.group(4)) if ram.group(4) is not None else None
        lfb_block_bytes = _bytes(ram.group(5), ram.group(6))

    swap_used = swap_total = swap_cached = None
    swap = _SWAP_RE.search(text)
    if swap:
        swap_used = _bytes(swap.group(1), swap.group(3))
        swap_total = _bytes(swap.group(2), swap.group(3))
        if swap.group(4) is not None:
            swap_cached = _bytes(swap.group(4), swap.group(5))

    loads: list[int | None] = []
    freqs: list[int | None] = []
    cpu = _CPU_RE.search(text)
    if cpu:
        shared_freq = int(cpu.group(2)) if cpu.group(2) else None  # old "CPU [X%,Y%]@Z" form
        for raw in cpu.group(1).split(","):
            core = raw.strip()
            if core.lower() == "off" or core == "":
                loads.append(None)
                freqs.append(None)
                continue
            m = _CPU_CORE_RE.match(core)
            if m is None:
                raise ValueError(f"unreadable CPU core entry {core!r} in {cpu.group(0)!r}")
            loads.append(int(m.group(1)))
            freqs.append(int(m.group(2)) if m.group(2) else shared_freq)

    emc_percent = emc_freq = None
    emc = _EMC_RE.search(text)
    if emc:
        emc_percent = int(emc.group(1))
        emc_freq = int(emc.group(2)) if emc.group(2) else None

    gr3d_percent: int | None = None
    gr3d_freq: tuple[int, ...] | None = None
    gr3d = _GR3D_RE.search(text)
    if gr3d:
        gr3d_percent = int(gr3d.group(1))
        if gr3d.group(2):
            gr3d_freq = tuple(int(f) for f in gr3d.group(2).split(","))

    temperatures = {name: float(value) for name, value in _TEMP_RE.findall(text)}
    rails = {
        name: (int(cur), int(avg)) for name, cur, avg in _RAIL_RE.findall(text) if name not in _NOT_RAILS
    }

    return TegraStats(
        ram_used_bytes=ram_used,
        ram_total_bytes=ram_total,
        lfb_blocks=lfb_blocks,
        lfb_block_bytes=lfb_block_bytes,
        swap_used_bytes=swap_used,
        swap_total_bytes=swap_total,
        swap_cached_bytes=swap_cached,
        cpu_load_percent=tuple(loads),
        cpu_freq_mhz=tuple(freqs),
        emc_percent=emc_percent,
        emc_freq_mhz=emc_freq,
        gr3d_percent=gr3d_percent,
        gr3d_freq_mhz=gr3d_freq,
        temperatures_c=temperatures,
        power_mw=rails,
        timestamp=timestamp,
    )


# Read when called, so a test can point them at a fake board.
MEMINFO: str | os.PathLike[str] = "/proc/meminfo"
TEGRA_RELEASE: str | os.PathLike[str] = "/etc/nv_tegra_release"


def is_jetson(
    meminfo: dict[str, int] | None = None,
    tegra_release_path: str | os.PathLike[str] | None = None,
) -> bool:
    """True on an L4T (Jetson) system: ``/etc/nv_tegra_release`` exists or the kernel reports NvMap."""
    if Path(TEGRA_RELEASE if tegra_release_path is None else tegra_release_path).exists():
        return True
    return meminfo is not None and "NvMapMemUsed" in meminfo


@dataclass(frozen=True)
class MemoryPicture:
    """Where memory stands now, in bytes. ``None`` marks a figure this platform does not have."""

    total_bytes: int
    available_bytes: int
    process_rss_bytes: int
    nvmap_used_bytes: int | None
    cuda_allocated_bytes: int | None
    cuda_max_allocated_bytes: int | None
    cuda_reserved_bytes: int | None
    is_jetson: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_picture(
    meminfo_path: str | os.PathLike[str] | None = None,
    status_path: str | os.PathLike[str] = "/proc/self/status",
    tegra_release_path: str | os.PathLike[str] | None = None,
) -> MemoryPicture:
    """``meminfo_path`` and ``tegra_release_path`` default to MEMINFO and TEGRA_RELEASE."""
    meminfo_path = MEMINFO if meminfo_path is None else meminfo_path
    tegra_release_path = TEGRA_RELEASE if tegra_release_path is None else tegra_release_path
    meminfo = read_meminfo(meminfo_path)
    if "MemTotal" not in meminfo:
        raise ValueError(f"{meminfo_path}: no MemTotal line")
    if "MemAvailable" in meminfo:
        available = meminfo["MemAvailable"]
    else:  # kernels before 3.14 have no MemAvailable; this is the estimate free(1) used then
        available = meminfo.get("MemFree", 0) + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
    cuda = cuda_allocator()
    return MemoryPicture(
        total_bytes=meminfo["MemTotal"],
        available_bytes=available,
        process_rss_bytes=process_rss_bytes(status_path),
        nvmap_used_bytes=meminfo.get("NvMapMemUsed"),
        cuda_allocated_bytes=cuda["allocated_bytes"] if cuda else None,
        cuda_max_allocated_bytes=cuda["max_allocated_bytes"] if cuda else None,
        cuda_reserved_bytes=cuda["reserved_bytes"] if cuda else None,
        is_jetson=is_jetson(meminfo, tegra_release_path),
    )


def board_memory() -> dict[str, int | None] | None:
    """The board's shared memory (CPU and GPU draw on one DRAM) as the kernel counts it, on a
    Jetson; ``None`` elsewhere, where the machine's RAM is not the board's budget."""
    try:
        pic = memory_picture()
    except (OSError, ValueError):  # no /proc/meminfo (not Linux), or one without MemTotal
        return None
    if not pic.is_jetson:
        return None
    return {"total_bytes": pic.total_bytes, "available_bytes": pic.available_bytes,
            "nvmap_used_bytes": pic.nvmap_used_bytes}


class TegrastatsReader:
    """Run ``tegrastats --interval N`` and yield each line parsed.

    >>> with TegrastatsReader(interval_ms=500) as reader:
    ...     for stats in reader:
    ...         print(stats.ram_used_bytes)

    The binary ships with L4T only; elsewhere the constructor raises ``RuntimeError``.
    A line that cannot be parsed raises ``ValueError`` unless ``skip_unparsable`` is set.
    """

    def __init__(
        self, interval_ms: int = 1000, *, executable: str = "tegrastats", skip_unparsable: bool = False
    ) -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(
                f"{executable!r} not found on PATH: tegrastats exists only on NVIDIA Jetson (L4T) systems"
            )
        self.executable = found
        self.interval_ms = interval_ms
        self.skip_unparsable = skip_unparsable
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start tegrastats now (iterating starts it too, if this was not called)."""
        if self._proc is None:
            self._proc = subprocess.Popen(
                [self.executable, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )

    def stop(self) -> None:
        """End tegrastats, leaving its output to whoever iterates (who then sees the end of it)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def __iter__(self) -> Iterator[TegraStats]:
        self.start()
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                if not line.strip():
                    continue
                try:
                    yield parse_tegrastats(line)
                except ValueError:
                    if not self.skip_unparsable:
                        raise
        finally:
            self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> TegrastatsReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TegrastatsPeak:
    """The highest RAM use and GPU load tegrastats reports while a block runs.

    >>> with TegrastatsPeak() as t:
    ...     run_the_benchmark()
    >>> t.ram_used_peak_bytes, t.gr3d_peak_percent

    tegrastats' RAM figure is the board's whole shared DRAM (CPU and GPU), which the process's
    resident size does not show. Without tegrastats (not a Jetson) nothing runs and the figures
    stay ``None``.
    """

    def __init__(self, interval_ms: int = 100, *, executable: str = "tegrastats") -> None:
        self.ram_used_peak_bytes: int | None = None
        self.gr3d_peak_percent: int | None = None
        self.samples = 0
        try:
            self._reader: TegrastatsReader | None = TegrastatsReader(interval_ms, executable=executable,
                                                                     skip_unparsable=True)
        except RuntimeError:
            self._reader = None
        self._thread: threading.Thread | None = None

    def _run(self, lines: Iterator[TegraStats]) -> None:
        for s in lines:
            self.samples += 1
            self.ram_used_peak_bytes = max(self.ram_used_peak_bytes or 0, s.ram_used_bytes)
            if s.gr3d_percent is not None:
                self.gr3d_peak_percent = max(self.gr3d_peak_percent or 0, s.gr3d_percent)

    def __enter__(self) -> TegrastatsPeak:
        if self._reader is not None:
            lines = iter(self._reader)
            # Start tegrastats here, not in the thread, so the block is measured from its start.
            self._reader.start()
            self._thread = threading.Thread(target=self._run, args=(lines,), name="tegrastats", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reader is not None and self._thread is not None:
            # A block shorter than tegrastats' interval still gets its first reading.
            deadline = time.monotonic() + max(2.0, 3 * self._reader.interval_ms / 1000)
            while self.samples == 0 and self._thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            self._reader.stop()  # tegrastats ends; the thread reads what is left and returns
            self._thread.join(timeout=10)
            self._thread = None

    def to_dict(self) -> dict[str, int | None]:
        return {"tegrastats_ram_peak_bytes": self.ram_used_peak_bytes, "gr3d_peak_percent": self.gr3d_peak_percent}
