"""The main window: chat list, conversation, input, mode selector, status-bar meters, menus.

All engine work goes through `EngineController` (a worker thread); this file only reacts to its
signals. A turn is written to the history as it streams (at most one write a second, plus one at
the end), so a crash loses at most the last second of an answer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, QModelIndex, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QAction,
    QDesktopServices,
    QGuiApplication,
    QIcon,
    QKeySequence,
    QShortcut,
)
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListView,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from flashdesk.app.backend import Backend, ModelInfo, Prompt, Sampling, TurnStats
from flashdesk.app.conversation import ChatIdRole, ChatListModel, ConversationView, MessageModel
from flashdesk.app.documents_ui import (
    DocumentTray,
    document_budget,
    refusal_for,
    stored_attachment,
)
from flashdesk.app.formatting import context_meter_text, human_bytes, human_seconds, human_tokens
from flashdesk.app.history import (
    COMPLETE,
    FAILED,
    STOPPED,
    STREAMING,
    History,
    HistoryError,
)
from flashdesk.app.paths import LOG_NAME, asset
from flashdesk.app.settings import MODES, THINK_MAX_MIN_CONTEXT, Settings
from flashdesk.app.workers import EngineController

log = logging.getLogger("flashdesk.app.window")

SAVE_INTERVAL_S = 1.0  # a streaming answer is saved at least this often


class PromptEdit(QPlainTextEdit):
    """The input box: Ctrl+Enter sends, Esc stops."""

    send_requested = Signal()
    stop_requested = Signal()
    files_dropped = Signal(list)

    @staticmethod
    def _local_files(event) -> list[str]:
        mime = event.mimeData()
        if not mime.hasUrls():
            return []
        return [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]

    def dragEnterEvent(self, event) -> None:
        if self._local_files(event):
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event) -> None:
        if self._local_files(event):
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event) -> None:
        """Files dropped on the input become documents, not their paths as text."""
        files = self._local_files(event)
        if files:
            self.files_dropped.emit(files)
            event.acceptProposedAction()
        else:
            super().dropEvent(event)

    def keyPressEvent(self, event) -> None:
        key, mods = event.key(), event.modifiers()
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and (
            mods & Qt.KeyboardModifier.ControlModifier
        ):
            self.send_requested.emit()
            return
        if key == Qt.Key.Key_Escape:
            self.stop_requested.emit()
            return
        super().keyPressEvent(event)


class MainWindow(QMainWindow):
    turn_finished = Signal(str)  # status of the answer: complete | stopped | error
    model_ready = Signal(object)  # ModelInfo

    def __init__(
        self,
        backend: Backend,
        data_folder: Path,
        settings: Settings | None = None,
        history: History | None = None,
        *,
        autoload: bool = True,
    ):
        super().__init__()
        self.data_folder = Path(data_folder)
        self.data_folder.mkdir(parents=True, exist_ok=True)
        self.settings = settings or Settings.load(self.data_folder)
        self.history = history or History.in_folder(self.data_folder)
        self.engine = EngineController(backend, self)
        self.backend = backend
        self.info: ModelInfo | None = None
        self.chat_id: int | None = None
        self.stream_row: int | None = None  # row of the answer being streamed
        self._last_save = 0.0
        self._last_stats: TurnStats | None = None
        self.last_prompt: Prompt | None = None
        self.setWindowTitle("FlashDesk")
        self.resize(1180, 780)
        self.ttft_predictor = None
        self.api_server = None  # engine.server.ServerHandle while the local API runs
        self._api_config: tuple[int, str] | None = None
        self._served = None  # the ServedModel the API hands out (None: no V4 model loaded)
        self._build_ui()
        self._build_menus()
        self._connect_engine()
        self.meter_timer = QTimer(self)
        self.meter_timer.timeout.connect(self._update_memory)
        self.meter_timer.start(1000)
        self.reload_chats()
        self._build_ttft_predictor()
        if self.history.recovered:
            self.statusBar().showMessage(
                f"{self.history.recovered} answer(s) were interrupted last time; "
                "they are kept as they were.",
                10000,
            )
        self.sync_api_server()
        if autoload:
            self.load_model()

    # UI -----------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        splitter = QSplitter()
        # Left: chat list.
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(6, 6, 0, 6)
        self.new_chat_button = QPushButton("New chat")
        self.new_chat_button.clicked.connect(self.new_chat)
        left_layout.addWidget(self.new_chat_button)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search chats")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(lambda _t: self.reload_chats())
        left_layout.addWidget(self.search)
        self.chat_list_model = ChatListModel(self)
        self.chat_list = QListView()
        self.chat_list.setModel(self.chat_list_model)
        self.chat_list.setEditTriggers(QListView.EditTrigger.NoEditTriggers)
        self.chat_list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.chat_list.customContextMenuRequested.connect(self._chat_menu)
        self.chat_list.clicked.connect(self._on_chat_clicked)
        left_layout.addWidget(self.chat_list)
        splitter.addWidget(left)

        # Centre: conversation + input.
        centre = QWidget()
        centre_layout = QVBoxLayout(centre)
        centre_layout.setContentsMargins(0, 6, 6, 6)
        self.message_model = MessageModel(self)
        self.conversation = ConversationView()
        self.conversation.set_model(self.message_model)
        self.conversation.copy_requested.connect(self.copy_message)
        self.conversation.regenerate_requested.connect(lambda _row: self.regenerate())
        centre_layout.addWidget(self.conversation, 1)

        self.documents = DocumentTray(self.backend.document_tokenizer, self)
        self.documents.changed.connect(self._preview_context)
        self.documents.problem.connect(self.show_error)
        centre_layout.addWidget(self.documents)
        self.setAcceptDrops(True)

        self.input = PromptEdit()
        self.input.setPlaceholderText("Message FlashDesk (Ctrl+Enter to send)")
        self.input.setMaximumHeight(96)
        self.input.send_requested.connect(self.send)
        self.input.stop_requested.connect(self.stop)
        self.input.files_dropped.connect(self.documents.add_files)
        self.input.textChanged.connect(self._preview_context)
        centre_layout.addWidget(self.input)

        row = QHBoxLayout()
        self.attach_button = QToolButton()
        clip = asset("paperclip.svg")
        if clip.is_file():
            self.attach_button.setIcon(QIcon(str(clip)))
        else:
            self.attach_button.setText("Attach")
        self.attach_button.setToolTip("Attach documents (or drop them on the window)")
        self.attach_button.clicked.connect(self.choose_documents)
        row.addWidget(self.attach_button)
        row.addWidget(QLabel("Mode:"))
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(MODES)
        self.mode_combo.setCurrentText(self.settings.mode)
        self.mode_combo.currentTextChanged.connect(self._on_mode_changed)
        row.addWidget(self.mode_combo)
        row.addStretch(1)
        self.preview_label = QLabel()
        self.preview_label.setStyleSheet("color: palette(mid);")
        row.addWidget(self.preview_label)
        self.send_button = QPushButton("Send")
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        row.addWidget(self.send_button)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        row.addWidget(self.stop_button)
        centre_layout.addLayout(row)
        splitter.addWidget(centre)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([240, 940])
        self.setCentralWidget(splitter)

        # Status bar meters.
        bar = self.statusBar()
        self.speed_label = QLabel("— tok/s")
        self.speed_label.setToolTip("Decode speed of the current or last answer")
        bar.addPermanentWidget(self.speed_label)
        self.context_meter = QProgressBar()
        self.context_meter.setMinimumWidth(260)
        self.context_meter.setTextVisible(True)
        self.context_meter.setToolTip(
            "Tokens in the context window (your messages, documents, reasoning and answers) "
            "and the memory the KV cache takes"
        )
        bar.addPermanentWidget(self.context_meter)
        self.memory_label = QLabel()
        self.memory_label.setToolTip("Memory in use now: GPU (VRAM) and this process (RAM)")
        bar.addPermanentWidget(self.memory_label)
        self.model_label = QLabel("No model")
        bar.addPermanentWidget(self.model_label)
        self.api_label = QLabel()
        self.api_label.setVisible(False)
        bar.addPermanentWidget(self.api_label)
        self.load_bar = QProgressBar()
        self.load_bar.setRange(0, 1000)
        self.load_bar.setMaximumWidth(200)
        self.load_bar.setVisible(False)
        bar.addPermanentWidget(self.load_bar)
        self.load_cancel = QToolButton()
        self.load_cancel.setText("Cancel")
        self.load_cancel.setVisible(False)
        self.load_cancel.clicked.connect(self.engine.cancel_load)
        bar.addPermanentWidget(self.load_cancel)
        self._set_context(0, self.settings.context_limit, None)
        self._update_memory()
        QShortcut(QKeySequence(Qt.Key.Key_Escape), self, activated=self.stop)
        self._update_buttons()

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        act = QAction("&New chat", self, shortcut=QKeySequence.StandardKey.New)
        act.triggered.connect(self.new_chat)
        file_menu.addAction(act)
        self.export_md_action = QAction("Export chat as &Markdown…", self)
        self.export_md_action.triggered.connect(lambda: self.export_chat("md"))
        file_menu.addAction(self.export_md_action)
        self.export_json_action = QAction("Export chat as &JSON…", self)
        self.export_json_action.triggered.connect(lambda: self.export_chat("json"))
        file_menu.addAction(self.export_json_action)
        file_menu.addSeparator()
        act = QAction("&Quit", self, shortcut=QKeySequence.StandardKey.Quit)
        act.triggered.connect(self.close)
        file_menu.addAction(act)
        self.model_menu = self.menuBar().addMenu("&Model")
        act = QAction("&Hardware fit…", self)
        act.triggered.connect(self.open_wizard)
        self.model_menu.addAction(act)
        act = QAction("&Settings…", self)
        act.triggered.connect(self.open_settings)
        self.model_menu.addAction(act)
        act = QAction("&Reload model", self)
        act.triggered.connect(self.load_model)
        self.model_menu.addAction(act)
        help_menu = self.menuBar().addMenu("&Help")
        act = QAction("Open &log file", self)
        act.triggered.connect(self.open_log)
        help_menu.addAction(act)
        act = QAction("Open &data folder", self)
        act.triggered.connect(
            lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.data_folder)))
        )
        help_menu.addAction(act)

    def _connect_engine(self) -> None:
        w = self.engine.worker
        w.load_progress.connect(self._on_load_progress)
        w.loaded.connect(self._on_loaded)
        w.load_failed.connect(self._on_load_failed)
        w.prompt_ready.connect(self._on_prompt_ready)
        w.turn_batch.connect(self._on_batch)
        w.turn_done.connect(self._on_turn_done)
        w.turn_failed.connect(self._on_turn_failed)

    # model loading ------------------------------------------------------------------------------
    def load_model(self) -> None:
        if self.engine.loading or self.engine.busy:
            return
        self.info = None
        self.model_label.setText("Loading model…")
        self.load_bar.setValue(0)
        self.load_bar.setVisible(True)
        self.load_cancel.setVisible(True)
        self._update_buttons()
        self.engine.load()

    def _on_load_progress(self, fraction: float, what: str) -> None:
        self.load_bar.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.load_bar.setFormat(f"{what} %p%")
        self.load_bar.setToolTip(what)

    def _on_loaded(self, info: ModelInfo) -> None:
        self.info = info
        self.load_bar.setVisible(False)
        self.load_cancel.setVisible(False)
        text = info.label
        if info.plan_summary:
            text += f" · {info.plan_summary}"
        self.model_label.setText(text)
        self.model_label.setToolTip(f"{text}\nContext window: {info.context_limit:,} tokens")
        self._apply_mode_limits()
        self._set_context(0, info.context_limit, None)
        self._update_buttons()
        self._served = self._served_model(info)
        self.statusBar().showMessage(f"Model ready: {info.label}", 5000)
        log.info("model ready: %s, context %d, %s", info.label, info.context_limit, info.device)
        self.model_ready.emit(info)

    def _on_load_failed(self, kind: str, message: str) -> None:
        self.load_bar.setVisible(False)
        self.load_cancel.setVisible(False)
        self.model_label.setText("No model loaded")
        self._update_buttons()
        if kind == "cancelled":
            self.statusBar().showMessage(message, 10000)
        else:
            self.show_error("The model could not be loaded", message)

    def _apply_mode_limits(self) -> None:
        limit = self.info.context_limit if self.info else self.settings.context_limit
        item = self.mode_combo.model().item(MODES.index("Think Max"))
        allowed = limit >= THINK_MAX_MIN_CONTEXT
        item.setEnabled(allowed)
        item.setToolTip(
            "Reason as long as needed (needs a long context)"
            if allowed
            else f"Think Max needs a context window of at least "
            f"{human_tokens(THINK_MAX_MIN_CONTEXT)} tokens; this model is loaded with "
            f"{human_tokens(limit)}. Raise the context in the hardware-fit wizard."
        )
        item.setData(item.toolTip(), Qt.ItemDataRole.ToolTipRole)
        if not allowed and self.mode_combo.currentText() == "Think Max":
            self.mode_combo.setCurrentText("Think High")

    def _on_mode_changed(self, mode: str) -> None:
        self.settings.mode = mode
        self._save_settings()

    # fit wizard ---------------------------------------------------------------------------------
    def open_wizard(self, profile=None):
        from flashdesk.app.wizard import FitWizard

        self.wizard = FitWizard(self.settings, self.data_folder, self, profile=profile)
        self.wizard.plan_saved.connect(self.apply_plan)
        self.wizard.open()
        return self.wizard

    def apply_plan(self, saved: dict) -> None:
        """The wizard saved a plan: reload the model with its context (and checkpoint)."""
        self.backend.configure(
            self.settings.model_path, self.settings.context_limit, plan_summary(saved), saved
        )
        self._apply_mode_limits()
        self._build_ttft_predictor()
        if self.engine.busy:
            self.statusBar().showMessage("The new plan applies after this answer.", 6000)
            return
        self.load_model()

    def open_settings(self):
        from flashdesk.app.settings_dialog import SettingsDialog

        self.settings_dialog = SettingsDialog(self.settings, self)
        self.settings_dialog.accepted.connect(self._settings_accepted)
        self.settings_dialog.open()
        return self.settings_dialog

    def _settings_accepted(self) -> None:
        reload = self.settings_dialog.apply()
        self._save_settings()
        self.sync_api_server()
        if reload:
            self.backend.configure(
                self.settings.model_path,
                self.settings.context_limit,
                plan_summary(self.settings.plan),
                self.settings.plan,
            )
            if self.engine.busy:
                self.statusBar().showMessage("The new model loads after this answer.", 6000)
            else:
                self.load_model()

    # chats --------------------------------------------------------------------------------------
    def reload_chats(self) -> None:
        self.chat_list_model.set_chats(self.history.chats(self.search.text().strip()))
        self._select_chat_row()

    def _select_chat_row(self) -> None:
        if self.chat_id is None:
            return
        row = self.chat_list_model.row_of(self.chat_id)
        if row >= 0:
            self.chat_list.selectionModel().setCurrentIndex(
                self.chat_list_model.index(row), QItemSelectionModel.SelectionFlag.ClearAndSelect
            )

    def new_chat(self) -> None:
        if self.engine.busy:
            return
        self.chat_id = None
        self.message_model.set_messages([])
        self.chat_list.clearSelection()
        self._set_context(0, self._context_limit(), None)
        self.input.setFocus()

    def open_chat(self, chat_id: int) -> None:
        if self.engine.busy:
            self.statusBar().showMessage("Stop the answer first to switch chats.", 4000)
            self._select_chat_row()
            return
        self.chat_id = chat_id
        messages = self.history.messages(chat_id)
        self.message_model.set_messages(messages)
        used = next((m.stats.get("context_used", 0) for m in reversed(messages) if m.stats), 0)
        self._set_context(used, self._context_limit(), None)
        self._select_chat_row()

    def _on_chat_clicked(self, index: QModelIndex) -> None:
        self.open_chat(index.data(ChatIdRole))

    def _chat_menu(self, pos) -> None:
        index = self.chat_list.indexAt(pos)
        if not index.isValid():
            return
        chat_id = index.data(ChatIdRole)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.rename_chat(chat_id))
        menu.addAction("Export as Markdown…", lambda: self.export_chat("md", chat_id))
        menu.addAction("Export as JSON…", lambda: self.export_chat("json", chat_id))
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete_chat(chat_id))
        menu.exec(self.chat_list.viewport().mapToGlobal(pos))

    def rename_chat(self, chat_id: int, title: str | None = None) -> None:
        if title is None:
            chat = self.history.chat(chat_id)
            title, ok = QInputDialog.getText(
                self, "Rename chat", "New name:", text=chat.title if chat else ""
            )
            if not ok:
                return
        if title.strip():
            self._guard(self.history.rename_chat, chat_id, title)
            self.reload_chats()

    def delete_chat(self, chat_id: int, confirm: bool = True) -> None:
        if confirm:
            answer = QMessageBox.question(
                self, "Delete chat", "Delete this chat and all its messages? This cannot be undone."
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        if self.engine.busy and chat_id == self.chat_id:
            self.statusBar().showMessage("Stop the answer first to delete this chat.", 4000)
            return
        self._guard(self.history.delete_chat, chat_id)
        if chat_id == self.chat_id:
            self.new_chat()
        self.reload_chats()

    def export_chat(self, kind: str, chat_id: int | None = None, path: str | None = None) -> None:
        chat_id = chat_id if chat_id is not None else self.chat_id
        if chat_id is None:
            self.statusBar().showMessage("Open a chat first, then export it.", 4000)
            return
        if path is None:
            chat = self.history.chat(chat_id)
            suggested = (chat.title if chat else "chat").replace("/", "_") + f".{kind}"
            path, _ = QFileDialog.getSaveFileName(
                self,
                "Export chat",
                str(Path.home() / suggested),
                "Markdown (*.md)" if kind == "md" else "JSON (*.json)",
            )
            if not path:
                return
        text = (
            self.history.export_markdown(chat_id)
            if kind == "md"
            else self.history.export_json(chat_id)
        )
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            self.show_error(
                "The chat could not be exported",
                f"Writing {path} failed ({exc.strerror or exc}). Pick another folder.",
            )
            return
        self.statusBar().showMessage(f"Exported to {path}", 5000)

    # sending ------------------------------------------------------------------------------------
    def _context_limit(self) -> int:
        return self.info.context_limit if self.info else self.settings.context_limit

    def sampling(self) -> Sampling:
        s = self.settings
        return Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            max_tokens=s.max_tokens,
        )

    # documents ----------------------------------------------------------------------------------
    def choose_documents(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self,
            "Attach documents",
            str(Path.home()),
            "Documents (*.pdf *.docx *.txt *.md *.csv *.json *.html *.py *.c *.cpp *.h *.rs "
            "*.go *.java *.js *.ts);;All files (*)",
        )
        if paths:
            self.documents.add_files(paths)

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.documents.add_files(paths)
            event.acceptProposedAction()

    def conversation_tokens(self) -> int:
        """Tokens the conversation so far takes (from the last turn's stats)."""
        for m in reversed(self.message_model.messages):
            if m.stats.get("context_used"):
                return int(m.stats["context_used"])
        return 0

    def prompt_preview(self) -> tuple[int, int, str]:
        """(documents tokens, whole prompt tokens, time-to-first-token text) before sending."""
        docs = self.documents.total_tokens
        text = self.input.toPlainText()
        typed = self.backend.count_tokens(text) if text and len(text) < 20000 else len(text) // 3
        total = self.conversation_tokens() + docs + typed
        parts = []
        if self.ttft_predictor is not None:
            predicted = self.ttft_predictor.ttft_s(total)
            if predicted is not None:
                parts.append(
                    f"{self.ttft_predictor.model} reads it in ≈ {human_seconds(predicted)} "
                    "(planner)"
                )
        if self._last_stats is not None and self._last_stats.prefill_tok_s:
            rate = self._last_stats.prefill_tok_s
            parts.append(f"≈ {human_seconds(total / rate)} at the {rate:,.0f} tok/s measured here")
        return docs, total, " · ".join(parts)

    def _build_ttft_predictor(self) -> None:
        from flashdesk.app import tasks
        from flashdesk.app.fit_preview import TtftPredictor

        self.ttft_predictor = None
        plan = dict(self.settings.plan or {})
        if not plan:
            return
        self._predictor_task = tasks.start(
            lambda: TtftPredictor.build(self.data_folder, plan),
            "Preparing the planner's prediction",
            self._on_predictor,
            self._on_predictor_failed,
        )

    def _on_predictor(self, predictor) -> None:
        self.ttft_predictor = predictor
        self._preview_context()

    def _on_predictor_failed(self, message: str) -> None:
        log.warning("%s", message)

    def _preview_context(self) -> None:
        if self.engine.busy:
            return
        docs, total, ttft = self.prompt_preview()
        if not docs and not self.documents.chips:
            self.preview_label.setText("")
            return
        limit = self._context_limit()
        parts = [f"Documents: {docs:,} tokens", f"prompt ≈ {total:,} of {human_tokens(limit)}"]
        if self.documents.busy:
            parts.append("counting…")
        if ttft:
            parts.append(ttft)
        self.preview_label.setText(" · ".join(parts))
        over = total + self.settings.max_tokens > limit
        self.preview_label.setStyleSheet("color: #c0392b;" if over else "color: palette(mid);")
        self._set_context(total, limit, None)

    def attachments_for_send(self) -> list[dict]:
        return self.documents.attachments()

    def clear_attachments(self) -> None:
        self.documents.clear()

    def check_documents_fit(self, attachments: list[dict]) -> bool:
        """Refuse (with the documents API's numbers and options) when they do not fit."""
        if not attachments:
            return True
        text = self.input.toPlainText()
        used = self.conversation_tokens() + (self.backend.count_tokens(text) if text else 0)
        budget = document_budget(
            self._context_limit(),
            used,
            self.settings.max_tokens,
            self.settings.plan.get("max_context"),
        )
        refusal = refusal_for(attachments, budget)
        if refusal is None:
            return True
        self.show_error("The documents do not fit in the context window", refusal)
        return False

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        attachments = self.attachments_for_send()
        if not text and not attachments:
            return
        if self.engine.busy:
            return
        if self.info is None:
            self.statusBar().showMessage(
                "The model is not loaded yet. Wait for it, or load it from the Model menu.", 6000
            )
            return
        if self.documents.busy:
            self.statusBar().showMessage(
                "Documents are still being counted; send when their chips show token counts.", 6000
            )
            return
        if not self.check_documents_fit(attachments):
            return
        try:
            if self.chat_id is None:
                title = (text or attachments[0]["name"]).splitlines()[0][:60]
                self.chat_id = self.history.create_chat(title).id
            user = self.history.add_message(
                self.chat_id, "user", text, attachments=[stored_attachment(a) for a in attachments]
            )
        except HistoryError as exc:
            self.show_error("Your message could not be saved", exc.args[0])
            return
        self.message_model.append(user)
        self.preview_label.setText("")
        self.input.clear()
        self.clear_attachments()
        self.reload_chats()
        self._start_turn()

    def regenerate(self) -> None:
        """Replace the last answer with a new one."""
        if self.engine.busy or self.chat_id is None or not self.message_model.messages:
            return
        last = self.message_model.messages[-1]
        if last.role == "assistant":
            self._guard(self.history.delete_message, last.id)
            self.message_model.remove(len(self.message_model.messages) - 1)
        if self.message_model.messages and self.message_model.messages[-1].role == "user":
            self._start_turn()

    def conversation_for_prompt(self) -> list[dict]:
        """The messages the model sees: system prompt, then each turn (documents inlined)."""
        out: list[dict] = []
        if self.settings.system_prompt:
            out.append({"role": "system", "content": self.settings.system_prompt})
        for m in self.message_model.messages:
            if m.role == "assistant" and m.status in (STREAMING, FAILED):
                continue
            content = m.content
            if m.role == "user" and m.attachments:
                # Each attachment's text is the documents API's section (header, parts, footer).
                content = "".join(a.get("text", "") for a in m.attachments) + content
            out.append({"role": m.role, "content": content, "reasoning": m.reasoning})
        return out

    def _start_turn(self) -> None:
        mode = self.mode_combo.currentText()
        messages = self.conversation_for_prompt()
        try:
            answer = self.history.add_message(
                self.chat_id, "assistant", "", mode=mode, status=STREAMING
            )
        except HistoryError as exc:
            self.show_error("The answer could not be saved", exc.args[0])
            return
        self.stream_row = self.message_model.append(answer)
        self._last_save = time.monotonic()
        self._stream_started = time.monotonic()
        self.engine.start_turn(messages, mode, self.sampling())
        self.conversation.set_busy(True)
        self._update_buttons()

    def stop(self) -> None:
        if self.engine.busy:
            self.engine.stop()
            self.statusBar().showMessage("Stopping…", 2000)

    def _on_prompt_ready(self, prompt: Prompt) -> None:
        self.last_prompt = prompt
        self._set_context(prompt.tokens, self._context_limit(), None)

    def _on_batch(self, reasoning: str, answer: str, stats: TurnStats) -> None:
        if self.stream_row is None:
            return
        self._last_stats = stats
        self.message_model.append_text(self.stream_row, reasoning, answer, stats.to_dict())
        if stats.decode_tok_s:
            self.speed_label.setText(f"{stats.decode_tok_s:.1f} tok/s")
        self._set_context(
            stats.context_used, stats.context_limit or self._context_limit(), stats.kv_bytes
        )
        if time.monotonic() - self._last_save >= SAVE_INTERVAL_S:
            self._save_stream(STREAMING)

    def _save_stream(self, status: str, extra: dict | None = None) -> None:
        if self.stream_row is None:
            return
        msg = self.message_model.messages[self.stream_row]
        stats = dict(msg.stats)
        if extra:
            stats.update(extra)
        try:
            self.history.update_message(
                msg.id, content=msg.content, reasoning=msg.reasoning, status=status, stats=stats
            )
        except HistoryError as exc:
            log.error("saving the streaming answer failed: %s", exc)
            self.statusBar().showMessage(exc.args[0], 10000)
        self._last_save = time.monotonic()

    def _end_turn(self, status: str, extra: dict | None = None) -> None:
        row = self.stream_row
        if row is not None:
            stats = dict(self.message_model.messages[row].stats)
            if extra:
                stats.update(extra)
            self.message_model.update(row, status=status, stats=stats)
            self._save_stream(status)
        self.stream_row = None
        self.conversation.set_busy(False)
        self._update_buttons()
        self.reload_chats()
        self.turn_finished.emit(status)

    def _on_turn_done(self, stats: TurnStats) -> None:
        if self.stream_row is not None:
            self.message_model.update(self.stream_row, stats=stats.to_dict())
        status = STOPPED if stats.stop_reason == "cancelled" else COMPLETE
        log.info(
            "turn %s: %d prompt + %d generated tokens, %s tok/s, stop %s",
            status,
            stats.prompt_tokens,
            stats.generated_tokens,
            f"{stats.decode_tok_s:.2f}" if stats.decode_tok_s else "-",
            stats.stop_reason,
        )
        self._end_turn(status)

    def _on_turn_failed(self, kind: str, message: str, stats: TurnStats | None) -> None:
        extra = {"error": message, "error_kind": kind}
        if stats is not None:
            extra.update(stats.to_dict())
        self._end_turn(FAILED, extra)
        if kind == "overflow":
            self.show_error("The conversation is too long for the context window", message)
        else:
            self.statusBar().showMessage(message, 15000)

    # meters -------------------------------------------------------------------------------------
    def _set_context(self, used: int, limit: int, kv_bytes: int | None) -> None:
        limit = max(1, int(limit))
        self.context_meter.setRange(0, limit)
        self.context_meter.setValue(min(int(used), limit))
        self.context_meter.setFormat(context_meter_text(int(used), limit, kv_bytes))

    def _update_memory(self) -> None:
        mem = self.backend.memory_in_use()
        parts = []
        if mem.get("vram") is not None:
            parts.append(f"VRAM {human_bytes(mem['vram'])}")
        else:
            parts.append("VRAM —")
        parts.append(f"RAM {human_bytes(mem.get('ram'))}")
        self.memory_label.setText(" · ".join(parts))

    def _update_buttons(self) -> None:
        busy = self.engine.busy
        self.send_button.setEnabled(not busy and self.info is not None)
        self.stop_button.setEnabled(busy)
        self.new_chat_button.setEnabled(not busy)

    # misc ---------------------------------------------------------------------------------------
    def copy_message(self, row: int) -> None:
        msg = self.message_model.messages[row]
        QGuiApplication.clipboard().setText(msg.content)
        self.statusBar().showMessage("Copied", 2000)

    def open_log(self) -> None:
        path = self.data_folder / LOG_NAME
        if not path.exists():
            path.touch()
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))

    def show_error(self, title: str, message: str) -> None:
        log.warning("%s: %s", title, message)
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle(title)
        box.setText(title)
        box.setInformativeText(message)
        box.setStandardButtons(QMessageBox.StandardButton.Ok)
        box.setWindowModality(Qt.WindowModality.WindowModal)
        self.last_error = (title, message)
        box.open()

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except HistoryError as exc:
            self.show_error("The chat history could not be changed", exc.args[0])
            return None

    def _save_settings(self) -> None:
        try:
            self.settings.save(self.data_folder)
        except OSError as exc:
            log.error("saving settings failed: %s", exc)

    # local API server ---------------------------------------------------------------------------
    def _served_model(self, info: ModelInfo):
        """The loaded model as the API serves it; None unless it speaks the V4 chat format."""
        session = getattr(self.backend, "session", None)
        tokenizer = getattr(self.backend, "tokenizer", None)
        if session is None or tokenizer is None:
            return None
        from flashdesk.engine.tokenizer import V4Tokenizer

        if not isinstance(tokenizer, V4Tokenizer):
            return None  # e.g. the GGUF demo model: its own template, not V4's
        from flashdesk.engine.server import ServedModel

        return ServedModel(info.name, session, tokenizer)

    def sync_api_server(self) -> None:
        """Start, restart or stop the local API to match the settings; failures are shown, not
        raised (a port in use must not stop the app)."""
        s = self.settings
        wanted = (s.api_port, s.api_key) if s.api_server else None
        if wanted == self._api_config and (wanted is None) == (self.api_server is None):
            return
        self._stop_api_server()
        if wanted is None:
            return
        from flashdesk.engine.server import ServerStartError, start_server

        try:
            self.api_server = start_server(
                lambda: self._served, port=s.api_port, api_key=s.api_key or None
            )
        except (ServerStartError, OSError) as exc:
            log.warning("local API server did not start: %s", exc)
            self.api_label.setText("API: off (see log)")
            self.api_label.setToolTip(str(exc))
            self.api_label.setVisible(True)
            self.statusBar().showMessage(f"The local API server did not start: {exc}", 15000)
            return
        self._api_config = wanted
        self.api_label.setText(f"API :{self.api_server.port}")
        self.api_label.setToolTip(
            f"OpenAI-compatible API at {self.api_server.url}"
            + (" (API key required)" if s.api_key else "")
        )
        self.api_label.setVisible(True)
        log.info("local API server on %s", self.api_server.url)

    def _stop_api_server(self) -> None:
        if self.api_server is not None:
            self.api_server.stop()
            log.info("local API server stopped")
        self.api_server = None
        self._api_config = None
        self.api_label.setVisible(False)

    def closeEvent(self, event) -> None:
        self._stop_api_server()
        if self.stream_row is not None:
            self._save_stream(STOPPED)
        self.engine.shutdown()
        self.documents.shutdown()
        self._save_settings()
        super().closeEvent(event)


def plan_summary(plan: dict | None) -> str:
    """'plan: fits · 128K · fp8 KV' for the status bar."""
    if not plan or not plan.get("verdict"):
        return ""
    parts = [f"plan: {plan['verdict'].replace('_', ' ')}"]
    if plan.get("context"):
        parts.append(human_tokens(int(plan["context"])))
    if plan.get("kv_dtype"):
        parts.append(f"{plan['kv_dtype']} KV")
    return " · ".join(parts)
