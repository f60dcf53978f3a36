"""Model ▸ Settings…: the checkpoint folder, sampling defaults and the system prompt."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from flashdesk.app.settings import Settings


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent=None):
        super().__init__(parent)
        self.settings = settings
        self.setWindowTitle("Settings")
        layout = QVBoxLayout(self)
        form = QFormLayout()
        row = QHBoxLayout()
        self.model_path = QLineEdit(settings.model_path)
        self.model_path.setPlaceholderText("empty: the tiny test model (random weights)")
        row.addWidget(self.model_path, 1)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row.addWidget(browse)
        holder = QWidget()
        holder.setLayout(row)
        form.addRow("Checkpoint folder:", holder)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.05)
        self.temperature.setValue(settings.temperature)
        self.temperature.setToolTip("0 = always the most likely token; DeepSeek recommends 1.0")
        form.addRow("Temperature:", self.temperature)
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(settings.top_p)
        form.addRow("Top-p:", self.top_p)
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 1000)
        self.top_k.setSpecialValueText("off")
        self.top_k.setValue(settings.top_k)
        form.addRow("Top-k:", self.top_k)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 1 << 20)
        self.max_tokens.setValue(settings.max_tokens)
        self.max_tokens.setToolTip("Most tokens one answer may take (reasoning included)")
        form.addRow("Max answer tokens:", self.max_tokens)
        seed_row = QHBoxLayout()
        self.fixed_seed = QCheckBox("fixed")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(settings.seed or 0)
        self.fixed_seed.setChecked(settings.seed is not None)
        self.seed.setEnabled(settings.seed is not None)
        self.fixed_seed.toggled.connect(self.seed.setEnabled)
        seed_row.addWidget(self.fixed_seed)
        seed_row.addWidget(self.seed, 1)
        seed_holder = QWidget()
        seed_holder.setLayout(seed_row)
        form.addRow("Seed:", seed_holder)
        self.system_prompt = QPlainTextEdit(settings.system_prompt)
        self.system_prompt.setPlaceholderText("Optional instructions sent before every chat")
        self.system_prompt.setMaximumHeight(100)
        form.addRow("System prompt:", self.system_prompt)
        self.api_server = QCheckBox("Serve the loaded model to other tools on 127.0.0.1")
        self.api_server.setChecked(settings.api_server)
        self.api_server.setToolTip(
            "An OpenAI-compatible API (/v1/chat/completions) for editors and agents on this "
            "computer only. Off by default."
        )
        form.addRow("Local API server:", self.api_server)
        self.api_port = QSpinBox()
        self.api_port.setRange(1024, 65535)
        self.api_port.setValue(settings.api_port)
        form.addRow("API port:", self.api_port)
        self.api_key = QLineEdit(settings.api_key)
        self.api_key.setEchoMode(QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.api_key.setPlaceholderText("optional: clients must send it as a Bearer token")
        form.addRow("API key:", self.api_key)
        for widget in (self.api_port, self.api_key):
            widget.setEnabled(settings.api_server)
            self.api_server.toggled.connect(widget.setEnabled)
        layout.addLayout(form)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the checkpoint folder")
        if folder:
            self.model_path.setText(folder)

    def apply(self) -> bool:
        """Copy the fields into the settings; True when the model must be reloaded."""
        s = self.settings
        new_path = self.model_path.text().strip()
        reload = new_path != s.model_path
        s.model_path = new_path
        s.temperature = self.temperature.value()
        s.top_p = self.top_p.value()
        s.top_k = self.top_k.value()
        s.max_tokens = self.max_tokens.value()
        s.seed = self.seed.value() if self.fixed_seed.isChecked() else None
        s.system_prompt = self.system_prompt.toPlainText().strip()
        s.api_server = self.api_server.isChecked()
        s.api_port = self.api_port.value()
        s.api_key = self.api_key.text().strip()
        return reload
