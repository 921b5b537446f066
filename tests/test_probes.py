"""Tests for device/probes.py (tegrastats parsing, the memory picture, the tegrastats reader) and for
edge_m2kd/memory.py's measuring half (meminfo, resident size, the peak sampler).

The tegrastats lines below are real output copied from public sources (cited above each); none
of them was produced on a board in this project.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from device import probes
from device.probes import (
    MemoryPicture,
    TegraStats,
    TegrastatsPeak,
    TegrastatsReader,
    board_memory,
    is_jetson,
    memory_picture,
    parse_tegrastats,
)
from edge_m2kd.memory import PeakMemorySampler, cuda_allocator, process_rss_bytes, read_meminfo

MiB = 1024**2
KiB = 1024

# --- real tegrastats lines ------------------------------------------------------------------

# JetPack 6, Orin Nano 8GB (timestamped line, two cores "off").
# Source: github.com/cmu-argus-2/FSW-Payload, include/telemetry/README.md.
JP6_ORIN_NANO = (
    "11-27-2024 19:20:22 RAM 3150/7620MB (lfb 37x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [0%@883,0%@883,0%@883,0%@883,off,off] GR3D_FREQ 0% cpu@63.687C soc2@62.781C "
    "soc0@61.5C gpu@62.281C tj@63.687C soc1@62.312C VDD_IN 4233mW/4233mW "
    "VDD_CPU_GPU_CV 478mW/478mW VDD_SOC 1317mW/1317mW"
)

# JetPack 6, Orin Nano; note the average of VDD_CPU_GPU_CV printed without its unit ("598mW/598").
# Source: github.com/cmu-argus-2/FSW-Payload, src/telemetry/tegra.cpp (comment in ParseTegrastatsLine).
JP6_ORIN_NANO_NO_UNIT = (
    "12-23-2024 22:54:11 RAM 3162/7620MB (lfb 4x2MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 1% cpu@62.843C soc2@61.968C "
    "soc0@60.625C gpu@61.687C tj@62.843C soc1@61.687C "
    "VDD_IN 3913mW/3922mW VDD_CPU_GPU_CV 598mW/598 VDD_SOC 1238mW/1237mW"
)

# L4T r36 (JetPack 6), AGX Orin 32GB: per-GPC GR3D frequencies, engines shown "off", odd spacing.
# Source: github.com/DataDog/datadog-agent, pkg/collector/corechecks/nvidia/jetson/jetson_test.go (r36Sample).
JP6_AGX_ORIN = (
    "RAM 29114/30697MB (lfb 3x4MB)    SWAP 4915/15348MB (cached 1MB) CPU [3%@729,4%@729,0%@729,"
    "1%@729,0%@2201,100%@2201,1%@2201,0%@2201,100%@2201,0%@2201,0%@2201,0%@2201] EMC_FREQ 1%@2133 "
    "GR3D_FREQ 0%@[305,305] NVENC      off  NVDEC    off NVJPG off NVJPG1    off         VIC        "
    "off          OFA           off          NVDLA0    off       NVDLA1     off          PVA0_FREQ "
    "off         APE           174        cpu@53.062C soc2@48.25C soc0@48.843C  gpu@47.812C "
    "tj@53.062C soc1@48.968C    VDD_GPU_SOC 3205mW/3205mW VDD_CPU_CV 4405mW/4405mW "
    "VIN_SYS_5V0 4767mW/4767mW"
)

# JetPack 5 (L4T r35), Orin NX 16GB: no timestamp, mW units, a sensor reading.
# Source: DataDog/datadog-agent jetson_test.go (voltageUnitSample).
JP5_ORIN_NX = (
    "RAM 6334/15388MB (lfb 1770x4MB) SWAP 491/7694MB (cached 0MB) CPU [6%@729,9%@729,5%@729,"
    "16%@729,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@611 VIC_FREQ 729 APE 174 CV0@45.812C "
    "CPU@47.937C SOC2@46.093C SOC0@46.968C CV1@46.406C GPU@45.875C tj@48.875C SOC1@48.875C "
    "CV2@45.75C VDD_IN 5299mW/5299mW VDD_CPU_GPU_CV 773mW/773mW VDD_SOC 1424mW/1424mW"
)

# JetPack 5.1.2, Xavier NX: timestamped, GR3D frequency in brackets.
# Source: github.com/waggle-sensor/jetson-exporter, tegrastats_test.go (TestParseTegraStatsXavierNXJetPack512).
JP512_XAVIER_NX = (
    "07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) "
    "CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 GR3D_FREQ 0%@[114] "
    "VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C "
    "VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW"
)

# JetPack 4.6.1, Jetson Nano: POM_* rails without units, IRAM.
# Source: waggle-sensor/jetson-exporter, tegrastats_test.go (TestParseTegraStatsXavierNanoJetPack461).
JP461_NANO = (
    "RAM 1923/3964MB (lfb 2x2MB) SWAP 191/1982MB (cached 6MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [5%@1224,4%@1224,3%@1224,6%@1224] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@37C CPU@40C "
    "PMIC@50C GPU@40C AO@45C thermal@40C POM_5V_IN 1750/1628 POM_5V_GPU 0/0 POM_5V_CPU 366/406"
)

# JetPack 4, AGX Xavier: rails named without a VDD_ prefix, no units.
# Source: DataDog/datadog-agent jetson_test.go (agXSample).
JP4_AGX_XAVIER = (
    "RAM 721/31927MB (lfb 7291x4MB) SWAP 0/15963MB (cached 0MB) CPU [2%@1190,0%@1190,0%@1190,"
    "0%@1190,off,off,off,off] EMC_FREQ 0%@665 GR3D_FREQ 0%@318 APE 150 MTS fg 0% bg 0% AO@37.5C "
    "GPU@37.5C Tdiode@40C PMIC@100C AUX@36C CPU@37.5C thermal@36.9C Tboard@37C GPU 0/0 CPU 311/311 "
    "SOC 932/932 CV 0/0 VDDRQ 621/621 SYS5V 1482/1482"
)

# L4T 28 (JetPack 3), TX1: the old "cpu [X%,Y%]@Z" form with one frequency for all cores, EMC/GR3D.
# Source: github.com/hordiales/jetson-tx1-dev, SCRIPTS.md.
L4T28_TX1 = (
    "RAM 3468/3983MB (lfb 48x4MB) SWAP 873/8192MB (cached 295MB) cpu [17%,13%,29%,5%]@408 "
    "EMC 1%@408 APE 25 GR3D 3%@76"
)


def test_jetpack6_orin_nano_every_field():
    s = parse_tegrastats(JP6_ORIN_NANO)
    assert s.timestamp == datetime(2024, 11, 27, 19, 20, 22)
    assert s.ram_used_bytes == 3150 * MiB
    assert s.ram_total_bytes == 7620 * MiB
    assert (s.lfb_blocks, s.lfb_block_bytes) == (37, 4 * MiB)
    assert s.lfb_bytes == 4 * MiB
    assert (s.swap_used_bytes, s.swap_total_bytes, s.swap_cached_bytes) == (0, 3810 * MiB, 0)
    assert s.cpu_load_percent == (0, 0, 0, 0, None, None)
    assert s.cpu_freq_mhz == (883, 883, 883, 883, None, None)
    assert s.gr3d_percent == 0
    assert s.gr3d_freq_mhz is None  # the line gives no GPU frequency
    assert s.emc_percent is None and s.emc_freq_mhz is None  # no EMC field on this line
    assert s.temperatures_c == {
        "cpu": 63.687,
        "soc2": 62.781,
        "soc0": 61.5,
        "gpu": 62.281,
        "tj": 63.687,
        "soc1": 62.312,
    }
    assert s.power_mw == {
        "VDD_IN": (4233, 4233),
        "VDD_CPU_GPU_CV": (478, 478),
        "VDD_SOC": (1317, 1317),
    }


def test_jetpack6_rail_average_without_unit():
    s = parse_tegrastats(JP6_ORIN_NANO_NO_UNIT)
    assert s.power_mw["VDD_CPU_GPU_CV"] == (598, 598)
    assert s.power_mw["VDD_IN"] == (3913, 3922)
    assert (s.lfb_blocks, s.lfb_block_bytes) == (4, 2 * MiB)
    assert s.cpu_load_percent == (1, 0, 0, 0, 0, 0)


def test_jetpack6_agx_orin_gpc_frequencies_and_noise():
    s = parse_tegrastats(JP6_AGX_ORIN)
    assert s.timestamp is None
    assert s.ram_used_bytes == 29114 * MiB
    assert s.swap_used_bytes == 4915 * MiB and s.swap_cached_bytes == 1 * MiB
    assert len(s.cpu_load_percent) == 12
    assert s.cpu_load_percent[5] == 100 and s.cpu_freq_mhz[5] == 2201
    assert (s.emc_percent, s.emc_freq_mhz) == (1, 2133)
    assert (s.gr3d_percent, s.gr3d_freq_mhz) == (0, (305, 305))
    assert s.temperatures_c["tj"] == 53.062
    assert s.power_mw == {
        "VDD_GPU_SOC": (3205, 3205),
        "VDD_CPU_CV": (4405, 4405),
        "VIN_SYS_5V0": (4767, 4767),
    }


def test_jetpack5_orin_nx_without_timestamp():
    s = parse_tegrastats(JP5_ORIN_NX)
    assert s.timestamp is None
    assert s.ram_total_bytes == 15388 * MiB
    assert (s.lfb_blocks, s.lfb_block_bytes) == (1770, 4 * MiB)
    assert s.cpu_load_percent == (6, 9, 5, 16, None, None, None, None)
    assert (s.gr3d_percent, s.gr3d_freq_mhz) == (0, (611,))
    assert s.temperatures_c["CV0"] == 45.812 and s.temperatures_c["tj"] == 48.875
    assert s.power_mw["VDD_IN"] == (5299, 5299)
    assert set(s.power_mw) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}


def test_jetpack512_timestamp_and_bracketed_gpu_frequency():
    s = parse_tegrastats(JP512_XAVIER_NX)
    assert s.timestamp == datetime(2024, 7, 9, 13, 31, 31)
    assert s.gr3d_freq_mhz == (114,)
    assert s.cpu_freq_mhz == (1397, 1192, 1190, 1190, 1190, 1190)
    assert s.power_mw["VDD_IN"] == (2763, 2846)
    assert s.temperatures_c["thermal"] == 45.6


def test_jetpack4_pom_rails_without_units_and_iram_not_a_rail():
    s = parse_tegrastats(JP461_NANO)
    assert s.power_mw == {"POM_5V_IN": (1750, 1628), "POM_5V_GPU": (0, 0), "POM_5V_CPU": (366, 406)}
    assert "IRAM" not in s.power_mw and "RAM" not in s.power_mw
    assert s.ram_used_bytes == 1923 * MiB
    assert s.swap_cached_bytes == 6 * MiB
    assert (s.gr3d_percent, s.gr3d_freq_mhz) == (0, (76,))
    assert s.temperatures_c["PMIC"] == 50.0


def test_jetpack4_agx_xavier_bare_rail_names():
    s = parse_tegrastats(JP4_AGX_XAVIER)
    assert s.power_mw["CPU"] == (311, 311)
    assert s.power_mw["SYS5V"] == (1482, 1482)
    assert s.temperatures_c["CPU"] == 37.5  # "CPU@37.5C" is a sensor, "CPU 311/311" a rail
    assert s.cpu_load_percent[:4] == (2, 0, 0, 0) and s.cpu_load_percent[4:] == (None,) * 4


def test_l4t28_shared_cpu_frequency_and_short_field_names():
    s = parse_tegrastats(L4T28_TX1)
    assert s.cpu_load_percent == (17, 13, 29, 5)
    assert s.cpu_freq_mhz == (408, 408, 408, 408)
    assert (s.emc_percent, s.emc_freq_mhz) == (1, 408)
    assert (s.gr3d_percent, s.gr3d_freq_mhz) == (3, (76,))
    assert s.temperatures_c == {} and s.power_mw == {}


def test_units_kilo_and_giga():
    # Not a captured line: the units tegrastats may print (kB, MB, GB) applied to one line.
    s = parse_tegrastats("RAM 512000/7812500kB (lfb 2x512kB) SWAP 1/4GB (cached 0GB)")
    assert s.ram_used_bytes == 512000 * KiB
    assert s.ram_total_bytes == 7812500 * KiB
    assert s.lfb_block_bytes == 512 * KiB
    assert (s.swap_used_bytes, s.swap_total_bytes) == (1024**3, 4 * 1024**3)


def test_missing_optional_fields_are_none_not_zero():
    s = parse_tegrastats("RAM 220/38955MB (lfb 847x4MB)")  # the RAM example from NVIDIA's L4T 32.5 guide
    assert s.swap_used_bytes is None and s.swap_total_bytes is None and s.swap_cached_bytes is None
    assert s.cpu_load_percent == () and s.cpu_freq_mhz == ()
    assert s.emc_percent is None and s.gr3d_percent is None and s.gr3d_freq_mhz is None
    assert s.temperatures_c == {} and s.power_mw == {}
    assert s.timestamp is None
    s = parse_tegrastats("RAM 220/38955MB")
    assert s.lfb_blocks is None and s.lfb_block_bytes is None


@pytest.mark.parametrize(
    "line, match",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("garbage that is not tegrastats", "no 'RAM used/total'"),
        ("SWAP 0/3810MB (cached 0MB) CPU [1%@729]", "no 'RAM used/total'"),
        ("IRAM 0/252kB(lfb 252kB)", "no 'RAM used/total'"),  # IRAM is not RAM
        ("RAM 0/0MB", "total of 0"),
        ("RAM 10/100MB CPU [1%@729,banana]", "unreadable CPU core entry 'banana'"),
        ("13-45-2024 25:61:00 RAM 10/100MB", "unreadable timestamp"),
    ],
)
def test_unreadable_lines_raise(line, match):
    with pytest.raises(ValueError, match=match):
        parse_tegrastats(line)


def test_to_dict_is_json_serialisable():
    d = parse_tegrastats(JP6_ORIN_NANO).to_dict()
    back = json.loads(json.dumps(d))
    assert back["timestamp"] == "2024-11-27T19:20:22"
    assert back["power_mw"]["VDD_IN"] == [4233, 4233]
    assert back["ram_used_bytes"] == 3150 * MiB


def test_tegrastats_is_frozen():
    s = parse_tegrastats(JP6_ORIN_NANO)
    assert isinstance(s, TegraStats)
    with pytest.raises(AttributeError):
        s.ram_used_bytes = 0  # type: ignore[misc]


# --- /proc/meminfo ----------------------------------------------------------------------------

# Shaped on a Jetson TX2's /proc/meminfo (L4T 32.7, kernel 4.9-tegra), trimmed.
JETSON_MEMINFO = """\
MemTotal:        8038788 kB
MemFree:         4851052 kB
MemAvailable:    5642288 kB
Buffers:           38972 kB
Cached:           879052 kB
SwapCached:            0 kB
SwapTotal:       4019376 kB
SwapFree:        4019376 kB
VmallocTotal:   263061440 kB
NvMapMemFree:      94784 kB
NvMapMemUsed:     805068 kB
CmaTotal:         753664 kB
CmaFree:          719864 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
"""

PC_MEMINFO = """\
MemTotal:       16318480 kB
MemFree:         1021344 kB
MemAvailable:    9264520 kB
Buffers:          402112 kB
Cached:          7623444 kB
"""

STATUS = """\
Name:\tpython
VmPeak:\t  900000 kB
VmRSS:\t  123456 kB
Threads:\t4
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_meminfo_bytes_and_nvmap(tmp_path):
    m = read_meminfo(_write(tmp_path, "meminfo", JETSON_MEMINFO))
    assert m["MemTotal"] == 8038788 * KiB
    assert m["NvMapMemUsed"] == 805068 * KiB
    assert m["NvMapMemFree"] == 94784 * KiB
    assert m["HugePages_Total"] == 0  # a count, not a size
    assert m["Hugepagesize"] == 2048 * KiB


