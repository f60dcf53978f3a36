"""Chat list and conversation: Qt list models over the history, and the view that renders them.

`MessageModel` holds the open chat's messages (the streaming answer included) and is the single
source the `ConversationView` draws from: the view creates one `MessageWidget` per row and
refreshes it on `dataChanged`, so streaming text, stats and status changes reach the screen through
the model only (the GPT4All pattern, with widgets instead of QML).
"""

from __future__ import annotations

import time
from dataclasses import replace

from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    QTimer,
    QUrl,
    Signal,
)
from PySide6.QtGui import (
    QDesktopServices,
    QGuiApplication,
    QPalette,
    QTextCursor,
    QTextFormat,
)
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from flashdesk.app.formatting import markdown_with_copy_links, stats_line, thought_label
from flashdesk.app.history import COMPLETE, FAILED, INTERRUPTED, STOPPED, STREAMING, Chat, Message

LONG_ANSWER_CHARS = 6000  # beyond this a streaming answer is re-rendered less often
MessageRole = Qt.ItemDataRole.UserRole + 1
ChatIdRole = Qt.ItemDataRole.UserRole + 2

_Index = QModelIndex | QPersistentModelIndex


class ChatListModel(QAbstractListModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.chats: list[Chat] = []

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.chats)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self.chats):
            return None
        chat = self.chats[index.row()]
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return chat.title
        if role == Qt.ItemDataRole.ToolTipRole:
            return chat.title
        if role == ChatIdRole:
            return chat.id
        return None

    def set_chats(self, chats: list[Chat]) -> None:
        self.beginResetModel()
        self.chats = list(chats)
        self.endResetModel()

    def row_of(self, chat_id: int) -> int:
        for i, chat in enumerate(self.chats):
            if chat.id == chat_id:
                return i
        return -1


