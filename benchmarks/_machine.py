"""The machine line every benchmark prints first: CPU, cores, RAM, GPU."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    import psutil

    from flashdesk.engine import _kernels

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": _kernels.cpu_features()["logical_cores"],
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
    }


def print_machine(info: dict) -> None:
    print(
        f"machine: {info['cpu']}, {info['physical_cores']} cores / {info['logical_cores']} threads, "
        f"{info['ram_gib']} GiB RAM, GPU: {info['gpu']}"
    )


def start(json_output: bool):
    """A benchmark's preamble: (say, machine) where say prints unless JSON was asked for, and the
    machine line is printed first."""
    info = describe()

    def say(text: str) -> None:
        if not json_output:
            print(text, flush=True)

    if not json_output:
        print_machine(info)
    return say, info
