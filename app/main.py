"""Start the desktop app (`flashdesk` with no command, `make run`), or its headless entry points.

flashdesk                       the app
flashdesk --self-test           offscreen: load the tiny model, stream an answer through the
                                real window, check the history; exit 0 or 1 with the reason
flashdesk --screenshot PATH [--page chat|wizard|documents]
                                render a populated window to a PNG
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("flashdesk.app")

PAGES = ("chat", "wizard", "documents")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashdesk",
        description="Open the FlashDesk desktop app (with no options), or run its headless checks.",
    )
    p.add_argument(
        "--self-test",
        action="store_true",
        help="start offscreen, load the tiny test model, stream a short answer through the window, "
        "check the history, and exit 0 (or 1 with the reason)",
    )
    p.add_argument("--screenshot", metavar="PATH", help="render a populated window to PATH (PNG)")
    p.add_argument("--page", choices=PAGES, default="chat", help="what --screenshot shows")
    p.add_argument(
        "--profile",
        metavar="JSON",
        help="a saved hardware profile for --screenshot --page wizard (default: probe this machine)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="keep history, settings and the log in DIR")
    p.add_argument("--model", metavar="DIR", help="a DeepSeek-V4 checkpoint folder to load")
    p.add_argument(
        "--test-model",
        action="store_true",
        help="use the tiny random-weights test model even if a checkpoint is configured",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds the headless modes may take"
    )
    return p


def emit_refcount_bug() -> str | None:
    """PySide6 6.12.0 drops a reference to True on every Signal.emit(); on Python < 3.12 (True is
    not immortal) the app aborts after a few hundred signals. Say so instead of crashing."""
    import PySide6

    if PySide6.__version__ == "6.12.0" and sys.version_info < (3, 12):
        return (
            "FlashDesk cannot run with PySide6 6.12.0 on Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: that release has a bug that "
            "crashes the app after a few seconds of streaming. Install another version with "
            "`pip install PySide6-Essentials==6.11.3` (or use Python 3.12 or newer)."
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import PySide6  # noqa: F401
    except ImportError as exc:
        print(
            f"FlashDesk needs PySide6 for its window, and it could not be imported ({exc}).\n"
            "Install it with `pip install PySide6-Essentials`, or run `make run`, which sets up "
            "everything in .venv.",
            file=sys.stderr,
        )
        return 1
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = emit_refcount_bug()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    headless = args.self_test or args.screenshot
    if headless and not os.environ.get("QT_QPA_PLATFORM"):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    app = make_application()
    if args.self_test:
        return run_self_test(args)
    if args.screenshot:
        from flashdesk.app.screenshot import take_screenshot

        return take_screenshot(args)
    return run_app(args, app)


def make_application():
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from flashdesk.app.paths import APP_NAME, ORG_NAME, asset

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "flashdesk"])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(ORG_NAME)
    app.setApplicationDisplayName(APP_NAME)
    icon = asset("flashdesk.svg")
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    return app


def open_data(args):
    from flashdesk.app.history import History
    from flashdesk.app.paths import data_dir, setup_logging
    from flashdesk.app.settings import Settings

    folder = data_dir(args.data_dir)
    setup_logging(folder)
    settings = Settings.load(folder)
    history = History.in_folder(folder)
    return folder, settings, history


def make_backend(args, folder: Path, settings):
    from flashdesk.app.engine_backend import EngineBackend
    from flashdesk.app.window import plan_summary

    model_path = None if args.test_model else (args.model or settings.model_path or None)
    return EngineBackend(
        model_path,
        folder,
        context_limit=settings.context_limit,
        plan_summary=plan_summary(settings.plan),
        plan=settings.plan,
        # No V4 weights configured: the real small GGUF demo model when the gguf extra and the
        # demo file are installed (make run installs both), else the tiny V4 test model.
        demo=not args.test_model,
    )


def install_excepthook(folder: Path) -> None:
    """An unexpected error becomes a log entry and a readable message, never a traceback box."""
    from PySide6.QtWidgets import QApplication, QMessageBox

    def hook(exc_type, exc, tb):
        log.error("unexpected error:\n%s", "".join(traceback.format_exception(exc_type, exc, tb)))
        if issubclass(exc_type, KeyboardInterrupt):
            QApplication.quit()
            return
        window = QApplication.activeWindow()
        QMessageBox.warning(
            window,
            "Something went wrong",
            f"FlashDesk hit an unexpected problem ({exc_type.__name__}: {exc}). Your chats are "
            f"saved. The details are in {folder / 'flashdesk.log'} (Help ▸ Open log file); "
            "please include them if you report this.",
        )

    sys.excepthook = hook


def run_app(args, app) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QMessageBox

    from flashdesk.app.history import HistoryError
    from flashdesk.app.window import MainWindow

    try:
        folder, settings, history = open_data(args)
    except HistoryError as exc:
        QMessageBox.critical(None, "FlashDesk cannot open its history", exc.args[0])
        return 1
    except OSError as exc:
        QMessageBox.critical(
            None,
            "FlashDesk cannot open its data folder",
            f"{exc}. Check that your home folder is writable, or start FlashDesk with "
            "--data-dir pointing to a writable folder.",
        )
        return 1
    install_excepthook(folder)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl+C in the terminal closes the app
    log.info("FlashDesk starting; data in %s", folder)
    window = MainWindow(make_backend(args, folder, settings), folder, settings, history)
    window.show()
    if not settings.wizard_done:
        QTimer.singleShot(300, window.open_wizard)
    return app.exec()


# ---------------------------------------------------------------------------------------------
def wait_for(signals, timeout_s: float) -> tuple[object, tuple] | None:
    """Run the event loop until one of `signals` fires; (signal, args) or None on timeout."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    fired: list = []

    def make(sig):
        def slot(*a):
            fired.append((sig, a))
            loop.quit()

        return slot

    slots = [(sig, make(sig)) for sig in signals]
    for sig, slot in slots:
        sig.connect(slot)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()
    for sig, slot in slots:
        sig.disconnect(slot)
    return fired[0] if fired else None


