"""HardwareProfile: what this machine has, each value labelled with where it came from.

A plan is only as good as its inputs, and users need to see which inputs were read from the OS,
which were measured, and which are guesses. So every value is a `Sourced`: the value plus a source
label, one of

* `reported:<where>`  read from the OS or a driver (`reported:psutil`, `reported:nvml`, ...);
* `measured`          timed on this machine (RAM read, host-to-device copies), with a timestamp;
* `estimated`         derived from other values or from a table of typical figures;
* `calibrated`        an efficiency factor fitted by a benchmark on this machine;
* `unknown`           nothing could tell (the note says why and what would).

Every source is optional: no NVML, no root, no DMI tables, no EDAC all give a profile, never an
error. Profiles round-trip through JSON so plans can be made for other machines (`--profile FILE`).
The parsers for dmidecode, SMBIOS tables, WMI and system_profiler are pure functions on text so
they are tested on every OS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
GIB = 1 << 30

# Bytes per lane and direction after line coding, by PCIe generation (GB/s).
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# Share of the link rate a pinned cudaMemcpy reaches (H100 PCIe 5 x16: 51.6 of 63 GB/s measured).
PCIE_PINNED_EFFICIENCY = 0.82
# Pageable copies go through a bounce buffer; measured 6.0 vs 51.6 GB/s pinned on the PCIe 5 host.
PAGEABLE_TO_PINNED = 0.12

# SMBIOS type 17 "Memory Type" byte.
SMBIOS_MEMORY_TYPES = {
    0x12: "DDR",
    0x13: "DDR2",
    0x18: "DDR3",
    0x1A: "DDR4",
    0x1B: "LPDDR",
    0x1C: "LPDDR2",
    0x1D: "LPDDR3",
    0x1E: "LPDDR4",
    0x20: "HBM",
    0x21: "HBM2",
    0x22: "DDR5",
    0x23: "LPDDR5",
    0x24: "HBM3",
}

# Apple Silicon unified-memory bandwidth (GB/s) from Apple's published specifications. The binned
# Max parts (fewer GPU cores) have a narrower bus; the lower figure is used when the name is all
# we know.
APPLE_BANDWIDTH_GBPS = {
    "M1": 68,
    "M1 Pro": 200,
    "M1 Max": 400,
    "M1 Ultra": 800,
    "M2": 100,
    "M2 Pro": 200,
    "M2 Max": 400,
    "M2 Ultra": 800,
    "M3": 100,
    "M3 Pro": 150,
    "M3 Max": 300,
    "M3 Ultra": 819,
    "M4": 120,
    "M4 Pro": 273,
    "M4 Max": 410,
}
# Metal lets one process keep about this share of unified memory resident on the GPU.
APPLE_GPU_WORKING_SET = 0.75

# Dense BF16 tensor-core FLOP per SM per clock by compute capability (fp32 accumulate), from the
# architecture whitepapers; used only to estimate prefill speed.
BF16_FLOP_PER_SM_CLOCK = {
    (8, 0): 2048,
    (8, 6): 512,
    (8, 7): 512,
    (8, 9): 512,
    (9, 0): 4096,
    (10, 0): 8192,
    (12, 0): 1024,
}


class ProfileError(ValueError):
    """A profile file that cannot be used, with what is wrong and what to do."""


@dataclass
class Sourced:
    """A value with its source label; `note` says why when the source is weak."""

    value: Any = None
    source: str = "unknown"
    note: str = ""
    at: float | None = None  # unix time of a measurement

    def to_json(self) -> dict:
        out: dict[str, Any] = {"value": self.value, "source": self.source}
        if self.note:
            out["note"] = self.note
        if self.at is not None:
            out["at"] = self.at
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Sourced:
        if not isinstance(data, dict) or "value" not in data or "source" not in data:
            raise ProfileError(
                f"profile field {where!r} must be an object with 'value' and 'source' "
                f"(got {data!r}); write it as {{'value': ..., 'source': 'reported:...'}}."
            )
        source = str(data["source"])
        if not _valid_source(source):
            raise ProfileError(
                f"profile field {where!r} has source {source!r}; use reported:<where>, measured, "
                "estimated, calibrated or unknown."
            )
        value = data["value"]
        if isinstance(value, list):
            value = tuple(value)
        return cls(value, source, str(data.get("note", "")), data.get("at"))

    @property
    def known(self) -> bool:
        return self.value is not None and self.source != "unknown"


def _valid_source(source: str) -> bool:
    return source in ("measured", "estimated", "calibrated", "unknown") or (
        source.startswith("reported:") and len(source) > len("reported:")
    )


def reported(value: Any, where: str, note: str = "") -> Sourced:
    return Sourced(value, f"reported:{where}", note)


def estimated(value: Any, note: str = "") -> Sourced:
    return Sourced(value, "estimated", note)


def unknown(note: str) -> Sourced:
    return Sourced(None, "unknown", note)


@dataclass
class GpuProfile:
    """One GPU. `unified` means it shares system RAM (Apple Silicon): its memory is not extra."""

    index: int = 0
    name: Sourced = field(default_factory=Sourced)
    vram_total_bytes: Sourced = field(default_factory=Sourced)
    vram_free_bytes: Sourced = field(default_factory=Sourced)
    compute_capability: Sourced = field(default_factory=Sourced)
    sm_count: Sourced = field(default_factory=Sourced)
    sm_clock_mhz: Sourced = field(default_factory=Sourced)
    pcie_gen_current: Sourced = field(default_factory=Sourced)
    pcie_gen_max: Sourced = field(default_factory=Sourced)
    pcie_width_current: Sourced = field(default_factory=Sourced)
    pcie_width_max: Sourced = field(default_factory=Sourced)
    driver_version: Sourced = field(default_factory=Sourced)
    memory_bandwidth_gbps: Sourced = field(default_factory=Sourced)
    bf16_tflops: Sourced = field(default_factory=Sourced)
    h2d_pinned_gbps: Sourced = field(default_factory=Sourced)
    h2d_pageable_gbps: Sourced = field(default_factory=Sourced)
    unified: Sourced = field(default_factory=lambda: Sourced(False, "estimated"))

    def sourced_items(self) -> list[tuple[str, Sourced]]:
        return [
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Sourced)
        ]

    def to_json(self) -> dict:
        return {"index": self.index, **{k: v.to_json() for k, v in self.sourced_items()}}

    @classmethod
    def from_json(cls, data: dict, where: str) -> GpuProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{where} must be an object describing one GPU.")
        gpu = cls(index=int(data.get("index", 0)))
        for f in dataclasses.fields(cls):
            if f.name != "index" and f.name in data:
                setattr(gpu, f.name, Sourced.from_json(data[f.name], f"{where}.{f.name}"))
        return gpu

    @property
    def usable_vram_bytes(self) -> int | None:
        """Free VRAM when reported, else the total."""
        for candidate in (self.vram_free_bytes, self.vram_total_bytes):
            if candidate.known:
                return int(candidate.value)
        return None


@dataclass
class HardwareProfile:
    """The machine. Every value is a `Sourced`; `gpus` is empty on a CPU-only machine."""

    os: Sourced = field(default_factory=Sourced)
    arch: Sourced = field(default_factory=Sourced)
    cpu_model: Sourced = field(default_factory=Sourced)
    physical_cores: Sourced = field(default_factory=Sourced)
    logical_cores: Sourced = field(default_factory=Sourced)
    cpu_max_mhz: Sourced = field(default_factory=Sourced)
    isa: Sourced = field(default_factory=Sourced)
    numa_nodes: Sourced = field(default_factory=Sourced)
    cpu_gflops: Sourced = field(default_factory=Sourced)
    ram_total_bytes: Sourced = field(default_factory=Sourced)
    ram_available_bytes: Sourced = field(default_factory=Sourced)
    swap_total_bytes: Sourced = field(default_factory=Sourced)
    cgroup_limit_bytes: Sourced = field(default_factory=Sourced)
    memlock_limit_bytes: Sourced = field(default_factory=Sourced)
    pin_cap_bytes: Sourced = field(default_factory=Sourced)
    ddr_type: Sourced = field(default_factory=Sourced)
    ddr_speed_mts: Sourced = field(default_factory=Sourced)
    memory_modules: Sourced = field(default_factory=Sourced)
    memory_channels: Sourced = field(default_factory=Sourced)
    theoretical_bandwidth_gbps: Sourced = field(default_factory=Sourced)
    ram_read_gbps: Sourced = field(default_factory=Sourced)
    disk_read_gbps: Sourced = field(default_factory=Sourced)
    gpus: list[GpuProfile] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    label: str = ""

    def sourced_items(self) -> list[tuple[str, Sourced]]:
        return [
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Sourced)
        ]

    def to_json(self) -> dict:
        out: dict[str, Any] = {"schema": SCHEMA, "label": self.label, "created_at": self.created_at}
        out.update({k: v.to_json() for k, v in self.sourced_items()})
        out["gpus"] = [g.to_json() for g in self.gpus]
        return out

    @classmethod
    def from_json(cls, data: Any) -> HardwareProfile:
        if not isinstance(data, dict):
            raise ProfileError("a hardware profile must be a JSON object (see `--save-profile`).")
        if data.get("schema", SCHEMA) != SCHEMA:
            raise ProfileError(
                f"profile schema {data.get('schema')!r} is not {SCHEMA}; save the profile again "
                "with this FlashDesk (`flashdesk fit --save-profile FILE`)."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(k for k in data if k not in known and k != "schema")
        if extra:
            raise ProfileError(
                f"profile has unknown fields {extra}; check their spelling against a profile "
                "saved with `flashdesk fit --save-profile FILE`."
            )
        profile = cls(label=str(data.get("label", "")))
        profile.created_at = float(data.get("created_at", time.time()))
        for name, _ in profile.sourced_items():
            if name in data:
                setattr(profile, name, Sourced.from_json(data[name], name))
        gpus = data.get("gpus", [])
        if not isinstance(gpus, list):
            raise ProfileError("profile field 'gpus' must be a list (empty for no GPU).")
        profile.gpus = [GpuProfile.from_json(g, f"gpus[{i}]") for i, g in enumerate(gpus)]
        return profile

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(
                f"no profile at {path}; make one with `flashdesk fit --save-profile {path}`."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read the profile {path}: {exc}.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"{path} is not valid JSON ({exc}); save the profile again with "
                "`flashdesk fit --save-profile FILE`."
            ) from None
        profile = cls.from_json(data)
        if not profile.label:
            profile.label = path.stem
        return profile

    # --------------------------------------------------------------- derived figures

    @property
    def gpu(self) -> GpuProfile | None:
        """The GPU the planner uses: the one with the most memory."""
        if not self.gpus:
            return None
        return max(self.gpus, key=lambda g: g.usable_vram_bytes or 0)

    @property
    def unified_memory(self) -> bool:
        gpu = self.gpu
        return bool(gpu is not None and gpu.unified.value)

    def usable_ram_bytes(self) -> int:
        """Available RAM, capped by the cgroup limit; the total when availability is unknown."""
        candidates = [
            int(s.value)
            for s in (self.ram_available_bytes, self.ram_total_bytes)
            if s.known and s.value
        ]
        if not candidates:
            raise ProfileError(
                "the profile has no RAM size; add ram_total_bytes (and ram_available_bytes)."
            )
        usable = candidates[0]
        if self.cgroup_limit_bytes.known and self.cgroup_limit_bytes.value:
            usable = min(usable, int(self.cgroup_limit_bytes.value))
        return usable

    def ram_bandwidth(self) -> Sourced:
        """Best available RAM read bandwidth, GB/s: measured, else 70 % of theoretical."""
        if self.ram_read_gbps.known:
            return self.ram_read_gbps
        if self.theoretical_bandwidth_gbps.known:
            return estimated(
                0.7 * float(self.theoretical_bandwidth_gbps.value),
                "70 % of the theoretical channel bandwidth (no measurement in this profile)",
            )
        return estimated(30.0, "typical dual-channel desktop figure; measure it with `fit`")


# ---------------------------------------------------------------------------------- probing


def probe(
    measure: bool = True,
    remeasure: bool = False,
    measure_gpu_copies: bool = True,
    disk_path: str | Path | None = None,
) -> HardwareProfile:
    """Probe this machine. Never raises for a missing source: such fields are `unknown`.

    `measure` runs the RAM read-bandwidth measurement (~1 s) unless a recent cached result exists
    (`remeasure` forces it); `measure_gpu_copies` times host-to-device copies when CUDA is present.
    `disk_path` names where the checkpoint lives, so its disk is the one whose speed is estimated.
    """
    from flashdesk.offload import bandwidth

    profile = HardwareProfile()
    _probe_os(profile)
    _probe_cpu(profile)
    _probe_memory(profile)
    _probe_modules(profile)
    if measure:
        profile.ram_read_gbps = bandwidth.ram_read_gbps(
            threads=_int_or_zero(profile.physical_cores), remeasure=remeasure
        )
    else:
        profile.ram_read_gbps = unknown("not measured (measurement switched off)")
    profile.disk_read_gbps = bandwidth.disk_read_estimate(disk_path or Path.cwd())
    profile.gpus = probe_gpus()
    if sys.platform == "darwin" and not profile.gpus:
        apple = _apple_gpu(profile)
        if apple is not None:
            profile.gpus = [apple]
    if measure_gpu_copies:
        for gpu in profile.gpus:
            if not gpu.unified.value:
                bandwidth.fill_host_to_device(gpu, remeasure=remeasure)
    for gpu in profile.gpus:
        bandwidth.fill_estimated_pcie(gpu)
    _fill_pin_cap(profile)
    profile.label = describe(profile)
    return profile


def describe(profile: HardwareProfile) -> str:
    """One line naming the machine by its parts (no host name: profiles get shared)."""
    ram = profile.ram_total_bytes
    parts = [str(profile.cpu_model.value or "unknown CPU")]
    if ram.known:
        parts.append(f"{int(ram.value) / GIB:.0f} GiB RAM")
    gpu = profile.gpu
    parts.append(str(gpu.name.value) if gpu is not None and gpu.name.known else "no GPU")
    return ", ".join(parts)


def _int_or_zero(s: Sourced) -> int:
    return int(s.value) if s.known else 0


def _probe_os(profile: HardwareProfile) -> None:
    profile.os = reported(f"{platform.system()} {platform.release()}", "platform")
    profile.arch = reported(platform.machine(), "platform")


def _probe_cpu(profile: HardwareProfile) -> None:
    import psutil

    model = _cpu_model_name()
    profile.cpu_model = model
    physical = psutil.cpu_count(logical=False)
    profile.physical_cores = (
        reported(physical, "psutil") if physical else unknown("psutil could not count cores")
    )
    try:
        from flashdesk.engine import _kernels

        features = _kernels.cpu_features()
        profile.logical_cores = reported(int(features["logical_cores"]), "cpu_features")
        flags = sorted(k for k, v in features.items() if v is True)
        profile.isa = reported(tuple(flags), "cpu_features")
    except ImportError as exc:
        profile.logical_cores = reported(os.cpu_count(), "os.cpu_count")
        profile.isa = unknown(f"the kernels extension did not load ({exc}); reinstall FlashDesk")
    if not profile.physical_cores.known and profile.logical_cores.known:
        profile.physical_cores = estimated(
            profile.logical_cores.value, "assumed equal to logical cores"
        )
    profile.cpu_max_mhz = _cpu_max_mhz()
    profile.numa_nodes = _numa_nodes()
    profile.cpu_gflops = estimate_cpu_gflops(profile)


def _cpu_model_name() -> Sourced:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware")):
                    return reported(line.split(":", 1)[1].strip(), "/proc/cpuinfo")
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return reported(out.strip(), "sysctl")
    name = platform.processor()
    if name:
        return reported(name, "platform")
    return unknown("the OS did not name the CPU")


def _cpu_max_mhz() -> Sourced:
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return reported(int(path.read_text()) / 1000.0, str(path))
    except (OSError, ValueError):
        pass
    try:
        import psutil

        freq = psutil.cpu_freq()
    except (ImportError, OSError, RuntimeError, NotImplementedError):
        freq = None
    if freq is not None and freq.max:
        return reported(float(freq.max), "psutil")
    if freq is not None and freq.current:
        return reported(float(freq.current), "psutil", "current clock; the maximum is not exposed")
    return unknown("the OS does not expose the CPU clock")


def _numa_nodes() -> Sourced:
    online = Path("/sys/devices/system/node/online")
    try:
        return reported(count_cpu_list(online.read_text()), str(online))
    except (OSError, ValueError):
        pass
    if sys.platform in ("win32", "darwin"):
        return estimated(1, "desktop machines of this OS have one NUMA node")
    return unknown("/sys/devices/system/node is not readable")


def count_cpu_list(text: str) -> int:
    """Entries in a Linux list such as `0-1,3` (NUMA nodes, CPUs)."""
    total = 0
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            total += int(hi) - int(lo) + 1
        else:
            int(part)
            total += 1
    return total


def estimate_cpu_gflops(profile: HardwareProfile) -> Sourced:
    """Peak throughput of the prompt kernels' inner instruction: cores × clock × FLOP/cycle of
    the widest vector unit; FP32 FMA, or the bf16 dot (vdpbf16ps: twice the multiply-adds per
    instruction) where the CPU has AVX512_BF16, which the expert and linear kernels use for
    prompts on bf16 activations."""
    cores = _int_or_zero(profile.physical_cores)
    if not cores:
        return unknown("core count unknown")
    mhz = float(profile.cpu_max_mhz.value) if profile.cpu_max_mhz.known else 3000.0
    flags = set(profile.isa.value or ()) if profile.isa.known else set()
    kind = "FP32"
    if "avx512_bf16" in flags:
        per_cycle, kind = 128, "bf16-dot"  # 2 × 512-bit vdpbf16ps, 32 multiply-adds each
    elif "avx512f" in flags:
        per_cycle = 64  # 2 × 512-bit FMA (one on some parts; the kernel efficiency absorbs it)
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    elif "neon" in flags:
        per_cycle = 16
    else:
        per_cycle = 8
    note = f"{cores} cores × {mhz / 1000:.2f} GHz × {per_cycle} {kind} FLOP/cycle"
    if not profile.cpu_max_mhz.known:
        note += " (clock assumed 3 GHz)"
    return estimated(cores * mhz / 1000.0 * per_cycle, note)


def _probe_memory(profile: HardwareProfile) -> None:
    import psutil

    vm = psutil.virtual_memory()
    profile.ram_total_bytes = reported(int(vm.total), "psutil")
    profile.ram_available_bytes = reported(int(vm.available), "psutil")
    profile.swap_total_bytes = reported(int(psutil.swap_memory().total), "psutil")
    profile.cgroup_limit_bytes = cgroup_limit(int(vm.total))
    profile.memlock_limit_bytes = memlock_limit()


def cgroup_limit(ram_total: int, root: Path = Path("/sys/fs/cgroup")) -> Sourced:
    """The container's memory limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`)."""
    if not sys.platform.startswith("linux"):
        return reported(None, "platform", f"no cgroups on {sys.platform}")
    own = _own_cgroup_paths()
    candidates = [root / rel / "memory.max" for rel in own.get("v2", [])]
    candidates += [root / "memory.max"]
    candidates += [root / "memory" / rel / "memory.limit_in_bytes" for rel in own.get("v1", [])]
    candidates += [root / "memory" / "memory.limit_in_bytes"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return reported(None, str(path), "no limit")
        try:
            limit = int(text)
        except ValueError:
            continue
        if limit >= ram_total:  # v1 writes a huge number for "no limit"
            return reported(None, str(path), "no limit")
        return reported(limit, str(path))
    return reported(None, "/sys/fs/cgroup", "no memory limit file found: no limit")


def _own_cgroup_paths() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"v1": [], "v2": []}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        rel = parts[2].lstrip("/")
        if parts[0] == "0" and parts[1] == "":
            found["v2"].append(rel)
        elif "memory" in parts[1].split(","):
            found["v1"].append(rel)
    return found


