"""Measured RAM read and host-to-device bandwidth, the figures every speed prediction divides by.

RAM read uses the C extension's streaming reader with all physical cores; the result is cached
with a timestamp (per CPU and RAM size) so `flashdesk fit` answers at once the second time, and
`remeasure=True` times it again. Host-to-device copies need CUDA and torch, both imported only here
and only when asked; without them the PCIe figures are estimated from the link NVML reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from flashdesk.offload.probe import (
    PAGEABLE_TO_PINNED,
    PCIE_LANE_GBPS,
    PCIE_PINNED_EFFICIENCY,
    GpuProfile,
    Sourced,
    estimate_gpu_tflops,
    estimated,
    reported,
    unknown,
)

CACHE_MAX_AGE_S = 7 * 24 * 3600
RAM_READ_SECONDS = 0.8  # plus ~0.2 s to fault in the buffer: about a second in all

# Typical sequential read of the device kinds Linux tells apart (GB/s); used only to price paging
# experts from disk, and labelled estimated.
DISK_READ_GBPS = {"nvme": 3.0, "ssd": 0.5, "hdd": 0.15}


def cache_dir() -> Path:
    """Per-user cache folder (FLASHDESK_CACHE_DIR overrides it)."""
    override = os.environ.get("FLASHDESK_CACHE_DIR")
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "FlashDesk" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "FlashDesk"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashdesk"


def _machine_key() -> str:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()}|{psutil.virtual_memory().total >> 30}GiB"


def measure_ram_read(threads: int = 0, seconds: float = RAM_READ_SECONDS) -> dict:
    """Time streaming reads of a buffer well above the last-level cache; GB/s best and mean."""
    import psutil

    from flashdesk.engine import _kernels

    available = psutil.virtual_memory().available
    nbytes = int(min(512 << 20, max(64 << 20, available // 8)))
    return _kernels.read_bandwidth(nbytes, threads, seconds, details=True)


def ram_read_gbps(threads: int = 0, remeasure: bool = False) -> Sourced:
    """Measured RAM read bandwidth (GB/s), from the cache when it is recent and for this machine."""
    path = cache_dir() / "ram_read.json"
    key = _machine_key()
    if not remeasure:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key and time.time() - cached["at"] < CACHE_MAX_AGE_S:
                return Sourced(
                    cached["gbps"],
                    "measured",
                    f"{cached['threads']} threads, cached from {_when(cached['at'])}",
                    cached["at"],
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        result = measure_ram_read(threads)
    except ImportError as exc:
        return unknown(f"the kernels extension did not load ({exc}); reinstall FlashDesk")
    except (MemoryError, OSError, ValueError) as exc:
        return unknown(f"the RAM read measurement failed: {exc}")
    now = time.time()
    gbps = float(result["best_gbps"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"key": key, "gbps": gbps, "threads": result["threads"], "at": now}),
            encoding="utf-8",
        )
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return Sourced(
        gbps,
        "measured",
        f"{result['threads']} threads, {result['nbytes'] >> 20} MiB, {result['passes']} passes",
        now,
    )


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def _gpu_key(gpu: GpuProfile) -> str:
    return (
        "|".join(
            str(getattr(gpu, name).value)
            for name in ("name", "vram_total_bytes", "pcie_gen_max", "pcie_width_current")
        )
        + f"|{gpu.index}"
    )


def fill_host_to_device(gpu: GpuProfile, nbytes: int = 256 << 20, remeasure: bool = False) -> None:
    """Pinned and pageable host→device copy speed (and the SM count), timed with torch when CUDA
    is usable; cached like the RAM figure, so a second `fit` does not even import torch."""
    path = cache_dir() / "host_to_device.json"
    key = _gpu_key(gpu)
    if not remeasure:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))[key]
            if time.time() - entry["at"] < CACHE_MAX_AGE_S:
                note = f"{entry['nbytes'] >> 20} MiB copies, cached from {_when(entry['at'])}"
                gpu.h2d_pinned_gbps = Sourced(entry["pinned"], "measured", note, entry["at"])
                gpu.h2d_pageable_gbps = Sourced(entry["pageable"], "measured", note, entry["at"])
                gpu.sm_count = reported(entry["sm_count"], "torch.cuda")
                gpu.bf16_tflops = estimate_gpu_tflops(gpu)
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        import torch
    except ImportError:
        return
    try:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", gpu.index)
        props = torch.cuda.get_device_properties(device)
        gpu.sm_count = reported(int(props.multi_processor_count), "torch.cuda")
        gpu.bf16_tflops = estimate_gpu_tflops(gpu)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        now = time.time()
        for name, pinned in (("h2d_pinned_gbps", True), ("h2d_pageable_gbps", False)):
            src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=pinned)
                torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
            setattr(
                gpu,
                name,
                Sourced(nbytes / best / 1e9, "measured", f"{nbytes >> 20} MiB copies", now),
            )
            del src
        del dst
        torch.cuda.empty_cache()
    except (RuntimeError, OSError) as exc:  # e.g. pinning refused by the memlock limit
        for name in ("h2d_pinned_gbps", "h2d_pageable_gbps"):
            if getattr(gpu, name).source != "measured":
                setattr(gpu, name, unknown(f"copy measurement failed: {exc}"))
        return
    try:
        cached = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        cached[key] = {
            "pinned": gpu.h2d_pinned_gbps.value,
            "pageable": gpu.h2d_pageable_gbps.value,
            "sm_count": gpu.sm_count.value,
            "nbytes": nbytes,
            "at": now,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached), encoding="utf-8")
    except (OSError, ValueError):
        pass  # the next probe measures again


def fill_estimated_pcie(gpu: GpuProfile) -> None:
    """Where copies were not measured, estimate them from the PCIe link (current gen/width)."""
    if gpu.unified.value:
        return
    link = pcie_link_gbps(gpu)
    if gpu.h2d_pinned_gbps.source != "measured":
        if link is not None:
            gpu.h2d_pinned_gbps = estimated(
                link * PCIE_PINNED_EFFICIENCY,
                f"{PCIE_PINNED_EFFICIENCY:.0%} of the PCIe link rate",
            )
        else:
            gpu.h2d_pinned_gbps = estimated(
                20.0, "PCIe generation unknown: typical PCIe 4.0 x16 figure"
            )
    if gpu.h2d_pageable_gbps.source != "measured":
        gpu.h2d_pageable_gbps = estimated(
            float(gpu.h2d_pinned_gbps.value) * PAGEABLE_TO_PINNED,
            f"{PAGEABLE_TO_PINNED:.0%} of pinned (ratio measured on a PCIe 5.0 host)",
        )


def pcie_link_gbps(gpu: GpuProfile) -> float | None:
    """Link rate in GB/s per direction. A link idling at a low generation reports the maximum."""
    gen = gpu.pcie_gen_max if gpu.pcie_gen_max.known else gpu.pcie_gen_current
    width = gpu.pcie_width_current if gpu.pcie_width_current.known else gpu.pcie_width_max
    if not (gen.known and width.known):
        return None
    lane = PCIE_LANE_GBPS.get(int(gen.value))
    return lane * int(width.value) if lane else None


def disk_read_estimate(path: str | Path) -> Sourced:
    """Typical read speed of the device that holds `path` (Linux: NVMe / SSD / HDD from sysfs)."""
    if not sys.platform.startswith("linux"):
        return estimated(DISK_READ_GBPS["ssd"], "device kind unknown on this OS: SATA-SSD figure")
    try:
        st = os.stat(path)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    except OSError:
        return estimated(DISK_READ_GBPS["ssd"], "device not found: SATA-SSD figure")
    disk = dev if (dev / "queue").exists() else dev.parent
    name = disk.name
    try:
        rotational = (disk / "queue" / "rotational").read_text().strip() == "1"
    except OSError:
        rotational = None
    if name.startswith("nvme"):
        kind = "nvme"
    elif rotational is False:
        kind = "ssd"
    elif rotational and not name.startswith(("vd", "xvd")):
        kind = "hdd"
    else:
        return estimated(
            DISK_READ_GBPS["ssd"], f"{name} is a virtual disk of unknown kind: SATA-SSD figure"
        )
    return estimated(DISK_READ_GBPS[kind], f"typical {kind.upper()} sequential read ({name})")
