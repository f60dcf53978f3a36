"""The chat window driven by the deterministic ScriptedBackend (pytest-qt, offscreen)."""

from __future__ import annotations

import sqlite3

import pytest

pytest.importorskip("pytestqt")

from _qtwait import wait_signal, wait_until

from flashdesk.app.backend import ScriptedBackend
from flashdesk.app.history import History
from flashdesk.app.settings import MODES, Settings
from flashdesk.app.window import MainWindow
from flashdesk.engine.chat import ASSISTANT, BOS

LONG_REPLY = "word " * 400


def make_window(qtbot, folder, backend=None, **kwargs):
    backend = backend or ScriptedBackend()
    win = MainWindow(backend, folder, **kwargs)
    qtbot.addWidget(win)
    # polled without pytest-qt's blockers (tests/_qtwait.py: they corrupted memory under PySide6)
    wait_until(lambda: win.info is not None, timeout=10000)
    return win


@pytest.fixture
def window(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path)
    yield win
    win.close()


def send(qtbot, win, text, timeout=10000):
    win.input.setPlainText(text)
    with wait_signal(win.turn_finished, timeout=timeout) as blocker:
        win.send_button.click()
    return blocker.args[0]


def test_send_streams_answer_and_shows_stats(qtbot, window):
    status = send(qtbot, window, "hello")
    assert status == "complete"
    user, answer = window.message_model.messages
    assert user.role == "user" and user.content == "hello"
    assert answer.content.startswith("You said: **hello**")
    widget = window.conversation.widgets[1]
    assert "tok/s" in widget.stats.text() and "finished" in widget.stats.text()
    assert not widget.stats.isHidden()
    # Markdown rendered: bold text and a code block with a copy link.
    assert widget.body.code_blocks == ["print(1)"]
    assert "You said: hello" in widget.body.toPlainText()
    assert "Copy code" in widget.body.toPlainText()
    # Saved, with stats.
    saved = window.history.messages(window.chat_id)
    assert [m.role for m in saved] == ["user", "assistant"]
    assert saved[1].status == "complete" and saved[1].content == answer.content
    assert saved[1].stats["stop_reason"] == "eos"
    assert "tok/s" in window.speed_label.text()
    assert "tokens" in window.context_meter.format()


