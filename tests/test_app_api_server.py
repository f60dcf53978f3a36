"""The app's settings toggle for the local OpenAI-compatible server (off by default)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("pytestqt")

from _qtwait import wait_until

from flashdesk.app.backend import ScriptedBackend
from flashdesk.app.settings import Settings
from flashdesk.app.window import MainWindow
from flashdesk.engine.generate import EOS_ID, Session
from flashdesk.engine.tokenizer import load_tokenizer


class EchoModel:
    """Answers every prompt with the same ids, then EOS (model contract of engine.generate)."""

    def __init__(self, answer_ids: list[int], vocab: int):
        self.answer = [*answer_ids, EOS_ID]
        self.vocab = vocab

    def new_state(self) -> dict:
        return {"step": 0}

    def _logits(self, state) -> torch.Tensor:
        out = torch.zeros(self.vocab)
        out[self.answer[min(state["step"], len(self.answer) - 1)]] = 100.0  # certain at any T
        return out

    def prefill(self, ids, state):
        state["step"] = 0
        return self._logits(state)

    def decode(self, token_id, state):
        state["step"] += 1
        return self._logits(state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, key: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=30) as reply:
        return reply.status, json.loads(reply.read())


@pytest.fixture
def backend():
    tokenizer = load_tokenizer()
    backend = ScriptedBackend()
    backend.tokenizer = tokenizer
    backend.session = Session(EchoModel(tokenizer.encode("Hello there"), 129280), tokenizer)
    return backend


def open_window(qtbot, folder, backend, settings):
    win = MainWindow(backend, folder, settings)
    qtbot.addWidget(win)
    # polled without pytest-qt's blockers (tests/_qtwait.py: they corrupted memory under PySide6)
    wait_until(lambda: win.info is not None, timeout=10000)
    return win


def test_server_is_off_by_default(qtbot, tmp_path, backend):
    win = open_window(qtbot, tmp_path, backend, Settings(wizard_done=True))
    assert win.api_server is None and win.api_label.isHidden()
    win.close()


def test_toggle_serves_the_loaded_model_and_stops(qtbot, tmp_path, backend):
    port = free_port()
    settings = Settings(wizard_done=True, api_server=True, api_port=port, api_key="sekret")
    win = open_window(qtbot, tmp_path, backend, settings)
    try:
        assert win.api_server is not None and f":{port}" in win.api_label.text()
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            request(f"{base}/models")
        assert denied.value.code == 401
        status, models = request(f"{base}/models", key="sekret")
        assert status == 200 and models["data"][0]["id"] == win.info.name
        status, reply = request(
            f"{base}/chat/completions",
            {"model": "x", "messages": [{"role": "user", "content": "hi"}], "think": False},
            key="sekret",
        )
        assert status == 200
        assert reply["choices"][0]["message"]["content"] == "Hello there"
        # Turning it off in the settings closes the port.
        win.settings.api_server = False
        win.sync_api_server()
        assert win.api_server is None and win.api_label.isHidden()
        with pytest.raises(urllib.error.URLError):
            request(f"{base}/models", key="sekret")
    finally:
        win.close()


def test_port_in_use_is_reported_not_raised(qtbot, tmp_path, backend):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(wizard_done=True, api_server=True, api_port=port)
        win = open_window(qtbot, tmp_path, backend, settings)
        try:
            assert win.api_server is None
            assert "off" in win.api_label.text() and not win.api_label.isHidden()
            assert str(port) in win.api_label.toolTip()
        finally:
            win.close()


def test_settings_dialog_edits_the_server_fields(qtbot, tmp_path, backend):
    win = open_window(qtbot, tmp_path, backend, Settings(wizard_done=True))
    try:
        dialog = win.open_settings()
        assert not dialog.api_port.isEnabled()
        dialog.api_server.setChecked(True)
        assert dialog.api_port.isEnabled()
        dialog.api_port.setValue(free_port())
        dialog.api_key.setText(" k ")
        dialog.apply()
        assert win.settings.api_server and win.settings.api_key == "k"
        assert win.settings.api_port == dialog.api_port.value()
    finally:
        win.close()
