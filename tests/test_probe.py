"""The hardware probe: runs here without NVML or root, labels every value, parses every OS's
memory-module report, and round-trips through JSON."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from flashdesk.offload import bandwidth, probe
from flashdesk.offload.probe import GIB, HardwareProfile, ProfileError, Sourced

PROFILES = Path(__file__).parent / "profiles"
SOURCES = ("measured", "estimated", "calibrated", "unknown")


def _labelled(s: Sourced) -> bool:
    return s.source in SOURCES or (s.source.startswith("reported:") and len(s.source) > 9)


@pytest.fixture(scope="module")
def here(tmp_path_factory) -> HardwareProfile:
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLASHDESK_CACHE_DIR", str(cache))
    try:
        yield probe.probe(remeasure=True)
    finally:
        mp.undo()


def test_probe_here_labels_every_field(here):
    items = here.sourced_items() + [i for g in here.gpus for i in g.sourced_items()]
    assert len(items) >= 20
    for name, sourced in items:
        assert _labelled(sourced), (name, sourced)
        if sourced.source == "unknown":
            assert sourced.note, f"{name} is unknown without saying why"
    # Values the OS always has are reported, not guessed.
    for name in ("os", "ram_total_bytes", "ram_available_bytes", "logical_cores", "isa"):
        assert getattr(here, name).source.startswith("reported:"), name
    assert here.ram_total_bytes.value > here.ram_available_bytes.value * 0.5 > 0


def test_probe_here_measures_ram_bandwidth(here):
    bw = here.ram_read_gbps
    assert bw.source == "measured" and bw.at is not None
    assert 0.5 < bw.value < 2000


def test_probe_here_without_nvml_is_cpu_only():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the CPU-only path is covered elsewhere")
    except Exception:
        pass
    assert probe.probe_gpus() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux limits")
def test_probe_here_memlock_matches_getrlimit(here):
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        assert (
            here.memlock_limit_bytes.value is None and "unlimited" in here.memlock_limit_bytes.note
        )
    else:
        assert here.memlock_limit_bytes.value == soft
        assert here.pin_cap_bytes.value == soft


def test_probe_here_roundtrips_json(here, tmp_path):
    path = tmp_path / "here.json"
    here.save(path)
    again = HardwareProfile.load(path)
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(here.to_json(), sort_keys=True)


def test_ram_bandwidth_is_cached_and_remeasurable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    calls = []

    def fake(threads=0, seconds=1.0):
        calls.append(threads)
        return {"best_gbps": 42.0, "mean_gbps": 40.0, "passes": 3, "threads": 2, "nbytes": 1 << 28}

    monkeypatch.setattr(bandwidth, "measure_ram_read", fake)
    first = bandwidth.ram_read_gbps(2)
    second = bandwidth.ram_read_gbps(2)
    assert first.value == second.value == 42.0 and len(calls) == 1
    assert "cached" in second.note and second.at == pytest.approx(first.at)
    third = bandwidth.ram_read_gbps(2, remeasure=True)
    assert third.source == "measured" and len(calls) == 2


# ----------------------------------------------------------------------- saved profiles


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.json")), ids=lambda p: p.stem)
def test_synthetic_profiles_load_and_are_labelled(path):
    profile = HardwareProfile.load(path)
    for name, sourced in profile.sourced_items():
        assert _labelled(sourced), name
    assert profile.usable_ram_bytes() > 0


def test_profile_errors_say_what_to_do(tmp_path):
    with pytest.raises(ProfileError, match="--save-profile"):
        HardwareProfile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        HardwareProfile.load(bad)
    bad.write_text(json.dumps({"ram_total_bytes": 64}))
    with pytest.raises(ProfileError, match="'value' and 'source'"):
        HardwareProfile.load(bad)
    bad.write_text(json.dumps({"ram_total_bytes": {"value": 1, "source": "guess"}}))
    with pytest.raises(ProfileError, match="reported:<where>"):
        HardwareProfile.load(bad)
    bad.write_text(json.dumps({"ram_totl_bytes": {"value": 1, "source": "estimated"}}))
    with pytest.raises(ProfileError, match="unknown fields"):
        HardwareProfile.load(bad)
    empty = HardwareProfile()
    with pytest.raises(ProfileError, match="no RAM size"):
        empty.usable_ram_bytes()


def test_cgroup_limit_caps_usable_ram():
    profile = HardwareProfile()
    profile.ram_total_bytes = probe.reported(64 * GIB, "psutil")
    profile.ram_available_bytes = probe.reported(60 * GIB, "psutil")
    assert profile.usable_ram_bytes() == 60 * GIB
    profile.cgroup_limit_bytes = probe.reported(16 * GIB, "/sys/fs/cgroup/memory.max")
    assert profile.usable_ram_bytes() == 16 * GIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroups are Linux")
def test_cgroup_files(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert probe.cgroup_limit(64 * GIB, tmp_path).value is None
    (tmp_path / "memory.max").write_text(f"{8 * GIB}\n")
    limit = probe.cgroup_limit(64 * GIB, tmp_path)
    assert limit.value == 8 * GIB and limit.source.startswith("reported:")
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert probe.cgroup_limit(64 * GIB, tmp_path).note == "no limit"


def test_pin_cap_windows_is_half_of_ram_and_unlimited_memlock_is_all():
    ram = probe.reported(192 * GIB, "psutil")
    win = probe.pin_cap("Windows 11", probe.reported(None, "platform"), ram)
    assert win.value == 96 * GIB and win.source == "estimated"
    unlimited = probe.reported(None, "getrlimit(RLIMIT_MEMLOCK)", "unlimited")
    assert probe.pin_cap("Linux 6.8", unlimited, ram).value == 192 * GIB
    small = probe.reported(8 << 20, "getrlimit(RLIMIT_MEMLOCK)")
    assert probe.pin_cap("Linux 6.8", small, ram).value == 8 << 20


# ----------------------------------------------------------------------- memory modules

DMIDECODE = """\
# dmidecode 3.5
Handle 0x0010, DMI type 17, 92 bytes
Memory Device
\tSize: 48 GB
\tLocator: DIMM 0
\tBank Locator: P0 CHANNEL A
\tType: DDR5
\tSpeed: 6000 MT/s
\tConfigured Memory Speed: 5600 MT/s