def test_ctrl_enter_sends_and_escape_stops(qtbot, tmp_path):
    from PySide6.QtCore import Qt

    backend = ScriptedBackend(delay_s=0.01, chars_per_event=1, reply=lambda t: LONG_REPLY)
    win = make_window(qtbot, tmp_path, backend)
    win.input.setPlainText("go")
    with wait_signal(win.turn_finished, timeout=20000) as blocker:
        qtbot.keyClick(win.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
        wait_until(lambda: len(win.message_model.messages[-1].content) > 5, timeout=10000)
        qtbot.keyClick(win.input, Qt.Key.Key_Escape)
    assert blocker.args[0] == "stopped"
    win.close()


def test_stop_mid_stream_keeps_partial_answer(qtbot, tmp_path):
    backend = ScriptedBackend(delay_s=0.01, chars_per_event=1, reply=lambda t: LONG_REPLY)
    win = make_window(qtbot, tmp_path, backend)
    win.input.setPlainText("long please")
    with wait_signal(win.turn_finished, timeout=20000) as blocker:
        win.send_button.click()
        assert win.stop_button.isEnabled() and not win.send_button.isEnabled()
        wait_until(lambda: len(win.message_model.messages[-1].content) > 10, timeout=10000)
        win.stop_button.click()
    assert blocker.args[0] == "stopped"
    partial = win.message_model.messages[-1]
    assert 0 < len(partial.content) < len(LONG_REPLY)
    saved = win.history.messages(win.chat_id)[-1]
    assert saved.status == "stopped" and saved.content == partial.content
    assert saved.stats["stop_reason"] == "cancelled"
    assert "Stopped" in win.conversation.widgets[-1].error.text()
    assert win.send_button.isEnabled() and not win.stop_button.isEnabled()
    win.close()


def test_mode_selector_changes_encoded_prompt(qtbot, window):
    backend = window.backend
    window.mode_combo.setCurrentText("Non-think")
    send(qtbot, window, "one")
    assert backend.prompts[-1].text.startswith(BOS)
    assert backend.prompts[-1].text.endswith(ASSISTANT + "</think>")
    window.mode_combo.setCurrentText("Think High")
    send(qtbot, window, "two")
    assert backend.prompts[-1].text.endswith(ASSISTANT + "<think>")
    answer = window.message_model.messages[-1]
    assert answer.mode == "Think High" and answer.reasoning
    widget = window.conversation.widgets[-1]
    assert widget.reasoning_toggle.text().startswith("Thought for")
    assert widget.reasoning.isHidden()  # collapsed until clicked
    widget.reasoning_toggle.click()
    assert not widget.reasoning.isHidden()
    assert window.history.messages(window.chat_id)[-1].reasoning == answer.reasoning
    # The next turn adds widgets without rebuilding the ones shown: the block stays expanded.
    send(qtbot, window, "three")
    assert window.conversation.widgets[3] is widget and not widget.reasoning.isHidden()
    assert [w.row for w in window.conversation.widgets] == list(range(6))
    assert widget.regenerate_button.isHidden()  # only the last answer offers Regenerate
    assert Settings.load(window.data_folder).mode == "Think High"


def test_think_max_disabled_under_384k(qtbot, window):
    item = window.mode_combo.model().item(MODES.index("Think Max"))
    assert not item.isEnabled()
    assert "384K" in item.toolTip() and "8K" in item.toolTip()


def test_think_max_enabled_with_long_context(qtbot, tmp_path):
    backend = ScriptedBackend(context_limit=512 * 1024)
    win = make_window(qtbot, tmp_path, backend)
    item = win.mode_combo.model().item(MODES.index("Think Max"))
    assert item.isEnabled()
    win.mode_combo.setCurrentText("Think Max")
    send(qtbot, win, "hard problem")
    assert "Reasoning Effort: Absolute maximum" in backend.prompts[-1].text
    win.close()


def test_token_updates_are_batched(qtbot, tmp_path):
    backend = ScriptedBackend(delay_s=0.0005, chars_per_event=1, reply=lambda t: LONG_REPLY)
    win = make_window(qtbot, tmp_path, backend, settings=Settings(max_tokens=4096))
    batches = []  # counted in the GUI thread, where the updates land
    append_text = win.message_model.append_text
    win.message_model.append_text = lambda *a: (batches.append(1), append_text(*a))
    send(qtbot, win, "x")
    events = len(LONG_REPLY)
    elapsed = win.message_model.messages[-1].stats["elapsed_s"]
    assert len(batches) < events / 4  # far fewer UI updates than tokens
    assert len(batches) <= elapsed * 30 + 2  # at most ~30 per second
    assert win.message_model.messages[-1].content == LONG_REPLY
    win.close()


def test_max_tokens_stops_the_answer(qtbot, tmp_path):
    backend = ScriptedBackend(reply=lambda t: LONG_REPLY)
    win = make_window(qtbot, tmp_path, backend, settings=Settings(max_tokens=100))
    assert send(qtbot, win, "x") == "complete"
    answer = win.message_model.messages[-1]
    assert len(answer.content) == 100 and answer.stats["stop_reason"] == "max_tokens"
    assert "hit the token limit" in win.conversation.widgets[-1].stats.text()
    win.close()


def test_regenerate_replaces_last_answer(qtbot, window):
    send(qtbot, window, "again")
    first_id = window.message_model.messages[-1].id
    widget = window.conversation.widgets[-1]
    assert not widget.regenerate_button.isHidden()
    with wait_signal(window.turn_finished, timeout=10000):
        widget.regenerate_button.click()
    msgs = window.history.messages(window.chat_id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[-1].id != first_id


def test_over_context_prompt_gives_readable_error(qtbot, tmp_path):
    backend = ScriptedBackend(context_limit=200)
    win = make_window(qtbot, tmp_path, backend)
    status = send(qtbot, win, "x" * 300)
    assert status == "error"
    title, message = win.last_error
    assert "too long" in title
    assert "context window holds 200" in message and "Traceback" not in message
    win.close()


def test_load_failure_is_a_readable_message(qtbot, tmp_path):
    backend = ScriptedBackend(
        fail_load="The checkpoint folder is missing shard 3. Download it again."
    )
    win = MainWindow(backend, tmp_path)
    qtbot.addWidget(win)
    wait_until(lambda: hasattr(win, "last_error"), timeout=10000)
    assert win.last_error[1].startswith("The checkpoint folder is missing shard 3")
    assert not win.send_button.isEnabled()
    win.close()


def test_load_can_be_cancelled(qtbot, tmp_path):
    backend = ScriptedBackend(load_delay_s=3.0)
    win = MainWindow(backend, tmp_path)
    qtbot.addWidget(win)
    assert not win.load_cancel.isHidden()
    win.load_cancel.click()
    wait_until(lambda: win.load_cancel.isHidden(), timeout=10000)
    assert win.info is None and not win.engine.loading
    assert "cancelled" in win.statusBar().currentMessage()
    assert not win.send_button.isEnabled()
    win.close()


def test_history_survives_restart(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path)
    send(qtbot, win, "remember me")
    win.rename_chat(win.chat_id, "Kept")
    win.close()
    win.history.close()
    again = make_window(qtbot, tmp_path)
    assert [c.title for c in again.chat_list_model.chats] == ["Kept"]
    again.open_chat(again.chat_list_model.chats[0].id)
    assert again.message_model.messages[0].content == "remember me"
    assert again.message_model.messages[1].content.startswith("You said")
    again.search.setText("nothing like this")
    assert again.chat_list_model.rowCount() == 0
    again.search.setText("remember")
    assert again.chat_list_model.rowCount() == 1
    again.close()


def test_export_and_delete(qtbot, window, tmp_path):
    send(qtbot, window, "export me")
    md = tmp_path / "chat.md"
    js = tmp_path / "chat.json"
    window.export_chat("md", path=str(md))
    window.export_chat("json", path=str(js))
    assert "export me" in md.read_text() and "## FlashDesk" in md.read_text()
    import json

    assert json.loads(js.read_text())["messages"][0]["content"] == "export me"
    window.delete_chat(window.chat_id, confirm=False)
    assert window.chat_list_model.rowCount() == 0 and window.message_model.rowCount() == 0
    db = sqlite3.connect(window.history.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_history_wal_mode(tmp_path):
    h = History.in_folder(tmp_path)
    assert h.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    h.close()


def test_settings_dialog_changes_sampling_and_persists(qtbot, window):
    dialog = window.open_settings()
    dialog.temperature.setValue(0.0)
    dialog.max_tokens.setValue(7)
    dialog.system_prompt.setPlainText("Be brief.")
    dialog.fixed_seed.setChecked(True)
    dialog.seed.setValue(42)
    dialog.accept()
    saved = Settings.load(window.data_folder)
    assert (saved.temperature, saved.max_tokens, saved.seed) == (0.0, 7, 42)
    assert window.sampling().max_tokens == 7 and window.sampling().temperature == 0.0
    send(qtbot, window, "hi")
    assert window.backend.prompts[-1].text.startswith(BOS + "Be brief.")
    assert len(window.message_model.messages[-1].content) == 7  # the new max applies


def test_settings_dialog_new_model_folder_reloads(qtbot, window):
    dialog = window.open_settings()
    dialog.model_path.setText("/models/DeepSeek-V4-Flash")
    with wait_signal(window.model_ready, timeout=10000):
        dialog.accept()
    assert Settings.load(window.data_folder).model_path == "/models/DeepSeek-V4-Flash"
