"""Keep the host heap's large blocks for reuse instead of handing them back to the OS at free.

A CPU prompt chunk makes large temporaries, layer after layer: at 1,024 tokens the mHC streams
`[1024, 4, 4096]` float32 (67 MB), the queries `[1024, 32768]` (134 MB), the expert kernels'
activation copies. glibc (Linux) serves a block above its mmap threshold (32 MB at most by
default), and any block a thread other than the main one asks for beyond its arena's 64 MB
heaps, by a fresh `mmap`, and unmaps it at free. The next tensor of the same size then faults its
pages in one at a time: on the dev VM a `[1024, 32768]` copy ran at ~0.7 GB/s instead of RAM
speed, and the app's prompts run on a worker thread, which no threshold reaches.

`keep_large_blocks()` puts every thread on the main heap, serves blocks below 1 GB from it and
keeps up to 1 GB of freed heap at its top, so the next chunk reuses the pages the last one
faulted in. The cost is resident memory: what a prompt chunk needed at its peak (which the plan
already budgets) stays with the process until it exits or `release()` returns it.

It is a process-wide allocator setting, so the entry points (`flashdesk.cli.main`) call it before
any other thread starts; a thread that has already allocated keeps its own arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

KEPT_BYTES = 1 << 30  # blocks below this come from the heap; this much free heap stays at its top

_applied = False


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # glibc only (musl's mallopt is a stub that does nothing)
        if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim")):
            return None
    except OSError:
        return None
    return libc


def user_tuned() -> str | None:
    """The environment variable by which the user tuned glibc's allocator themselves, if any
    (their setting wins)."""
    for name in sorted(os.environ):
        if name.startswith("MALLOC_") or (
            name == "GLIBC_TUNABLES" and "malloc" in os.environ[name]
        ):
            return name
    return None


def keep_large_blocks() -> bool:
    """Apply the heap settings above → whether they are in force (False off glibc, or where the
    user set `MALLOC_*` / `GLIBC_TUNABLES` themselves, or `FLASHDESK_KEEP_HEAP=0`)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("FLASHDESK_KEEP_HEAP", "").strip() == "0":
        return False
    tuned = user_tuned()
    if tuned is not None:
        log.info("host heap: %s is set, so glibc's allocator is left as the user tuned it", tuned)
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(
        mallopt(param, value)
        for param, value in (
            (M_ARENA_MAX, 1),
            (M_MMAP_THRESHOLD, KEPT_BYTES),
            (M_TRIM_THRESHOLD, KEPT_BYTES),
        )
    )
    _applied = ok
    if not ok:
        log.info("host heap: this glibc refused a mallopt setting; large blocks stay mmapped")
    return ok


def release() -> None:
    """Hand the heap's free pages back to the OS (when the process goes idle after a prompt)."""
    libc = _glibc()
    if libc is not None and _applied:
        libc.malloc_trim(0)