def memlock_limit() -> Sourced:
    """RLIMIT_MEMLOCK (bytes that may be page-locked); None with note 'unlimited'."""
    if sys.platform == "win32":
        return reported(None, "platform", "Windows has no RLIMIT_MEMLOCK; see pin_cap_bytes")
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return reported(None, "getrlimit(RLIMIT_MEMLOCK)", "unlimited")
    return reported(int(soft), "getrlimit(RLIMIT_MEMLOCK)")


def _fill_pin_cap(profile: HardwareProfile) -> None:
    profile.pin_cap_bytes = pin_cap(
        profile.os.value or "", profile.memlock_limit_bytes, profile.ram_total_bytes
    )


def pin_cap(os_name: str, memlock: Sourced, ram_total: Sourced) -> Sourced:
    """How many bytes of host memory can be page-locked for fast host-to-device copies."""
    if str(os_name).startswith("Windows"):
        if ram_total.known:
            return estimated(
                int(ram_total.value) // 2,
                "CUDA on Windows page-locks at most about half of RAM",
            )
        return unknown("RAM size unknown")
    if memlock.source.startswith("reported:") and memlock.value is None:
        if ram_total.known:
            return Sourced(int(ram_total.value), memlock.source, "memlock unlimited: all of RAM")
        return unknown("RAM size unknown")
    if memlock.known:
        return Sourced(int(memlock.value), memlock.source)
    return unknown("the locked-memory limit is unknown")


