"""Documents attached to the next message: chips with name, pages and token count.

Files are read and counted by `flashdesk.engine.documents.attach` on a thread of their own (so
counting a long PDF never waits behind a generation, nor blocks the window), one file at a time,
each with its own progress. The tray sums the tokens for the context preview; the window checks
the total against the context before sending and shows the documents API's refusal (the numbers
and the options) when it does not fit. Nothing is ever cut.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QToolButton,
    QWidget,
)

log = logging.getLogger("flashdesk.app.documents")

_ids = itertools.count(1)


def document_budget(context_tokens: int, used_tokens: int, reserved: int, max_context=None):
    from flashdesk.engine.documents import ContextBudget

    return ContextBudget(
        context_tokens=int(context_tokens),
        used_tokens=int(used_tokens),
        reserved_answer_tokens=int(reserved),
        max_context_tokens=max_context,
    )


def refusal_for(attachments: list[dict], budget) -> str | None:
    """The documents API's message when `attachments` do not fit `budget`, else None."""
    from flashdesk.engine.documents import AttachedDocument, Attachment

    attached = [
        AttachedDocument(document=a["_document"], tokens=a["tokens"], part_tokens=a["_parts"])
        for a in attachments
        if a.get("_document") is not None
    ]
    att = Attachment(
        documents=attached,
        failures=[],
        content="".join(a["text"] for a in attachments),
        tokens=sum(a["tokens"] for a in attachments),
        budget=budget,
    )
    return att.refusal


class DocumentCounter(QObject):
    progress = Signal(int, str, int, int)  # chip id, stage, done, total
    counted = Signal(int, object)  # chip id, attachment dict
    failed = Signal(int, str)  # chip id, message

    def __init__(self):
        super().__init__()
        self.cancels: dict[int, threading.Event] = {}

    @Slot(int, str, object)
    def count(self, chip_id: int, path: str, tokenizer) -> None:
        from flashdesk.engine.documents import DocumentCancelled, DocumentError, attach

        cancel = self.cancels.setdefault(chip_id, threading.Event())
        try:
            att = attach(
                [path],
                document_budget(1 << 40, 0, 0),
                tokenizer=tokenizer,
                progress=lambda stage, done, total: self.progress.emit(chip_id, stage, done, total),
                cancel=cancel,
            )
        except DocumentCancelled:
            return
        except DocumentError as exc:
            self.failed.emit(chip_id, exc.message)
            return
        except Exception as exc:
            log.error("counting %s failed", path, exc_info=exc)
            self.failed.emit(
                chip_id,
                f"{Path(path).name} could not be read ({type(exc).__name__}: {exc}). "
                "Details are in the log file (Help ▸ Open log file).",
            )
            return
        finally:
            self.cancels.pop(chip_id, None)
        if att.failures:
            self.failed.emit(chip_id, att.failures[0].message)
            return
        doc = att.documents[0]
        self.counted.emit(
            chip_id,
            {
                "name": doc.document.name,
                "describe": doc.document.describe(),
                "pages": doc.document.pages,
                "tokens": att.tokens,
                "text": att.content,
                "notes": list(att.notes),
                "_document": doc.document,
                "_parts": doc.part_tokens,
            },
        )