def test_read_meminfo_rejects_garbage(tmp_path):
    with pytest.raises(ValueError, match="unreadable meminfo line"):
        read_meminfo(_write(tmp_path, "meminfo", "MemTotal: lots\n"))
    with pytest.raises(ValueError, match="unexpected unit"):
        read_meminfo(_write(tmp_path, "meminfo", "MemTotal: 10 MB\n"))


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc")
def test_read_meminfo_on_this_machine():
    m = read_meminfo()
    assert m["MemTotal"] > 0 and "MemAvailable" in m


def test_process_rss_from_status(tmp_path):
    assert process_rss_bytes(_write(tmp_path, "status", STATUS)) == 123456 * KiB
    with pytest.raises(ValueError, match="VmRSS"):
        process_rss_bytes(_write(tmp_path, "status2", "Name:\tx\n"))


def test_process_rss_falls_back_to_getrusage(tmp_path):
    assert process_rss_bytes(tmp_path / "no-such-status") > 0


def test_memory_picture_on_a_jetson(tmp_path):
    pic = memory_picture(
        meminfo_path=_write(tmp_path, "meminfo", JETSON_MEMINFO),
        status_path=_write(tmp_path, "status", STATUS),
        tegra_release_path=tmp_path / "absent",
    )
    assert isinstance(pic, MemoryPicture)
    assert pic.total_bytes == 8038788 * KiB
    assert pic.available_bytes == 5642288 * KiB
    assert pic.process_rss_bytes == 123456 * KiB
    assert pic.nvmap_used_bytes == 805068 * KiB
    assert pic.is_jetson  # detected from NvMapMemUsed
    d = json.loads(json.dumps(pic.to_dict()))
    assert d["nvmap_used_bytes"] == 805068 * KiB