# ------------------------------------------------------------------------- memory modules


@dataclass
class ModuleInfo:
    """One populated memory slot."""

    kind: str | None  # "DDR5", "LPDDR5", ...
    speed_mts: int | None  # configured speed when known, else rated
    size_bytes: int | None
    locator: str  # "DIMM_A1", "P0 CHANNEL A / DIMM 0", ...


def _probe_modules(profile: HardwareProfile) -> None:
    modules, where, why = read_modules()
    fill_module_fields(profile, modules, where, why)


def read_modules() -> tuple[list[ModuleInfo], str, str]:
    """Populated modules and where they were read; `why` says what failed when none were."""
    reasons = []
    if sys.platform.startswith("linux"):
        table = Path("/sys/firmware/dmi/tables/DMI")
        try:
            modules = parse_smbios_memory(table.read_bytes())
            if modules:
                return modules, str(table), ""
        except PermissionError:
            reasons.append(f"{table} is readable by root only")
        except OSError:
            reasons.append(f"{table} does not exist")
        out = _run(["dmidecode", "-t", "memory"])
        if out and "Memory Device" in out:
            modules = parse_dmidecode(out)
            if modules:
                return modules, "dmidecode", ""
        reasons.append("dmidecode is missing or needs root")
        modules = read_edac()
        if modules:
            return modules, "/sys/devices/system/edac", ""
        reasons.append("no EDAC driver in /sys/devices/system/edac")
    elif sys.platform == "win32":
        out = _run(
            [
                "powershell",
                "-NoProfile",
                "-Command",
                "Get-CimInstance Win32_PhysicalMemory | Select-Object SMBIOSMemoryType,"
                "ConfiguredClockSpeed,Speed,Capacity,DeviceLocator,BankLabel | ConvertTo-Json",
            ]
        )
        if out:
            modules = parse_wmi_memory(out)
            if modules:
                return modules, "WMI Win32_PhysicalMemory", ""
        reasons.append("WMI Win32_PhysicalMemory gave no modules")
    elif sys.platform == "darwin":
        out = _run(["system_profiler", "SPMemoryDataType", "-json"])
        if out:
            modules = parse_system_profiler_memory(out)
            if modules:
                return modules, "system_profiler", ""
        reasons.append("system_profiler SPMemoryDataType gave no modules")
    return [], "", "; ".join(reasons) or f"no memory-module source on {sys.platform}"


