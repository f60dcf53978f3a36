"""Run one slow call (probe, bandwidth measurement, checkpoint verification) off the GUI thread.

The result comes back as a queued signal to a QObject receiver in the GUI thread. Connect only
bound methods of QObjects (widgets): a plain function or lambda would be called in the pool thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

log = logging.getLogger("flashdesk.app.tasks")


class TaskSignals(QObject):
    done = Signal(object)
    failed = Signal(str)


class Task(QRunnable):
    def __init__(self, fn: Callable[[], Any], doing: str):
        super().__init__()
        self.fn = fn
        self.doing = doing
        self.signals = TaskSignals()
        self.setAutoDelete(False)  # the caller keeps it until its signal arrived

    def run(self) -> None:
        try:
            try:
                result = self.fn()
            except Exception as exc:
                log.error("%s failed", self.doing, exc_info=exc)
                message = getattr(exc, "message", None) or str(exc)
                self.signals.failed.emit(f"{self.doing} failed: {message}")
                return
            self.signals.done.emit(result)
        except RuntimeError as exc:  # the window that asked was closed meanwhile
            log.info("%s finished after its receiver was gone (%s)", self.doing, exc)
        finally:
            _running.discard(self)


_running: set[Task] = set()  # keeps a task (and its signals) alive until it has run


def start(fn: Callable[[], Any], doing: str, on_done, on_failed) -> Task:
    task = Task(fn, doing)
    _running.add(task)
    task.signals.done.connect(on_done)
    task.signals.failed.connect(on_failed)
    QThreadPool.globalInstance().start(task)
    return task
