"""Where the app keeps its data, and the log file the Help menu opens.

Portable mode: a `portable.txt` beside the executable (or the launcher script) puts every file the
app writes in a `FlashDesk-data` folder next to it, so the whole app can live on a USB stick.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

APP_NAME = "FlashDesk"
ORG_NAME = "FlashDesk"
PORTABLE_MARKER = "portable.txt"
PORTABLE_FOLDER = "FlashDesk-data"
LOG_NAME = "flashdesk.log"


def executable_dirs() -> list[Path]:
    """Folders a user would call 'next to the executable' (frozen app, launcher script)."""
    dirs = []
    if getattr(sys, "frozen", False):
        dirs.append(Path(sys.executable).resolve().parent)
    if sys.argv and sys.argv[0]:
        dirs.append(Path(sys.argv[0]).resolve().parent)
    return dirs


def portable_dir(candidates: list[Path] | None = None) -> Path | None:
    for folder in executable_dirs() if candidates is None else candidates:
        if (folder / PORTABLE_MARKER).is_file():
            return folder / PORTABLE_FOLDER
    return None


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder for history, settings and the log; created if missing.

    Order: explicit override, $FLASHDESK_DATA_DIR, portable mode, the platform's app-data folder
    (QStandardPaths.AppDataLocation, e.g. ~/.local/share/FlashDesk/FlashDesk on Linux).
    """
    if override is not None:
        folder = Path(override)
    elif os.environ.get("FLASHDESK_DATA_DIR"):
        folder = Path(os.environ["FLASHDESK_DATA_DIR"])
    elif (portable := portable_dir()) is not None:
        folder = portable
        # Measurement caches (offload.bandwidth) go beside the data too, not to ~/.cache.
        os.environ.setdefault("FLASHDESK_CACHE_DIR", str(folder / "cache"))
    else:
        from PySide6.QtCore import QCoreApplication, QStandardPaths

        if not QCoreApplication.applicationName() or QCoreApplication.applicationName() == "python":
            QCoreApplication.setApplicationName(APP_NAME)
            QCoreApplication.setOrganizationName(ORG_NAME)
        location = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation)
        folder = Path(location) if location else Path.home() / ".flashdesk"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def setup_logging(folder: Path, level: int = logging.INFO) -> Path:
    """Log to `folder/flashdesk.log` (details of every error the UI shows in plain words)."""
    log_path = folder / LOG_NAME
    root = logging.getLogger("flashdesk")
    for handler in list(root.handlers):
        if getattr(handler, "_flashdesk_log", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler._flashdesk_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    return log_path


def asset(name: str) -> Path:
    """A file shipped in `flashdesk.assets` (icons, the desktop entry)."""
    from importlib import resources

    return Path(str(resources.files("flashdesk.assets") / name))
