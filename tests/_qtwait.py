"""Waiting in Qt tests without pytest-qt's blockers.

Every `qtbot.wait` (which `waitUntil` calls each 10 ms) and `waitSignal` builds a QTimer, an
event loop and signal connections, and tears them down again; under PySide6 those
(dis)connections have corrupted memory (pytest-qt#487, Nuitka#2492): CI runs segfaulted inside
`waitSignal` and later inside `waitUntil`. These helpers only process events and poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from PySide6.QtCore import QCoreApplication, QEventLoop


def wait_until(predicate: Callable[[], object], timeout: int = 5000) -> None:
    """Process Qt events until `predicate()` is true; TimeoutError after `timeout` ms."""
    deadline = time.monotonic() + timeout / 1000
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} ms and the condition never held")
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 10)
        time.sleep(0.002)


@contextmanager
def wait_signal(signal, timeout: int = 5000) -> Iterator[SimpleNamespace]:
    """`with wait_signal(sig) as blocker: …` waits after the block until `sig` was emitted;
    `blocker.args` holds its arguments. The slot stays connected (a disconnect is what the
    PySide6 bug needs); it only appends to a list."""
    seen: list[tuple] = []
    signal.connect(lambda *args: seen.append(args))
    blocker = SimpleNamespace(args=None)
    yield blocker
    wait_until(lambda: bool(seen), timeout)
    blocker.args = list(seen[0])
