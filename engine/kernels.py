"""CPU kernels for the quantized V4-Flash weights: the routed-expert FFN and FP8/FP4 linears.

The work happens in C (`flashdesk.engine._kernels`): weights are read in the checkpoint's packed
formats (spec §4.3, §4.4) and never dequantized into memory, on a persistent thread pool, with
the GIL released, so a Python thread can run these while the GPU works. This module checks
shapes, dtypes and contiguity and passes buffer addresses, so any host buffer works without a
copy: numpy arrays, CPU torch tensors (pinned or not), slices of memory-mapped shards.

The SIMD variant (scalar reference, avx2, avx2_vnni, avx512, avx512_bf16, neon) is measured, not
assumed:
on first use each variant the CPU runs decodes a small in-cache block of FP4 expert rows and the
fastest is kept for the process (`variant_timings()` shows the figures; the CPU flags alone
mislead: plain avx512 can beat avx512_bf16). `FLASHDESK_ISA=<name>` or `set_isa()` / `use_isa()`
/ the `isa=` argument force one (tests and benchmarks run every variant on the same inputs). `FLASHDESK_THREADS` or `set_threads()` set the
thread count (default: physical cores).

The routed experts can take their activations as int8 (`int8=`): each 32-element block scaled by
its |max| / 127, so the FP4 codes multiply them in integer SIMD (vpmaddubsw / vpdpbusd; NEON's
widening multiplies), 2-3× the float path's rate per core on x86 (NEON: checked under qemu, its
speed not yet measured). The rounding is finer than the reference's own FP8 rounding
of the same activations; `int8_experts()` says whether the measured rates favour it here.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from flashdesk.engine import _kernels

__all__ = [
    "BoundLinear",
    "CpuExperts",
    "ExpertTable",
    "ExpertWeights",
    "active_isa",
    "available_isas",
    "bf16_linear",
    "expert_ffn",
    "fp4_linear",
    "fp8_finite",
    "fp8_linear",
    "get_threads",
    "has_int8",
    "host_buffer",
    "int8_experts",
    "keep_threads_awake",
    "measured_isa",
    "prefetch",
    "set_isa",
    "set_threads",
    "use_isa",
    "variant_timings",
]

_FP4, _FP4_INT8, _FP8, _FP8_FINITE, _BF16 = 4, 5, 8, 9, 16
_HIDDEN_BUDGET = 256 << 20  # bytes of expert hidden activations one kernel call may hold

# torch dtypes (by name) whose elements are one raw byte of a packed weight or scale.
_TORCH_BYTE_DTYPES = {
    "torch.uint8",
    "torch.int8",
    "torch.float8_e4m3fn",
    "torch.float8_e8m0fnu",
    "torch.float4_e2m1fn_x2",
}


class ExpertWeights(NamedTuple):
    """One routed expert as stored in the checkpoint (`ffn.experts.{e}.w1.weight` / `.scale`, ...).

    w1, w3: [I, D/2] packed E2M1 bytes; w1_scale, w3_scale: [I, D/32] E8M0 bytes;
    w2: [D, I/2] packed bytes; w2_scale: [D, I/32] E8M0 bytes. V4-Flash: D = 4096, I = 2048.
    """

    w1: Any
    w1_scale: Any
    w3: Any
    w3_scale: Any
    w2: Any
    w2_scale: Any


# ------------------------------------------------------------------------------------ settings


HUGE_PAGE = 2 << 20


def prefetch(tensors: Sequence[Any]) -> int:
    """Ask the OS to start paging in the host tensors' bytes (memory-mapped weights needed soon:
    the read from disk overlaps the work before their use) → bytes advised (0 where the OS has
    no such call). Returns at once; never blocks on the disk."""
    done = 0
    for t in tensors:
        done += _kernels.prefetch_pages(int(t.data_ptr()), int(t.numel() * t.element_size()))
    return done


def host_buffer(nbytes: int) -> np.ndarray:
    """An untouched `[nbytes]` uint8 host buffer for weights the kernels stream, 2 MiB aligned and
    advised for transparent huge pages (Linux): a decode step reads a few hundred weight rows at
    once, and with 4 KiB pages their TLB misses cost about 8 % of the bandwidth (dev VM, 6 experts:
    40 → 43 GB/s). Touch it only by filling it, after this call, so the pages come in huge."""
    raw = np.empty(int(nbytes) + HUGE_PAGE, dtype=np.uint8)
    start = (-raw.ctypes.data) % HUGE_PAGE
    buf = raw[start : start + int(nbytes)]
    if nbytes:
        _kernels.advise_hugepages(buf.ctypes.data, int(nbytes))
    return buf


def _default_threads() -> int:
    env = os.environ.get("FLASHDESK_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"FLASHDESK_THREADS={env!r}: set it to a positive thread count")
        return n
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return max(1, n or os.cpu_count() or 1)


_threads = _default_threads()


def get_threads() -> int:
    """Threads a kernel call uses unless it passes `threads=`."""
    return _threads


def set_threads(n: int) -> None:
    """Set the default thread count (the pool grows to it on the next call)."""
    global _threads
    if not isinstance(n, int) or n < 1 or n > 256:
        raise ValueError(f"threads must be an int in [1, 256], got {n!r}")
    _threads = n


def keep_threads_awake(seconds: float) -> None:
    """Wake the kernels' pool workers and keep them spinning for up to `seconds` (≤ 1): a call
    expected after a wait (a GPU decode step's host-expert layer while the GPU runs the layers
    before it) then starts on every worker instead of on those that woke in time. Returns at
    once; workers sleep again after the deadline (an idle app costs no CPU)."""
    _kernels.keep_threads_awake(float(seconds))


def has_int8(isa: str | None = None) -> bool:
    """Whether a variant (default: the active one) has the FP4 × int8 dot that `int8=` calls use."""
    return bool(_kernels.isa_paths(isa or active_isa())["fp4_int8"])


def available_isas() -> list[str]:
    """Variants compiled into this build that run on this CPU, the scalar reference first."""
    return [name for name, runs in _kernels.isa_variants().items() if runs]


# The default variant is measured, not assumed from CPU flags: on the first kernel call (or the
# first active_isa()/variant_timings()), every available variant decodes the same in-cache block of
# FP4 expert rows (W1 rows of V4-Flash, K = 4096) on one core with bf16, fp32 and int8
# activations, and FP8 linear rows of the same width with bf16 ones; the one that runs a CPU
# token's bytes fastest on the runtime's default paths (`_pick_rate`) wins for the rest of the
# process. The flags only say what runs: on a 16-core Xeon the plain avx512 variant once beat
# avx512_bf16 on FP4 rows alone.
# FLASHDESK_ISA, set_isa() and use_isa() take precedence over the measured pick.
_TUNE_K = 4096  # V4-Flash hidden: the K of a W1/W3 row
_TUNE_ROWS = (32, 160)  # two row-block sizes; the difference cancels the per-call overhead
_TUNE_CALLS = 12  # best of up to this many calls per (variant, activation dtype, size) ...
_TUNE_BUDGET_S = 0.001  # ... or of those that fit in this time (at least 3): slow ones stop early

_tune_lock = threading.Lock()
_timings: dict[str, dict[str, float]] | None = None
_pick: str | None = None
_forced: str | None = None  # the variant FLASHDESK_ISA / set_isa() forced, if any


# What a CPU-only V4-Flash token reads: ~3.4 GB of FP4 routed experts, ~6 GB of FP8 linears
# (attention, compressors, shared experts); the pick weighs the two paths' rates by these shares.
_FP4_SHARE = 0.36


def _measure_variants() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    rows = max(_TUNE_ROWS)
    w = rng.integers(0, 256, (rows, _TUNE_K // 2), dtype=np.uint8)
    s = rng.integers(122, 129, (rows, _TUNE_K // 32), dtype=np.uint8)
    w8 = rng.integers(0, 0x7F, (rows, _TUNE_K), dtype=np.uint8)  # FP8 codes, no NaN
    s8 = rng.integers(118, 126, (-(-rows // 128), _TUNE_K // 128), dtype=np.uint8)
    x32 = rng.standard_normal(_TUNE_K).astype(np.float32)
    x16 = (x32.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated: any values do)
    y = np.zeros(rows, dtype=np.float32)
    addr = {
        name: int(a.__array_interface__["data"][0])
        for name, a in (
            ("w", w), ("s", s), ("w8", w8), ("s8", s8), ("x32", x32), ("x16", x16), ("y", y)
        )
    }  # fmt: skip
    row_bytes = {"fp4": _TUNE_K // 2 + _TUNE_K // 32, "fp8": _TUNE_K}
    timings: dict[str, dict[str, float]] = {}
    for isa in available_isas():
        seconds = {}
        # (figure, activations, kernel kind, weights): the FP4 expert rows with bf16, fp32 and
        # (where the variant has it) int8 activations; FP8 linear rows with bf16 activations
        modes = [("bf16", "x16", _FP4, "fp4"), ("fp32", "x32", _FP4, "fp4")]
        if _kernels.isa_paths(isa)["fp4_int8"]:
            modes.append(("int8", "x16", _FP4_INT8, "fp4"))
        modes.append(("fp8", "x16", _FP8_FINITE, "fp8"))
        for mode, x_key, kind, weights in modes:
            best = {}
            for n in _TUNE_ROWS:
                w_key, s_key = ("w", "s") if weights == "fp4" else ("w8", "s8")
                args = (
                    kind, addr[x_key], x_key == "x16", 1, 1, _TUNE_K, addr[w_key], addr[s_key],
                    n, addr["y"], False, 1, isa,
                )  # fmt: skip
                _kernels.quant_linear(*args)  # warm the caches and the code
                t_best, spent, calls = float("inf"), 0.0, 0
                while calls < _TUNE_CALLS and (calls < 3 or spent < _TUNE_BUDGET_S):
                    t0 = time.perf_counter()
                    _kernels.quant_linear(*args)
                    dt = time.perf_counter() - t0
                    t_best, spent, calls = min(t_best, dt), spent + dt, calls + 1
                best[n] = t_best
            block = (rows - min(_TUNE_ROWS)) * row_bytes[weights]
            seconds[mode] = block / max(best[rows] - best[min(_TUNE_ROWS)], 1e-9)
        figures = {f"{mode}_gbps": rate / 1e9 for mode, rate in seconds.items()}
        figures["gbps"] = _pick_rate(figures)
        timings[isa] = figures
    return timings


def _pick_rate(figures: Mapping[str, float]) -> float:
    """The figure the pick maximizes: the rate of a CPU token's bytes on the runtime's default
    paths, FP4 experts at the faster of bf16 and int8 (where allowed) and FP8 linears at bf16,
    weighted by their shares (`_FP4_SHARE`) as a harmonic mean."""
    int8 = figures.get("int8_gbps", 0.0) if int8_allowed() else 0.0
    fp4 = max(figures["bf16_gbps"], int8)
    return 1 / (_FP4_SHARE / fp4 + (1 - _FP4_SHARE) / figures["fp8_gbps"])


def int8_allowed() -> bool:
    """FLASHDESK_INT8=0 keeps the routed experts' activations in bf16 everywhere."""
    return os.environ.get("FLASHDESK_INT8", "").strip() != "0"


