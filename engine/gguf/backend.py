"""A GGUF model run by llama.cpp, driven by our `Session` (engine/generate.py).

`LlamaCppModel` speaks the Session's model protocol: `new_state()`, `prefill(ids, state)` and
`decode(token, state)` return the last position's logits as a torch tensor, so sampling, streaming,
phases, Stats, cancel and prefix reuse are the same code as for the native engine. llama.cpp keeps
one sequence's KV cache per context; a state object names the sequence the context currently
holds, and a fresh `new_state()` clears it.

Placement follows a `GGUFPlacement` (usually made from the planner's plan): layers offloaded to the
GPU, routed-expert tensors overridden to CPU buffers (all layers, or the first N like
`--n-cpu-moe`), context, KV type, threads, mmap/mlock.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flashdesk.engine.gguf.errors import GGUFError
from flashdesk.engine.gguf.llama_glue import (
    LoadReport,
    TensorOverrides,
    capture_log,
    expert_patterns,
    llama_cpp_module,
)
from flashdesk.engine.gguf.metadata import GGUFInfo, read_gguf
from flashdesk.engine.interrupt import Interrupted

# ggml_type ids of the KV cache types llama.cpp accepts for K and V.
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}

_backend_lock = threading.Lock()
_backend_ready = False


class LoadCancelledError(Exception):
    """The progress callback asked to stop loading."""


@dataclass(frozen=True)
class GGUFPlacement:
    """Where llama.cpp puts a GGUF model.

    n_gpu_layers: layers offloaded to the GPU (-1 all, 0 none).
    cpu_moe: routed experts kept in CPU buffers: True = every layer's, an int N = layers 0..N-1
        (llama.cpp's --n-cpu-moe), a tuple = those layers, False = wherever their layer goes.
    """

    n_gpu_layers: int = 0
    cpu_moe: bool | int | tuple[int, ...] = True
    context: int = 4096
    kv_type: str = "f16"
    threads: int | None = None
    threads_batch: int | None = None
    batch: int = 512
    mmap: bool = True
    mlock: bool = False
    flash_attn: bool | None = None  # None: llama.cpp decides (on where the backend supports it)

    def __post_init__(self):
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {self.kv_type!r}")
        if self.context < 16:
            raise ValueError(f"context must be at least 16 tokens, got {self.context}")

    @property
    def override_patterns(self) -> list[str]:
        if self.cpu_moe is True:
            return expert_patterns(None)
        if self.cpu_moe is False:
            return []
        if isinstance(self.cpu_moe, tuple | list | frozenset | set):
            return expert_patterns(layers=sorted(self.cpu_moe))
        return expert_patterns(int(self.cpu_moe))

    @property
    def load_mode(self) -> int:
        # llama_load_mode: NONE 0, MMAP 1, MLOCK 2, MMAP_MLOCK 3
        return (1 if self.mmap else 0) + (2 if self.mlock else 0)

    def describe(self) -> str:
        """Where llama.cpp puts the model, in words (the app's plan line)."""
        if self.n_gpu_layers == 0:
            where = "llama.cpp on the CPU"
        else:
            layers = "all layers" if self.n_gpu_layers < 0 else f"{self.n_gpu_layers} layers"
            if self.cpu_moe is True:
                experts = "routed experts in RAM"
            elif self.cpu_moe is False:
                experts = "routed experts on the GPU"
            elif isinstance(self.cpu_moe, int):
                experts = f"the first {self.cpu_moe} layers' routed experts in RAM"
            else:
                experts = f"{len(self.cpu_moe)} layers' routed experts in RAM"
            where = f"llama.cpp: {layers} on the GPU, {experts}"
        return f"{where}; KV cache {self.kv_type}, {self.context:,} tokens"

    @classmethod
    def from_plan(cls, plan, n_layers: int, gpu_offload: bool = True, **overrides) -> GGUFPlacement:
        """From an offload.plan.Plan: attention layers on the GPU become llama.cpp's offloaded
        layers; every layer whose experts the plan does not put wholly on the GPU keeps its
        expert tensors in CPU buffers; pinned RAM becomes mlock; FP8 KV becomes q8_0, with
        flash attention on (llama.cpp quantizes the V cache only with it). A llama.cpp built
        without GPU support (`gpu_offload` False) keeps everything on the CPU."""
        layers = list(plan.layers)
        on_gpu = sum(1 for lp in layers if lp.attention_on == "gpu")
        all_gpu = on_gpu >= n_layers and getattr(plan, "head_on", "") == "gpu"
        cpu_expert_layers = tuple(lp.index for lp in layers if not lp.whole_layer_on_gpu)
        cpu_moe: bool | tuple[int, ...] = cpu_expert_layers
        if len(cpu_expert_layers) == len(layers):
            cpu_moe = True
        elif not cpu_expert_layers:
            cpu_moe = False
        values = {
            "n_gpu_layers": -1 if all_gpu else on_gpu,
            "cpu_moe": cpu_moe,
            "context": int(plan.context),
            "kv_type": {"bf16": "bf16", "fp8": "q8_0"}.get(plan.kv_dtype, "f16"),
            "mlock": int(getattr(plan, "pinned_bytes", 0) or 0) > 0,
        }
        if not gpu_offload:
            values |= {"n_gpu_layers": 0, "cpu_moe": True}
        if values["kv_type"] == "q8_0":
            values["flash_attn"] = True
        values.update(overrides)
        return cls(**values)


def _ensure_backend(llama_cpp) -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


class _Sequence:
    """The one sequence a context holds; stale once the context is cleared for another."""

    def __init__(self, model: LlamaCppModel, generation: int):
        self._model = model
        self.generation = generation

    def nbytes(self) -> int | None:
        return self._model.kv_bytes

    # `generate.Session` returns to a marked state where a new prompt diverges from the old
    def mark(self, device=None) -> int:
        return self._model._pos

    def rewind(self, mark: int) -> None:
        self._model._truncate(self, int(mark))


class LlamaCppModel:
    """A GGUF model and one llama.cpp context, as a Session model."""

    def __init__(
        self,
        path: str | Path | GGUFInfo,
        placement: GGUFPlacement | None = None,
        *,
        progress: Callable[[float], bool] | None = None,
    ):
        self.info = path if isinstance(path, GGUFInfo) else read_gguf(path)
        self.placement = placement or GGUFPlacement()
        llama_cpp = llama_cpp_module()
        self._llama = llama_cpp
        _ensure_backend(llama_cpp)
        self._model = None
        self._ctx = None
        self._generation = 0
        self._pos = 0
        self._lock = threading.Lock()

        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.placement.n_gpu_layers
        params.load_mode = self.placement.load_mode
        self.overrides = TensorOverrides(self.placement.override_patterns)
        if self.overrides.pointer is not None:
            params.tensor_buft_overrides = self.overrides.pointer
        cancelled = [False]
        if progress is not None:

            @llama_cpp.llama_progress_callback
            def on_progress(fraction: float, _user) -> bool:
                keep_going = bool(progress(float(fraction)))
                cancelled[0] = not keep_going
                return keep_going

            params.progress_callback = on_progress
            self._progress_cb = on_progress  # alive while loading
        with capture_log() as report:
            model = llama_cpp.llama_model_load_from_file(str(self.info.path).encode(), params)
        self.load_report: LoadReport = report
        if not model:
            if cancelled[0]:
                raise LoadCancelledError()
            detail = "; ".join(report.errors()[-3:]) or "no reason given"
            raise GGUFError(
                f"llama.cpp could not load {self.info.path.name} ({detail}). If it says out of "
                "memory, offload fewer layers or run the hardware-fit wizard; otherwise the file "
                "may need a newer llama.cpp."
            )
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

        cparams = llama_cpp.llama_context_default_params()
        trained = int(llama_cpp.llama_model_n_ctx_train(model)) or self.placement.context
        cparams.n_ctx = min(self.placement.context, trained)
        cparams.n_batch = cparams.n_ubatch = self.placement.batch
        threads = self.placement.threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = threads
        cparams.n_threads_batch = self.placement.threads_batch or threads
        cparams.type_k = cparams.type_v = KV_TYPES[self.placement.kv_type]
        cparams.no_perf = True
        if self.placement.flash_attn is not None:
            cparams.flash_attn_type = int(self.placement.flash_attn)
        with capture_log() as ctx_report:
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        self.load_report.lines.extend(ctx_report.lines)
        if not ctx:
            self.close()
            detail = "; ".join(ctx_report.errors()[-3:]) or "no reason given"
            raise GGUFError(
                f"llama.cpp could not create a {cparams.n_ctx:,}-token context for "
                f"{self.info.path.name} ({detail}). Choose a smaller context or KV type."
            )
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.context_limit = int(llama_cpp.llama_n_ctx(ctx))
        self.threads = threads
        self.stop_ids = self._end_of_generation_ids()
        self._interrupt: Callable[[], bool] | None = None  # `set_interrupt`

    # Session protocol ----------------------------------------------------------------------------
    def set_interrupt(self, asked) -> None:
        """`asked()` is polled between llama.cpp batches of a call; True stops it
        (`Interrupted`, its cells removed again): a cancel stops a long prompt within a batch."""
        self._interrupt = asked

    def new_state(self) -> _Sequence:
        with self._lock:
            self._need_ctx()
            self._llama.llama_memory_clear(self._memory, True)
            self._generation += 1
            self._pos = 0
            return _Sequence(self, self._generation)

    def prefill(self, ids: Sequence[int], state: _Sequence):
        return self._eval(list(ids), state)

    def decode(self, token_id: int, state: _Sequence):
        return self._eval([int(token_id)], state)

    def _truncate(self, state: _Sequence, n: int) -> None:
        """Drop the sequence's positions from `n` on (llama.cpp removes their cache cells);
        raises RuntimeError where this model's cache cannot be cut there (recurrent state)."""
        with self._lock:
            self._need_ctx()
            if state.generation != self._generation or not 0 <= n <= self._pos:
                raise RuntimeError("this state cannot return to that mark")
            self._cut(n)

    def _cut(self, n: int) -> None:
        """(Lock held.) The cache cells of positions n… removed, or RuntimeError."""
        if n < self._pos and not self._llama.llama_memory_seq_rm(self._memory, 0, n, -1):
            raise RuntimeError("llama.cpp cannot cut this model's cache back")
        self._pos = n

    def _eval(self, ids: list[int], state: _Sequence):
        import torch

        if not ids:
            raise ValueError("nothing to evaluate: the token list is empty")
        with self._lock:
            self._need_ctx()
            if state.generation != self._generation:
                raise RuntimeError(
                    "this state was replaced by a newer one (llama.cpp holds one sequence per "
                    "context); start a new Session turn"
                )
            if self._pos + len(ids) > self.context_limit:
                raise GGUFError(
                    f"The context is full ({self.context_limit:,} tokens). Start a new chat or "
                    "load the model with a larger context."
                )
            step = self.placement.batch
            first = self._pos
            for start in range(0, len(ids), step):
                if start and self._interrupt is not None and self._interrupt():
                    # a cancel between llama.cpp's batches: the call's cache cells go again
                    # (where they cannot, the RuntimeError has the Session start afresh)
                    self._cut(first)
                    raise Interrupted(f"stopped after {start} of {len(ids)} tokens")
                chunk = ids[start : start + step]
                tokens = (self._llama.llama_token * len(chunk))(*chunk)
                batch = self._llama.llama_batch_get_one(tokens, len(chunk))
                rc = int(self._llama.llama_decode(self._ctx, batch))
                if rc != 0:
                    raise GGUFError(
                        f"llama.cpp failed to evaluate {len(chunk)} token(s) (llama_decode "
                        f"returned {rc}; 1 means no room left in the KV cache). Start a new chat "
                        "or use a larger context."
                    )
                self._pos += len(chunk)
            ptr = self._llama.llama_get_logits_ith(self._ctx, -1)
            if not ptr:
                raise GGUFError("llama.cpp returned no logits for the last token.")
            array = (ctypes.c_float * self.n_vocab).from_address(ctypes.addressof(ptr.contents))
            return torch.frombuffer(bytearray(array), dtype=torch.float32)

    @property
    def kv_bytes(self) -> int | None:
        """Bytes of the context's KV buffers as llama.cpp reported them at creation."""
        mib = sum(v for (name, kind), v in self.load_report.buffers.items() if kind == "KV")
        return int(mib * (1 << 20)) if mib else None

    # tokens ---------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._llama.llama_token * cap)()
        n = int(
            self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        )
        if n < 0:
            cap = -n
            buf = (self._llama.llama_token * cap)()
            n = int(
                self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
            )
        return list(buf[:n])

    def piece(self, token_id: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = int(self._llama.llama_token_to_piece(self._vocab, int(token_id), buf, 64, 0, True))
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = int(self._llama.llama_token_to_piece(self._vocab, int(token_id), buf, -n, 0, True))
        return buf.raw[:n]

    def _end_of_generation_ids(self) -> tuple[int, ...]:
        is_eog = self._llama.llama_vocab_is_eog
        return tuple(i for i in range(self.n_vocab) if is_eog(self._vocab, i))

    @property
    def bos_id(self) -> int:
        return int(self._llama.llama_vocab_bos(self._vocab))

    @property
    def add_bos(self) -> bool:
        return bool(self._llama.llama_vocab_get_add_bos(self._vocab))

    # lifetime ---------------------------------------------------------------------------------------
    def _need_ctx(self) -> None:
        if self._ctx is None:
            raise RuntimeError("this model was closed")

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._llama.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                self._llama.llama_model_free(self._model)
                self._model = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GGUFTokenizer:
    """The GGUF's own vocabulary (through llama.cpp), with the interface Session and the app use."""

    def __init__(self, model: LlamaCppModel):
        self.model = model

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.model.tokenize(text, special=special)

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.model.piece(i) for i in ids).decode("utf-8", errors="replace")

    def count(self, text: str) -> int:
        return len(self.model.tokenize(text, special=False))

    def count_many(
        self,
        texts: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[int] | None:
        """Counts of several texts (documents); None when cancelled."""
        counts = []
        for i, text in enumerate(texts):
            if cancel is not None and cancel():
                return None
            counts.append(self.count(text))
            if progress is not None:
                progress(i + 1, len(texts))
        return counts