def fill_module_fields(
    profile: HardwareProfile, modules: list[ModuleInfo], where: str, why: str
) -> None:
    if not modules:
        hint = (
            f"{why}. Run `sudo flashdesk fit --save-profile FILE` once to record the modules "
            "(the measured bandwidth is used either way)."
        )
        for name in ("ddr_type", "ddr_speed_mts", "memory_modules", "memory_channels"):
            setattr(profile, name, unknown(hint))
        profile.theoretical_bandwidth_gbps = unknown("needs the module speed and channel count")
        return
    kinds = sorted({m.kind for m in modules if m.kind})
    profile.ddr_type = reported("/".join(kinds), where) if kinds else unknown(f"{where}: no type")
    speeds = [m.speed_mts for m in modules if m.speed_mts]
    profile.ddr_speed_mts = (
        reported(min(speeds), where, "slowest module: the bus runs at that speed")
        if speeds
        else unknown(f"{where} gave no speed")
    )
    profile.memory_modules = reported(len(modules), where)
    channels = channels_from_locators([m.locator for m in modules])
    if channels:
        profile.memory_channels = estimated(
            channels, f"distinct channels named in the slot labels ({where})"
        )
    else:
        guess = 1 if len(modules) == 1 else 2 if len(modules) <= 4 else len(modules) // 2
        profile.memory_channels = estimated(
            guess, "slot labels name no channels: assumed desktop layout (1-2 modules per channel)"
        )
    if kinds and any(k.startswith("LPDDR") for k in kinds):
        profile.memory_channels.note += "; LPDDR channel widths vary, treat as approximate"
    if profile.ddr_speed_mts.known and profile.memory_channels.known:
        gbps = int(profile.memory_channels.value) * int(profile.ddr_speed_mts.value) * 8 / 1000.0
        profile.theoretical_bandwidth_gbps = estimated(
            gbps, "channels × MT/s × 8 bytes (64-bit channels)"
        )
    else:
        profile.theoretical_bandwidth_gbps = unknown("needs the module speed and channel count")


