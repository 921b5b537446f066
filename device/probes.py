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
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "TegraStats",
    "parse_tegrastats",
    "read_meminfo",
    "process_rss_bytes",
    "cuda_allocator",
    "is_jetson",
    "MemoryPicture",
    "memory_picture",
    "MemorySample",
    "PeakMemorySampler",
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


def read_meminfo(path: str | os.PathLike[str] = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as bytes (``kB`` values times 1024); unitless counts (HugePages_*) as is.

    On a Jetson this includes ``NvMapMemUsed`` / ``NvMapMemFree``.
    """
    out: dict[str, int] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts or not parts[0].isdigit() or len(parts) > 2:
            raise ValueError(f"{path}:{lineno}: unreadable meminfo line {line!r}")
        value = int(parts[0])
        if len(parts) == 2:
            if parts[1] != "kB":
                raise ValueError(f"{path}:{lineno}: unexpected unit {parts[1]!r} in {line!r}")
            value *= 1024
        out[key.strip()] = value
    return out


def process_rss_bytes(status_path: str | os.PathLike[str] = "/proc/self/status") -> int:
    """Resident set size of this process now (``VmRSS``).

    Without ``/proc`` (not Linux) it falls back to ``getrusage``'s ``ru_maxrss``, which is the
    peak since the process started, not the current figure.
    """
    try:
        text = Path(status_path).read_text()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # darwin: bytes, Linux: kB
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) * 1024
    raise ValueError(f"{status_path}: no VmRSS line")


def cuda_allocator() -> dict[str, int] | None:
    """The PyTorch CUDA caching allocator's figures for the current device, or ``None`` without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated()),
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "reserved_bytes": int(torch.cuda.memory_reserved()),
    }


def is_jetson(
    meminfo: dict[str, int] | None = None,
    tegra_release_path: str | os.PathLike[str] = "/etc/nv_tegra_release",
) -> bool:
    """True on an L4T (Jetson) system: ``/etc/nv_tegra_release`` exists or the kernel reports NvMap."""
    if Path(tegra_release_path).exists():
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
    meminfo_path: str | os.PathLike[str] = "/proc/meminfo",
    status_path: str | os.PathLike[str] = "/proc/self/status",
    tegra_release_path: str | os.PathLike[str] = "/etc/nv_tegra_release",
) -> MemoryPicture:
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


@dataclass(frozen=True)
class MemorySample:
    """One reading of the sampler; ``t`` is seconds since the sampler was entered."""

    t: float
    rss_bytes: int
    cuda_max_allocated_bytes: int | None
    nvmap_used_bytes: int | None


class PeakMemorySampler:
    """Record the peak memory of a block of code by sampling in a daemon thread.

    >>> with PeakMemorySampler() as s:
    ...     step()
    >>> s.peak_rss_bytes, s.peak_cuda_bytes, s.peak_nvmap_bytes

    It samples on entry (the baseline), every ``interval`` seconds, and once more on exit so a
    step shorter than the interval still gets a figure. With CUDA, the allocator's peak counter is
    reset on entry (``reset_cuda_peak``) so ``peak_cuda_bytes`` is this block's peak, not the
    process's. ``NvMapMemUsed`` is system-wide: other processes' GPU buffers count too.
    """

    def __init__(
        self,
        interval: float = 0.05,
        *,
        reset_cuda_peak: bool = True,
        meminfo_path: str | os.PathLike[str] = "/proc/meminfo",
        status_path: str | os.PathLike[str] = "/proc/self/status",
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.reset_cuda_peak = reset_cuda_peak
        self._meminfo_path = meminfo_path
        self._status_path = status_path
        self.samples: list[MemorySample] = []
        self.baseline_rss_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.peak_nvmap_bytes: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._cuda = False
        self._nvmap = False

    @property
    def peak_rss_delta_bytes(self) -> int | None:
        """How far RSS rose above the value on entry."""
        if self.peak_rss_bytes is None or self.baseline_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def _cuda_max_allocated(self) -> int | None:
        if not self._cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())

    def _nvmap_used(self) -> int | None:
        if not self._nvmap:
            return None
        try:
            return read_meminfo(self._meminfo_path).get("NvMapMemUsed")
        except (OSError, ValueError):
            return None

    def sample(self) -> MemorySample:
        """Take one reading now and fold it into the peaks."""
        s = MemorySample(
            t=time.monotonic() - self._t0,
            rss_bytes=process_rss_bytes(self._status_path),
            cuda_max_allocated_bytes=self._cuda_max_allocated(),
            nvmap_used_bytes=self._nvmap_used(),
        )
        with self._lock:
            self.samples.append(s)
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, s.rss_bytes)
            if s.cuda_max_allocated_bytes is not None:
                self.peak_cuda_bytes = max(self.peak_cuda_bytes or 0, s.cuda_max_allocated_bytes)
            if s.nvmap_used_bytes is not None:
                self.peak_nvmap_bytes = max(self.peak_nvmap_bytes or 0, s.nvmap_used_bytes)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemorySampler:
        if self._thread is not None:
            raise RuntimeError("PeakMemorySampler is already running")
        self.samples = []  # a sampler entered again measures the new block only
        self.peak_rss_bytes = self.peak_cuda_bytes = self.peak_nvmap_bytes = None
        self._t0 = time.monotonic()
        self._cuda = cuda_allocator() is not None
        if self._cuda and self.reset_cuda_peak:
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            self._nvmap = "NvMapMemUsed" in read_meminfo(self._meminfo_path)
        except (OSError, ValueError):
            self._nvmap = False
        self.baseline_rss_bytes = self.sample().rss_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_delta_bytes": self.peak_rss_delta_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "peak_nvmap_bytes": self.peak_nvmap_bytes,
            "n_samples": len(self.samples),
            "interval_s": self.interval,
        }


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

    def __iter__(self) -> Iterator[TegraStats]:
        self._proc = subprocess.Popen(
            [self.executable, "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
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