def test_memory_picture_off_jetson(tmp_path):
    pic = memory_picture(
        meminfo_path=_write(tmp_path, "meminfo", PC_MEMINFO),
        status_path=_write(tmp_path, "status", STATUS),
        tegra_release_path=tmp_path / "absent",
    )
    assert pic.nvmap_used_bytes is None
    assert not pic.is_jetson
    if cuda_allocator() is None:
        assert pic.cuda_allocated_bytes is None
        assert pic.cuda_max_allocated_bytes is None
        assert pic.cuda_reserved_bytes is None


def test_jetson_detected_by_release_file(tmp_path):
    release = _write(tmp_path, "nv_tegra_release", "# R36 (release), REVISION: 4.0\n")
    assert is_jetson({}, release)
    assert not is_jetson({}, tmp_path / "absent")
    assert is_jetson({"NvMapMemUsed": 1}, tmp_path / "absent")


def test_memory_picture_needs_memtotal(tmp_path):
    with pytest.raises(ValueError, match="MemTotal"):
        memory_picture(meminfo_path=_write(tmp_path, "meminfo", "MemFree: 1 kB\n"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_picture_on_this_machine():
    pic = memory_picture()
    assert 0 < pic.available_bytes <= pic.total_bytes
    assert 0 < pic.process_rss_bytes < pic.total_bytes


def test_cuda_allocator_matches_torch():
    torch = pytest.importorskip("torch")
    got = cuda_allocator()
    if not torch.cuda.is_available():
        assert got is None
    else:
        assert got is not None
        assert set(got) == {"allocated_bytes", "max_allocated_bytes", "reserved_bytes"}
        assert got["max_allocated_bytes"] >= got["allocated_bytes"] >= 0


# --- PeakMemorySampler ------------------------------------------------------------------------

linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc")


@linux_only
def test_sampler_sees_a_200mb_allocation():
    with PeakMemorySampler(interval=0.01) as s:
        a = np.ones(200 * MiB, dtype=np.uint8)  # np.ones writes every page, so they are resident
        a[::4096] += 1
        del a
    assert s.baseline_rss_bytes is not None and s.peak_rss_bytes is not None
    assert s.peak_rss_bytes - s.baseline_rss_bytes >= 150 * MiB
    assert s.peak_rss_delta_bytes == s.peak_rss_bytes - s.baseline_rss_bytes
    assert len(s.samples) >= 2


@linux_only
def test_sampler_final_sample_catches_a_short_step():
    # The thread never wakes during this block; the exit sample must still see the array.
    with PeakMemorySampler(interval=60.0) as s:
        a = np.ones(200 * MiB, dtype=np.uint8)
    assert len(s.samples) == 2  # entry + exit
    assert s.peak_rss_delta_bytes is not None and s.peak_rss_delta_bytes >= 150 * MiB
    del a


def test_sampler_without_cuda_or_jetson_reports_none(tmp_path):
    with PeakMemorySampler(interval=0.01, meminfo_path=_write(tmp_path, "meminfo", PC_MEMINFO)) as s:
        pass
    if cuda_allocator() is None:
        assert s.peak_cuda_bytes is None
    assert s.peak_nvmap_bytes is None
    d = s.to_dict()
    assert d["n_samples"] == len(s.samples) >= 2
    assert json.loads(json.dumps(d)) == d


def test_sampler_reads_nvmap_on_a_jetson(tmp_path):
    meminfo = _write(tmp_path, "meminfo", JETSON_MEMINFO)
    with PeakMemorySampler(interval=0.01, meminfo_path=meminfo) as s:
        meminfo.write_text(JETSON_MEMINFO.replace("805068", "905068"))
        s.sample()
        meminfo.write_text(JETSON_MEMINFO)
    assert s.peak_nvmap_bytes == 905068 * KiB


def test_sampler_stops_its_thread():
    s = PeakMemorySampler(interval=0.01)
    with s:
        thread = s._thread
        assert thread is not None and thread.is_alive() and thread.daemon
    assert not thread.is_alive()


def test_sampler_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        PeakMemorySampler(interval=0)


# --- TegrastatsReader -------------------------------------------------------------------------


def test_reader_without_binary_says_jetson_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="only on NVIDIA Jetson") as info:
        TegrastatsReader()
    assert "\n" not in str(info.value)


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as a fake tegrastats")
def test_reader_parses_fake_tegrastats(tmp_path, monkeypatch):
    args_file = tmp_path / "args"
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" > \"{args_file}\"\necho '{JP6_ORIN_NANO}'\necho '{JP5_ORIN_NX}'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    with TegrastatsReader(interval_ms=250) as reader:
        got = list(reader)
    assert [g.ram_used_bytes for g in got] == [3150 * MiB, 6334 * MiB]
    assert got[0].timestamp is not None and got[1].timestamp is None
    assert args_file.read_text().split() == ["--interval", "250"]


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as a fake tegrastats")
def test_reader_garbage_line_raises_or_is_skipped(tmp_path, monkeypatch):
    script = tmp_path / "tegrastats"
    script.write_text(f"#!/bin/sh\necho 'WARNING: not a stats line'\necho '{JP6_ORIN_NANO}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(ValueError, match="no 'RAM used/total'"):
        list(TegrastatsReader())
    assert [s.ram_used_bytes for s in TegrastatsReader(skip_unparsable=True)] == [3150 * MiB]


def test_sampler_entered_again_measures_only_the_new_block():
    s = PeakMemorySampler(interval=60.0)
    with s:
        pass
    with s:
        pass
    assert len(s.samples) == 2  # entry + exit of the second block; the first block's are gone
    with s, pytest.raises(RuntimeError, match="already running"):
        s.__enter__()


# --- what `memory` and `bench` get from the board's probes --------------------------------------


def _fake_tegrastats(folder: Path, monkeypatch) -> None:
    script = folder / "tegrastats"
    # It ignores SIGTERM so a block shorter than its start-up still gets both lines (a real
    # tegrastats prints until it is stopped; this one prints two and exits).
    script.write_text(f"#!/bin/sh\ntrap '' TERM\necho '{JP6_ORIN_NANO}'\necho '{JP5_ORIN_NX}'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as a fake tegrastats")
def test_tegrastats_peak_keeps_the_highest_figures(tmp_path, monkeypatch):
    _fake_tegrastats(tmp_path, monkeypatch)
    with TegrastatsPeak(interval_ms=100) as t:
        pass
    assert t.samples == 2 and t.ram_used_peak_bytes == 6334 * MiB
    assert t.gr3d_peak_percent == 0  # both lines: GR3D_FREQ 0%


def test_tegrastats_peak_off_a_jetson_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with TegrastatsPeak() as t:
        pass
    assert t.to_dict() == {"tegrastats_ram_peak_bytes": None, "gr3d_peak_percent": None}


def test_board_memory_only_on_a_jetson(tmp_path, monkeypatch):
    monkeypatch.setattr(probes, "TEGRA_RELEASE", tmp_path / "no-nv_tegra_release")
    monkeypatch.setattr(probes, "MEMINFO", _write(tmp_path, "meminfo", PC_MEMINFO))
    assert board_memory() is None  # a PC's RAM is not the board's
    monkeypatch.setattr(probes, "MEMINFO", _write(tmp_path, "meminfo-jetson", JETSON_MEMINFO))
    got = board_memory()
    want = read_meminfo(probes.MEMINFO)
    assert got == {"total_bytes": want["MemTotal"], "available_bytes": want["MemAvailable"],
                   "nvmap_used_bytes": want["NvMapMemUsed"]}
    monkeypatch.setattr(probes, "MEMINFO", tmp_path / "no-meminfo")  # not Linux
    assert board_memory() is None