def int8_experts(isa: str | None = None) -> bool:
    """Whether the routed experts should take bf16 activations through the int8 path on a variant
    (default: the active one): it has one, its measured in-cache rate beats the bf16 path's, and
    FLASHDESK_INT8=0 does not forbid it. The runtime's default (`load_runtime(int8_experts=None)`).
    """
    name = isa or active_isa()
    if not (int8_allowed() and has_int8(name)):
        return False
    figures = variant_timings().get(name, {})
    return figures.get("int8_gbps", 0.0) > figures.get("bf16_gbps", float("inf"))


def _measured_pick() -> str:
    """Measure once per process (thread-safe) and return the fastest variant."""
    global _timings, _pick
    if _pick is None:
        with _tune_lock:
            if _pick is None:
                _timings = _measure_variants()
                _pick = max(_timings, key=lambda isa: _timings[isa]["gbps"])
    return _pick


def _ensure_default() -> None:
    """Before a kernel call without isa=: make the measured pick active unless one was forced."""
    if _forced is None and _kernels.active_isa() != _measured_pick():
        _kernels.set_isa(_pick)


def variant_timings() -> dict[str, dict[str, float]]:
    """What the variant choice measured (running the measurement now if it has not run): per
    variant, one core's in-cache rate in GB/s of weight bytes: FP4 expert rows with bf16
    ('bf16_gbps'), fp32 ('fp32_gbps') and, where the variant has the path, int8 ('int8_gbps')
    activations; FP8 linear rows with bf16 activations ('fp8_gbps'); and 'gbps', the figure the
    pick maximizes: a CPU token's FP4 and FP8 bytes on the runtime's default paths."""
    _measured_pick()
    return {isa: dict(figures) for isa, figures in _timings.items()}


