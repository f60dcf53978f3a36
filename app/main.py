"""Start the desktop app (`flashdesk` with no command, `make run`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


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
    print(
        "FlashDesk is installed, but its chat window has not been built yet in this version.\n"
        "What works today: `flashdesk info` (CPU features, RAM bandwidth) and `flashdesk --help`."
    )
    return 0
