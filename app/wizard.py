"""The hardware-fit wizard: the machine (with where each figure came from), the model, the plan.

Page 1 shows the probe table (every value with its source label) and can re-measure the RAM read
bandwidth. Page 2 picks the model: a checkpoint folder or DeepSeek-V4 GGUF file (verified,
problems listed), a preset to plan without weights, or the tiny test model. Page 3 is the plan,
recomputed live as the context, KV dtype and VRAM reserve change: verdict colour, memory bars per
device, predicted decode/prefill speed with confidence, and what had to change. Page 4 saves it;
the chat window uses it. The planner (`flashdesk.offload`) does the work; this file only shows
it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from flashdesk.app import tasks
from flashdesk.app.fit_preview import PROFILE_NAME
from flashdesk.app.formatting import human_bytes, human_seconds, human_tokens
from flashdesk.app.settings import Settings

log = logging.getLogger("flashdesk.app.wizard")

CONTEXTS = tuple(4096 << i for i in range(9))  # 4K … 1M
VERDICT_TEXT = {
    "fits": ("Fits", "#1e8449"),
    "fits_with_changes": ("Fits with changes", "#b9770e"),
    "does_not_fit": ("Does not fit", "#c0392b"),
}
PRESETS = ("DeepSeek-V4-Flash", "DeepSeek-V4-Pro")
PREVIEW_PROMPT = 8192  # the prompt length the time-to-first-token figure is given for


def format_value(name: str, value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name.endswith("_bytes") and isinstance(value, int | float):
        return human_bytes(value)
    if name.endswith("_gbps") and isinstance(value, int | float):
        return f"{value:.1f} GB/s"
    if name.endswith("_tflops") and isinstance(value, int | float):
        return f"{value:.1f} TFLOPS"
    if name.endswith("_gflops") and isinstance(value, int | float):
        return f"{value:.0f} GFLOPS"
    if name.endswith("_mhz") or name.endswith("_mts"):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def profile_rows(profile) -> list[tuple[str, str, str, str]]:
    """(what, value, source, note) for every sourced figure, GPUs included."""
    rows = []
    for name, s in profile.sourced_items():
        rows.append((name.replace("_", " "), format_value(name, s.value), s.source, s.note))
    for gpu in profile.gpus:
        for name, s in gpu.sourced_items():
            label = f"GPU {gpu.index} · {name.replace('_', ' ')}"
            rows.append((label, format_value(name, s.value), s.source, s.note))
    if not profile.gpus:
        rows.append(("GPU", "none found", "reported:probe", "CPU-only mode"))
    return rows


@dataclass
class ModelChoice:
    kind: str  # "preset" | "checkpoint" | "gguf" | "test"
    name: str
    config: Any  # a ModelConfig; for "gguf" the file's header (GGUFInfo)
    path: str = ""


def figures_for(choice: ModelChoice):
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures

    if choice.kind == "gguf":  # the file's own bytes per tensor
        from flashdesk.engine.gguf.plan_glue import model_figures

        return model_figures(choice.config)
    return ModelFigures.from_inventory(inventory(choice.config), choice.config, choice.name)


def preset_choice(name: str) -> ModelChoice:
    from flashdesk.engine.config import ModelConfig

    config = ModelConfig.v4_pro() if name.endswith("Pro") else ModelConfig.v4_flash()
    return ModelChoice("preset", name, config)


def test_model_choice() -> ModelChoice:
    from flashdesk.app.engine_backend import test_model_config

    return ModelChoice("test", "V4 tiny test model (random weights)", test_model_config())


# ---------------------------------------------------------------------------------------------
class ProbePage(QWizardPage):
    def __init__(self, wizard: FitWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Your machine")
        self.setSubTitle(
            "What FlashDesk found, and where each figure came from (reported by the system, "
            "measured here, or estimated)."
        )
        layout = QVBoxLayout(self)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["What", "Value", "Source", "Note"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        layout.addWidget(self.table)
        row = QHBoxLayout()
        self.measure_button = QPushButton("Measure bandwidth")
        self.measure_button.setToolTip(
            "Time reading a large buffer from RAM and, with an NVIDIA GPU, copies to it "
            "(a few seconds)"
        )
        self.measure_button.clicked.connect(self.measure)
        row.addWidget(self.measure_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setMaximumWidth(160)
        self.progress.setVisible(False)
        row.addWidget(self.progress)
        self.status = QLabel()
        self.status.setWordWrap(True)
        row.addWidget(self.status, 1)
        layout.addLayout(row)
        self._task = None

    def initializePage(self) -> None:
        if self.wiz.profile is None:
            self.status.setText("Looking at this machine…")
            self.progress.setVisible(True)
            self.measure_button.setEnabled(False)
            self._task = tasks.start(
                self.wiz.probe_fn, "Probing this machine", self._on_profile, self._on_failed
            )
        else:
            self.show_profile()

    def _on_profile(self, profile) -> None:
        self.wiz.profile = profile
        self.progress.setVisible(False)
        self.measure_button.setEnabled(True)
        self.status.setText("")
        self.show_profile()
        self.completeChanged.emit()

    def _on_failed(self, message: str) -> None:
        self.progress.setVisible(False)
        self.measure_button.setEnabled(True)
        self.status.setText(message)
        self.status.setStyleSheet("color: #c0392b;")

    def show_profile(self) -> None:
        rows = profile_rows(self.wiz.profile)
        self.table.setRowCount(len(rows))
        for r, cells in enumerate(rows):
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 2 and text.startswith("unknown"):
                    item.setForeground(Qt.GlobalColor.darkRed)
                self.table.setItem(r, c, item)

    def measure(self) -> None:
        profile = self.wiz.profile
        if profile is None:
            return
        self.measure_button.setEnabled(False)
        self.progress.setVisible(True)
        self.status.setText("Measuring RAM read bandwidth…")
        self._task = tasks.start(
            self.wiz.measure_fn, "Measuring bandwidth", self._on_measured, self._on_failed
        )

    def _on_measured(self, sourced) -> None:
        self.wiz.profile.ram_read_gbps = sourced
        self.progress.setVisible(False)
        self.measure_button.setEnabled(True)
        self.status.setText(f"RAM read: {format_value('ram_read_gbps', sourced.value)}")
        self.show_profile()

    def isComplete(self) -> bool:
        return self.wiz.profile is not None


class ModelPage(QWizardPage):
    def __init__(self, wizard: FitWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("The model")
        self.setSubTitle(
            "Plan for a model without downloading it, or choose the checkpoint folder or GGUF "
            "file you have."
        )
        layout = QVBoxLayout(self)
        self.group = QButtonGroup(self)
        self.preset_radio = QRadioButton("Plan without weights:")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PRESETS)
        row = QHBoxLayout()
        row.addWidget(self.preset_radio)
        row.addWidget(self.preset_combo)
        row.addStretch(1)
        layout.addLayout(row)
        self.folder_radio = QRadioButton("A DeepSeek-V4 checkpoint folder or GGUF file:")
        layout.addWidget(self.folder_radio)
        row = QHBoxLayout()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText(
            "folder with config.json and model.safetensors.index.json, or a .gguf file"
        )
        row.addWidget(self.path_edit, 1)
        browse = QPushButton("Folder…")
        browse.clicked.connect(self.browse)
        row.addWidget(browse)
        browse_gguf = QPushButton("GGUF file…")
        browse_gguf.clicked.connect(self.browse_gguf)
        row.addWidget(browse_gguf)
        self.verify_button = QPushButton("Verify")
        self.verify_button.clicked.connect(self.verify)
        row.addWidget(self.verify_button)
        layout.addLayout(row)
        self.test_radio = QRadioButton(
            "The tiny test model (random weights; try every part of the app)"
        )
        layout.addWidget(self.test_radio)
        for i, radio in enumerate((self.preset_radio, self.folder_radio, self.test_radio)):
            self.group.addButton(radio, i)
        self.preset_radio.setChecked(True)
        self.group.idToggled.connect(lambda *_: self._changed())
        self.preset_combo.currentTextChanged.connect(lambda *_: self._changed())
        self.path_edit.textChanged.connect(self._path_changed)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)
        self.progress.setVisible(False)
        layout.addWidget(self.progress)
        self.result = QLabel()
        self.result.setWordWrap(True)
        layout.addWidget(self.result)
        self.problems = QListWidget()
        layout.addWidget(self.problems, 1)
        self.verified: ModelChoice | None = None
        self._task = None

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the checkpoint folder")
        if folder:
            self.path_edit.setText(folder)
            self.folder_radio.setChecked(True)
            self.verify()

    def browse_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose the GGUF file (the first part of a split one)", "", "GGUF (*.gguf)"
        )
        if path:
            self.path_edit.setText(path)
            self.folder_radio.setChecked(True)
            self.verify()

    def _path_changed(self) -> None:
        self.verified = None
        self.problems.clear()
        self.result.setText("")
        self._changed()

    def _changed(self) -> None:
        self.completeChanged.emit()

    def verify(self) -> None:
        path = self.path_edit.text().strip()
        if not path:
            self.result.setText("Type or browse to the checkpoint folder or GGUF file first.")
            return
        self.folder_radio.setChecked(True)
        self.verified = None
        self.problems.clear()
        self.progress.setVisible(True)
        self.verify_button.setEnabled(False)
        gguf = path.lower().endswith(".gguf")
        self.result.setText(
            "Reading the GGUF header…" if gguf else "Reading the index and every shard header…"
        )
        self._task = tasks.start(
            lambda: verify_gguf(path) if gguf else verify_checkpoint(path),
            "Verifying the model",
            self._on_verified,
            self._on_failed,
        )

    def _on_verified(self, outcome) -> None:
        self.progress.setVisible(False)
        self.verify_button.setEnabled(True)
        choice, report_problems, notes, summary = outcome
        self.problems.clear()
        for p in report_problems:
            item = QListWidgetItem(f"✗ {p}")
            item.setForeground(Qt.GlobalColor.darkRed)
            self.problems.addItem(item)
        for n in notes:
            self.problems.addItem(QListWidgetItem(f"note: {n}"))
        if report_problems:
            self.result.setText(
                f"{len(report_problems)} problem(s) make this model unusable here; fix them "
                "(usually: download the missing or damaged files again) and verify again."
            )
            self.result.setStyleSheet("color: #c0392b;")
        else:
            self.result.setText(summary)
            self.result.setStyleSheet("color: #1e8449;")
            self.verified = choice
        self.completeChanged.emit()

    def _on_failed(self, message: str) -> None:
        self.progress.setVisible(False)
        self.verify_button.setEnabled(True)
        self.problems.clear()
        item = QListWidgetItem(f"✗ {message}")
        item.setForeground(Qt.GlobalColor.darkRed)
        self.problems.addItem(item)
        self.result.setText("This model cannot be used.")
        self.result.setStyleSheet("color: #c0392b;")
        self.completeChanged.emit()

    def choice(self) -> ModelChoice | None:
        if self.preset_radio.isChecked():
            return preset_choice(self.preset_combo.currentText())
        if self.test_radio.isChecked():
            return test_model_choice()
        return self.verified

    def isComplete(self) -> bool:
        return not self.folder_radio.isChecked() or self.verified is not None

    def validatePage(self) -> bool:
        choice = self.choice()
        if choice is None:
            return False
        self.wiz.set_model(choice)
        return True


def verify_checkpoint(path: str):
    """(choice or None, problems, notes, summary) for a checkpoint folder; runs off the GUI."""
    from flashdesk.engine.checkpoint import Checkpoint, CheckpointError

    try:
        ckpt = Checkpoint.open(path, strict=False)
    except CheckpointError as exc:
        return None, [str(exc)], [], ""
    with ckpt:
        report = ckpt.verify()
        config = ckpt.config
    choice = None
    if report.ok and config is not None:
        choice = ModelChoice("checkpoint", Path(path).name or path, config, path)
    summary = (
        f"Checkpoint OK: {report.tensors_checked:,} tensors in {report.shards_checked} shard(s)."
    )
    return choice, list(report.problems), list(report.notes), summary


def verify_gguf(path: str):
    """(choice or None, problems, notes, summary) for a GGUF file, as `verify_checkpoint`: its
    header read (split parts found, the architecture one llama.cpp runs) and a DeepSeek-V4
    model the planner can plan; runs off the GUI."""
    try:
        from flashdesk.engine.gguf.errors import GGUFError
        from flashdesk.engine.gguf.metadata import read_gguf
        from flashdesk.engine.gguf.plan_glue import model_figures
    except ImportError:
        from flashdesk.engine.gguf.errors import GGUFUnavailable

        return None, [str(GGUFUnavailable())], [], ""
    try:
        info = read_gguf(path)
        figures = model_figures(info)  # refuses a model the planner does not know
    except GGUFError as exc:
        return None, [str(exc)], [], ""
    except OSError as exc:
        return None, [f"{path} cannot be read ({exc.strerror or exc})."], [], ""
    choice = ModelChoice("gguf", info.name, info, path)
    parts = len(info.files)
    summary = (
        f"GGUF OK: {info.name}, {len(info.tensors):,} tensors"
        + (f" in {parts} parts" if parts > 1 else "")
        + f", {human_bytes(figures.total_bytes)} of weights; llama.cpp runs it."
    )
    return choice, [], [], summary


class PlanPage(QWizardPage):
    def __init__(self, wizard: FitWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("The plan")
        self.setSubTitle("Where every part of the model goes, and what speed to expect.")
        layout = QVBoxLayout(self)
        form = QFormLayout()
        row = QHBoxLayout()
        self.context_slider = QSlider(Qt.Orientation.Horizontal)
        self.context_slider.setRange(0, len(CONTEXTS) - 1)
        self.context_slider.setPageStep(1)
        self.context_slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        row.addWidget(self.context_slider, 1)
        self.context_label = QLabel()
        self.context_label.setMinimumWidth(110)
        row.addWidget(self.context_label)
        form.addRow("Context:", row)
        self.kv_combo = QComboBox()
        self.kv_combo.addItems(["bf16", "fp8"])
        self.kv_combo.setToolTip("KV cache precision: fp8 halves its memory")
        form.addRow("KV cache:", self.kv_combo)
        self.reserve_spin = QDoubleSpinBox()
        self.reserve_spin.setRange(-0.5, 16.0)
        self.reserve_spin.setSingleStep(0.5)
        self.reserve_spin.setSuffix(" GiB")
        self.reserve_spin.setSpecialValueText("automatic")
        self.reserve_spin.setValue(-0.5)
        self.reserve_spin.setToolTip("VRAM left free for the display and other programs")
        form.addRow("VRAM reserve:", self.reserve_spin)
        layout.addLayout(form)
        self.verdict = QLabel()
        self.verdict.setObjectName("verdict")
        font = self.verdict.font()
        font.setPointSizeF(font.pointSizeF() * 1.4)
        font.setBold(True)
        self.verdict.setFont(font)
        layout.addWidget(self.verdict)
        self.bars_box = QWidget()
        self.bars = QGridLayout(self.bars_box)
        self.bars.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bars_box)
        self.prediction = QLabel()
        self.prediction.setWordWrap(True)
        self.prediction.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.prediction)
        layout.addWidget(QLabel("What to change, and notes:"))
        self.changes = QListWidget()
        self.changes.setWordWrap(True)
        layout.addWidget(self.changes, 1)
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(60)
        self.timer.timeout.connect(self.recompute)
        self.context_slider.valueChanged.connect(self._schedule)
        self.kv_combo.currentTextChanged.connect(self._schedule)
        self.reserve_spin.valueChanged.connect(self._schedule)

    def initializePage(self) -> None:
        s = self.wiz.settings
        ctx = (s.plan or {}).get("context") or s.context_limit or 131072
        idx = min(range(len(CONTEXTS)), key=lambda i: abs(CONTEXTS[i] - ctx))
        self.context_slider.setValue(idx)
        self.kv_combo.setCurrentText((s.plan or {}).get("kv_dtype", "bf16"))
        self.recompute()

    def _schedule(self) -> None:
        self.context_label.setText(f"{human_tokens(self.context())} tokens")
        self.timer.start()

    def context(self) -> int:
        return CONTEXTS[self.context_slider.value()]

    def options(self, context: int | None = None):
        from flashdesk.offload.plan import PlanOptions

        reserve = self.reserve_spin.value()
        return PlanOptions(
            context=context or self.context(),
            kv_dtype=self.kv_combo.currentText(),
            vram_reserve_bytes=None if reserve < 0 else int(reserve * (1 << 30)),
        )

    def recompute(self) -> None:
        from flashdesk.offload.plan import PlanError
        from flashdesk.offload.predict import LONG_PROMPT, Efficiency, plan_and_predict, predict

        self.context_label.setText(f"{human_tokens(self.context())} tokens")
        wiz = self.wiz
        try:
            eff = Efficiency.load_or_defaults()  # what `bench decode` measured here, as `fit`
            plan, pred = plan_and_predict(
                wiz.figures, wiz.profile, self.options(), PREVIEW_PROMPT, eff
            )
            long = min(LONG_PROMPT, plan.context - 1)  # a long document: what the chunk is for
            document = (
                predict(plan, wiz.figures, wiz.profile, long, eff)
                if long > PREVIEW_PROMPT
                else None
            )
        except (PlanError, ValueError) as exc:
            self.verdict.setText("Cannot plan")
            self.verdict.setStyleSheet("color: #c0392b;")
            self.prediction.setText(str(exc))
            wiz.plan = wiz.prediction = wiz.document_prediction = None
            self.completeChanged.emit()
            return
        wiz.document_prediction = document
        wiz.plan, wiz.prediction = plan, pred
        text, colour = VERDICT_TEXT.get(plan.verdict, (plan.verdict, "black"))
        mode = {"gpu+cpu": "GPU + CPU", "cpu": "CPU only", "unified": "unified memory"}.get(
            plan.mode, plan.mode
        )
        self.verdict.setText(
            f"{text} — {wiz.choice.name}, {human_tokens(plan.context)} context, {mode}"
        )
        self.verdict.setStyleSheet(f"color: {colour};")
        self._show_memory(plan)
        self.prediction.setText(prediction_text(pred, document, plan))
        self.changes.clear()
        for c in plan.changes:
            self.changes.addItem(QListWidgetItem(f"→ {c}"))
        for n in plan.notes:
            self.changes.addItem(QListWidgetItem(f"note: {n}"))
        if not plan.changes and not plan.notes:
            self.changes.addItem("Nothing to change.")
        self.completeChanged.emit()

    def _show_memory(self, plan) -> None:
        while self.bars.count():
            w = self.bars.takeAt(0).widget()
            if w is not None:
                w.hide()
                w.deleteLater()
        row = 0
        for device, label in (("gpu", "GPU (VRAM)"), ("ram", "RAM")):
            m = plan.memory.get(device)
            if not m:
                continue
            bar = QProgressBar()
            budget = max(1, int(m.get("budget", 0)))
            bar.setRange(0, 1000)
            bar.setValue(int(1000 * min(1.0, m.get("used", 0) / budget)))
            bar.setFormat(
                f"{human_bytes(m.get('used', 0))} of {human_bytes(budget)} usable "
                f"(reserve {human_bytes(m.get('reserve', 0))})"
            )
            bar.setObjectName(f"memory_{device}")
            self.bars.addWidget(QLabel(label), row, 0)
            self.bars.addWidget(bar, row, 1)
            row += 1
        mapped = plan.memory.get("disk", {}).get("mapped", 0)
        if mapped:
            self.bars.addWidget(QLabel("Disk"), row, 0)
            self.bars.addWidget(QLabel(f"{human_bytes(mapped)} of experts read from disk"), row, 1)

    def isComplete(self) -> bool:
        return self.wiz.plan is not None and self.wiz.plan.verdict != "does_not_fit"


def prediction_text(pred, document=None, plan=None) -> str:
    """The plan page's speed line; `document`: the prediction for a long prompt, shown with the
    plan's GPU prompt chunk (what the chunk choice buys)."""
    if pred.decode_tok_s <= 0:
        return "No speed prediction: nothing could be placed."
    inputs = pred.inputs or {}
    sources = []
    for key, label in (("ram_read_gbps", "RAM read"), ("h2d_pinned_gbps", "PCIe")):
        item = inputs.get(key)
        if isinstance(item, dict) and item.get("value"):
            sources.append(f"{label} {item['value']:.1f} GB/s [{item.get('source', '?')}]")
    limit = (
        ", limited by the GPU's many small kernels per layer"
        if getattr(pred, "decode_limit", "memory") == "dispatch"
        else ""
    )
    full = getattr(pred, "decode_full_tok_s", 0.0)
    if full and full < 0.95 * pred.decode_tok_s and plan is not None:
        limit += f"; {full:.1f} once the {human_tokens(plan.context)}-token context is full"
    drafted = getattr(pred, "speculative_tok_s", None)
    if drafted:
        from flashdesk.offload.predict import DRAFT_ACCEPTANCE

        limit += f"; ≈ {drafted:.1f} with the MTP block's drafts if {100 * DRAFT_ACCEPTANCE:.0f} % are kept"
    return (
        f"Decode ≈ {pred.decode_tok_s:.1f} tok/s ({pred.confidence}; bound "
        f"{pred.decode_bound_tok_s:.1f}{limit}) · prefill ≈ {pred.prefill_tok_s:,.0f} tok/s "
        f"({pred.confidence}) · first token for a {human_tokens(pred.prompt_tokens)}-token prompt "
        f"≈ {human_seconds(pred.ttft_s)}"
        + (
            f"\nA {human_tokens(document.prompt_tokens)}-token document ≈ "
            f"{human_seconds(document.ttft_s)} to read in ({document.prefill_tok_s:,.0f} tok/s"
            + (
                f", {plan.prefill_chunk:,}-token GPU chunks"
                if plan is not None and plan.mode == "gpu+cpu"
                else ""
            )
            + ")"
            if document is not None and document.ttft_s
            else ""
        )
        + (f"\nFrom: {'; '.join(sources)}" if sources else "")
    )


