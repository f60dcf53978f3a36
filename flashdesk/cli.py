"""The `flashdesk` command: with no subcommand it opens the desktop app.

Each subcommand lives beside the code it drives and registers itself here by module path. Those
modules keep their top-level imports light (no torch, no Qt) and import heavy things inside `run`,
so `flashdesk --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from flashdesk import __version__
from flashdesk.engine import host_heap

# name -> (module, one-line help). The module provides `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("flashdesk.engine.info", "show the CPU features and memory bandwidth this build sees"),
    "make-checkpoint": (
        "flashdesk.engine.checkpoint_cli",
        "write a random checkpoint in the official V4 layout (tests, benchmarks)",
    ),
    "bench": (
        "flashdesk.bench",
        "run a benchmark from benchmarks/ (ratios against measured bounds)",
    ),
    "documents": ("flashdesk.engine.documents", "count documents' tokens and check they fit"),
    "fit": ("flashdesk.fit", "what this machine will do with the model: placement, context, speed"),
    "serve": ("flashdesk.serve", "serve the model to other tools: a local OpenAI-compatible API"),
    "generate": (
        "flashdesk.engine.generate_cli",
        "answer one prompt, streamed (GPU + CPU experts)",
    ),
    "chat": ("flashdesk.engine.generate_cli", "a terminal chat with the model, with speed stats"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashdesk",
        description="Run DeepSeek-V4-Flash on one machine, split between a GPU and system RAM. "
        "With no command, opens the desktop app.",
    )
    parser.add_argument("--version", action="version", version=f"flashdesk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        module = importlib.import_module(module_name)
        module.add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # before any thread starts: CPU prompts' large temporaries reuse the heap's pages
    host_heap.keep_large_blocks()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("--") and argv[0] not in ("--help", "--version")):
        # No subcommand: the desktop app (it takes its own options, e.g. --self-test).
        from flashdesk.app.main import main as app_main

        return app_main(argv)
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


def gui_main() -> int:
    """Entry point of the windowed launcher (no console on Windows)."""
    return main([])


if __name__ == "__main__":
    sys.exit(main())
