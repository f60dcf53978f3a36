"""Entry script of the frozen app: the `flashdesk` command (no command: the window)."""

import multiprocessing
import sys

from flashdesk.cli import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