_CHANNEL_PATTERNS = (
    re.compile(r"CHANNEL\s*([A-Z0-9]+)", re.I),
    re.compile(r"CH(?:AN)?[\s_-]?([A-Z0-9])\b", re.I),
    re.compile(r"DIMM[\s_-]?(?:P\d[\s_-]?)?([A-H])\d", re.I),
    re.compile(r"(?:^|[\s_-])([A-H])\d(?:$|\s)", re.I),
)


def channels_from_locators(locators: list[str]) -> int:
    """Distinct memory channels named in slot labels ('P0 CHANNEL A', 'DIMM_B2', ...); 0 if none."""
    names = set()
    for label in locators:
        cpu = re.search(r"\b(?:P|CPU|NODE)(\d+)", label, re.I)
        for pattern in _CHANNEL_PATTERNS:
            m = pattern.search(label)
            if m:
                names.add(((cpu.group(1) if cpu else ""), m.group(1).upper()))
                break
        else:
            return 0
    return len(names)


def parse_dmidecode(text: str) -> list[ModuleInfo]:
    """Populated 'Memory Device' entries of `dmidecode -t memory`."""
    modules = []
    for block in text.split("\n\n"):
        if "Memory Device" not in block:
            continue
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip()] = value.strip()
        size = _parse_size(fields.get("Size", ""))
        if not size:
            continue
        speed = _parse_speed(fields.get("Configured Memory Speed", "")) or _parse_speed(
            fields.get("Configured Clock Speed", "")
        )
        speed = speed or _parse_speed(fields.get("Speed", ""))
        kind = fields.get("Type")
        locator = " / ".join(x for x in (fields.get("Bank Locator"), fields.get("Locator")) if x)
        modules.append(
            ModuleInfo(kind if kind not in (None, "Unknown") else None, speed, size, locator)
        )
    return modules


