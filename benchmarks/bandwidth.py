"""RAM read bandwidth: one thread against all threads, the bound every other figure is divided by.

Prints the all-thread figure as the bound and the one-thread figure as a ratio of it: how much a
single-threaded kernel would leave on the table on this machine.
"""

from __future__ import annotations

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

BUFFER_BYTES = 1 << 30  # far above any desktop last-level cache


def run(json_output: bool = False) -> dict:
    from flashdesk.engine import _kernels

    info = _machine.describe()
    threads = info["logical_cores"]
    one = _kernels.read_bandwidth(BUFFER_BYTES, 1, 1.0, details=True)
    every = _kernels.read_bandwidth(BUFFER_BYTES, threads, 1.0, details=True)
    figures = {
        "machine": info,
        "read_gbps_all_threads": every["best_gbps"],
        "read_gbps_one_thread": one["best_gbps"],
        "one_thread_ratio": one["best_gbps"] / every["best_gbps"],
        "threads": threads,
        "buffer_bytes": BUFFER_BYTES,
    }
    if not json_output:
        _machine.print_machine(info)
        print(f"RAM read, {threads} threads (the bound): {every['best_gbps']:.2f} GB/s")
        print(
            f"RAM read, 1 thread: {one['best_gbps']:.2f} GB/s = "
            f"{figures['one_thread_ratio']:.2f} x the bound"
        )
    return figures
