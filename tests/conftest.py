"""Shared test setup: Qt offscreen, no network, deterministic seeds."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU the Triton kernels (engine/gpu_kernels.py) are tested in Triton's CPU interpreter,
# which must be on before Triton is first imported.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (tests/_*.py) import by name; --import-mode=importlib does not put tests/ on
# sys.path by itself.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# The heap as the product's entry point sets it (`cli.main`), before a test starts a thread: CPU
# prompts' large temporaries reuse its pages (the real-dims prefill test: 41 → 34 s).
from flashdesk.engine import host_heap

host_heap.keep_large_blocks()


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches `triton.language` (an `inspect.getmembers` walk, ~2 ms) on
    every call of a `@triton.jit` helper, `tl.sum` and `tl.max` among them, in every program:
    most of an interpreted kernel's time (a 24-program launch of `hc_mixes` took 120 ms). The
    launch's own patch holds until the launch ends, so a helper whose modules are already
    patched in this launch skips it; the first helper that needs another module still
    patches it."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, run_grid = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: set[tuple[int, ...]] = set()
    modules: dict[object, tuple[int, ...]] = {}  # function → the language modules it sees

    def patch_once(fn):
        key = modules.get(fn)
        if key is None:
            key = modules[fn] = tuple(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
            )
        if key in patched:
            return interpreter._LangPatchScope()  # nothing to undo
        patched.add(key)
        return patch_lang(fn)

    def launch(self, *args, **kwargs):
        patched.clear()  # the launch's patch is undone at its end: start afresh
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET") == "1":
    import contextlib

    with contextlib.suppress(ImportError, AttributeError):  # another Triton: as it is
        _patch_the_language_once_per_launch()