class DocumentChip(QFrame):
    remove_requested = Signal(int)

    def __init__(self, chip_id: int, path: Path, parent=None):
        super().__init__(parent)
        self.chip_id = chip_id
        self.path = path
        self.attachment: dict | None = None
        self.error: str | None = None
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setObjectName("documentChip")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 2, 2)
        self.label = QLabel(f"{path.name} · reading…")
        layout.addWidget(self.label)
        self.bar = QProgressBar()
        self.bar.setMaximumWidth(80)
        self.bar.setMaximumHeight(12)
        self.bar.setTextVisible(False)
        self.bar.setRange(0, 0)
        layout.addWidget(self.bar)
        self.remove = QToolButton()
        self.remove.setText("✕")
        self.remove.setAutoRaise(True)
        self.remove.setToolTip("Remove this document")
        self.remove.clicked.connect(lambda: self.remove_requested.emit(self.chip_id))
        layout.addWidget(self.remove)

    @property
    def ready(self) -> bool:
        return self.attachment is not None

    def set_progress(self, stage: str, done: int, total: int) -> None:
        words = {"reading": "reading", "extracting": "extracting text", "counting": "counting"}
        self.label.setText(f"{self.path.name} · {words.get(stage, stage)}…")
        if total > 0:
            self.bar.setRange(0, 1000)
            self.bar.setValue(int(1000 * done / total))

    def set_counted(self, attachment: dict) -> None:
        self.attachment = attachment
        self.bar.setVisible(False)
        self.label.setText(
            f"{attachment['name']} · {attachment['describe']} · {attachment['tokens']:,} tokens"
        )
        tip = [str(self.path), *attachment.get("notes", [])]
        self.setToolTip("\n".join(tip))

    def set_failed(self, message: str) -> None:
        self.error = message
        self.bar.setVisible(False)
        self.label.setText(f"{self.path.name} · not attached")
        self.label.setStyleSheet("color: #c0392b;")
        self.setToolTip(message)


class DocumentTray(QWidget):
    """The row of chips above the input box; owns the counting thread."""

    changed = Signal()
    request_count = Signal(int, str, object)
    problem = Signal(str, str)  # title, message

    def __init__(self, tokenizer_source, parent=None):
        super().__init__(parent)
        self.tokenizer_source = tokenizer_source  # callable -> tokenizer or None
        self.chips: dict[int, DocumentChip] = {}
        self.layout_ = QHBoxLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.layout_.addStretch(1)
        self.thread = QThread()
        self.thread.setObjectName("flashdesk-documents")
        self.counter = DocumentCounter()
        self.counter.moveToThread(self.thread)
        self.request_count.connect(self.counter.count)
        self.counter.progress.connect(self._on_progress)
        self.counter.counted.connect(self._on_counted)
        self.counter.failed.connect(self._on_failed)
        self.thread.start()
        self.setVisible(False)

    def add_files(self, paths: list[str | Path]) -> None:
        for p in paths:
            path = Path(p)
            chip_id = next(_ids)
            chip = DocumentChip(chip_id, path, self)
            chip.remove_requested.connect(self.remove)
            self.chips[chip_id] = chip
            self.layout_.insertWidget(self.layout_.count() - 1, chip)
            self.request_count.emit(chip_id, str(path), self.tokenizer_source())
        self.setVisible(bool(self.chips))
        self.changed.emit()

    def remove(self, chip_id: int) -> None:
        chip = self.chips.pop(chip_id, None)
        if chip is None:
            return
        cancel = self.counter.cancels.get(chip_id)
        if cancel is not None:
            cancel.set()
        self.layout_.removeWidget(chip)
        chip.deleteLater()
        self.setVisible(bool(self.chips))
        self.changed.emit()

    def clear(self) -> None:
        for chip_id in list(self.chips):
            self.remove(chip_id)

    @property
    def busy(self) -> bool:
        return any(not c.ready and c.error is None for c in self.chips.values())

    @property
    def total_tokens(self) -> int:
        return sum(c.attachment["tokens"] for c in self.chips.values() if c.ready)

    def attachments(self) -> list[dict]:
        return [c.attachment for c in self.chips.values() if c.ready]

    def shutdown(self) -> None:
        for cancel in list(self.counter.cancels.values()):
            cancel.set()
        self.thread.quit()
        self.thread.wait(5000)

    def _on_progress(self, chip_id: int, stage: str, done: int, total: int) -> None:
        chip = self.chips.get(chip_id)
        if chip is not None:
            chip.set_progress(stage, done, total)

    def _on_counted(self, chip_id: int, attachment: dict) -> None:
        chip = self.chips.get(chip_id)
        if chip is not None:
            chip.set_counted(attachment)
            self.changed.emit()

    def _on_failed(self, chip_id: int, message: str) -> None:
        chip = self.chips.get(chip_id)
        if chip is not None:
            chip.set_failed(message)
            self.changed.emit()
            self.problem.emit("A document could not be attached", message)


def stored_attachment(a: dict) -> dict:
    """What the history keeps of an attachment (no in-memory objects)."""
    return {k: v for k, v in a.items() if not k.startswith("_")}
