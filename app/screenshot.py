"""`flashdesk --screenshot PATH [--page chat|wizard|documents]`: a populated window as a PNG.

The chat and documents pages use scripted demo replies (the status bar says so), so the picture
shows the window's parts (reasoning block, Markdown, code, stats line, chips, meters) without
needing the real model; the wizard page plans DeepSeek-V4-Flash on this machine's probe, or on a
saved profile given with --profile.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

DEMO_REPLIES = {
    "How fast will V4-Flash run here?": (
        "On this machine the plan keeps attention, the shared experts and the KV cache on the "
        "GPU and reads the routed experts from RAM:\n\n"
        "| part | where | bytes per token |\n|---|---|---|\n"
        "| attention + shared | GPU | 7.7 GB |\n| routed experts | RAM | 3.45 GB |\n\n"
        "Decode is bounded by **RAM bandwidth ÷ expert bytes**, so a 90 GB/s system reads "
        "about 26 tokens' worth of experts per second before any other cost."
    ),
    "Show me how to start the local server.": (
        "Run it from a terminal:\n\n```sh\nflashdesk serve --model ~/models/DeepSeek-V4-Flash\n```\n\n"
        "Then point any OpenAI-compatible client at `http://127.0.0.1:8437/v1`."
    ),
}


def _demo_reply(text: str) -> str:
    return DEMO_REPLIES.get(text.strip(), f"(demo) You asked: {text}")


def _settle(app, seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def _chat_window(folder: Path, documents: bool):
    from PySide6.QtWidgets import QApplication

    from flashdesk.app.backend import ScriptedBackend
    from flashdesk.app.main import wait_for
    from flashdesk.app.settings import Settings
    from flashdesk.app.window import MainWindow

    app = QApplication.instance()
    backend = ScriptedBackend(
        context_limit=131072,
        delay_s=0.012,
        chars_per_event=1,
        reply=_demo_reply,
        name="demo",
        note="scripted demo replies",
    )
    settings = Settings(max_tokens=4096, wizard_done=True, context_limit=131072)
    win = MainWindow(backend, folder, settings, autoload=False)
    win.resize(1280, 820)
    win.show()
    win.load_model()
    if wait_for([win.model_ready], 30) is None:
        raise RuntimeError("the demo backend did not load")
    for text, mode in (
        ("How fast will V4-Flash run here?", "Think High"),
        ("Show me how to start the local server.", "Non-think"),
    ):
        win.mode_combo.setCurrentText(mode)
        win.input.setPlainText(text)
        win.send_button.click()
        if wait_for([win.turn_finished], 60) is None:
            raise RuntimeError("the demo answer did not finish")
    win.history.rename_chat(win.chat_id, "Speed on this machine")
    win.history.create_chat("Summarise the Q3 report")
    win.history.create_chat("Rust borrow checker question")
    win.reload_chats()
    win.conversation.widgets[1].reasoning_toggle.setChecked(True)
    if documents:
        from flashdesk.engine.documents import write_text_pdf

        pdf = folder / "q3-report.pdf"
        pdf.write_bytes(
            write_text_pdf(
                [
                    [f"Q3 report, page {i + 1}", "Revenue grew 12 percent on data-centre sales."]
                    * 20
                    for i in range(6)
                ]
            )
        )
        notes = folder / "design-notes.md"
        notes.write_text("# Design notes\n\n" + "Experts live in RAM; attention on the GPU.\n" * 80)
        win.documents.add_files([pdf, notes])
        deadline = time.monotonic() + 60
        while win.documents.busy and time.monotonic() < deadline:
            _settle(app, 0.05)
        win.input.setPlainText("Compare the report with the design notes.")
    _settle(app, 0.5)
    win.conversation.verticalScrollBar().setValue(0 if not documents else 10**6)
    _settle(app, 0.2)
    return win


def _wizard(folder: Path, profile_path: str | None):
    from PySide6.QtWidgets import QApplication

    from flashdesk.app.settings import Settings
    from flashdesk.app.wizard import CONTEXTS, FitWizard

    app = QApplication.instance()
    profile = None
    if profile_path:
        from flashdesk.offload.probe import HardwareProfile

        profile = HardwareProfile.load(profile_path)
    else:
        from flashdesk.offload.probe import probe

        profile = probe(measure=True)
    wiz = FitWizard(Settings(), folder, profile=profile)
    wiz.resize(960, 720)
    wiz.show()
    _settle(app, 0.2)
    wiz.next()
    wiz.next()
    wiz.plan_page.context_slider.setValue(CONTEXTS.index(131072))
    wiz.plan_page.recompute()
    _settle(app, 0.3)
    return wiz


def take_screenshot(args) -> int:
    from PySide6.QtWidgets import QApplication

    out = Path(args.screenshot)
    app = QApplication.instance()
    with tempfile.TemporaryDirectory(prefix="flashdesk-shot-") as tmp:
        folder = Path(args.data_dir) if args.data_dir else Path(tmp)
        try:
            if args.page == "wizard":
                widget = _wizard(folder, getattr(args, "profile", None))
            else:
                widget = _chat_window(folder, documents=args.page == "documents")
        except Exception as exc:
            print(f"screenshot failed: {exc}", file=sys.stderr)
            return 1
        pixmap = widget.grab()
        out.parent.mkdir(parents=True, exist_ok=True)
        if not pixmap.save(str(out), "PNG"):
            print(
                f"could not write {out}; check the folder exists and is writable", file=sys.stderr
            )
            return 1
        widget.close()
        if hasattr(widget, "history"):
            widget.history.close()
        _settle(app, 0.1)
    print(f"wrote {out} ({pixmap.width()}×{pixmap.height()}, page {args.page})")
    return 0