def _parse_size(text: str) -> int | None:
    m = re.match(r"(\d+)\s*(KB|MB|GB|TB)", text.strip(), re.I)
    if not m:
        return None
    unit = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * unit


def _parse_speed(text: str) -> int | None:
    m = re.match(r"(\d+)\s*(MT/s|MHz)", text.strip())
    return int(m.group(1)) if m else None


def parse_smbios_memory(table: bytes) -> list[ModuleInfo]:
    """Populated type-17 (Memory Device) structures of a raw SMBIOS table (`/sys/firmware/dmi/tables/DMI`)."""
    modules = []
    offset = 0
    while offset + 4 <= len(table):
        kind, length = table[offset], table[offset + 1]
        if length < 4:
            break
        formatted = table[offset : offset + length]
        end = table.find(b"\x00\x00", offset + length)
        if end < 0:
            break
        strings = table[offset + length : end].split(b"\x00")
        if kind == 17 and length >= 0x15:
            modules_entry = _smbios_type17(formatted, strings)
            if modules_entry is not None:
                modules.append(modules_entry)
        if kind == 127:  # end of table
            break
        offset = end + 2
    return modules


def _smbios_type17(s: bytes, strings: list[bytes]) -> ModuleInfo | None:
    def string(index: int) -> str:
        return (
            strings[index - 1].decode("ascii", "replace").strip()
            if 0 < index <= len(strings)
            else ""
        )

    size_word = struct.unpack_from("<H", s, 0x0C)[0]
    if size_word in (0, 0xFFFF):
        return None
    if size_word == 0x7FFF and len(s) >= 0x20:
        size = struct.unpack_from("<I", s, 0x1C)[0] << 20
    else:
        size = (size_word & 0x7FFF) << (10 if size_word & 0x8000 else 20)
    speed = struct.unpack_from("<H", s, 0x15)[0] if len(s) >= 0x17 else 0
    if len(s) >= 0x22:
        configured = struct.unpack_from("<H", s, 0x20)[0]
        if configured == 0xFFFF and len(s) >= 0x5C:
            configured = struct.unpack_from("<I", s, 0x58)[0]
        speed = configured or speed
    if speed == 0xFFFF and len(s) >= 0x58:
        speed = struct.unpack_from("<I", s, 0x54)[0]
    locator = " / ".join(x for x in (string(s[0x11]), string(s[0x10])) if x)
    return ModuleInfo(SMBIOS_MEMORY_TYPES.get(s[0x12]), speed or None, size, locator)