def run_self_test(args) -> int:
    from flashdesk.app.engine_backend import EngineBackend
    from flashdesk.app.history import History
    from flashdesk.app.paths import setup_logging
    from flashdesk.app.settings import Settings
    from flashdesk.app.window import MainWindow

    started = time.perf_counter()
    temp = None
    if args.data_dir:
        folder = Path(args.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="flashdesk-selftest-")
        folder = Path(temp.name)
    setup_logging(folder)

    def fail(reason: str) -> int:
        log_file = folder / "flashdesk.log"
        if temp is None:
            print(f"self-test FAILED: {reason}\n(log: {log_file})", file=sys.stderr)
            return 1
        # The temporary data folder is removed on exit: show the log's end instead of its path.
        try:
            tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        except OSError:
            tail = ["(no log was written)"]
        print(f"self-test FAILED: {reason}\nlast lines of the log:", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        return 1

    def ok(what: str) -> None:
        print(f"ok  {what}  [{time.perf_counter() - started:.1f} s]", flush=True)

    settings = Settings(
        max_tokens=12, temperature=1.0, seed=0, context_limit=4096, wizard_done=True
    )
    backend = EngineBackend(
        None if args.test_model or not args.model else args.model,
        folder,
        context_limit=settings.context_limit,
    )
    window = MainWindow(backend, folder, settings, autoload=False)
    window.show()
    got = None
    try:
        window.load_model()
        got = wait_for([window.model_ready, window.engine.worker.load_failed], args.timeout)
        if got is None:
            return fail(f"the model did not load within {args.timeout:.0f} s")
        if got[0] is not window.model_ready:
            return fail(f"loading the model failed: {got[1][1]}")
        info = window.info
        ok(f"model loaded: {info.label}, context {info.context_limit:,} tokens, on {info.device}")
        window.mode_combo.setCurrentText("Non-think")
        window.input.setPlainText("Say hello in five words.")
        window.send_button.click()
        if window.stream_row is None:
            return fail("pressing Send did not start an answer")
        got = wait_for([window.turn_finished], args.timeout)
        if got is None:
            window.stop()
            return fail(f"the answer did not finish within {args.timeout:.0f} s")
        status = got[1][0]
        answer = window.message_model.messages[-1]
        if status != "complete":
            return fail(f"the answer ended as {status!r}: {answer.stats.get('error', '')}")
        stats = answer.stats
        if not stats.get("generated_tokens"):
            return fail("the model generated no tokens")
        ok(
            f"answer streamed: {stats['generated_tokens']} tokens, "
            f"{stats.get('decode_tok_s') or 0:.1f} tok/s, first token "
            f"{stats.get('ttft_s') or 0:.2f} s, stop: {stats.get('stop_reason')}"
        )
        if not window.conversation.widgets[-1].stats.text():
            return fail("the stats line under the answer is empty")
        ok(f"stats line: {window.conversation.widgets[-1].stats.text()}")
        chat_id = window.chat_id
    finally:
        window.close()
        window.history.close()
    history = History.in_folder(folder)
    try:
        saved = history.messages(chat_id)
    finally:
        history.close()
    if [m.role for m in saved] != ["user", "assistant"]:
        return fail(f"the history holds {[m.role for m in saved]} instead of a user and an answer")
    if saved[1].content != answer.content or saved[1].status != "complete":
        return fail("the saved answer differs from the one shown")
    ok(f"history written: {history.path}")
    print(f"self-test passed in {time.perf_counter() - started:.1f} s")
    if temp is not None:
        temp.cleanup()
    return 0
