"""Entry script of the windowed launcher (Windows: no console window; macOS: the .app)."""

import multiprocessing
import sys

from flashdesk.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    # Finder and Explorer pass their own arguments (macOS: -psn_...); the window takes none, but
    # --self-test / --screenshot still work when given explicitly.
    sys.exit(main([a for a in sys.argv[1:] if not a.startswith("-psn_")]))