def read_edac(root: Path = Path("/sys/devices/system/edac/mc")) -> list[ModuleInfo]:
    """Modules from the Linux EDAC driver (type and size; location names the channel)."""
    modules = []
    for dimm in sorted(root.glob("mc*/dimm*")):
        try:
            size_mb = int((dimm / "size").read_text())
        except (OSError, ValueError):
            continue
        if size_mb <= 0:
            continue
        kind = _read(dimm / "dimm_mem_type").replace("Unbuffered-", "").replace("Registered-", "")
        location = _read(dimm / "dimm_location")
        mc = dimm.parent.name
        locator = f"{mc.replace('mc', 'P')} {location}".strip()
        modules.append(ModuleInfo(kind or None, None, size_mb << 20, locator))
    return modules


def parse_wmi_memory(text: str) -> list[ModuleInfo]:
    """`Get-CimInstance Win32_PhysicalMemory | ConvertTo-Json` output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    if isinstance(data, dict):
        data = [data]
    wmi_types = {20: "DDR", 21: "DDR2", 24: "DDR3", 26: "DDR4", 34: "DDR5", 35: "LPDDR5"}
    modules = []
    for entry in data:
        if not isinstance(entry, dict) or not entry.get("Capacity"):
            continue
        kind = wmi_types.get(int(entry.get("SMBIOSMemoryType") or 0))
        speed = entry.get("ConfiguredClockSpeed") or entry.get("Speed")
        locator = " / ".join(str(entry[k]) for k in ("BankLabel", "DeviceLocator") if entry.get(k))
        modules.append(
            ModuleInfo(kind, int(speed) if speed else None, int(entry["Capacity"]), locator)
        )
    return modules


def parse_system_profiler_memory(text: str) -> list[ModuleInfo]:
    """`system_profiler SPMemoryDataType -json`: Apple Silicon reports one unified package."""
    try:
        items = json.loads(text).get("SPMemoryDataType", [])
    except (json.JSONDecodeError, AttributeError):
        return []
    modules = []
    for item in items:
        slots = item.get("_items")
        if slots:  # Intel Macs: one entry per DIMM slot
            for slot in slots:
                size = _parse_size(str(slot.get("dimm_size", "")))
                if size:
                    modules.append(
                        ModuleInfo(
                            slot.get("dimm_type"),
                            _parse_speed(str(slot.get("dimm_speed", ""))),
                            size,
                            str(slot.get("_name", "")),
                        )
                    )
        elif item.get("SPMemoryDataType"):
            size = _parse_size(str(item["SPMemoryDataType"]))
            modules.append(ModuleInfo(item.get("dimm_type"), None, size, "unified"))
    return modules


def _apple_gpu(profile: HardwareProfile) -> GpuProfile | None:
    """Apple Silicon: the GPU shares RAM; bandwidth from Apple's specifications by chip name."""
    chip = str(profile.cpu_model.value or "")
    m = re.search(r"Apple (M\d(?: (?:Pro|Max|Ultra))?)", chip)
    if not m or not profile.ram_total_bytes.known:
        return None
    return apple_gpu(m.group(1), int(profile.ram_total_bytes.value))


