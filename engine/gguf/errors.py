"""Errors of the GGUF backend, importable without the `gguf` extra installed."""

from __future__ import annotations

INSTALL_HINT = (
    "Install the extra with `pip install 'flashdesk[gguf]'` (from a source checkout: "
    "`make run` or `.venv/bin/pip install -e '.[gguf]'`). llama-cpp-python builds from source "
    "on Linux, which takes about 25 minutes on a 2-core machine the first time."
)


class GGUFError(ValueError):
    """A GGUF file cannot be used; the message says why and what to do."""


class GGUFUnavailable(ImportError):
    """The `gguf` extra (llama-cpp-python, gguf) is not installed."""

    def __init__(self, what: str = "llama-cpp-python"):
        super().__init__(f"GGUF models need {what}, which is not installed. {INSTALL_HINT}")