class SavePage(QWizardPage):
    def __init__(self, wizard: FitWizard):
        super().__init__()
        self.wiz = wizard
        self.setTitle("Save")
        self.setSubTitle("The chat window will load the model with this plan.")
        layout = QVBoxLayout(self)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        layout.addStretch(1)

    def initializePage(self) -> None:
        plan, pred, choice = self.wiz.plan, self.wiz.prediction, self.wiz.choice
        lines = [
            f"Model: {choice.name}"
            + (f" ({choice.path})" if choice.path else "")
            + (" — planning only, no weights to load" if choice.kind == "preset" else ""),
            f"Verdict: {VERDICT_TEXT[plan.verdict][0]}",
            f"Context: {plan.context:,} tokens, KV cache {plan.kv_dtype} "
            f"({human_bytes(plan.kv_bytes)})",
            prediction_text(pred, getattr(self.wiz, "document_prediction", None), plan),
        ]
        if choice.kind == "preset":
            lines.append(
                "Without the weights the chat window runs the tiny test model (random weights); "
                "choose the checkpoint folder here once you have it."
            )
        self.summary.setText("\n\n".join(lines))


class FitWizard(QWizard):
    plan_saved = Signal(dict)

    def __init__(self, settings: Settings, data_folder: Path, parent=None, *, profile=None):
        super().__init__(parent)
        self.settings = settings
        self.data_folder = Path(data_folder)
        self.profile = profile
        self.choice: ModelChoice | None = None
        self.figures = None
        self.plan = None
        self.prediction = None
        self.document_prediction = None  # a long document's prediction (the plan page)
        self.setWindowTitle("Hardware fit")
        self.setWizardStyle(QWizard.WizardStyle.ClassicStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage, True)
        self.resize(900, 640)
        self.probe_page = ProbePage(self)
        self.model_page = ModelPage(self)
        self.plan_page = PlanPage(self)
        self.save_page = SavePage(self)
        for page in (self.probe_page, self.model_page, self.plan_page, self.save_page):
            self.addPage(page)
        self.setButtonText(QWizard.WizardButton.FinishButton, "Save plan")
        if settings.model_path:
            self.model_page.path_edit.setText(settings.model_path)

    # Overridable for tests: what runs in the background.
    def probe_fn(self):
        from flashdesk.offload.probe import probe

        return probe(measure=True)

    def measure_fn(self):
        from flashdesk.offload import bandwidth

        cores = self.profile.physical_cores.value if self.profile else 0
        ram = bandwidth.ram_read_gbps(threads=int(cores or 0), remeasure=True)
        for gpu in self.profile.gpus if self.profile else []:
            if not gpu.unified.value:
                bandwidth.fill_host_to_device(gpu, remeasure=True)  # PCIe copies, when CUDA works
        return ram

    def set_model(self, choice: ModelChoice) -> None:
        if self.choice is None or (choice.name, choice.path) != (
            self.choice.name,
            self.choice.path,
        ):
            self.figures = figures_for(choice)
        self.choice = choice

    def max_context(self) -> int:
        """The largest context (of the slider's steps) this machine can plan without shrinking it."""
        from flashdesk.offload.plan import make_plan

        best = 0
        for ctx in CONTEXTS:
            plan = make_plan(self.figures, self.profile, self.plan_page.options(ctx))
            if plan.verdict != "does_not_fit" and plan.context == ctx:
                best = ctx
        return best

    def saved_plan(self) -> dict:
        plan, pred, choice = self.plan, self.prediction, self.choice
        return {
            "model": choice.name,
            "model_kind": choice.kind,
            "verdict": plan.verdict,
            "context": plan.context,
            "kv_dtype": plan.kv_dtype,
            "kv_bytes": plan.kv_bytes,
            "mode": plan.mode,
            "memory": plan.memory,
            "changes": list(plan.changes),
            "decode_tok_s": pred.decode_tok_s,
            "prefill_tok_s": pred.prefill_tok_s,
            "confidence": pred.confidence,
            "max_context": self.max_context(),
            "vram_reserve_bytes": plan.options.vram_reserve_bytes if plan.options else None,
            "model_path": choice.path,
        }

    def accept(self) -> None:
        if self.plan is None or self.choice is None:
            return
        saved = self.saved_plan()
        s = self.settings
        s.plan = saved
        s.context_limit = int(self.plan.context)
        if self.choice.kind in ("checkpoint", "gguf"):
            s.model_path = self.choice.path
        elif self.choice.kind == "test":
            s.model_path = ""
        s.wizard_done = True
        try:
            s.save(self.data_folder)
            self.profile.save(self.data_folder / PROFILE_NAME)
        except OSError as exc:
            log.error("saving the plan failed: %s", exc)
        self.plan_saved.emit(saved)
        super().accept()

    def reject(self) -> None:
        if not self.settings.wizard_done:
            self.settings.wizard_done = True  # asked once; the Model menu opens it again
            try:
                self.settings.save(self.data_folder)
            except OSError as exc:
                log.error("saving settings failed: %s", exc)
        super().reject()