class MessageModel(QAbstractListModel):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.messages: list[Message] = []

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.messages)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self.messages):
            return None
        msg = self.messages[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return msg.content
        if role == MessageRole:
            return msg
        return None

    def set_messages(self, messages: list[Message]) -> None:
        self.beginResetModel()
        self.messages = list(messages)
        self.endResetModel()

    def append(self, message: Message) -> int:
        row = len(self.messages)
        self.beginInsertRows(QModelIndex(), row, row)
        self.messages.append(message)
        self.endInsertRows()
        return row

    def remove(self, row: int) -> None:
        self.beginRemoveRows(QModelIndex(), row, row)
        del self.messages[row]
        self.endRemoveRows()

    def update(self, row: int, **changes) -> None:
        self.messages[row] = replace(self.messages[row], **changes)
        idx = self.index(row)
        self.dataChanged.emit(idx, idx, [MessageRole])

    def append_text(self, row: int, reasoning: str, answer: str, stats: dict | None) -> None:
        msg = self.messages[row]
        changes: dict = {
            "reasoning": msg.reasoning + reasoning,
            "content": msg.content + answer,
        }
        if stats is not None:
            changes["stats"] = stats
        self.update(row, **changes)


class MarkdownView(QTextBrowser):
    """Read-only Markdown that grows to its content's height (the scroll area scrolls)."""

    def __init__(self, parent=None, *, monospace: bool = False):
        super().__init__(parent)
        self.code_blocks: list[str] = []
        self.setOpenLinks(False)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.viewport().setAutoFillBackground(False)
        self.setStyleSheet("QTextBrowser { background: transparent; }")
        if monospace:
            font = self.font()
            font.setStyleHint(font.StyleHint.Monospace)
            self.setFont(font)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.anchorClicked.connect(self._on_link)
        self._markdown = None

    def set_markdown(self, text: str) -> None:
        if text == self._markdown:
            return
        self._markdown = text
        rendered, self.code_blocks = markdown_with_copy_links(text)
        self.setMarkdown(rendered)
        self._shade_code_blocks()
        self._fit()

    def _shade_code_blocks(self) -> None:
        """Give fenced code a background so it reads as code (Qt's Markdown sets only the font)."""
        doc = self.document()
        block = doc.begin()
        shade = self.palette().color(QPalette.ColorRole.AlternateBase)
        while block.isValid():
            fmt = block.blockFormat()
            if fmt.hasProperty(QTextFormat.Property.BlockCodeFence):
                fmt.setBackground(shade)
                QTextCursor(block).setBlockFormat(fmt)
            block = block.next()

    def _fit(self, *_args) -> None:
        self.document().setTextWidth(self.viewport().width())
        self.setFixedHeight(int(self.document().size().height()) + 6)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def _on_link(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            try:
                block = self.code_blocks[int(url.path() or url.toString().split(":", 1)[1])]
            except (ValueError, IndexError):
                return
            QGuiApplication.clipboard().setText(block)
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)


class MessageWidget(QFrame):
    copy_requested = Signal(int)
    regenerate_requested = Signal(int)

    def __init__(self, row: int, parent=None):
        super().__init__(parent)
        self.row = row
        self._last_render = 0.0
        self.setObjectName("message")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 10, 6)
        layout.setSpacing(4)
        self.header = QLabel()
        self.header.setStyleSheet("font-weight: bold;")
        layout.addWidget(self.header)
        self.attachments = QLabel()
        self.attachments.setWordWrap(True)
        layout.addWidget(self.attachments)
        self.reasoning_toggle = QToolButton()
        self.reasoning_toggle.setCheckable(True)
        self.reasoning_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.reasoning_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.reasoning_toggle.setAutoRaise(True)
        self.reasoning_toggle.toggled.connect(self._toggle_reasoning)
        layout.addWidget(self.reasoning_toggle)
        self.reasoning = MarkdownView()
        self.reasoning.setStyleSheet(
            "QTextBrowser { background: transparent; color: palette(mid); }"
        )
        self.reasoning.setVisible(False)
        layout.addWidget(self.reasoning)
        self.body = MarkdownView()
        layout.addWidget(self.body)
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #c0392b;")
        layout.addWidget(self.error)
        footer = QHBoxLayout()
        self.stats = QLabel()
        self.stats.setStyleSheet("color: palette(mid); font-size: small;")
        footer.addWidget(self.stats)
        footer.addStretch(1)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setFlat(True)
        self.copy_button.clicked.connect(lambda: self.copy_requested.emit(self.row))
        footer.addWidget(self.copy_button)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setFlat(True)
        self.regenerate_button.clicked.connect(lambda: self.regenerate_requested.emit(self.row))
        footer.addWidget(self.regenerate_button)
        layout.addLayout(footer)

    def _toggle_reasoning(self, shown: bool) -> None:
        self.reasoning.setVisible(shown)
        self.reasoning_toggle.setArrowType(
            Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow
        )

    def show_message(self, msg: Message, *, is_last: bool, busy: bool) -> None:
        assistant = msg.role == "assistant"
        streaming = msg.status == STREAMING
        if self.property("role") != msg.role:
            self.setProperty("role", msg.role)
            self.setStyleSheet(
                "QFrame#message { background: palette(alternate-base); border-radius: 6px; }"
                if msg.role == "user"
                else "QFrame#message { border-radius: 6px; }"
            )
        who = "FlashDesk" if assistant else ("You" if msg.role == "user" else "System")
        if assistant and msg.mode:
            who += f" · {msg.mode}"
        self.header.setText(who)
        names = [
            f"Attached: {a.get('name', '?')} — {a.get('tokens', 0):,} tokens"
            for a in msg.attachments
        ]
        self.attachments.setText("\n".join(names))
        self.attachments.setVisible(bool(names))
        self.reasoning_toggle.setVisible(bool(msg.reasoning))
        reasoning_s = msg.stats.get("reasoning_s") if msg.stats else None
        still_thinking = streaming and not msg.content
        self.reasoning_toggle.setText(thought_label(reasoning_s, still_thinking))
        if self.reasoning.isVisible() or msg.reasoning:
            self.reasoning.set_markdown(msg.reasoning)
        # A long answer is re-laid out at most 4 times a second while it streams.
        now = time.monotonic()
        long_stream = streaming and len(msg.content) > LONG_ANSWER_CHARS
        if not long_stream or now - self._last_render >= 0.25:
            self.body.set_markdown(msg.content + (" ▍" if streaming else ""))
            self._last_render = now
        self.body.setVisible(bool(msg.content) or not msg.reasoning or not streaming)
        notes = {
            STOPPED: "Stopped by you.",
            INTERRUPTED: "This answer was interrupted (the app closed while it was being written).",
        }
        if msg.status == FAILED:
            self.error.setText(msg.stats.get("error", "This answer failed."))
        else:
            self.error.setText(notes.get(msg.status, ""))
        self.error.setVisible(bool(self.error.text()))
        self.stats.setText(stats_line(msg.stats) if assistant and not streaming else "")
        self.stats.setVisible(assistant and not streaming and bool(self.stats.text()))
        self.copy_button.setVisible(not streaming and bool(msg.content))
        self.regenerate_button.setVisible(
            assistant and is_last and not busy and msg.status != STREAMING
        )


