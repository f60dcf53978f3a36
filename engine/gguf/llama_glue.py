"""ctypes glue over llama.cpp's C API for what llama-cpp-python's wrapper leaves out.

* Tensor buffer-type overrides (llama.cpp's `-ot exps=CPU` / `--n-cpu-moe N`): llama-cpp-python
  0.3.36 declares `llama_model_params.tensor_buft_overrides` as an unused `void *`. We build the
  NULL-terminated `{const char *pattern; ggml_backend_buffer_type_t buft;}` array ourselves, with
  the CPU buffer type from ggml, and keep it (and its strings) alive for the model's lifetime.
* The library's log: llama.cpp reports where every overridden tensor went ("tensor X buffer type
  overridden to CPU") and each buffer's size. A capture routes those lines to us, so tests and the
  app can check the placement llama.cpp actually made instead of trusting the request.

Imports llama_cpp lazily: this module is importable without the `gguf` extra.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("flashdesk.engine.gguf.llama")

# Routed-expert tensors of layer i (llama.cpp's common/arg.cpp uses the same names for -cmoe).
_EXPERTS_ALL = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_EXPERTS_LAYER = r"^blk\.{layer}\.ffn_(up|down|gate|gate_up)_(ch|)exps"

_OVERRIDDEN = re.compile(r"tensor (\S+) \((\d+) MiB (\S+)\) buffer type overridden to (\S+)")
_BUFFER_SIZE = re.compile(r"(\S+) (model|KV|compute|RS) buffer size =\s*([\d.]+) MiB")


class _Override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def llama_cpp_module():
    """The llama_cpp package, or GGUFUnavailable saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        from flashdesk.engine.gguf.errors import GGUFUnavailable

        raise GGUFUnavailable() from exc
    return llama_cpp


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (a CPU build ignores them)."""
    return bool(llama_cpp_module().llama_supports_gpu_offload())


def _ggml():
    """libggml with the few backend functions we call declared."""
    import llama_cpp._ggml as ggml_mod

    lib = ggml_mod.libggml
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_cpu_buffer_type.argtypes = []
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    return lib


def cpu_buffer_type() -> int:
    """ggml's CPU buffer type (the value llama.cpp compares overrides against)."""
    return int(_ggml().ggml_backend_cpu_buffer_type())


def expert_patterns(
    cpu_moe_layers: int | None = None, *, layers: list[int] | None = None
) -> list[str]:
    """Regexes for routed-expert tensors kept on the CPU: all layers (None), layers < N, or the
    listed `layers`."""
    if layers is not None:
        return [_EXPERTS_LAYER.format(layer=int(i)) for i in layers]
    if cpu_moe_layers is None:
        return [_EXPERTS_ALL]
    return [_EXPERTS_LAYER.format(layer=i) for i in range(max(0, int(cpu_moe_layers)))]


class TensorOverrides:
    """A NULL-terminated override array for `llama_model_params.tensor_buft_overrides`.

    Holds the pattern bytes and the array; keep the object alive until the model is loaded
    (llama.cpp reads the patterns during loading only, but holding it longer is harmless)."""

    def __init__(self, patterns: list[str], buft: int | None = None):
        self.patterns = list(patterns)
        self._bytes = [p.encode() for p in self.patterns]
        buft = cpu_buffer_type() if buft is None else buft
        self._array = (_Override * (len(self._bytes) + 1))()
        for i, pattern in enumerate(self._bytes):
            self._array[i].pattern = pattern
            self._array[i].buft = buft
        self._array[len(self._bytes)].pattern = None
        self._array[len(self._bytes)].buft = None

    @property
    def pointer(self) -> int | None:
        """Address for the params field (None = no overrides)."""
        return ctypes.addressof(self._array) if self.patterns else None


@dataclass
class LoadReport:
    """What llama.cpp said while loading: overridden tensors and buffer sizes (MiB)."""

    lines: list[str] = field(default_factory=list)

    @property
    def overridden(self) -> dict[str, str]:
        """tensor name -> buffer type it was placed in by an override."""
        out = {}
        for line in self.lines:
            match = _OVERRIDDEN.search(line)
            if match:
                out[match.group(1)] = match.group(4)
        return out

    @property
    def buffers(self) -> dict[tuple[str, str], float]:
        """(buffer name, kind) -> MiB, e.g. ("CPU_Mapped", "model") -> 91.4."""
        out: dict[tuple[str, str], float] = {}
        for line in self.lines:
            match = _BUFFER_SIZE.search(line)
            if match:
                key = (match.group(1), match.group(2))
                out[key] = out.get(key, 0.0) + float(match.group(3))
        return out

    def errors(self) -> list[str]:
        return [ln.strip() for ln in self.lines if "error" in ln.lower() or "failed" in ln.lower()]


_capture_lock = threading.Lock()
_captures: list[LoadReport] = []
_callback = None  # the installed ctypes callback (kept alive for the process)


def install_log_callback() -> None:
    """Route llama.cpp's log to Python logging (and to active captures) instead of stderr."""
    global _callback
    if _callback is not None:
        return
    llama_cpp = llama_cpp_module()
    pending: list[str] = []  # llama.cpp sends some lines in pieces (level CONT)

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        piece = text.decode("utf-8", errors="replace") if text else ""
        pending.append(piece)
        if not piece.endswith("\n"):
            return
        line = "".join(pending)
        pending.clear()
        with _capture_lock:
            for capture in _captures:
                capture.lines.append(line)
        if level in (3, 4):  # ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
            log.warning("llama.cpp: %s", line.rstrip())
        else:
            log.debug("llama.cpp: %s", line.rstrip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    _callback = on_log


@contextmanager
def capture_log() -> Iterator[LoadReport]:
    """Collect llama.cpp's log lines while the block runs (all threads)."""
    install_log_callback()
    report = LoadReport()
    with _capture_lock:
        _captures.append(report)
    try:
        yield report
    finally:
        with _capture_lock:
            _captures.remove(report)
