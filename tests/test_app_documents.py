"""Documents in the chat window: chips with token counts, drop, send, and the over-limit dialog."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from _qtwait import wait_signal, wait_until
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from flashdesk.app.backend import ScriptedBackend
from flashdesk.app.window import MainWindow
from flashdesk.engine.documents import write_text_pdf
from flashdesk.engine.tokenizer import load_tokenizer


def make_window(qtbot, folder, backend=None):
    win = MainWindow(backend or ScriptedBackend(), folder)
    qtbot.addWidget(win)
    # polled without pytest-qt's blockers (tests/_qtwait.py: they corrupted memory under PySide6)
    wait_until(lambda: win.info is not None, timeout=10000)
    return win


@pytest.fixture
def files(tmp_path):
    import docx

    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(
        write_text_pdf([["Quarterly report", "Revenue grew by 12 percent."], ["Page two text."]])
    )
    d = docx.Document()
    d.add_heading("Design notes", level=1)
    d.add_paragraph("The engine keeps routed experts in RAM and the rest on the GPU.")
    word = tmp_path / "notes.docx"
    d.save(word)
    return pdf, word


def drop(target, paths):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    target.dropEvent(event)


def test_dropped_pdf_and_docx_become_chips_with_token_counts(qtbot, tmp_path, files):
    pdf, word = files
    win = make_window(qtbot, tmp_path / "data")
    drop(win, [pdf])
    win.documents.add_files([word])
    wait_until(lambda: not win.documents.busy and len(win.documents.chips) == 2, timeout=20000)
    chips = list(win.documents.chips.values())
    assert all(c.ready for c in chips)
    pdf_chip, docx_chip = chips
    assert "report.pdf" in pdf_chip.label.text() and "2 pages" in pdf_chip.label.text()
    assert "notes.docx" in docx_chip.label.text() and "DOCX" in docx_chip.label.text()
    tok = load_tokenizer()
    for chip in chips:
        # The count shown is the exact V4 token count of what will be sent.
        assert chip.attachment["tokens"] == tok.count(chip.attachment["text"])
        assert f"{chip.attachment['tokens']:,} tokens" in chip.label.text()
    total = sum(c.attachment["tokens"] for c in chips)
    assert win.documents.total_tokens == total
    assert f"Documents: {total:,} tokens" in win.preview_label.text()
    assert win.context_meter.value() >= total

    # Sending puts the documents before the message, and the history keeps what was attached.
    win.input.setPlainText("Summarise these")
    with wait_signal(win.turn_finished, timeout=10000):
        win.send_button.click()
    prompt = win.backend.prompts[-1].text
    assert "[File: report.pdf" in prompt and "Revenue grew by 12 percent." in prompt
    assert "[File: notes.docx" in prompt and prompt.index("notes.docx") < prompt.index("Summarise")
    assert not win.documents.chips  # the tray is emptied after sending
    saved = win.history.messages(win.chat_id)[0]
    assert [a["name"] for a in saved.attachments] == ["report.pdf", "notes.docx"]
    assert sum(a["tokens"] for a in saved.attachments) == total
    assert "report.pdf" in win.conversation.widgets[0].attachments.text()
    win.close()


def test_files_dropped_on_the_input_box_are_attached_not_pasted(qtbot, tmp_path, files):
    pdf, _ = files
    win = make_window(qtbot, tmp_path / "data")
    drop(win.input, [pdf])
    assert win.input.toPlainText() == ""
    wait_until(lambda: not win.documents.busy and len(win.documents.chips) == 1, timeout=20000)
    assert next(iter(win.documents.chips.values())).attachment["name"] == "report.pdf"
    win.close()


def test_removing_a_chip_updates_the_total(qtbot, tmp_path, files):
    pdf, word = files
    win = make_window(qtbot, tmp_path / "data")
    win.documents.add_files([pdf, word])
    wait_until(lambda: not win.documents.busy, timeout=20000)
    first_id, first = next(iter(win.documents.chips.items()))
    before = win.documents.total_tokens
    first.remove.click()
    assert win.documents.total_tokens == before - first.attachment["tokens"]
    assert first_id not in win.documents.chips
    win.close()


def test_documents_over_the_limit_show_the_numbers_and_send_nothing(qtbot, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    win = make_window(qtbot, tmp_path / "data", ScriptedBackend(context_limit=1024))
    win.documents.add_files([big])
    wait_until(lambda: not win.documents.busy, timeout=20000)
    tokens = win.documents.total_tokens
    assert tokens > 1024
    assert "color: #c0392b" in win.preview_label.styleSheet()  # previewed red before sending
    win.input.setPlainText("read this")
    win.send_button.click()
    title, message = win.last_error
    assert "do not fit" in title
    assert f"{tokens:,} tokens" in message and "1,024-token context" in message
    assert "Options:" in message and "Nothing was cut" in message
    assert win.message_model.rowCount() == 0 and win.chat_id is None
    assert win.documents.chips  # still attached, so the user can remove or change them
    win.close()


def test_unreadable_file_is_reported_not_attached(qtbot, tmp_path):
    bad = tmp_path / "archive.bin"
    bad.write_bytes(bytes(range(256)) * 64)
    win = make_window(qtbot, tmp_path / "data")
    win.documents.add_files([bad])
    wait_until(lambda: not win.documents.busy, timeout=20000)
    chip = next(iter(win.documents.chips.values()))
    assert chip.error and "not attached" in chip.label.text()
    assert win.last_error[0] == "A document could not be attached"
    assert "archive.bin" in win.last_error[1]
    assert win.documents.total_tokens == 0 and win.documents.attachments() == []
    win.close()