def apple_gpu(chip: str, ram_total: int) -> GpuProfile:
    gpu = GpuProfile(index=0)
    gpu.name = reported(f"Apple {chip} GPU", "sysctl")
    gpu.unified = reported(True, "sysctl", "unified memory: the GPU uses system RAM")
    cap = int(ram_total * APPLE_GPU_WORKING_SET)
    gpu.vram_total_bytes = estimated(cap, "Metal's working-set limit, about 75 % of RAM")
    gpu.vram_free_bytes = estimated(cap, "shared with the CPU side of the plan")
    bw = APPLE_BANDWIDTH_GBPS.get(chip)
    gpu.memory_bandwidth_gbps = (
        estimated(float(bw), f"Apple's specification for {chip}")
        if bw
        else unknown(f"no bandwidth figure for {chip}")
    )
    for name in ("h2d_pinned_gbps", "h2d_pageable_gbps"):
        setattr(gpu, name, estimated(None, "unified memory: no host-to-device copies"))
    return gpu


# --------------------------------------------------------------------------------- NVIDIA


def probe_gpus() -> list[GpuProfile]:
    """NVIDIA GPUs through NVML; an empty list (CPU-only) when there is no driver or library."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / NoPermission: CPU-only
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
        driver = _nvml(pynvml.nvmlSystemGetDriverVersion)
        return [_probe_nvml_gpu(pynvml, i, driver) for i in range(count)]
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml(fn: Any, *args: Any) -> Any:
    try:
        value = fn(*args)
    except Exception:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _probe_nvml_gpu(pynvml: Any, index: int, driver: Any) -> GpuProfile:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    gpu = GpuProfile(index=index)

    def put(name: str, value: Any, what: str) -> None:
        setattr(
            gpu,
            name,
            reported(value, "nvml")
            if value is not None
            else unknown(f"NVML did not report {what}"),
        )

    put("name", _nvml(pynvml.nvmlDeviceGetName, handle), "the name")
    mem = _nvml(pynvml.nvmlDeviceGetMemoryInfo, handle)
    put("vram_total_bytes", int(mem.total) if mem else None, "memory")
    put("vram_free_bytes", int(mem.free) if mem else None, "memory")
    cc = _nvml(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    put("compute_capability", f"{cc[0]}.{cc[1]}" if cc else None, "the compute capability")
    put("pcie_gen_current", _nvml(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle), "PCIe gen")
    put("pcie_gen_max", _nvml(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle), "PCIe gen")
    put("pcie_width_current", _nvml(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle), "PCIe width")
    put("pcie_width_max", _nvml(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle), "PCIe width")
    put("driver_version", driver, "the driver version")
    bus = _nvml(pynvml.nvmlDeviceGetMemoryBusWidth, handle)
    mem_mhz = _nvml(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM)
    if bus and mem_mhz:
        gpu.memory_bandwidth_gbps = estimated(
            bus / 8 * mem_mhz * 2 / 1000.0,
            f"{bus}-bit bus × {mem_mhz} MHz × 2 (double data rate), from NVML",
        )
    else:
        gpu.memory_bandwidth_gbps = unknown("NVML did not report the memory bus and clock")
    put(
        "sm_clock_mhz",
        _nvml(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
        "the SM clock",
    )
    gpu.sm_count = unknown("NVML has no SM count; filled in when torch sees the GPU")
    gpu.bf16_tflops = estimate_gpu_tflops(gpu)
    gpu.unified = reported(False, "nvml", "discrete GPU with its own memory")
    return gpu


def estimate_gpu_tflops(gpu: GpuProfile) -> Sourced:
    """Dense BF16 tensor throughput: SMs × clock × FLOP per SM per clock of the architecture."""
    if not (gpu.compute_capability.known and gpu.sm_count.known and gpu.sm_clock_mhz.known):
        return unknown("needs the compute capability, SM count and clock")
    major, minor = (int(x) for x in str(gpu.compute_capability.value).split("."))
    per_clock = BF16_FLOP_PER_SM_CLOCK.get((major, minor))
    if per_clock is None:
        return unknown(f"no tensor-core figure for compute capability {major}.{minor}")
    mhz = float(gpu.sm_clock_mhz.value)
    tflops = int(gpu.sm_count.value) * mhz * 1e6 * per_clock / 1e12
    return estimated(tflops, f"{gpu.sm_count.value} SMs × {mhz:.0f} MHz × {per_clock} FLOP/clock")


# ---------------------------------------------------------------------------------- helpers


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _run(cmd: list[str], timeout: float = 10.0) -> str:
    """stdout of a helper program, or '' when it is missing, fails or needs privileges."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""