Handle 0x0011, DMI type 17, 92 bytes
Memory Device
\tSize: No Module Installed
\tLocator: DIMM 1
\tBank Locator: P0 CHANNEL A
\tType: Unknown

Handle 0x0012, DMI type 17, 92 bytes
Memory Device
\tSize: 48 GB
\tLocator: DIMM 0
\tBank Locator: P0 CHANNEL B
\tType: DDR5
\tSpeed: 6000 MT/s
\tConfigured Memory Speed: 5600 MT/s
"""


def test_parse_dmidecode_and_theoretical_bandwidth():
    modules = probe.parse_dmidecode(DMIDECODE)
    assert [(m.kind, m.speed_mts, m.size_bytes) for m in modules] == [("DDR5", 5600, 48 * GIB)] * 2
    profile = HardwareProfile()
    probe.fill_module_fields(profile, modules, "dmidecode", "")
    assert profile.ddr_type.value == "DDR5" and profile.ddr_type.source == "reported:dmidecode"
    assert profile.memory_modules.value == 2 and profile.memory_channels.value == 2
    # 2 channels × 5600 MT/s × 8 B = 89.6 GB/s
    assert profile.theoretical_bandwidth_gbps.value == pytest.approx(89.6)


def _type17(size_mb: int, mem_type: int, speed: int, configured: int, strings: list[str]) -> bytes:
    body = bytearray(0x28)
    body[0], body[1] = 17, 0x28
    if size_mb >= 0x7FFF:  # 32 GiB and up: the extended size field (SMBIOS 2.7)
        struct.pack_into("<H", body, 0x0C, 0x7FFF)
        struct.pack_into("<I", body, 0x1C, size_mb)
    else:
        struct.pack_into("<H", body, 0x0C, size_mb)
    body[0x10], body[0x11], body[0x12] = 1, 2, mem_type
    struct.pack_into("<H", body, 0x15, speed)
    struct.pack_into("<H", body, 0x20, configured)
    return bytes(body) + b"\x00".join(s.encode() for s in strings) + b"\x00\x00"


def test_parse_raw_smbios_table():
    table = (
        _type17(16384, 0x1A, 3200, 3200, ["DIMM_A1", "BANK 0"])
        + _type17(0, 0x02, 0, 0, ["DIMM_A2", "BANK 1"])  # empty slot
        + _type17(32768, 0x1A, 3200, 2933, ["DIMM_B1", "BANK 2"])
        + bytes([127, 4, 0, 0])
        + b"\x00\x00"
    )
    modules = probe.parse_smbios_memory(table)
    assert [(m.kind, m.speed_mts, m.size_bytes) for m in modules] == [
        ("DDR4", 3200, 16 * GIB),
        ("DDR4", 2933, 32 * GIB),
    ]
    assert probe.channels_from_locators([m.locator for m in modules]) == 2


def test_parse_wmi_and_system_profiler():
    wmi = json.dumps(
        [
            {
                "SMBIOSMemoryType": 34,
                "ConfiguredClockSpeed": 5600,
                "Speed": 6400,
                "Capacity": 48 * GIB,
                "DeviceLocator": "DIMM_A2",
                "BankLabel": "BANK 0",
            },
            {
                "SMBIOSMemoryType": 34,
                "ConfiguredClockSpeed": 5600,
                "Speed": 6400,
                "Capacity": 48 * GIB,
                "DeviceLocator": "DIMM_B2",
                "BankLabel": "BANK 2",
            },
        ]
    )
    modules = probe.parse_wmi_memory(wmi)
    assert [(m.kind, m.speed_mts) for m in modules] == [("DDR5", 5600)] * 2
    assert probe.channels_from_locators([m.locator for m in modules]) == 2
    apple = json.dumps(
        {
            "SPMemoryDataType": [
                {"SPMemoryDataType": "128 GB", "dimm_type": "LPDDR5", "dimm_manufacturer": "Micron"}
            ]
        }
    )
    (unified,) = probe.parse_system_profiler_memory(apple)
    assert unified.kind == "LPDDR5" and unified.size_bytes == 128 * GIB
    assert probe.parse_wmi_memory("not json") == []


def test_edac(tmp_path):
    for i, loc in enumerate(("channel 0 slot 0", "channel 1 slot 0")):
        dimm = tmp_path / "mc0" / f"dimm{i}"
        dimm.mkdir(parents=True)
        (dimm / "size").write_text("16384\n")
        (dimm / "dimm_mem_type").write_text("Unbuffered-DDR4\n")
        (dimm / "dimm_location").write_text(loc + "\n")
    modules = probe.read_edac(tmp_path)
    assert [m.kind for m in modules] == ["DDR4", "DDR4"]
    assert probe.channels_from_locators([m.locator for m in modules]) == 2


def test_channel_labels():
    assert probe.channels_from_locators(["DIMM_A1", "DIMM_A2", "DIMM_B1", "DIMM_B2"]) == 2
    assert probe.channels_from_locators(["ChannelA-DIMM0", "ChannelB-DIMM0"]) == 2
    assert probe.channels_from_locators(["P0 CHANNEL A", "P1 CHANNEL A"]) == 2  # two sockets
    assert probe.channels_from_locators(["Bottom slot", "Top slot"]) == 0
    profile = HardwareProfile()
    modules = [probe.ModuleInfo("DDR4", 3200, GIB, "Bottom slot")] * 4
    probe.fill_module_fields(profile, modules, "dmidecode", "")
    assert profile.memory_channels.source == "estimated" and profile.memory_channels.value == 2


def test_unreadable_modules_are_unknown_with_a_hint():
    profile = HardwareProfile()
    probe.fill_module_fields(profile, [], "", "dmidecode is missing or needs root")
    for name in ("ddr_type", "ddr_speed_mts", "memory_modules", "memory_channels"):
        field = getattr(profile, name)
        assert field.source == "unknown" and "sudo" in field.note


# ----------------------------------------------------------------------- GPU figures


def test_pcie_estimates_from_the_link():
    gpu = probe.GpuProfile()
    gpu.pcie_gen_max = probe.reported(4, "nvml")
    gpu.pcie_gen_current = probe.reported(1, "nvml")  # idling link
    gpu.pcie_width_current = probe.reported(16, "nvml")
    bandwidth.fill_estimated_pcie(gpu)
    # PCIe 4.0: 1.969 GB/s per lane × 16 lanes
    assert gpu.h2d_pinned_gbps.value == pytest.approx(1.969 * 16 * probe.PCIE_PINNED_EFFICIENCY)
    assert gpu.h2d_pinned_gbps.source == "estimated"
    assert gpu.h2d_pageable_gbps.value < gpu.h2d_pinned_gbps.value


def test_gpu_tflops_estimate():
    gpu = probe.GpuProfile()
    gpu.compute_capability = probe.reported("8.9", "nvml")
    gpu.sm_count = probe.reported(128, "torch.cuda")
    gpu.sm_clock_mhz = probe.reported(2520, "nvml")
    # RTX 4090: 128 SMs × 2.52 GHz × 512 dense BF16 FLOP/clock ≈ 165 TFLOP/s
    assert probe.estimate_gpu_tflops(gpu).value == pytest.approx(165.2, rel=0.01)


def test_apple_gpu_is_unified():
    gpu = probe.apple_gpu("M3 Max", 128 * GIB)
    assert gpu.unified.value is True
    assert gpu.vram_total_bytes.value == int(128 * GIB * probe.APPLE_GPU_WORKING_SET)


def test_count_cpu_list():
    assert probe.count_cpu_list("0\n") == 1
    assert probe.count_cpu_list("0-1,3") == 3


def test_host_to_device_figures_come_from_the_cache_without_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    gpu = probe.GpuProfile(index=0)
    gpu.name = probe.reported("NVIDIA H200", "nvml")
    gpu.compute_capability = probe.reported("9.0", "nvml")
    gpu.sm_clock_mhz = probe.reported(1980, "nvml")
    key = bandwidth._gpu_key(gpu)
    import time

    entry = {"pinned": 55.4, "pageable": 7.5, "sm_count": 132, "nbytes": 1 << 28, "at": time.time()}
    (tmp_path / "host_to_device.json").write_text(json.dumps({key: entry}))
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would now fail
    bandwidth.fill_host_to_device(gpu)
    assert gpu.h2d_pinned_gbps.value == 55.4 and gpu.h2d_pinned_gbps.source == "measured"
    assert "cached" in gpu.h2d_pageable_gbps.note and gpu.sm_count.value == 132
    # 132 SMs × 1980 MHz × 4096 FLOP/clock (Hopper)
    assert gpu.bf16_tflops.value == pytest.approx(1070.5, rel=1e-3)
    # Remeasuring needs torch with CUDA; without it the figures are left to the PCIe estimate.
    other = probe.GpuProfile(index=0)
    bandwidth.fill_host_to_device(other, remeasure=True)
    assert other.h2d_pinned_gbps.source == "unknown"
    bandwidth.fill_estimated_pcie(other)
    assert other.h2d_pinned_gbps.source == "estimated"


@pytest.mark.parametrize(
    ("flags", "per_cycle", "kind"),
    [
        (("avx2", "fma"), 32, "FP32"),
        (("avx2", "fma", "avx512f"), 64, "FP32"),
        (("avx2", "fma", "avx512f", "avx512_bf16"), 128, "bf16-dot"),
        (("neon",), 16, "FP32"),
    ],
)
def test_cpu_peak_counts_the_instruction_the_prompt_kernels_use(flags, per_cycle, kind):
    """AVX512_BF16 CPUs run prompts through vdpbf16ps (32 multiply-adds per 512-bit instruction,
    twice an FP32 FMA's), so their peak is counted at that rate."""
    profile = HardwareProfile()
    profile.physical_cores = probe.reported(8, "test")
    profile.cpu_max_mhz = probe.reported(3000.0, "test")
    profile.isa = probe.reported(flags, "test")
    peak = probe.estimate_cpu_gflops(profile)
    assert peak.value == pytest.approx(8 * 3.0 * per_cycle)
    assert f"{per_cycle} {kind} FLOP/cycle" in peak.note
