"""A plain copy of the installed `flashdesk` package tree for PyInstaller to analyse.

`make` installs FlashDesk editable, and setuptools maps the source folders (engine/, app/, ...) to
`flashdesk.engine`, ... through an import hook that PyInstaller's module graph does not see. The
spec therefore copies each subpackage from wherever Python imports it (editable or not, with the
built C extension) into one ordinary `flashdesk/` folder and analyses that.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SUBPACKAGES = ("engine", "offload", "app", "assets")
IGNORED = shutil.ignore_patterns("__pycache__", "csrc", "*.c", "*.h", "*.o", "screenshots")


class StageError(RuntimeError):
    """The installed package is incomplete; the message says how to fix it."""


def package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            f"`{name}` cannot be imported by this Python, so it cannot be frozen. Install "
            "FlashDesk into the environment that runs PyInstaller first (`make dist` does)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def kernels_path() -> Path:
    spec = importlib.util.find_spec("flashdesk.engine._kernels")
    if spec is None or not spec.origin:
        raise StageError(
            "The C extension flashdesk.engine._kernels is not built, and the app cannot run "
            "without it. Build it with `pip install -e .` (or `make run`) before freezing."
        )
    return Path(spec.origin)


def stage(into: Path) -> Path:
    """Copy flashdesk and its subpackages into `into/flashdesk`; returns `into`."""
    into = Path(into)
    target = into / "flashdesk"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package_folder("flashdesk"), target, ignore=IGNORED)
    for sub in SUBPACKAGES:
        dest = target / sub
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(package_folder(f"flashdesk.{sub}"), dest, ignore=IGNORED)
    # The editable build may also hold extensions for other Pythons; keep only the one in use.
    kernels = kernels_path()
    engine = target / "engine"
    for old in engine.glob("_kernels*"):
        old.unlink()
    shutil.copy2(kernels, engine / kernels.name)
    return into


def module_names(into: Path) -> list[str]:
    """Every module of the staged tree, dotted (subcommands are imported by name at run time, so
    PyInstaller's import graph alone would miss them)."""
    into = Path(into)
    names = []
    for path in sorted((into / "flashdesk").rglob("*.py")):
        parts = path.relative_to(into).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names
