"""The headless entry points, as a user runs them: `flashdesk --self-test` and `--screenshot`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROFILES = Path(__file__).resolve().parent / "profiles"


def run_flashdesk(*args, timeout=900):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    return subprocess.run(
        [sys.executable, "-m", "flashdesk", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_self_test_streams_through_the_real_window_with_the_tiny_model(tmp_path):
    out = run_flashdesk("--self-test", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "model loaded: V4 tiny (test model — random weights)" in out.stdout
    assert "answer streamed:" in out.stdout and "history written:" in out.stdout
    assert "self-test passed" in out.stdout
    assert (tmp_path / "history.sqlite3").exists()
    assert (tmp_path / "test-model" / "config.json").exists()  # written once, reused next time


def test_self_test_reports_a_broken_model_folder(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    out = run_flashdesk("--self-test", "--data-dir", str(tmp_path / "d"), "--model", str(broken))
    assert out.returncode == 1
    assert "self-test FAILED: loading the model failed:" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("page", ["chat", "wizard", "documents"])
def test_screenshot_writes_a_populated_png(tmp_path, page):
    from PySide6.QtGui import QImage

    png = tmp_path / f"{page}.png"
    extra = ["--profile", str(PROFILES / "rtx4090_192gb_ddr5.json")] if page == "wizard" else []
    out = run_flashdesk("--screenshot", str(png), "--page", page, *extra, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    image = QImage(str(png))
    assert not image.isNull() and image.width() >= 900 and image.height() >= 700
    # Populated: many distinct colours (text, bars, chips), not a blank frame.
    colours = {
        image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)
    }
    assert len(colours) > 20


def test_unknown_option_is_an_argparse_error():
    out = run_flashdesk("--no-such-option", timeout=60)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