def measured_isa() -> str:
    """The variant the measurement picked (what kernel calls use when none is forced)."""
    return _measured_pick()


def active_isa() -> str:
    """The variant kernel calls use unless they pass `isa=`: the forced one, else the measured
    pick."""
    _ensure_default()
    return _kernels.active_isa()


def set_isa(name: str) -> str:
    """Force a variant for later calls ('auto': back to the measured pick); returns its name."""
    global _forced
    compiled = _kernels.isa_variants()
    if name != "auto" and name not in compiled:
        raise ValueError(
            f"unknown kernel variant {name!r}; this build has {sorted(compiled)} (or 'auto')"
        )
    if name != "auto" and not compiled[name]:
        raise ValueError(
            f"kernel variant {name!r} does not run on this CPU; it runs {available_isas()}"
        )
    if name == "auto":
        _forced = None
        return active_isa()
    _forced = _kernels.set_isa(name)
    return _forced


@contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Run the block with a forced variant, then restore the previous setting (a forced variant,
    or the measured pick)."""
    global _forced
    previous_forced, previous_active = _forced, _kernels.active_isa()
    set_isa(name)
    try:
        yield name
    finally:
        _forced = previous_forced
        _kernels.set_isa(previous_active)


_env_isa = os.environ.get("FLASHDESK_ISA", "").strip()
if _env_isa:
    try:
        set_isa(_env_isa)
    except ValueError as exc:
        raise ValueError(f"FLASHDESK_ISA={_env_isa!r}: {exc}") from None


# ------------------------------------------------------------------------------------ buffers


def _is_torch(a: Any) -> bool:
    return type(a).__module__.startswith("torch")


def _kind(a: Any) -> str:
    """'f32', 'bf16', 'u8', 'i32', 'i64', 'f64', or the dtype's name for anything else."""
    if _is_torch(a):
        name = str(a.dtype)
        if name == "torch.float32":
            return "f32"
        if name == "torch.bfloat16":
            return "bf16"
        if name in _TORCH_BYTE_DTYPES:
            return "u8"
        return {"torch.int32": "i32", "torch.int64": "i64", "torch.float64": "f64"}.get(name, name)
    dt = np.asarray(a).dtype
    if dt == np.float32:
        return "f32"
    if dt in (np.uint8, np.int8):
        return "u8"
    return {np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}.get(dt, str(dt))


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in a.shape)


def _address(a: Any, name: str, *, writable: bool = False) -> int:
    """Address of a C-contiguous host buffer (raises a clear error otherwise)."""
    if _is_torch(a):
        if a.device.type != "cpu":
            raise ValueError(f"{name} is on {a.device}; the CPU kernels need a host tensor")
        if not a.is_contiguous():
            raise ValueError(f"{name} is not contiguous; pass a contiguous tensor (.contiguous())")
        return int(a.data_ptr())
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; the kernel writes its result there")
    return int(a.__array_interface__["data"][0])


def _small_f32(a: Any, name: str) -> np.ndarray:
    """Routing weights and the like: small, so a float32 copy is fine."""
    if _is_torch(a):
        a = a.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(a, dtype=np.float32)


def _small_i32(a: Any, name: str) -> np.ndarray:
    if _is_torch(a):
        a = a.detach().to("cpu").numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert indices, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int32)


def _activations(x: Any, name: str) -> tuple[Any, bool]:
    """x as a contiguous fp32 or bf16 buffer (a copy only if it was not contiguous)."""
    kind = _kind(x)
    if kind not in ("f32", "bf16"):
        raise TypeError(f"{name} must be float32 or bfloat16, got {kind}")
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; the CPU kernels need a host tensor")
        x = x.contiguous()
    else:
        x = np.ascontiguousarray(x)
    return x, kind == "bf16"


def _new_out(like: Any, shape: tuple[int, ...]) -> Any:
    if _is_torch(like):
        import torch

        return torch.zeros(shape, dtype=torch.float32)
    return np.zeros(shape, dtype=np.float32)


def _check_out(out: Any, shape: tuple[int, ...]) -> bool:
    kind = _kind(out)
    if kind not in ("f32", "bf16"):
        raise TypeError(f"out must be float32 or bfloat16, got {kind}")
    if _shape(out) != shape:
        raise ValueError(f"out has shape {_shape(out)}, expected {shape}")
    return kind == "bf16"


def _f32_out(out: Any, like: Any, shape: tuple[int, ...], name: str) -> Any:
    """A float32 result buffer of `shape`: `out` checked, or a new one like `like`'s kind."""
    if out is None:
        return _new_out(like, shape)
    if _kind(out) != "f32" or _shape(out) != shape:
        raise ValueError(f"{name}: out must be float32 {shape}, got {_kind(out)} {_shape(out)}")
    return out


def _threads_arg(threads: int | None) -> int:
    if threads is None:
        return _threads
    if not isinstance(threads, int) or threads < 1 or threads > 256:
        raise ValueError(f"threads must be an int in [1, 256], got {threads!r}")
    return threads


# ------------------------------------------------------------------------------------ experts

_EXPERT_KEYS = (
    ("w1", "w1.weight"),
    ("w1_scale", "w1.scale"),
    ("w3", "w3.weight"),
    ("w3_scale", "w3.scale"),
    ("w2", "w2.weight"),
    ("w2_scale", "w2.scale"),
)


