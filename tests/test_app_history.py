"""History (SQLite WAL), settings, data folder and formatting: unit tests, and a kill mid-answer."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from flashdesk.app.formatting import (
    context_meter_text,
    human_bytes,
    human_seconds,
    markdown_with_copy_links,
    stats_line,
    thought_label,
)
from flashdesk.app.history import INTERRUPTED, History, HistoryError
from flashdesk.app.paths import PORTABLE_FOLDER, data_dir, portable_dir
from flashdesk.app.settings import Settings

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication
    app = QApplication([])
    from flashdesk.app.backend import ScriptedBackend
    from flashdesk.app.main import wait_for
    from flashdesk.app.settings import Settings
    from flashdesk.app.window import MainWindow

    replies = {"one": "first answer"}
    backend = ScriptedBackend(
        delay_s=0.005, chars_per_event=1, reply=lambda t: replies.get(t, "partial " * 20000)
    )
    win = MainWindow(backend, sys.argv[1], Settings(max_tokens=10**6))
    win.show()
    assert wait_for([win.model_ready], 30)
    win.input.setPlainText("one")
    win.send_button.click()
    assert wait_for([win.turn_finished], 30)
    win.input.setPlainText("two")
    win.send_button.click()
    print("streaming", flush=True)
    app.exec()
    """
)


def test_killed_mid_answer_keeps_earlier_turns_and_partial_answer(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "streaming", proc.stderr.read()
        db_path = tmp_path / "history.sqlite3"
        deadline = time.monotonic() + 60
        partial = ""
        while time.monotonic() < deadline:
            db = sqlite3.connect(db_path)
            rows = db.execute("SELECT content FROM messages ORDER BY id").fetchall()
            db.close()
            if len(rows) == 4 and len(rows[3][0]) > 40:
                partial = rows[3][0]
                break
            time.sleep(0.2)
        assert partial, "the streaming answer never reached the database"
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to save anything more
        proc.wait(30)
    history = History.in_folder(tmp_path)
    assert history.recovered == 1
    chat = history.chats()[0]
    msgs = history.messages(chat.id)
    assert [(m.role, m.status) for m in msgs] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", INTERRUPTED),
    ]
    assert msgs[0].content == "one" and msgs[1].content == "first answer"
    assert msgs[3].content.startswith("partial partial") and len(msgs[3].content) >= len(partial)
    assert msgs[3].stats.get("generated_tokens", 0) > 0
    history.close()


def test_history_basics(tmp_path):
    h = History.in_folder(tmp_path)
    a = h.create_chat("Alpha")
    b = h.create_chat("Beta")
    h.add_message(a.id, "user", "hello there")
    m = h.add_message(a.id, "assistant", "", mode="Think High", status="streaming")
    h.update_message(m.id, content="hi", reasoning="think", status="complete", stats={"x": 1})
    h.add_message(b.id, "user", "unrelated")
    assert [c.title for c in h.chats()] == ["Beta", "Alpha"]  # newest activity first
    h.add_message(a.id, "user", "more")
    assert [c.title for c in h.chats()] == ["Alpha", "Beta"]
    assert [c.title for c in h.chats("THERE")] == ["Alpha"]  # content, case-insensitive
    assert [c.title for c in h.chats("think")] == ["Alpha"]  # reasoning is searched too
    h.rename_chat(a.id, "  Renamed ")
    assert h.chat(a.id).title == "Renamed"
    saved = h.messages(a.id)[1]
    assert (saved.content, saved.reasoning, saved.mode, saved.stats) == (
        "hi",
        "think",
        "Think High",
        {"x": 1},
    )
    md = h.export_markdown(a.id)
    assert md.startswith("# Renamed") and "<summary>Reasoning</summary>" in md and "hi" in md
    exported = json.loads(h.export_json(a.id))
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant", "user"]
    h.delete_chat(a.id)
    assert h.chat(a.id) is None and h.messages(a.id) == []
    with pytest.raises(HistoryError, match="no longer exists"):
        h.export_json(a.id)
    h.close()


def test_damaged_history_file_gives_a_readable_error(tmp_path):
    (tmp_path / "history.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError, match="Move that file aside"):
        History.in_folder(tmp_path)


def test_settings_roundtrip_and_damaged_file(tmp_path):
    s = Settings(model_path="/models/v4", context_limit=65536, mode="Think High", top_k=40)
    s.save(tmp_path)
    assert Settings.load(tmp_path) == s
    (tmp_path / "settings.json").write_text("{ not json")
    assert Settings.load(tmp_path) == Settings()  # defaults, and the bad file is set aside
    assert (tmp_path / "settings.json.broken").exists()
    (tmp_path / "settings.json").write_text(json.dumps({"mode": "Bogus", "unknown": 1}))
    assert Settings.load(tmp_path).mode == "Non-think"


def test_portable_mode_and_data_dir(tmp_path, monkeypatch):
    exe_dir = tmp_path / "app"
    exe_dir.mkdir()
    assert portable_dir([exe_dir]) is None
    (exe_dir / "portable.txt").write_text("")
    assert portable_dir([exe_dir]) == exe_dir / PORTABLE_FOLDER
    monkeypatch.setenv("FLASHDESK_DATA_DIR", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_portable_marker_next_to_the_launcher_is_used(tmp_path):
    launcher = tmp_path / "FlashDesk"
    launcher.mkdir()
    (launcher / "portable.txt").write_text("")
    script = launcher / "start.py"
    script.write_text("from flashdesk.app.paths import data_dir\nprint(data_dir())\n")
    env = {k: v for k, v in os.environ.items() if k != "FLASHDESK_DATA_DIR"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == str(launcher / PORTABLE_FOLDER)


def test_markdown_copy_links():
    md = "Intro\n\n```python\nprint(1)\n```\n\ntext\n\n~~~\na\nb\n~~~\n"
    rendered, blocks = markdown_with_copy_links(md)
    assert blocks == ["print(1)", "a\nb"]
    assert rendered.count("(copy:") == 2 and "[Copy code](copy:1)" in rendered
    # An answer still streaming: the open block counts up to the end.
    rendered, blocks = markdown_with_copy_links("```sh\nls -l\ncd")
    assert blocks == ["ls -l\ncd"]
    # A shorter fence inside a longer one does not close it.
    _, blocks = markdown_with_copy_links("````\n```\ninner\n```\n````")
    assert blocks == ["```\ninner\n```"]


def test_formatting():
    assert human_bytes(None) == "—" and human_bytes(512) == "512 B"
    assert human_bytes(3 * 1024**3) == "3.0 GB"
    assert human_seconds(0.25) == "250 ms" and human_seconds(12.34) == "12.3 s"
    assert human_seconds(125) == "2 min 05 s"
    assert (
        thought_label(None, True) == "Thinking…"
        and thought_label(11.6, False) == "Thought for 12 s"
    )
    assert context_meter_text(1234, 8192, 2048) == "1,234 / 8K tokens · KV 2.0 KB"
    line = stats_line(
        {
            "decode_tok_s": 12.34,
            "ttft_s": 0.42,
            "generated_tokens": 120,
            "reasoning_tokens": 30,
            "prompt_tokens": 50,
            "stop_reason": "cancelled",
        }
    )
    assert line == (
        "12.3 tok/s · first token 420 ms · 120 tokens (30 reasoning) · prompt 50 · stopped"
    )
    assert stats_line({}) == ""
    assert stats_line({"prompt_tokens": 50_123, "reused_tokens": 48_000}) == (
        "prompt 50,123 (48,000 cached)"
    )