class ConversationView(QScrollArea):
    """Renders a MessageModel as a column of MessageWidgets; follows the bottom while streaming."""

    copy_requested = Signal(int)
    regenerate_requested = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.container = QWidget()
        self.column = QVBoxLayout(self.container)
        self.column.setContentsMargins(12, 12, 12, 12)
        self.column.setSpacing(10)
        self.placeholder = QLabel(
            "Ask anything. Drop documents here to add them to your message.\n"
            "Ctrl+Enter sends · Esc stops"
        )
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setStyleSheet("color: palette(mid);")
        self.column.addWidget(self.placeholder)
        self.column.addStretch(1)
        self.setWidget(self.container)
        self.widgets: list[MessageWidget] = []
        self.model: MessageModel | None = None
        self.busy = False
        self._follow = True
        self.verticalScrollBar().rangeChanged.connect(self._on_range)
        self.verticalScrollBar().valueChanged.connect(self._on_scrolled)

    def set_model(self, model: MessageModel) -> None:
        self.model = model
        model.modelReset.connect(self._rebuild)
        model.rowsInserted.connect(self._on_inserted)
        model.rowsRemoved.connect(self._on_removed)
        model.dataChanged.connect(self._on_changed)
        self._rebuild()

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self._refresh_all()

    def _make_widget(self, row: int) -> MessageWidget:
        w = MessageWidget(row, self.container)
        w.copy_requested.connect(self.copy_requested)
        w.regenerate_requested.connect(self.regenerate_requested)
        return w

    def _rebuild(self, *_args) -> None:
        """A different chat: new widgets for every row."""
        assert self.model is not None
        for w in self.widgets:
            self.column.removeWidget(w)
            w.deleteLater()
        self.widgets = []
        for row in range(self.model.rowCount()):
            w = self._make_widget(row)
            self.column.insertWidget(self.column.count() - 1, w)
            self.widgets.append(w)
        self.placeholder.setVisible(not self.widgets)
        self._follow = True
        self._refresh_all()

    def _on_inserted(self, _parent, first: int, last: int) -> None:
        """New rows get new widgets; the others (and their expanded reasoning) stay as they are."""
        for row in range(first, last + 1):
            w = self._make_widget(row)
            self.column.insertWidget(1 + row, w)  # index 0 is the placeholder
            self.widgets.insert(row, w)
        self._after_change(first)

    def _on_removed(self, _parent, first: int, last: int) -> None:
        for row in range(last, first - 1, -1):
            w = self.widgets.pop(row)
            self.column.removeWidget(w)
            w.deleteLater()
        self._after_change(first)

    def _after_change(self, first: int) -> None:
        for i, w in enumerate(self.widgets):
            w.row = i
        self.placeholder.setVisible(not self.widgets)
        self._follow = True
        for row in range(max(first - 1, 0), len(self.widgets)):
            self._refresh(row)

    def _refresh_all(self) -> None:
        for row in range(len(self.widgets)):
            self._refresh(row)

    def _refresh(self, row: int) -> None:
        assert self.model is not None
        msg = self.model.messages[row]
        self.widgets[row].show_message(msg, is_last=row == len(self.widgets) - 1, busy=self.busy)

    def _on_changed(self, top: QModelIndex, bottom: QModelIndex, _roles=()) -> None:
        for row in range(top.row(), bottom.row() + 1):
            if row < len(self.widgets):
                self._refresh(row)

    def _on_scrolled(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self._follow = value >= bar.maximum() - 24

    def _on_range(self, _lo: int, hi: int) -> None:
        if self._follow:
            QTimer.singleShot(0, lambda: self.verticalScrollBar().setValue(hi))


__all__ = [
    "COMPLETE",
    "ChatListModel",
    "ConversationView",
    "MessageModel",
    "MessageWidget",
]
