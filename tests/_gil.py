"""Shared check that a native call releases the GIL: a Python thread must keep ticking meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def python_ticks_during(work: Callable[[], None]) -> int:
    """How many 1 ms ticks a Python thread managed while `work()` ran on this thread."""
    ticks = 0
    done = threading.Event()

    def count():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    try:
        work()
    finally:
        done.set()
        counter.join()
    return ticks
