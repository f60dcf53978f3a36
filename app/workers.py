"""Engine work off the GUI thread: one QThread that loads the model and streams turns.

The GUI thread owns an `EngineController`; the controller's requests reach the `EngineWorker` in
its own thread as queued signals, and the worker's results come back the same way. Token text is
gathered in the worker and sent at most `BATCH_HZ` times a second, so a fast model cannot flood
the event loop. Cancellation bypasses the queue: `stop()` calls `backend.cancel()` directly (the
backend's cancel is thread-safe) and load cancel sets an Event the worker polls.
"""

from __future__ import annotations

import logging
import threading
import time

from PySide6.QtCore import QObject, QThread, Signal, Slot

from flashdesk.app.backend import (
    Backend,
    BackendError,
    ModelInfo,
    Prompt,
    Sampling,
    TurnStats,
)

log = logging.getLogger("flashdesk.app.workers")

BATCH_HZ = 30


def _readable(exc: BaseException, doing: str) -> tuple[str, str]:
    """(kind, message) for any exception; details go to the log, never to the UI."""
    if isinstance(exc, BackendError):
        return exc.kind, exc.message
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or "OutOfMemory" in name or "out of memory" in str(exc):
        return "oom", (
            f"Out of memory while {doing}. Lower the context or raise the VRAM reserve in the "
            "hardware-fit wizard, close other programs, then try again."
        )
    overflow_limit = getattr(exc, "context_limit", None)
    if overflow_limit is not None and hasattr(exc, "prompt_tokens"):
        return "overflow", str(exc)
    log.error("error while %s", doing, exc_info=exc)
    return "error", (
        f"Something went wrong while {doing} ({name}: {exc}). "
        "The details are in the log file (Help ▸ Open log file)."
    )


class EngineWorker(QObject):
    load_progress = Signal(float, str)
    loaded = Signal(object)  # ModelInfo
    load_failed = Signal(str, str)  # kind, message
    prompt_ready = Signal(object)  # Prompt
    turn_batch = Signal(str, str, object)  # reasoning delta, answer delta, TurnStats
    turn_done = Signal(object)  # TurnStats (stop_reason set)
    turn_failed = Signal(str, str, object)  # kind, message, TurnStats | None

    def __init__(self, backend: Backend):
        super().__init__()
        self.backend = backend
        self.load_cancel = threading.Event()

    @Slot()
    def do_load(self) -> None:
        try:
            info = self.backend.load(self.load_progress.emit, self.load_cancel.is_set)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            log.info("load failed: %r", exc)
            self.load_failed.emit(*_readable(exc, "loading the model"))
            return
        self.loaded.emit(info)

    @Slot(object, str, object)
    def do_turn(self, messages: list, mode: str, sampling: Sampling) -> None:
        stats: TurnStats | None = None
        try:
            prompt = self.backend.encode(messages, mode)
            self.prompt_ready.emit(prompt)
            start = time.perf_counter()
            reasoning_end: float | None = None
            saw_reasoning = False
            pending = {"reasoning": "", "answer": ""}
            last_emit = 0.0
            for event in self.backend.stream(prompt, sampling):
                now = time.perf_counter()
                stats = TurnStats.from_any(event.stats)
                stats.elapsed_s = now - start
                if event.phase == "reasoning":
                    saw_reasoning = True
                elif saw_reasoning and reasoning_end is None:
                    reasoning_end = now
                stats.reasoning_s = (reasoning_end or now) - start if saw_reasoning else None
                pending[event.phase if event.phase in pending else "answer"] += event.text
                if event.done or now - last_emit >= 1.0 / BATCH_HZ:
                    self.turn_batch.emit(pending["reasoning"], pending["answer"], stats)
                    pending = {"reasoning": "", "answer": ""}
                    last_emit = now
                if event.done:
                    self.turn_done.emit(stats)
                    return
            # A stream that ends without a final event still ends the turn.
            stats = stats or TurnStats()
            stats.stop_reason = stats.stop_reason or "eos"
            self.turn_batch.emit(pending["reasoning"], pending["answer"], stats)
            self.turn_done.emit(stats)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            kind, message = _readable(exc, "generating the answer")
            self.turn_failed.emit(kind, message, stats)


class EngineController(QObject):
    """Lives in the GUI thread; the only object the window uses to reach the engine."""

    request_load = Signal()
    request_turn = Signal(object, str, object)

    def __init__(self, backend: Backend, parent: QObject | None = None):
        super().__init__(parent)
        self.backend = backend
        self.thread = QThread()
        self.thread.setObjectName("flashdesk-engine")
        self.worker = EngineWorker(backend)
        self.worker.moveToThread(self.thread)
        self.request_load.connect(self.worker.do_load)
        self.request_turn.connect(self.worker.do_turn)
        self.busy = False  # a turn is in flight
        self.loading = False
        self.info: ModelInfo | None = None
        self.worker.loaded.connect(self._on_loaded)
        self.worker.load_failed.connect(self._on_load_end)
        self.worker.turn_done.connect(self._on_turn_end)
        self.worker.turn_failed.connect(self._on_turn_end)
        self.thread.start()

    def load(self) -> None:
        self.loading = True
        self.worker.load_cancel.clear()  # here, not in the worker: a cancel may come first
        self.request_load.emit()

    def cancel_load(self) -> None:
        self.worker.load_cancel.set()

    def start_turn(self, messages: list[dict], mode: str, sampling: Sampling) -> None:
        self.busy = True
        self.request_turn.emit(messages, mode, sampling)

    def stop(self) -> None:
        if self.busy:
            self.backend.cancel()

    def shutdown(self, wait_ms: int = 5000) -> None:
        self.cancel_load()
        self.backend.cancel()
        self.thread.quit()
        if not self.thread.wait(wait_ms):
            log.warning("engine thread did not stop within %d ms", wait_ms)

    def _on_loaded(self, info: ModelInfo) -> None:
        self.info = info
        self.loading = False

    def _on_load_end(self, *_args) -> None:
        self.loading = False

    def _on_turn_end(self, *_args) -> None:
        self.busy = False


def prompt_summary(prompt: Prompt) -> str:
    return f"{prompt.tokens:,} prompt tokens ({prompt.mode})"