def _expert_parts(expert: Any, index: int) -> tuple:
    if isinstance(expert, Mapping):
        parts = []
        for short, ckpt in _EXPERT_KEYS:
            if short in expert:
                parts.append(expert[short])
            elif ckpt in expert:
                parts.append(expert[ckpt])
            else:
                raise KeyError(f"expert {index} has no {short!r} (or {ckpt!r}) tensor")
        return tuple(parts)
    parts = tuple(expert)
    if len(parts) != 6:
        raise ValueError(
            f"expert {index}: expected (w1, w1_scale, w3, w3_scale, w2, w2_scale), "
            f"got {len(parts)} items"
        )
    return parts


class ExpertTable:
    """A set of FP4 experts registered once: shapes checked, buffer addresses gathered.

    Build it once per layer and pass it to `expert_ffn` on every call: registering 256 experts
    costs milliseconds, a call with a table costs microseconds. The table keeps the tensors alive;
    tensors that view a memory-mapped checkpoint need that checkpoint to stay open while in use.
    """

    def __init__(self, experts: Sequence[Any]):
        experts = list(experts)
        if not experts:
            raise ValueError("ExpertTable needs at least one expert")
        self._tensors = []
        addresses = np.zeros((len(experts), 6), dtype=np.uintp)
        dim = inter = None
        for e, expert in enumerate(experts):
            w1, s1, w3, s3, w2, s2 = _expert_parts(expert, e)
            if len(_shape(w1)) != 2 or len(_shape(w2)) != 2:
                raise ValueError(f"expert {e}: w1 and w2 must be 2-D packed byte tensors")
            i_rows, half_d = _shape(w1)
            if dim is None:
                dim, inter = 2 * half_d, i_rows
            expected = {
                "w1": (inter, dim // 2),
                "w1_scale": (inter, dim // 32),
                "w3": (inter, dim // 2),
                "w3_scale": (inter, dim // 32),
                "w2": (dim, inter // 2),
                "w2_scale": (dim, inter // 32),
            }
            for j, (key, tensor) in enumerate(zip(expected, (w1, s1, w3, s3, w2, s2), strict=True)):
                if _kind(tensor) != "u8":
                    raise TypeError(
                        f"expert {e} {key}: expected packed bytes (int8/uint8/float8/float4), "
                        f"got {_kind(tensor)}"
                    )
                if _shape(tensor) != expected[key]:
                    raise ValueError(
                        f"expert {e} {key}: shape {_shape(tensor)}, expected {expected[key]} "
                        f"(hidden {dim}, expert width {inter})"
                    )
                addresses[e, j] = _address(tensor, f"expert {e} {key}")
                self._tensors.append(tensor)
        if dim % 32 or inter % 32:
            raise ValueError(f"hidden {dim} and expert width {inter} must be multiples of 32")
        self.addresses = addresses
        self.address = int(addresses.__array_interface__["data"][0])  # the kernel's table
        self.n_experts = len(experts)
        self.dim = dim
        self.inter = inter

    def __len__(self) -> int:
        return self.n_experts

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, layer: int, experts: Any = None) -> ExpertTable:
        """The routed experts of `layer` (index into the config's layers; the MTP block follows
        the main layers) straight from a `flashdesk.engine.checkpoint.Checkpoint`, as zero-copy
        views of its memory-mapped shards: keep the checkpoint open while the table is in use.
        experts: which expert indices (default: all), in table order."""
        config = checkpoint.config
        if config is None:
            raise ValueError("the checkpoint has no config.json; the layer's expert names need it")
        prefix = config.layer(layer).prefix
        indices = range(config.n_routed_experts) if experts is None else list(experts)
        return cls(
            [
                {
                    f"{w}.{part}": checkpoint.raw(f"{prefix}ffn.experts.{e}.{w}.{part}")
                    for w in ("w1", "w2", "w3")
                    for part in ("weight", "scale")
                }
                for e in indices
            ]
        )


_FAST_TOKENS = 4  # `expert_ffn` calls of at most this many tokens may take the direct path


def _few_torch_tokens(x, experts, weights, out, ids, isa) -> bool:
    """Whether an `expert_ffn` call can skip the argument checks: torch tensors of the kernel's
    dtypes and shapes on the CPU, contiguous, a few tokens (no chunking), an ExpertTable."""
    if not (
        isa is None
        and isinstance(experts, ExpertTable)
        and _is_torch(x)
        and _is_torch(ids)
        and _is_torch(weights)
        and _is_torch(out)
    ):
        return False
    import torch

    acts = (torch.float32, torch.bfloat16)
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= _FAST_TOKENS
        and x.shape[1] == experts.dim
        and x.dtype in acts
        and out.dtype in acts
        and tuple(out.shape) == tuple(x.shape)
        and ids.dim() == 2
        and tuple(ids.shape) == tuple(weights.shape)
        and ids.shape[0] == x.shape[0]
        and ids.shape[1] > 0
        and not ids.dtype.is_floating_point
        and x.device.type == out.device.type == ids.device.type == weights.device.type == "cpu"
        and x.is_contiguous()
        and out.is_contiguous()
    )


def expert_ffn(
    x: Any,
    experts: ExpertTable | Sequence[Any],
    weights: Any,
    out: Any = None,
    *,
    ids: Any = None,
    limit: float = 10.0,
    int8: bool = False,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """out[t] += Σ_j weights[t, j] · FFN_{ids[t, j]}(x[t]) over FP4 experts (spec §2.7 step 4).

    FFN_e(x) = W2 · (silu(min(W1·x, L)) ⊙ clamp(W3·x, −L, L)), L = limit (the config's
    swiglu_limit, 10 for V4; 0 disables the clamp), the routing weight applied to
    the hidden before W2, fp32 accumulation. With bfloat16 x the hidden is rounded to bfloat16
    before W2 (as the reference and the forward pass do); with float32 x it stays float32.
    x: [T, D] or [D], float32 or bfloat16. experts: an ExpertTable, or a sequence of
    ExpertWeights / 6-tuples / dicts with checkpoint names ('w1.weight', 'w1.scale', ...).
    weights: [T, k] (or [k] for 1-D x) routing weights. ids: [T, k] expert indices (-1 skips a
    slot); None means every token uses every expert and weights is [T, n_experts].
    out: [T, D] (or [D]) float32/bfloat16, accumulated into; None: a new zero float32 buffer.
    int8: x and the hidden quantized to int8 per 32 elements for the variant's integer dots
    (`has_int8`; the float path where it has none): 2-3× the float rate per core on x86, at a
    rounding (half a step of the block's |max| / 127) below the reference's own FP8 rounding of
    these activations. Returns out.
    """
    if _few_torch_tokens(x, experts, weights, out, ids, isa):
        # A decode step's call (torch tensors as the runtime holds them): straight to the kernel,
        # which checks the ids itself; the checks below cost ~16 µs a call, once per CPU layer.
        import torch

        ids32 = ids.to(torch.int32).contiguous()
        w32 = weights.to(torch.float32).contiguous()
        _ensure_default()
        _kernels.expert_ffn(
            x.data_ptr(), x.dtype is torch.bfloat16, x.shape[0], experts.dim, experts.inter,
            experts.address, experts.n_experts, ids32.data_ptr(), w32.data_ptr(), ids.shape[1],
            float(limit), out.data_ptr(), out.dtype is torch.bfloat16, _threads_arg(threads), "",
            bool(int8),
        )  # fmt: skip
        return out
    table = experts if isinstance(experts, ExpertTable) else ExpertTable(experts)
    one_token = len(_shape(x)) == 1
    x, x_bf16 = _activations(x, "x")
    x2 = x.reshape(1, -1) if one_token else x
    if len(_shape(x2)) != 2 or _shape(x2)[1] != table.dim:
        raise ValueError(f"x has shape {_shape(x)}, expected [T, {table.dim}] or [{table.dim}]")
    T = _shape(x2)[0]
    w = _small_f32(weights, "weights").reshape(T, -1) if T else _small_f32(weights, "weights")
    k = w.shape[1] if w.ndim == 2 else 0
    if ids is None:
        if k != table.n_experts:
            raise ValueError(
                f"weights has {k} columns; without ids it needs one per expert ({table.n_experts})"
            )
        ids_arr = None
    else:
        ids_arr = _small_i32(ids, "ids").reshape(T, -1) if T else _small_i32(ids, "ids")
        if ids_arr.shape != w.shape:
            raise ValueError(f"ids {ids_arr.shape} and weights {w.shape} must have the same shape")
        if ids_arr.size and (ids_arr.min() < -1 or ids_arr.max() >= table.n_experts):
            raise ValueError(
                f"ids must be in [0, {table.n_experts}) (or -1 for an unused slot); got "
                f"[{ids_arr.min()}, {ids_arr.max()}]"
            )
    out_shape = (table.dim,) if one_token else (T, table.dim)
    if out is None:
        out = _new_out(x, out_shape)
    out_bf16 = _check_out(out, out_shape)
    if T == 0 or k == 0:
        return out
    # The kernel holds every pair's hidden (T·k·I floats): long prompts go through in chunks of
    # tokens so that stays under _HIDDEN_BUDGET bytes.
    chunk = max(1, _HIDDEN_BUDGET // (4 * k * table.inter))
    n_threads = _threads_arg(threads)
    x_addr, w_addr = _address(x2, "x"), _address(w, "weights")
    ids_addr = 0 if ids_arr is None else _address(ids_arr, "ids")
    out_addr = _address(out, "out", writable=True)
    x_row = table.dim * (2 if x_bf16 else 4)
    out_row = table.dim * (2 if out_bf16 else 4)
    if not isa:
        _ensure_default()
    for t0 in range(0, T, chunk):
        n = min(chunk, T - t0)
        _kernels.expert_ffn(
            x_addr + t0 * x_row,
            x_bf16,
            n,
            table.dim,
            table.inter,
            table.address,
            table.n_experts,
            ids_addr + t0 * k * 4 if ids_addr else 0,
            w_addr + t0 * k * 4,
            k,
            float(limit),
            out_addr + t0 * out_row,
            out_bf16,
            n_threads,
            isa or "",
            bool(int8),
        )
    return out


class CpuExperts:
    """A drop-in for `engine.model.moe.DenseExperts` that runs the FP4 kernels on packed weights.

    Same call: x `[T, D]`, experts/weights `[T, k]` → Σ_k weight·expert(x) `[T, D]` float32 on
    x's device (x and the routing go through host memory; the kernels run on the CPU).
    """

    def __init__(self, table: ExpertTable, limit: float = 10.0, threads: int | None = None):
        self.table = table
        self.limit = float(limit)
        self.threads = threads

    @property
    def count(self) -> int:
        return self.table.n_experts

    def __call__(self, x, experts, weights, simulate: bool = False):
        import torch

        if simulate:
            raise ValueError(
                "the CPU expert kernels do not simulate the reference's FP8 activation rounding "
                "(simulate_quant); load the model with simulate_quant=False to use them"
            )
        xc = x.detach().to("cpu")
        if xc.dtype not in (torch.float32, torch.bfloat16):
            xc = xc.float()
        out = torch.zeros(tuple(x.shape), dtype=torch.float32)
        expert_ffn(
            xc.contiguous(),
            self.table,
            weights.detach().to("cpu", torch.float32),
            out,
            ids=experts.detach().to("cpu"),
            limit=self.limit,
            threads=self.threads,
        )
        return out.to(x.device)


# ------------------------------------------------------------------------------------ linears


def _linear_weight(kind: int, w, scale, name: str, groups: int) -> tuple[int, int]:
    """A linear's weight (and scales) checked → (N rows, K inputs per group)."""
    if kind == _BF16:
        if len(_shape(w)) != 2 or _kind(w) not in ("bf16", "uint16"):
            raise ValueError(f"{name}: w must be a 2-D bfloat16 tensor (or uint16 bit patterns)")
    elif len(_shape(w)) != 2 or _kind(w) != "u8":
        raise ValueError(f"{name}: w must be a 2-D tensor of raw weight bytes")
    elif _kind(scale) != "u8":
        raise TypeError(f"{name}: scale must be E8M0 bytes (uint8 or float8_e8m0fnu)")
    N, wk = _shape(w)
    K = 2 * wk if kind in (_FP4, _FP4_INT8) else wk
    if (
        not isinstance(groups, int)
        or groups < 1
        or N % groups
        or (groups > 1 and (N // groups) % 64)
    ):
        raise ValueError(f"{name}: groups={groups!r} must split N = {N} into multiples of 64 rows")
    fp8 = kind in (_FP8, _FP8_FINITE)
    expected_scale = ((N + 127) // 128, (K + 127) // 128) if fp8 else (N, K // 32)
    if kind in (_FP4, _FP4_INT8) and K % 32:
        raise ValueError(f"{name}: K = {K} must be a multiple of 32")
    if kind != _BF16 and _shape(scale) != expected_scale:
        raise ValueError(f"{name}: scale has shape {_shape(scale)}, expected {expected_scale}")
    return N, K


def _linear(kind: int, x, w, scale, out, threads, isa, name: str, groups: int = 1):
    one_token = len(_shape(x)) == 1
    x, x_bf16 = _activations(x, "x")
    x2 = x.reshape(1, -1) if one_token else x
    N, K = _linear_weight(kind, w, scale, name, groups)
    if len(_shape(x2)) != 2 or _shape(x2)[1] != groups * K:
        want = groups * K
        raise ValueError(f"{name}: x has shape {_shape(x)}, expected [M, {want}] or [{want}]")
    M = _shape(x2)[0]
    out_shape = (N,) if one_token else (M, N)
    if out is None:
        out = _new_out(x, out_shape)
    out_bf16 = _check_out(out, out_shape)
    if M == 0:
        return out
    if not isa:
        _ensure_default()
    _kernels.quant_linear(
        kind,
        _address(x2, "x"),
        x_bf16,
        M,
        groups,
        K,
        _address(w, "w"),
        0 if kind == _BF16 else _address(scale, "scale"),
        N,
        _address(out, "out", writable=True),
        out_bf16,
        _threads_arg(threads),
        isa or "",
    )
    return out


def fp8_linear(
    x: Any,
    w: Any,
    scale: Any,
    out: Any = None,
    *,
    groups: int = 1,
    finite: bool = False,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """out = x · Wᵀ for an FP8 E4M3 weight with 128×128 E8M0 tile scales (spec §4.3).

    x: [M, K] or [K], float32/bfloat16; w: [N, K] E4M3 bytes; scale: [ceil(N/128), ceil(K/128)]
    E8M0 bytes; out: [M, N] (or [N]) float32/bfloat16, overwritten; None: a new float32 buffer.
    groups > 1 (V4's grouped `wo_a`): x is [M, groups·K] and output rows g·N/groups … of W see
    only the g-th K inputs (N/groups a multiple of 64), one call for all groups.
    finite=True: w is known to hold no NaN code (`fp8_finite(w)`, checked once at load), so the
    kernel skips its per-element NaN patch (faster where the variant has such a path).
    """
    kind = _FP8_FINITE if finite else _FP8
    return _linear(kind, x, w, scale, out, threads, isa, "fp8_linear", groups)


def fp8_finite(w: Any) -> bool:
    """True if no byte of the FP8 E4M3 weight `w` is a NaN code (0x7F/0xFF) — true of every
    weight the official quantizer writes; one pass over the bytes, the GIL released."""
    if _kind(w) != "u8":
        raise ValueError("fp8_finite: w must be a tensor of raw weight bytes")
    return bool(
        _kernels.fp8_nan_free(_address(w, "w"), int(np.prod(_shape(w))) if _shape(w) else 1)
    )


def fp4_linear(
    x: Any,
    w: Any,
    scale: Any,
    out: Any = None,
    *,
    int8: bool = False,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """out = x · Wᵀ for a packed FP4 E2M1 weight with per-32 E8M0 scales (spec §4.4).

    x: [M, K] or [K]; w: [N, K/2] bytes (low nibble = even element); scale: [N, K/32] bytes.
    int8: quantize x to int8 per 32 elements first (step = the block's |x| max / 127) and take
    the variant's integer dot (`has_int8(isa)`; the float path where it has none).
    """
    return _linear(_FP4_INT8 if int8 else _FP4, x, w, scale, out, threads, isa, "fp4_linear")


def bf16_linear(
    x: Any,
    w: Any,
    out: Any = None,
    *,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """out = x · Wᵀ for a bfloat16 weight (V4's output head), every weight widened exactly and
    multiplied with float32 activations: the float32 result at half the bytes read.

    x: [M, K] or [K], float32/bfloat16; w: [N, K] bfloat16 (torch) or uint16 bit patterns;
    out: [M, N] (or [N]) float32/bfloat16, overwritten; None: a new float32 buffer.
    """
    return _linear(_BF16, x, w, None, out, threads, isa, "bf16_linear")


# A prompt's FP8 linears (many tokens) can run as fp32 GEMMs of torch's BLAS on the weights the
# C kernels decode, a tile of rows at a time: on the Intel dev VM (2 cores) MKL's sgemm ran V4's
# shapes at 220-250 GFLOP/s at 256 tokens where the variants' own GEMM ran ~115. Whether it wins
# on this machine is measured once, at the first call that could take it (`blas_prompts`);
# FLASHDESK_BLAS=0 / 1 decides instead. Decode steps and short prompts keep the C kernel.
BLAS_MIN_TOKENS = 128
_BLAS_TILE = 1 << 22  # decoded weights per tile: 16 MB of fp32
_blas_choice: bool | None = None
_blas_lock = threading.Lock()  # not _tune_lock: the measurement's kernel calls take that one
_blas_local = threading.local()  # each thread's tile buffer (a fresh one costs page faults)


def _blas_scratch(name: str, elements: int):
    """This thread's float32 buffer `name` of at least `elements`, kept between calls: a normal
    tensor even when made under `torch.inference_mode` (the runtime's calls), so that calls
    outside it may write it too."""
    import torch

    buf = getattr(_blas_local, name, None)
    if buf is None or buf.numel() < elements:
        with torch.inference_mode(False):
            buf = torch.empty(elements, dtype=torch.float32)
        setattr(_blas_local, name, buf)
    return buf


def _blas_fp8(lin: BoundLinear, x, out):
    """`lin`'s FP8 product for x `[M, groups·K]` as torch fp32 GEMMs on decoded row tiles →
    out `[M, N]` (its dtype; bf16 rounded from the fp32 sums once)."""
    import torch

    m, k, rows = x.shape[0], lin.k, lin.n // lin.groups
    # rows per tile: its weights and its products ([M, tile]) each ~_BLAS_TILE floats at most
    tile = min(rows, max(64, _BLAS_TILE // max(k, m) // 64 * 64))
    weights = _blas_scratch("weights", tile * k)
    xf = x if x.dtype is torch.float32 else x.float()
    whole = lin.groups == 1 and tile == rows and out.dtype is torch.float32
    # a tile's products land in a kept buffer, then in out's columns: a fresh [M, tile] result
    # each tile would cost its page faults
    products = None if whole else _blas_scratch("products", m * tile)
    with torch.inference_mode():  # writes out as the C kernel would, whatever mode made it
        for g in range(lin.groups):
            xg = xf[:, g * k : (g + 1) * k]
            for r0 in range(g * rows, (g + 1) * rows, tile):
                nr = min(tile, (g + 1) * rows - r0)
                w = weights[: nr * k].view(nr, k)
                _kernels.fp8_decode_rows(
                    lin._w_addr, lin._scale_addr, k, r0, nr, w.data_ptr(), _threads, ""
                )
                if products is None:
                    torch.mm(xg, w.t(), out=out)
                else:
                    product = products[: m * nr].view(m, nr)
                    torch.mm(xg, w.t(), out=product)
                    out[:, r0 : r0 + nr].copy_(product)
    return out


def blas_prompts() -> bool:
    """Whether prompts' FP8 linears go through torch's BLAS (`_blas_fp8`): FLASHDESK_BLAS=0 / 1,
    else measured once per process (a 256-token product with a [2048, 2048] weight both ways,
    best of three each; ~0.1 s)."""
    global _blas_choice
    forced = os.environ.get("FLASHDESK_BLAS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if _blas_choice is None:
        with _blas_lock:
            if _blas_choice is None:
                _blas_choice = _measure_blas()
    return _blas_choice


def _measure_blas() -> bool:
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 0x7F, (2048, 2048), dtype=torch.uint8, generator=g)  # no NaN code
    scale = torch.randint(118, 126, (16, 16), dtype=torch.uint8, generator=g)
    lin = BoundLinear("fp8", w, scale, finite=True)
    x = torch.randn(256, 2048, generator=g).to(torch.bfloat16)
    out = torch.empty(256, 2048)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    own = best(lambda: lin._kernel(x, out))
    blas = best(lambda: _blas_fp8(lin, x, out))
    return blas < 0.9 * own  # a clear win only: the two may trade places with the load


class BoundLinear:
    """One linear (FP8, FP4 or BF16 weight) whose weight and scales were checked once: a call
    checks only its torch activations and output and goes straight to the C kernel. The general
    entry points check every argument each call (~9 µs of Python; a CPU decode layer makes
    about a dozen linear calls). Arguments they would refuse take their path, for its message.

    kind: "fp8" (`finite`: no NaN code, as `fp8_linear`), "fp4" or "bf16"; w, scale as those
    functions take them; groups as `fp8_linear`'s. Call: x `[M, groups·K]` float32/bfloat16,
    out `[M, N]` float32/bfloat16 (overwritten) → out.
    """

    __slots__ = (
        "_bf16", "_code", "_dtypes", "_scale_addr", "_w_addr", "groups", "k", "n", "name",
        "scale", "w",
    )  # fmt: skip

    def __init__(self, kind: str, w: Any, scale: Any = None, *, groups: int = 1, finite=False):
        codes = {"fp8": _FP8_FINITE if finite else _FP8, "fp4": _FP4, "bf16": _BF16}
        if kind not in codes:
            raise ValueError(f"kind must be one of {sorted(codes)}, got {kind!r}")
        self.name = f"{kind}_linear"
        self._code = codes[kind]
        self.n, self.k = _linear_weight(self._code, w, scale, self.name, groups)
        self.w, self.scale, self.groups = w, scale, groups  # kept alive: the kernel reads them
        self._w_addr = _address(w, "w")
        self._scale_addr = 0 if self._code == _BF16 else _address(scale, "scale")
        import torch  # here, not at import: the kernels also serve numpy-only callers

        self._bf16 = torch.bfloat16
        self._dtypes = (torch.float32, torch.bfloat16)

    def __call__(self, x: Any, out: Any) -> Any:
        fast = (
            _is_torch(x)
            and _is_torch(out)
            and x.dtype in self._dtypes
            and out.dtype in self._dtypes
            and x.dim() == 2
            and x.shape[1] == self.groups * self.k
            and tuple(out.shape) == (x.shape[0], self.n)
            and x.device.type == "cpu"
            and out.device.type == "cpu"
            and x.is_contiguous()
            and out.is_contiguous()
        )
        if not fast:
            return _linear(
                self._code, x, self.w, self.scale, out, None, None, self.name, self.groups
            )
        if x.shape[0] >= BLAS_MIN_TOKENS and self._code == _FP8_FINITE and blas_prompts():
            _ensure_default()
            return _blas_fp8(self, x, out)
        return self._kernel(x, out)

    def _kernel(self, x: Any, out: Any) -> Any:
        """The C kernel's product (x and out as `__call__` checked them) → out."""
        if x.shape[0]:
            _ensure_default()
            _kernels.quant_linear(
                self._code, x.data_ptr(), x.dtype is self._bf16, x.shape[0], self.groups, self.k,
                self._w_addr, self._scale_addr, self.n, out.data_ptr(), out.dtype is self._bf16,
                _threads, "",
            )  # fmt: skip
        return out


# ------------------------------------------------------------------------------------ indexer

_KEY_KINDS = {"f32": 0, "bf16": 1, "u8": 2}


def index_scores(
    q: Any,
    w: Any,
    keys: Any,
    scale: Any = None,
    out: Any = None,
    *,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """CSA's lightning-indexer scores (spec §2.6.2) from the keys as stored, on the CPU:
    out[s, t] = Σ_h w[s, h] · ReLU(q[s, h] · key_t), float32 sums, each score in a fixed order
    whatever the thread count or the number of keys (a key's score does not depend on the others).

    q `[S, H, D]` float32, w `[S, H]` float32 (the head weights, their scale included); keys
    `[T, D]` float32, bfloat16 or E4M3 codes (uint8 / float8_e4m3fn) with `scale` `[T]` or `[T, 1]`
    float32 per key; out `[S, T]` float32 (overwritten; None: a new one) → out.
    Why: as torch ops a decode token widened every key to a float32 copy and ran two einsums over
    it; at 1M tokens of context that was ~200 ms per CSA layer on two cores (see indexer.h).
    """
    for name, a in (("q", q), ("w", w)):
        if _kind(a) != "f32":
            raise TypeError(f"index_scores: {name} must be float32, got {_kind(a)}")
    if len(_shape(q)) != 3:
        raise ValueError(f"index_scores: q must be [S, H, D], got shape {_shape(q)}")
    S, H, D = _shape(q)
    if _shape(w) != (S, H):
        raise ValueError(f"index_scores: w has shape {_shape(w)}, expected {(S, H)}")
    kind = _KEY_KINDS.get(_kind(keys))
    if kind is None or len(_shape(keys)) != 2 or _shape(keys)[1] != D:
        raise ValueError(
            f"index_scores: keys must be [T, {D}] float32, bfloat16 or E4M3 bytes, got "
            f"{_kind(keys)} {_shape(keys)}"
        )
    T = _shape(keys)[0]
    scale_addr = 0
    if kind == _KEY_KINDS["u8"]:
        if scale is None or _kind(scale) != "f32" or math.prod(_shape(scale)) != T:
            raise ValueError(f"index_scores: E4M3 keys need a float32 scale per key ({T})")
        scale_addr = _address(scale, "scale")
    out = _f32_out(out, q, (S, T), "index_scores")
    if not isa:
        _ensure_default()
    _kernels.index_scores(
        _address(q, "q"), _address(w, "w"), S, H, D, kind, _address(keys, "keys"), D,
        scale_addr, T, _address(out, "out", writable=True), T, _threads_arg(threads), isa or "",
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ attention

_ROW_KINDS = {"f32": 0, "bf16": 1}


def sink_attention(
    q: Any,
    sink: Any,
    sets: Sequence[Any],
    scale: float,
    out: Any = None,
    *,
    threads: int | None = None,
    isa: str | None = None,
) -> Any:
    """One decode query's sink attention (spec §2.6) over candidate rows as stored, on the CPU:
    out[h] = Σ_t p[h, t] · row_t, p[h] the softmax of scale · q[h] · row_t over the rows of all
    sets and the head's sink logit (which takes its share of the denominator only; K = V).

    q `[H, D]` float32, sink `[H]` float32, sets: 1–4 tensors `[n_i, D]` float32 or bfloat16
    (the window's rows, a store's compressed entries as stored), or a tuple (codes `[n, nope]`
    E4M3 bytes, exponents `[n, nope/64]` E8M0 bytes, rope `[n, D − nope]` bfloat16): the packed
    FP8 KV rows of spec §3.2 (`cache.Fp8Rows`), read as stored; out `[H, D]` float32
    (overwritten; None: a new one) → out. Why: as torch ops an HCA layer widened all its
    context/128 entries to float32 each token and ran its einsums on torch's threads, which
    contend with the kernels' pool (see attention.h).
    """
    for name, a in (("q", q), ("sink", sink)):
        if _kind(a) != "f32":
            raise TypeError(f"sink_attention: {name} must be float32, got {_kind(a)}")
    if len(_shape(q)) != 2:
        raise ValueError(f"sink_attention: q must be [H, D], got shape {_shape(q)}")
    H, D = _shape(q)
    if _shape(sink) != (H,):
        raise ValueError(f"sink_attention: sink has shape {_shape(sink)}, expected {(H,)}")
    if not 1 <= len(sets) <= 4:
        raise ValueError(f"sink_attention: 1 to 4 row sets, got {len(sets)}")
    spec = []
    for i, rows in enumerate(sets):
        if isinstance(rows, tuple):
            spec.append(_fp8_row_set(rows, D, i))
            continue
        kind = _ROW_KINDS.get(_kind(rows))
        if kind is None or len(_shape(rows)) != 2 or _shape(rows)[1] != D:
            raise ValueError(
                f"sink_attention: set {i} must be [n, {D}] float32 or bfloat16, got "
                f"{_kind(rows)} {_shape(rows)}"
            )
        spec.append((_address(rows, f"set {i}"), kind, D, _shape(rows)[0]))
    if not any(count for *_, count in spec):
        raise ValueError("sink_attention: no rows to attend to")
    out = _f32_out(out, q, (H, D), "sink_attention")
    if not isa:
        _ensure_default()
    _kernels.sink_attention(
        _address(q, "q"), float(scale), _address(sink, "sink"), H, D, spec,
        _address(out, "out", writable=True), _threads_arg(threads), isa or "",
    )  # fmt: skip
    return out


def _fp8_row_set(parts: tuple, width: int, i: int) -> tuple:
    """A packed FP8 row set (codes, exponents, rope) checked → its `sink_attention` spec."""
    if len(parts) != 3:
        raise ValueError(f"sink_attention: set {i}: packed rows are (codes, exponents, rope)")
    codes, exps, rope = parts
    n, nope = _shape(codes) if len(_shape(codes)) == 2 else (-1, -1)
    ok = (
        _kind(codes) == "u8"
        and _kind(exps) == "u8"
        and _kind(rope) == "bf16"
        and nope > 0
        and nope % 64 == 0
        and _shape(exps) == (n, nope // 64)
        and _shape(rope) == (n, width - nope)
    )
    if not ok:
        raise ValueError(
            f"sink_attention: set {i}: packed rows must be codes [n, k·64] E4M3 bytes, exponents "
            f"[n, k] E8M0 bytes and rope [n, {width} − k·64] bfloat16; got "
            f"{[(_kind(p), _shape(p)) for p in parts]}"
        )
    return (
        _address(codes, f"set {i} codes"), 2, nope, n, _address(exps, f"set {i} exponents"),
        _address(rope, f"set {i} rope") if width > nope else 0, nope,
    )  # fmt: skip
