"""GPU kernels (Triton) for weights held in VRAM in their stored formats.

Why: torch has no GEMV for V4's block-scaled FP8 or packed FP4, so the torch path must widen the
weights, either once at load (twice the VRAM: V4-Flash's non-expert weights take 15.4 GB as bf16
instead of 7.8 GB) or per use (about 35 times an FP4 expert's 13.4 MB of stored bytes in memory
traffic, plus a host sync per layer to list the picked experts). Here, for the few tokens of a
decode step:

* `moe(...)`: the routed experts those tokens picked, read straight from the packed E2M1 bytes
  and E8M0 scales (spec §4.4) of a stacked slot store, in two launches (gate/up with the clamped
  SwiGLU and the routing weight; then down, summed over the token's picks in a fixed order), with
  the pick → slot map read on the device: no host sync, experts not in VRAM (slot −1) skipped;
* `linear(...)`: `x · Wᵀ` from FP8 E4M3 weights with 128×128 E8M0 tile scales (spec §4.3), or
  from BF16 weights (the head), float32 sums; V4's grouped `wo_a` in the same launch ("rows";
  or "dot": up to 16 tokens per program on the tensor cores);
* `moe_grouped(...)`: a prompt's picks sorted by expert, each expert's packed bytes read once
  per block of picks and multiplied on the tensor cores (`moe_by_pick`: the same for a decode
  step, one block per pick); `dequant_fp4(...)`: one pass from packed FP4 to bf16/fp16/fp32;
* `sinkhorn(...)`: the hyper-connections' 20-iteration Sinkhorn of each 4×4 mixing matrix in one
  launch instead of ~120 tiny ones; `hc_mixes`, `hc_pre_tail`, `hc_post`, `rms_norm`,
  `apply_rope`, `route` (the router after its GEMV), `softmax_pool`, `compressor_step` (a
  compressor's step after its GEMVs) and `decode_attention` (a decode step's sink attention):
  the other chains of small operations a layer runs per token (~5-30 kernels each as torch
  operations), one launch each. A CUDA graph removes the
  host's cost of a kernel, not the GPU's few microseconds per launch; programmatic dependent
  launch (`PDL`, sm_90 and later) overlaps each launch with its predecessor's end.

Most of these kernels do little work per launch, so they are bound by instructions and latency,
not bytes. tests/_compile_kernels.py builds them for sm_90a here and counts the decode expert
kernels' SASS instructions per weight, which stands in for their speed until a GPU times them.

Triton is optional: torch's Linux CUDA wheels bring it; where it is missing (Windows, CPU-only)
`available()` is False and the runtime keeps its torch path. At first use on a GPU the kernels
are checked against their torch definitions: the core ones together (`available`), the
tensor-core ones (`tensor_cores`) and the newest fused chains one by one (`checked`), so a kernel
that fails there falls back alone. Without a GPU the tests run these kernels in Triton's CPU
interpreter, and build each for sm_90a (tests/test_gpu_kernels_compile.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
from collections.abc import Sequence

import torch

try:  # imported by name so that PyInstaller's import graph does not pull Triton into the app
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Kernel shapes. The values below are what `flashdesk bench gpu-kernels` chose on the lent H200
# in run 6 (2026-11-28, each call replayed from a CUDA graph, as decode runs it), with which the
# full synthetic V4-Flash decoded at 59.4 tok/s; the benchmark sweeps them on the user's GPU and
# records the fastest (`engine.gpu_tuning`), applied when the runtime first uses that GPU.
# Functions read them at call time.
#
# The FP4 decode expert kernels (`moe`): (rows, bytes per step) of the gate/up launch, then of
# the down launch; warps; (MODE, F16, SPLIT): MODE 0 sums 32-value blocks by a reshape, 1 loads
# the tile as [rows, blocks, 16] bytes, 2 as int32 words (below; F16 unused, always through
# float16 bits); F16 1 decodes E2M1 through float16 bits; SPLIT 1 runs
# the down projection as one program per (pick, row block), partial sums added by torch.
# H200, replayed from a CUDA graph: 66-67 µs per 6-expert step (1.2 TB/s, 0.29 × the copy
# bandwidth; (16, 256, 16, 256) 65.8 / 64.9 µs in runs 6 / 7, a tie; (0, 1, 0) 70-74 µs, MODE 0
# without F16 121-150 µs, MODE 1 103-279 µs, MODE 2 72-101 µs).
TILES = (8, 256, 8, 256)
WARPS = 4
FP4_MODE = (0, 1, 1)
FLOAT_FP4 = (TILES, WARPS, FP4_MODE)  # the built-in float decode, whatever a sweep recorded
# MODE 2 reads the rows as int32 words of eight codes and decodes two per 16-bit half of an
# operation: in the SASS ptxas builds for sm_90, 5.2 instructions per weight in the hot loop
# where the default shape's takes 10.4 (gate/up; down 4.9 against 8.6; tests/_compile_kernels.py
# counts them). Yet on the H200 (run 6) it lost: 72.2 µs at best against 65.8 for MODE 1 with
# half the instructions' count, so the kernel is bound by its loads' latency, not by issuing
# instructions. This shape (32 rows × 128 bytes, 4 warps) was its best; the sweep times it with
# others on each GPU.
FP4_WORDS = ((32, 128, 32, 128), 4, (2, 0, 1))
# Steps of the decode expert loop in flight at once. 1: a plain loop: a step's loads issue only
# after the step before has used its bytes (the PTX has no cp.async; each program of the default
# shape waits out 16 memory latencies in series). N ≥ 2: Triton's pipeliner loads the next N−1
# steps into shared memory (cp.async) while one is computed. Unmeasured; the sweep times 2-4.
FP4_STAGES = 1
# MODE 4 multiplies in integers, as llama.cpp's MXFP4 kernels do on CUDA: the activations of
# each 32-value block quantized to int8 (step amax/127, rounded to nearest even: what the CPU's
# int8 experts take, `quant.quantize_q8`; x in one launch before, h by the gate/up kernel as it
# writes it), each int32 word of eight E2M1 codes turned into eight int8 (twice the values: 0,
# ±1 … ±12) by three byte permutes (`prmt`) per four codes and multiplied four at a time
# (`dp4a`), the block's integer sum scaled once. In the SASS ptxas builds for sm_90: 2.4
# instructions per weight where MODE 1 takes 10.4 (tests/_compile_kernels.py counts them). It
# needs 32 gate/up rows a program (h is quantized per 32). Its mode's second item, F16 for the
# float modes, is JOINT here: 1 runs gate and up in one loop, both matrices' loads in flight
# together. Unmeasured; the sweep times it, and a GPU where its check fails ("FP4 int8 dots" in
# CHECKS) keeps the built-in float decode (`decode_shape`).
FP4_INT8 = ((32, 512, 32, 512), 4, (4, 0, 1))
# MODE 3 (gate and up in one loop, sums kept per thread, steps unrolled: what made the FP8
# rows linears reach the copy rate) lost on the H200 in run 7: 75-126 µs over eight shapes
# against 64.9 for (0, 1, 1), and one shape computed wrong there; so it is gone.
# Programmatic dependent launch (sm_90 and later): a decode step runs ~1,600 small kernels,
# and each waits for its predecessor's end before it even starts launching. 1: every Triton
# kernel launches early and waits at its start (`_await_inputs`). H200, run 6: decode 59.4 →
# 60.5 tok/s (43 layers), 46.2 → 47.1 (a 24 GiB card's plan), the replay check and the GPU
# tests passed with it; so on where the GPU has it (`pdl_possible`). `bench --synthetic` times
# the other setting beside; FLASHDESK_PDL=0 turns it off.
PDL = int(os.environ.get("FLASHDESK_PDL", "1") not in ("", "0"))
# A decode layer's four RMSNorms fused into the kernel before or after them: q's and kv's into
# their RoPE (`norm_rope`), the two block inputs' into the hyper-connection collapse
# (`hc_pre_tail`): 4 launches fewer a layer. `bench --synthetic` times the other setting beside.
FUSED_NORMS = True
# Launches of a decode layer folded into their neighbours' (twenty-first session, unmeasured
# on a GPU; the census by tests/test_decode_graphs.py): the next site's mixes into `hc_post`
# (`then=`, 2 a layer), the window ring's write and the output's de-rotation into the
# attention's merge (`decode_attention(keep_own=, rope=)`, 2), the compressed row's write into
# `compressor_step` (`into=`, 1 a compressor), a CSA layer's picked rows read where they lie
# (`decode_attention(picks=)`, 2). `bench --synthetic` times the other setting beside.
FUSED_SEAMS = True
# A decode step's cached experts: "rows" (`moe`) or "by pick" (`moe_by_pick`: the grouped
# tensor-core kernels, one 16-row block per pick, one row of it live; H200: 210-242 µs, lost).
DECODE_MOE = "rows"
BY_PICK_TILES = (16, 64, 128)
BY_PICK_WARPS = 4
MAX_TOKENS = 16  # above this many tokens the experts run grouped (`moe_grouped`)
# The grouped (prompt) expert kernels: picks per block, weight rows per program, packed bytes
# per step (two tensor-core products each: even and odd columns), warps. H200, a 1024-token
# chunk's 256 experts of one layer (3.42 GB): 10.8-11.1 ms (0.08 × copy; 6 shapes 11-19 ms),
# where dequantizing each expert for torch took 147-160 ms.
GROUPED_TILES = (16, 128, 64)
GROUPED_WARPS = 4
# `linear` for FP8 weights and bf16/fp16 activations: "rows" (LINEAR_ROWS = rows per program,
# warps; one token per program, float32 products) or "dot" (LINEAR_TILES = tokens, rows, K step
# per program on the tensor cores; K split across programs while a launch has fewer than
# LINEAR_MIN_PROGRAMS; pipeline LINEAR_STAGES, None: Triton's default). Other weights (the
# BF16 head: 1.09 × the copy's read+write rate with "rows") take "rows". "rows" options:
# columns per step (a multiple of 128: more loads in flight per thread), programs wanted per
# launch (0: K never split). H200, replayed from a graph: 512 columns per step halved the skinny
# linears' time (wo_b 23.0 → 11.2 µs, wq_a 10.9 → 5.2 µs; wq_b and wo_a at 0.98-0.99 × copy);
# splitting K tied at best; "dot" lost everywhere (6-38 µs).
LINEAR_KIND = "rows"
LINEAR_ROWS = (16, 4)
LINEAR_ROWS_K = 512
LINEAR_ROWS_MIN_PROGRAMS = 0
# steps of a "rows" program unrolled together, so that their loads are in flight at once (a small
# linear's few programs otherwise wait out a memory latency per step). H200, run 6: wq_b 9.2 →
# 7.7 µs, wo_a 10.3 → 8.8, wo_b 8.8 → 7.6, the small ones ±0.3 µs
LINEAR_ROWS_UNROLL = 4
# steps of a "rows" program whose loads Triton's pipeliner keeps in flight through shared memory
# (cp.async; 1: none, the loop's loads issue step by step, unrolled as above). Unmeasured: the
# sweep times each linear's best shape with 3 against this.
LINEAR_ROWS_STAGES = 1
LINEAR_TILES = (16, 64, 128)
LINEAR_STAGES: int | None = None
LINEAR_MIN_PROGRAMS = 1024
# Per weight shape (rows N, columns K, groups, bytes per weight) the "rows" options that
# `bench gpu-kernels` found fastest for it on this GPU: (rows per program, warps, columns per
# step, programs wanted). One shape for every linear leaves the small ones (wq_a, wkv, the
# shared expert's) at 0.10-0.57 × the copy rate on the H200 while the large ones reach 0.98;
# their best shapes differ. Built in: V4-Flash's shapes as the H200 chose them in run 6 (µs
# against the global options: wq_a 3.7 → 2.8, wkv 3.6 → 2.5, the router 3.8 → 2.4, the head
# 260 → 231, wo_a 9.6 → 8.8); another GPU's sweep replaces them. Those sweeps (runs 6 and 7)
# reread each weight from L2 (wq_b "1.12 × copy"; in the model, reading them cold, the linears
# took 69 µs a layer against the sweep's 46): the sweep now times them cold, and may choose
# otherwise next time.
LINEAR_ROWS_BY_SHAPE: dict[tuple[int, int, int, int], tuple[int, int, int, int]] = {
    (32768, 1024, 1, 1): (16, 4, 512, 1024),  # wq_b
    (8192, 4096, 8, 1): (4, 4, 2048, 0),  # wo_a (8 groups)
    (4096, 8192, 1, 1): (16, 4, 512, 0),  # wo_b
    (1024, 4096, 1, 1): (8, 4, 1024, 0),  # wq_a
    (512, 4096, 1, 1): (4, 4, 2048, 0),  # wkv
    (1536, 4096, 1, 1): (8, 4, 1024, 0),  # wq_a + wkv
    (2048, 4096, 1, 1): (8, 4, 1024, 0),  # the shared expert's w1 (or w3)
    (4096, 4096, 1, 1): (16, 4, 512, 0),  # the shared expert's w1 + w3
    (4096, 2048, 1, 1): (16, 4, 512, 0),  # the shared expert's w2
    (8192, 1024, 1, 1): (8, 4, 1024, 0),  # the indexer's wq_b
    (256, 4096, 1, 2): (4, 4, 2048, 0),  # the router's gate (BF16)
    (2048, 4096, 1, 2): (4, 4, 2048, 0),  # a CSA compressor's wkv + wgate (BF16)
    (1024, 4096, 1, 2): (4, 4, 2048, 0),  # an HCA compressor's
    (512, 4096, 1, 2): (4, 4, 2048, 0),  # the index compressor's
    (129280, 4096, 1, 2): (4, 4, 2048, 0),  # the head (BF16)
    # a CSA layer's decode-step joins, not swept yet: as wq_b's and a CSA compressor's shapes
    (40960, 1024, 1, 1): (16, 4, 512, 1024),  # wq_b + the indexer's wq_b
    (2624, 4096, 1, 2): (4, 4, 2048, 0),  # both compressors' projections + the index weights
}

# Triton's CPU interpreter (TRITON_INTERPRET=1 before Triton is imported; tests/conftest.py sets
# it where there is no GPU): the kernels then take CPU tensors, slowly. Never for the product.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# device → None when the kernels compiled and gave the right values there, else why not
_PROBED: dict[str, str | None] = {}
TUNED: dict[str, dict] = {}  # device → the recorded shapes applied there (`engine.gpu_tuning`)
TENSOR_CORES: dict[str, str | None] = {}  # device → None where the tensor-core kernels work
# (kernel, device) → None where a kernel with its own check (`checked`) works, else why not
FAILED_CHECKS: dict[tuple[str, str], str | None] = {}


def available(device: torch.device | str) -> bool:
    """The runtime may use these kernels for tensors on `device` (FLASHDESK_TRITON=0: never).
    On a GPU the first call compiles and checks one small kernel (`unavailable_reason`)."""
    return unavailable_reason(device) is None


def applies(t: torch.Tensor) -> bool:
    """Whether the model's small elementwise chains on `t` run as these kernels (its device is
    a GPU where they are available); tests point it at the interpreter."""
    return t.is_cuda and available(t.device)


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the kernels are not used on `device`, in words; None when they are."""
    if triton is None:
        return "Triton is not installed"
    if os.environ.get("FLASHDESK_TRITON", "1") == "0":
        return "FLASHDESK_TRITON=0 turns them off"
    dev = torch.device(device)
    if INTERPRETED or dev.type != "cuda":
        return f"they run on CUDA GPUs, not on {dev.type}"
    key = str(dev)
    if key not in _PROBED:
        _PROBED[key] = _probe(dev)
        if _PROBED[key] is None:
            _apply_tuning(dev)
            TENSOR_CORES[key] = _probe_tensor_cores(dev)
            if TENSOR_CORES[key] is not None:  # the FP4/FP8 kernels without tensor cores
                globals().update(DECODE_MOE="rows", LINEAR_KIND="rows")
    return _PROBED[key]


def checked(name: str, device: torch.device | str) -> bool:
    """Whether kernel `name` (of CHECKS) is used on `device`: the others are, and it compiled
    and gave its torch definition's values there (checked once per device; a failure keeps
    the previous path for it alone, with the reason in FAILED_CHECKS)."""
    if not available(device):
        return False
    key = (name, str(torch.device(device)))
    if key not in FAILED_CHECKS:
        try:
            FAILED_CHECKS[key] = CHECKS[name](torch.device(device))
        except Exception as exc:
            FAILED_CHECKS[key] = f"could not compile or run ({error_summary(exc)})"
    return FAILED_CHECKS[key] is None


def compressor_parts(g: torch.Generator, ratio: int, dim: int, c: int) -> dict:
    """Random weights of a small compressor (ratio 4: CSA's overlapping one) for checks."""
    width = 2 * c if ratio == 4 else c
    return {
        "wkv": torch.randn(width, dim, generator=g) * 0.2,
        "wgate": torch.randn(width, dim, generator=g) * 0.2,
        "ape": torch.randn(ratio, width, generator=g) * 0.1,
        "norm": torch.rand(c, generator=g) + 0.5,
    }


def _check_compressor_step(dev: torch.device) -> str | None:
    """`compressor_step` against `Compressor.step`'s torch path, CSA (overlap) and HCA-like
    windows, over positions that close windows; the HCA-like one writing into its store. Then
    both in one launch (`compressor_steps`, as a CSA layer runs its two)."""
    from flashdesk.engine.cache import CompressorCarry, NativeRows, RowStore
    from flashdesk.engine.model.compressor import Compressor
    from flashdesk.engine.model.rope import Rotary, inverse_frequencies

    g = torch.Generator().manual_seed(4)
    dim, c = 64, 32
    steps = 17  # windows of both ratios close
    for together in (False, True):
        made = {}
        for ratio in (4, 8):
            parts = compressor_parts(g, ratio, dim, c)
            rotary = Rotary(16, inverse_frequencies(16, 10000.0))
            for side, where in (("want", torch.device("cpu")), ("got", dev)):
                on = {k: v.to(where) for k, v in parts.items()}
                comp = Compressor(**on, ratio=ratio, rotary=rotary.to(where), eps=1e-6,
                                  for_indexer=False)  # fmt: skip
                store = RowStore(NativeRows(c, torch.float32), where)
                store.reserve(8)
                made[side, ratio] = (comp, CompressorCarry(ratio, c, ratio == 4, where), store)
        for pos in range(steps):
            a = torch.randn(1, dim, generator=g)
            launch = []
            for ratio in (4, 8):
                comp, carry, store = made["want", ratio]
                with torch.inference_mode():  # the torch ops on the CPU
                    comp.step(a, torch.tensor([pos]), carry, store, torch.float32)
                comp, carry, store = made["got", ratio]
                x = a.to(dev)
                into = store.as_stored(torch.float32) if ratio == 8 else None  # both ways
                launch.append({"kv_new": x @ comp.wkv.T, "gate_new": x @ comp.wgate.T,
                               "ape": comp.ape, "carry": carry, "norm": comp.norm,
                               "inv_freq": comp.rotary.inv_freq, "eps": comp.eps,
                               "out_dtype": torch.float32, "into": into})  # fmt: skip
            at = torch.tensor([pos], device=dev)
            if together:
                entries = compressor_steps(launch, at)
            else:
                entries = [compressor_step(pos=at, **part) for part in launch]
            for ratio, entry in zip((4, 8), entries, strict=True):
                if entry is not None:
                    made["got", ratio][2].put(*entry)
        for ratio in (4, 8):
            (_, want, want_rows), (_, got, got_rows) = made["want", ratio], made["got", ratio]
            closed = steps // ratio  # rows past the closed windows' are scratch
            pairs = [(got_rows.rows()[:closed], want_rows.rows()[:closed])]
            pairs += list(zip(got.tensors(), want.tensors(), strict=True))
            for t, u in pairs:
                if not torch.allclose(t.cpu(), u, rtol=1e-4, atol=1e-5):
                    how = "two in one launch" if together else "one"
                    return f"it gave other values than the torch step on this GPU ({how})"
    return None


def _check_paired_linears(dev: torch.device) -> str | None:
    """`linear_pair` (an FP8 linear with tile scales and a BF16 one in one launch) against
    each alone, bit for bit, and against the float32 products."""
    from flashdesk.engine import quant

    g = torch.Generator().manual_seed(10)
    codes, tiles = quant.quantize_fp8(torch.randn(256, 256, generator=g) * 0.1)
    fp8 = codes.view(torch.float8_e4m3fn).to(dev)
    bf16 = (torch.randn(96, 256, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    xd = x.to(dev)
    pair = linear_pair((xd, fp8, tiles.to(dev), torch.bfloat16), (xd, bf16.to(dev), None,
                                                                  torch.float32))  # fmt: skip
    if pair is None:
        return None  # the shapes take separate launches: nothing runs paired
    alone = (linear(xd, fp8, tiles.to(dev)), linear(xd, bf16.to(dev), out_dtype=torch.float32))
    if not all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(pair, alone, strict=True)):
        return "its two linears in one launch gave other values than each alone on this GPU"
    want = torch.nn.functional.linear(x.float(), bf16.float())
    if not torch.allclose(pair[1].cpu(), want, 1e-4, 1e-4):
        return "its paired BF16 linear gave other values than the float32 product on this GPU"
    return None


def _check_decode_attention(dev: torch.device) -> str | None:
    """`decode_attention` against `Attention.step`'s torch ops (`Attention._sink_attend`), the
    ring filling and full, with and without compressed rows, in one split per part and in
    several (the own slot and masked rows in later splits); in bf16 with the ring write and
    the de-rotation a decode step has the merge do (`keep_own`, `rope`), and the compressed
    rows read where a store holds them (`picks`)."""
    from types import SimpleNamespace

    from flashdesk.engine.model.attention import Attention
    from flashdesk.engine.model.rope import apply_rope_ops

    g = torch.Generator().manual_seed(8)
    heads, dim, w, c = 16, 64, 8, 12  # 16 heads: a group, where DECODE_ATTENTION is "heads"

    def randn(*shape):  # BF16 values, as the runtime's rows (the "heads" kernel's own path)
        return torch.randn(*shape, generator=g).to(torch.bfloat16).float()

    q, own = randn(1, heads, dim), randn(1, dim)
    window, comp = randn(w, dim), randn(c, dim)
    visible = torch.rand(c, generator=g) < 0.6
    layer = SimpleNamespace(sink=torch.randn(heads, generator=g), scale=dim**-0.5)
    for pos, with_comp, split, dtype in (
        (3, False, None, torch.float32), (5, True, None, torch.float32),
        (13, True, None, torch.bfloat16), (6, True, 4, torch.float32),
        (13, True, 4, torch.bfloat16), (13, False, 4, torch.float32),
    ):  # fmt: skip
        keys = window.index_copy(0, torch.tensor([pos % w]), own)
        logits = [torch.einsum("qhd,kd->qhk", q, keys)]
        logits[0][..., torch.arange(w) > pos] = float("-inf")
        values = [keys]
        if with_comp:
            logits.append(torch.einsum("qhd,td->qht", q, comp).masked_fill(~visible, -math.inf))
            values.append(comp)
        want = Attention._sink_attend(layer, logits, values)
        on = [t.to(dev, dtype) for t in (q, window, own, comp)]
        on += [visible.to(dev), layer.sink.to(dev)]
        # the bf16 cases also as a decode step asks: the ring written, the output de-rotated
        fused = dtype == torch.bfloat16
        angles = torch.rand(1, 8, generator=g) * 6.0
        rope = (angles.cos().to(dev), angles.sin().to(dev), dtype) if fused else None
        comp_in, vis_in, picks = on[3], on[4], None
        if fused and with_comp:  # the rows picked where they lie (the store and mask whole)
            order = torch.randperm(c + 5, generator=g)
            comp_in = torch.zeros(c + 5, dim, dtype=dtype).index_copy_(0, order[:c], comp.to(dtype))
            vis_in = torch.zeros(c + 5, dtype=torch.bool).index_copy_(0, order[:c], visible)
            comp_in, vis_in, picks = comp_in.to(dev), vis_in.to(dev), order[:c].to(dev)
        got = decode_attention(
            on[0], on[1], on[2], comp_in if with_comp else None, vis_in if with_comp else None,
            torch.tensor([pos], device=dev), on[5], layer.scale, rows_per_split=split,
            keep_own=fused, rope=rope, picks=picks,
        )  # fmt: skip
        if fused:
            want = apply_rope_ops(want, angles.cos(), angles.sin(), True, dtype).float()
            if not torch.equal(on[1].cpu(), keys.to(dtype)):  # the ring took own at its slot
                return "it wrote the window ring wrongly on this GPU"
            got = got.float()
        tol = {"rtol": 1e-2, "atol": 1e-2} if fused else {"rtol": 1e-4, "atol": 1e-5}
        if not torch.allclose(got.cpu(), want, **tol):
            return "it gave other values than the torch ops on this GPU"
    return None


def _check_hc_mixes(dev: torch.device) -> str | None:
    """`hc_mixes` against `mhc._mixes`' torch ops; and the mixes as `hc_post(then=)` sums them
    in parts and `hc_pre_tail` finishes them (two column blocks' parts) against the torch
    update and collapse."""
    from flashdesk.engine.model import mhc

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 128, generator=g).to(torch.bfloat16)
    fn = torch.randn(24, 512, generator=g) * 0.05
    want = mhc._mixes(x, fn, 1e-6)
    if not torch.allclose(hc_mixes(x.to(dev), fn.to(dev), 1e-6).cpu(), want, 1e-4, 1e-5):
        return "it gave other values than the torch ops on this GPU"
    _, streams, w, _, _, fn, mix_scale, base, _ = _elementwise_case(9)
    streams = streams.repeat(1, 1, 4)  # 512 columns: 2 programs' parts
    fn, w = fn.unflatten(1, (4, 128)).repeat(1, 1, 4).flatten(1), w.repeat(4)
    f = torch.randn(2, 512, generator=g)
    post, comb = torch.rand(2, 4, generator=g), torch.rand(2, 4, 4, generator=g)
    on = [t.to(dev) for t in (f, streams, post, comb, fn, mix_scale, base, w)]
    new, parts = hc_post(*on[:4], then=on[4])
    new = new.cpu()
    got = hc_pre_tail(parts, new.to(dev), on[5], on[6], 20, 1e-6, on[7], 1e-6)
    want = mhc.hc_pre_ops(new, fn, mix_scale, base, 20, 1e-6, 1e-6, w)  # of the same streams
    close = torch.allclose(new, mhc.hc_post_ops(f, streams, post, comb), 1e-4, 1e-5)
    if not close or not all(
        torch.allclose(a.cpu(), b, 1e-4, 1e-5) for a, b in zip(got, want, strict=True)
    ):
        return "the mixes summed by the hyper-connection update gave other values on this GPU"
    return None


def _check_fused_norms(dev: torch.device) -> str | None:
    """The RMSNorms inside RoPE (`norm_rope`, and `norm_ropes`' three parts in one launch),
    inside the hyper-connection collapse (`hc_pre_tail(norm=)`, and the head's,
    `hc_head_tail`) and inside a linear (`linear(norm=)`) against the torch ops: a failure
    leaves the norms (and those RoPE parts) their own launches."""
    from flashdesk.engine import quant
    from flashdesk.engine.model import mhc
    from flashdesk.engine.model.common import rms_norm as rms_norm_ops
    from flashdesk.engine.model.rope import apply_rope as rope_ops

    g, x, w, cos, sin, fn, mix_scale, base, mixes = _elementwise_case(8)
    u = mhc.hc_pre(x, fn, mix_scale, base, 20, 1e-6, 1e-6)[0]
    xd, wd, cosd, sind = (t.to(dev) for t in (x, w, cos, sin))
    roped = _rope(xd, cosd, sind, False, None, (wd, 1e-6))
    if not torch.allclose(roped.cpu(), rope_ops(rms_norm_ops(x, w, 1e-6), cos, sin), 1e-4, 1e-5):
        return "its RMSNorm inside RoPE gave other values than the torch ops on this GPU"
    parts = (x, x[:, 0], x[:, :2, :64])  # per head normed, normed · w, roped only
    want = [rope_ops(rms_norm_ops(parts[0], None, 1e-6), cos, sin),
            rope_ops(rms_norm_ops(parts[1], w, 1e-6), cos, sin), rope_ops(parts[2], cos, sin)]  # fmt: skip
    on_dev = [(parts[0].to(dev), None, True), (parts[1].to(dev), wd, True),
              (parts[2].to(dev), None, False)]  # fmt: skip
    for got, ref in zip(_norm_ropes(on_dev, 1e-6, cosd, sind), want, strict=True):
        if not torch.allclose(got.cpu(), ref, 1e-4, 1e-5):
            return "its RMSNorms and RoPE of three tensors in one launch gave other values"
    on = (mixes.to(dev), xd, mix_scale.to(dev), base.to(dev))
    collapsed = _hc_pre(*on, 20, 1e-6, wd, 1e-6)[0]
    if not torch.allclose(collapsed.cpu(), rms_norm_ops(u, w, 1e-6), 1e-4, 1e-5):
        return "its RMSNorm inside the hyper-connection collapse gave other values on this GPU"
    head_fn, head_scale = fn[:4], mix_scale[:1]
    head = mhc.hc_head(x, head_fn, head_scale, base[:4], 1e-6, 1e-6)
    on = (mhc._mixes(x, head_fn, 1e-6).to(dev), xd, head_scale.to(dev), base[:4].to(dev))
    if not torch.allclose(_hc_head_tail(*on, 1e-6, wd, 1e-6).cpu(), rms_norm_ops(head, w, 1e-6),
                          1e-4, 1e-5):  # fmt: skip
        return "its RMSNorm inside the head's collapse gave other values on this GPU"
    codes, tiles = quant.quantize_fp8(torch.randn(256, 128, generator=g) * 0.1)
    weight = quant.dequant_fp8(codes, tiles, dtype=torch.float32)
    rows = x[:, 0]  # [2, 128]
    want = torch.nn.functional.linear(rms_norm_ops(rows, w, 1e-6), weight)
    got = linear(rows.to(dev), codes.view(torch.float8_e4m3fn).to(dev), tiles.to(dev),
                 kind="rows", norm=(wd, 1e-6))  # fmt: skip
    if not torch.allclose(got.cpu(), want, 1e-4, 1e-4):
        return "its RMSNorm inside an FP8 linear gave other values on this GPU"
    return None


def moe_q8_reference(x, experts, weights, slot_of, stacks, limit) -> torch.Tensor:
    """What `moe` computes in MODE 4, as torch ops on the CPU: x and each h quantized to int8
    per 32 values (`quant.quantize_q8`), the FP4 weights dequantized, float32 sums → `[T, D]`
    over the picks whose slot is not −1 (the tests' and the sweep's reference)."""
    from flashdesk.engine import quant
    from flashdesk.engine.model.moe import swiglu

    def q8(v):
        q, step = quant.quantize_q8(v)
        return (q.float().view(*step.shape, 32) * step[..., None]).view(v.shape)

    w1, s1, w3, s3, w2, s2 = (t.cpu() for t in stacks)
    x, experts, weights, slot_of = (t.cpu() for t in (x, experts, weights, slot_of))
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        xt = q8(x[t].float())
        for j in range(experts.shape[1]):
            s = int(slot_of[experts[t, j]])
            if s >= 0:
                gate = quant.dequant_fp4(w1[s], s1[s]) @ xt
                up = quant.dequant_fp4(w3[s], s3[s]) @ xt
                h = q8(swiglu(gate, up, limit) * weights[t, j].float())
                out[t] += quant.dequant_fp4(w2[s], s2[s]) @ h
    return out


def _check_q8_moe(dev: torch.device) -> str | None:
    """`moe` MODE 4 (inline PTX: byte permutes and dp4a) against `moe_q8_reference`: two
    tokens, six picks of which some are not resident, every code and a spread of scales."""
    g = torch.Generator().manual_seed(11)
    slots, dim, inter = 4, 256, 64
    stacks = []
    for rows, k in ((inter, dim), (inter, dim), (dim, inter)):
        stacks += [
            torch.randint(0, 256, (slots, rows, k // 2), generator=g, dtype=torch.uint8),
            torch.randint(119, 131, (slots, rows, k // 32), generator=g, dtype=torch.uint8),
        ]
    slot_of = torch.tensor([2, -1, 0, -1, 3, 1, -1, -1], dtype=torch.int32)
    experts = torch.tensor([[0, 1, 2, 4, 5, 7], [5, 4, 3, 2, 6, 0]])
    weights = torch.rand(2, 6, generator=g) + 0.1
    x = (torch.randn(2, dim, generator=g) / 4).to(torch.bfloat16)
    want = moe_q8_reference(x, experts, weights, slot_of, stacks, 10.0)
    on = (t.to(dev) for t in (x, experts, weights, slot_of))
    got = moe(*on, tuple(t.to(dev) for t in stacks), 10.0, tiles=(32, 64, 32, 32),
              mode=(4, 0, 1))  # fmt: skip
    # an h within float rounding of a tie between two codes may round either way (a step of
    # its block); wrong permutes or scales are off by the whole output
    if not torch.isfinite(got).all() or (got.cpu() - want).norm() > 1e-2 * want.norm():
        return "its integer dots gave other values than the int8 reference on this GPU"
    return None


def _check_route(dev: torch.device) -> str | None:
    """`route` against `moe.Router`'s torch ops (its gate the identity, exact in float32), top-k
    and hash routing."""
    from flashdesk.engine.model.moe import Router

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 256, generator=g) * 2
    ids = torch.tensor([0, 5, 9])
    table = torch.randint(0, 256, (10, 6), generator=g)
    for bias, tid2eid in ((torch.randn(256, generator=g) * 0.1, None), (None, table)):
        router = Router(weight=torch.eye(256), bias=bias, tid2eid=tid2eid, top_k=6, scale=1.5)
        want = router(logits, ids)
        picked = tid2eid[ids].to(dev) if tid2eid is not None else None
        got = route(logits.to(dev), None if bias is None else bias.to(dev), picked, 6, 1.5)
        if not torch.equal(got[0].cpu(), want[0]) or not torch.allclose(
            got[1].cpu(), want[1], 1e-5, 1e-6
        ):
            return "it picked other experts or weights than the torch router on this GPU"
    return None


def _check_record_picks(dev: torch.device) -> str | None:
    """`record_picks` against `RoutingLog.record` and the host's share as torch ops: repeated
    experts across tokens (the atomic counts), with and without a device cache and experts read
    in place."""
    from flashdesk.engine.runtime_experts import RoutingLog

    experts = torch.tensor([[3, 7, 1], [7, 0, 3]])
    resident = torch.zeros(8, dtype=torch.bool)
    resident[[1, 7]] = True
    in_place = torch.zeros(8, dtype=torch.bool)
    in_place[0] = True
    for cache, read in ((None, None), (resident, None), (resident, in_place), (None, in_place)):
        want, got = RoutingLog(2, 8, torch.device("cpu")), RoutingLog(2, 8, dev)
        on = None if cache is None else cache[experts]
        want.record(1, experts, on)
        want_host = experts if on is None else experts.masked_fill(on, -1)
        want_host = want_host if read is None else want_host.masked_fill(read[experts], -1)
        host = record_picks(experts.to(dev), None if cache is None else cache.to(dev),
                            got.counts[1], got.device_picks, got.total_picks,
                            in_place=None if read is None else read.to(dev))  # fmt: skip
        pairs = [(host, want_host), (got.counts, want.counts), (got.total_picks, want.total_picks)]
        pairs.append((got.device_picks, want.device_picks))
        if not all(torch.equal(a.cpu(), b) for a, b in pairs):
            return "it logged other routing counts than the torch ops on this GPU"
    return _route_and_record_mismatch(dev)


def _route_and_record_mismatch(dev: torch.device) -> str | None:
    """`route(record=)` (routing and its log in one launch, a program per token: atomics)
    against `route` then `record_picks` on the CPU's torch path: three tokens, top-k and hash."""
    from flashdesk.engine.model.moe import Router
    from flashdesk.engine.runtime_experts import RoutingLog

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 64, generator=g)
    resident, in_place = torch.rand(64, generator=g) < 0.3, torch.rand(64, generator=g) < 0.2
    table = torch.randint(0, 64, (10, 6), generator=g)
    for bias, tid2eid in ((torch.randn(64, generator=g) * 0.1, None), (None, table)):
        router = Router(weight=torch.eye(64), bias=bias, tid2eid=tid2eid, top_k=6, scale=1.5)
        want_e, want_w = router(logits, torch.tensor([0, 5, 9]))
        want = RoutingLog(1, 64, torch.device("cpu"))
        want.record(0, want_e, resident[want_e])
        want_host = want_e.masked_fill(resident[want_e] | in_place[want_e], -1)
        got = RoutingLog(1, 64, dev)
        record = RoutingRecord(got.counts[0], got.device_picks, got.total_picks,
                               resident.to(dev), in_place.to(dev))  # fmt: skip
        picked = tid2eid[torch.tensor([0, 5, 9])].to(dev) if tid2eid is not None else None
        e, w, host = route(logits.to(dev), None if bias is None else bias.to(dev), picked, 6, 1.5,
                           record)  # fmt: skip
        same = [(e, want_e), (host, want_host), (got.counts, want.counts)]
        same += [(got.total_picks, want.total_picks), (got.device_picks, want.device_picks)]
        if not all(torch.equal(a.cpu(), b) for a, b in same) or not torch.allclose(
            w.cpu(), want_w, 1e-5, 1e-6
        ):
            return "its routing and log in one launch differ from the two launches on this GPU"
    return None


def _check_index_scores(dev: torch.device) -> str | None:
    """`index_scores` against `Indexer.scores` and the visible mask as torch ops, bf16 and
    float32, a store partly visible and one with more rows than a program takes."""
    from flashdesk.engine.model.indexer import Indexer

    g = torch.Generator().manual_seed(9)
    for dtype, rows, pos in ((torch.bfloat16, 40, 93), (torch.float32, 130, 301)):
        q = torch.randn(16, 32, generator=g).to(dtype)
        w = torch.randn(16, generator=g).to(dtype)
        keys = torch.randn(rows, 32, generator=g).to(dtype)
        want = Indexer.scores(q.float()[None], (w.float() * 0.125)[None], keys)[0]
        want[torch.arange(rows) >= (pos + 1) // 4] = float("-inf")
        on = (q.to(dev), w.to(dev), 0.125, keys.to(dev), torch.tensor([pos], device=dev), 4)
        if not torch.allclose(index_scores(*on).cpu(), want, rtol=1e-4, atol=1e-4):
            return "it gave other index scores than the torch ops on this GPU"
        # three queries of a prompt at once, each with its own visible count
        qs = torch.randn(3, 16, 32, generator=g).to(dtype)
        ws = torch.randn(3, 16, generator=g).to(dtype)
        at = torch.tensor([pos - 9, pos - 4, pos])
        want3 = Indexer.scores(qs.float(), ws.float() * 0.125, keys)
        want3[torch.arange(rows)[None, :] >= ((at + 1) // 4)[:, None]] = float("-inf")
        on3 = (qs.to(dev), ws.to(dev), 0.125, keys.to(dev), at.to(dev), 4)
        if not torch.allclose(index_scores(*on3).cpu(), want3, rtol=1e-4, atol=1e-4):
            return "it gave other index scores than the torch ops on this GPU (several queries)"
        # the same keys as FP8 codes with a scale per key (`cache.Fp8KeyRows`)
        from flashdesk.engine.cache import Fp8KeyRows

        codes, kscale = Fp8KeyRows(32).encode(keys)
        decoded = Fp8KeyRows(32).decode((codes, kscale))
        want = Indexer.scores(q.float()[None], (w.float() * 0.125)[None], decoded)[0]
        want[torch.arange(rows) >= (pos + 1) // 4] = float("-inf")
        on = (*on[:3], codes.to(dev), on[4], 4, kscale.to(dev))
        if not torch.allclose(index_scores(*on).cpu(), want, rtol=1e-3, atol=1e-3):
            return "it gave other index scores than the torch ops on this GPU (FP8 keys)"
    return None


def _check_fp8_rows(dev: torch.device) -> str | None:
    """`fp8_rows_put` / `fp8_rows_read` against `cache.Fp8Rows`' torch encode and decode, bit
    for bit: rows of every magnitude (zeros, FP8 subnormals, large), written at scattered rows
    and read back whole and gathered."""
    from flashdesk.engine.cache import Fp8Rows

    g = torch.Generator().manual_seed(8)
    codec = Fp8Rows(512, 64, torch.bfloat16)
    rows = (
        torch.randn(6, 512, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0, 1.0])[:, None]
    )
    rows[5, :64] = 0.0
    rows = rows.to(torch.bfloat16)
    index = torch.tensor([3, 0, 7, 5, 1, 2])
    want = codec.empty(8, "cpu")
    for buf, enc in zip(want, codec.encode(rows), strict=True):
        buf.index_copy_(0, index, enc)
    got = codec.empty(8, dev)
    fp8_rows_put(got, rows.to(dev), index.to(dev))
    if not all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True)):
        return "it encoded other FP8 KV rows than the torch ops on this GPU"
    pick = torch.tensor([7, 3, 3, 0])
    for sel in (None, pick):
        read = fp8_rows_read(got, None if sel is None else sel.to(dev), torch.bfloat16)
        ref = codec.decode(want if sel is None else tuple(p[sel] for p in want))
        if not torch.equal(read.cpu(), ref):
            return "it decoded other FP8 KV rows than the torch ops on this GPU"
    return None


def fallback_notes(device: torch.device | str) -> list[str]:
    """In words, for the runtime's notes: the kernels that failed their check on `device` and
    the slower path each left in place."""
    key = str(torch.device(device))
    notes = []
    if TENSOR_CORES.get(key):
        notes.append(
            f"prompts' experts run through torch's dequantize-then-multiply, slower: "
            f"{TENSOR_CORES[key]}"
        )
    for (name, where), reason in FAILED_CHECKS.items():
        if where == key and reason:
            what = _FALLBACKS.get(name, f"the {name} runs as separate kernels")
            notes.append(f"{what}, slower per token: {reason}")
    return notes


# what a failed check leaves in place, where it is not the same work in separate kernels
_FALLBACKS = {
    "FP4 int8 dots": "the VRAM experts take the float decode, not integer dots",
    "paired linears": "the linears of a decode step's attention input run in two launches",
}


def tensor_cores(device: torch.device | str) -> bool:
    """Whether the tensor-core kernels (`moe_grouped`, `moe_by_pick`, `linear` "dot") are used
    on `device`: the others are, and these compiled and gave the right values there."""
    return available(device) and TENSOR_CORES.get(str(torch.device(device))) is None


def _probe_tensor_cores(dev: torch.device) -> str | None:
    """Check the tensor-core kernels once on small inputs against dequantize-then-multiply; a
    failure keeps prompts' experts on torch's path and decode on the other kernels."""
    from flashdesk.engine import quant
    from flashdesk.engine.model.moe import swiglu

    g = torch.Generator().manual_seed(3)
    dim, inter = 64, 32
    stack = [
        torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        if i % 2 == 0
        else torch.randint(124, 130, shape, generator=g, dtype=torch.uint8)
        for i, shape in enumerate(
            [(1, inter, dim // 2), (1, inter, dim // 32)] * 2 + [(1, dim, inter // 2), (1, dim, 1)]
        )
    ]
    x = (torch.randn(3, dim, generator=g) / 4).to(torch.bfloat16)
    w1, w3, w2 = (quant.dequant_fp4(stack[i][0], stack[i + 1][0]) for i in (0, 2, 4))
    xf = x.float()
    want = swiglu(xf @ w1.T, xf @ w3.T, 10.0).to(torch.bfloat16).float() @ w2.T
    codes, scale = quant.quantize_fp8(torch.randn(64, 128, generator=g))
    want_lin = xf[:, :64].repeat(1, 2) @ quant.dequant_fp8(codes, scale).T
    try:
        picks = torch.arange(3, device=dev)
        out = torch.zeros((3, dim), device=dev)
        table = torch.tensor([[0, 0, 3]], dtype=torch.int32, device=dev)
        on = [t.to(dev) for t in stack]
        moe_grouped(x.to(dev), picks, table, torch.ones(3, device=dev), on, 10.0, out)
        lin = linear(
            x[:, :64].repeat(1, 2).to(dev), codes.view(torch.float8_e4m3fn).to(dev),
            scale.to(dev), out_dtype=torch.float32, kind="dot",
        )  # fmt: skip
        for got, ref in ((out, want), (lin, want_lin)):
            if (got.cpu() - ref).norm() > 2e-2 * ref.norm():
                return "Triton's tensor-core kernels gave wrong values on this GPU"
    except Exception as exc:
        return f"Triton's tensor-core kernels could not compile or run ({error_summary(exc)})"
    return None


def _apply_tuning(dev: torch.device) -> None:
    """Take the kernel shapes `bench gpu-kernels` recorded for this GPU model, if any
    (FLASHDESK_GPU_TUNING=0: keep the built-in ones)."""
    from flashdesk.engine import gpu_tuning

    if os.environ.get("FLASHDESK_GPU_TUNING", "1") == "0":
        return
    choices = gpu_tuning.load(torch.cuda.get_device_name(dev))
    globals().update(choices)
    TUNED[str(dev)] = choices


def _probe(dev: torch.device) -> str | None:
    """Compile and run small kernels: Triton builds its launcher with the system's C compiler
    on first use, which a desktop may lack, and the elementwise kernels replace torch in every
    forward, so each is checked once against its torch definition; a failure here leaves the
    runtime on torch's path."""
    from flashdesk.engine import quant

    packed = torch.arange(512).remainder(256).to(torch.uint8).view(16, 32)  # every byte twice
    scale = torch.full((16, 2), 128, dtype=torch.uint8)  # ×2
    try:
        got = dequant_fp4(packed.to(dev), scale.to(dev), torch.float32).cpu()
        if not torch.equal(got, quant.dequant_fp4(packed, scale)):
            return "Triton's kernels gave wrong values on this GPU"
        wrong = _elementwise_mismatch(dev)
        if wrong:
            return f"Triton's {wrong} kernel gave wrong values on this GPU"
        codes, tiles = quant.quantize_fp8(torch.linspace(-3, 3, 128 * 256).view(128, 256))
        x = torch.linspace(-1, 1, 256)[None]
        got = linear(x.to(dev), codes.view(torch.float8_e4m3fn).to(dev), tiles.to(dev),
                     out_dtype=torch.float32, kind="rows")  # fmt: skip
        want = x @ quant.dequant_fp8(codes, tiles).T
        if (got.cpu() - want).norm() > 1e-5 * want.norm():
            return "Triton's FP8 linear gave wrong values on this GPU"
    except Exception as exc:  # no C compiler, driver or PTX mismatch, ...: keep torch's path
        return f"Triton could not compile or run its kernels here ({error_summary(exc)})"
    return None


def _elementwise_case(seed: int) -> tuple:
    """Small inputs for the elementwise kernels' checks → (the generator, for more; streams x
    `[2, 4, 128]`, a norm weight `[128]`, the angles of two positions `[2, 16]` each, the mixes'
    fn, scale and base, and the mixes)."""
    from flashdesk.engine.model import mhc
    from flashdesk.engine.model.rope import Rotary, inverse_frequencies

    g = torch.Generator().manual_seed(seed)
    hc, dim = 4, 128
    x = torch.randn(2, hc, dim, generator=g)
    w = torch.rand(dim, generator=g) + 0.5
    cos, sin = Rotary(32, inverse_frequencies(32, 10000.0)).cos_sin(torch.tensor([3, 900]))
    fn = torch.randn((2 + hc) * hc, hc * dim, generator=g) * 0.05
    mix_scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + hc) * hc, generator=g)
    return g, x, w, cos, sin, fn, mix_scale, base, mhc._mixes(x, fn, 1e-6)


def _elementwise_mismatch(dev: torch.device) -> str | None:
    """The first of the elementwise kernels whose values on `dev` differ from the torch
    definitions (computed on the CPU), or None."""
    from flashdesk.engine.model import mhc, moe
    from flashdesk.engine.model.common import rms_norm as rms_norm_ops
    from flashdesk.engine.model.rope import apply_rope as rope_ops

    g, x, w, cos, sin, fn, mix_scale, base, mixes = _elementwise_case(0)
    hc, dim = x.shape[1:]
    u, post, comb = mhc.hc_pre(x, fn, mix_scale, base, 20, 1e-6, 1e-6)
    f = torch.randn(2, dim, generator=g)
    parts = torch.randn(2, 3, dim, generator=g)
    on = [t.to(dev) for t in (x, w, cos, sin, mixes, mix_scale, base, f, post, comb, parts)]
    xd, wd, cosd, sind, mixd, scd, based, fd, postd, combd, partsd = on
    checks = {
        "RMSNorm": (rms_norm(xd, wd, 1e-6), rms_norm_ops(x, w, 1e-6)),
        "RoPE": (apply_rope(xd, cosd, sind, True), rope_ops(x, cos, sin, True)),
        "Sinkhorn": (sinkhorn(mixd[:, 8:].reshape(2, hc, hc), 20, 1e-6),
                     mhc.sinkhorn_ops(mixes[:, 8:].reshape(2, hc, hc), 20, 1e-6)),
        "hyper-connection collapse": (
            torch.cat([t.flatten() for t in hc_pre_tail(mixd, xd, scd, based, 20, 1e-6)]),
            torch.cat([t.flatten() for t in (u, post, comb)]),
        ),
        "hyper-connection update": (hc_post(fd, xd, postd, combd), mhc.hc_post(f, x, post, comb)),
        "hyper-connection update with the experts' sums": (
            hc_post(fd, xd, postd, combd, add=partsd),
            mhc.hc_post((f + parts.sum(1)), x, post, comb),
        ),
        "a host layer's device share summed": (
            sum_parts(fd.to(torch.bfloat16), (partsd, partsd[:, :2]), torch.empty_like(fd)),
            f.to(torch.bfloat16).float() + parts.sum(1) + parts[:, :2].sum(1),
        ),
        "SwiGLU": (torch.cat([swiglu(xd[:, 0] * 9, xd[:, 1] * 9, lim, torch.float32)
                              for lim in (0.0, 7.0)]),
                   torch.cat([moe.swiglu(x[:, 0] * 9, x[:, 1] * 9, lim) for lim in (0.0, 7.0)])),
        "compressor pooling": (softmax_pool((xd[:, 0], xd[:, 1]), (xd[:, 2], xd[:, 3])),
                               (torch.cat((x[:, 0], x[:, 2]))
                                * torch.cat((x[:, 1], x[:, 3])).softmax(0)).sum(0, keepdim=True)),
    }  # fmt: skip
    for name, (got, want) in checks.items():
        if not torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5):
            return name
    return None


def error_summary(exc: BaseException) -> str:
    """`Type: first line of the message` (200 characters at most), for notes shown to users."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


if triton is not None:
    # the interpreter runs no inline asm: kernels that use it take another path there
    _INTERPRETED = tl.constexpr(INTERPRETED)

    @triton.jit
    def _await_inputs(PDL: tl.constexpr):
        """With programmatic dependent launch (`PDL`, sm_90 on) a kernel may start while the one
        before it in the stream still runs: it waits here, before its first memory access, until
        that kernel has finished and its writes are visible, and lets the next kernel start
        launching in turn. Only the launches' own latency overlaps; no read or write moves."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _e2m1(code):
        """int32 codes 0..15 → their E2M1 values as float32 (bits built directly)."""
        mag = code & 7
        e = mag >> 1
        m = mag & 1
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        bits = bits | ((code & 8) << 28)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nibbles(b, F16: tl.constexpr):
        """Packed bytes (int32) → (low, high) nibble values as float32; with F16 the values are
        2⁻¹⁴ of E2M1's (float16 bits: sign, then e1 e0 m into the exponent's and mantissa's low
        bits; the caller scales by 2¹⁴), fewer integer operations than `_e2m1`."""
        if F16:
            lo = ((b & 7) << 9) | ((b & 8) << 12)
            hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
            lo = lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            return lo, hi
        return _e2m1(b & 15), _e2m1(b >> 4)

    @triton.jit
    def _e8m0(byte):
        """E8M0 scale bytes → 2^(b−127) as float32 (byte 0 reads as 0: below float32's normals)."""
        return (byte.to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _e4m3_scaled(code):
        """E4M3 codes (int32 of the byte) → 2⁻⁸ of their values as float32, through float16 bits
        (the sign, then the exponent and mantissa fields shifted into the half's; subnormals
        included): no fp8 type needed, which Triton lacks before Ada. The NaN codes 0x7F/0xFF
        read as ±480 (× 2⁻⁸), which no encoder here writes."""
        bits = ((code & 0x7F) << 7) | ((code & 0x80) << 8)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _e4m3(code):
        """E4M3 codes (int32 of the byte) → their float32 values, on any GPU."""
        return _e4m3_scaled(code) * 256.0

    @triton.jit
    def _f16_pair(p):
        """int32 holding two float16 bit patterns → (low half, high half) as float32."""
        lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _bf16_pair(p):
        """int32 holding two bfloat16 bit patterns → (low, high) as float32 (exact bit moves)."""
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _words_x(x_ptr, words):
        """x[8j + i] for word indices j `[BW]` → 8 tensors `[BW]` float32 (i = 0..7); BF16 x
        read as int32 pairs (4 loads, bit moves), other types value by value."""
        if x_ptr.dtype.element_ty == tl.bfloat16:
            xw = x_ptr.to(tl.pointer_type(tl.int32)) + 4 * words
            x0, x1 = _bf16_pair(tl.load(xw))
            x2, x3 = _bf16_pair(tl.load(xw + 1))
            x4, x5 = _bf16_pair(tl.load(xw + 2))
            x6, x7 = _bf16_pair(tl.load(xw + 3))
        else:
            xv = x_ptr + 8 * words
            x0, x1 = tl.load(xv).to(tl.float32), tl.load(xv + 1).to(tl.float32)
            x2, x3 = tl.load(xv + 2).to(tl.float32), tl.load(xv + 3).to(tl.float32)
            x4, x5 = tl.load(xv + 4).to(tl.float32), tl.load(xv + 5).to(tl.float32)
            x6, x7 = tl.load(xv + 6).to(tl.float32), tl.load(xv + 7).to(tl.float32)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _fp8_weights(w):
        """Loaded FP8 weights → float32: as the fp8e4nv type (Ada and later), or from E4M3 code
        bytes on older GPUs, whose Triton has no such type (`_e4m3_scaled`: 2⁻⁸ of the value,
        the factor given back by `_fp8_unit` in the tile scale, not per weight)."""
        if w.dtype == tl.uint8:
            return _e4m3_scaled(w.to(tl.int32))
        return w.to(tl.float32)

    @triton.jit
    def _fp8_unit(w_ptr):
        """What `_fp8_weights`' values are to be multiplied by."""
        return 256.0 if w_ptr.dtype.element_ty == tl.uint8 else 1.0

    @triton.jit
    def _fp4_words_dot(
        w_ptr, s_ptr, x_ptr, rows, K: tl.constexpr, BW: tl.constexpr, STAGES: tl.constexpr
    ):
        """`_fp4_rows_dot` reading the rows as int32 words of eight E2M1 codes (MODE 2).

        A word's byte b holds values 2b (low nibble) and 2b+1; values 0 and 4 sit in the low
        nibbles of bytes 0 and 2, one per 16-bit half, so two masks and two shifts turn them into
        a pair of float16 bit patterns at once (2⁻¹⁴ of E2M1, as `_nibbles`), four such pairs per
        word: about half the instructions per weight of the byte-wise decode, whose SASS for
        sm_90 spent 10.4 instructions per weight, 5.2 here (tests/_compile_kernels.py reports
        both). The products and sums stay float32."""
        BN: tl.constexpr = rows.shape[0]
        NB: tl.constexpr = BW // 4  # 32-value blocks per step
        wp = w_ptr.to(tl.pointer_type(tl.int32))
        acc = tl.zeros((BN, NB), dtype=tl.float32)
        for kw in tl.range(0, K // 8, BW, num_stages=STAGES):
            words = kw + tl.arange(0, BW)
            w = tl.load(wp + rows[:, None] * (K // 8) + words[None, :])
            x0, x1, x2, x3, x4, x5, x6, x7 = _words_x(x_ptr, words)
            a0, a4 = _f16_pair(((w << 9) & 0x0E000E00) | ((w << 12) & -2147450880))
            a1, a5 = _f16_pair(((w << 5) & 0x0E000E00) | ((w << 8) & -2147450880))
            a2, a6 = _f16_pair(((w << 1) & 0x0E000E00) | ((w << 4) & -2147450880))
            a3, a7 = _f16_pair(((w >> 3) & 0x0E000E00) | (w & -2147450880))
            part = a0 * x0[None, :]
            part = a1 * x1[None, :] + part
            part = a2 * x2[None, :] + part
            part = a3 * x3[None, :] + part
            part = a4 * x4[None, :] + part
            part = a5 * x5[None, :] + part
            part = a6 * x6[None, :] + part
            part = a7 * x7[None, :] + part
            blocks = kw // 4 + tl.arange(0, NB)
            scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + blocks[None, :]))
            acc += tl.sum(tl.reshape(part, (BN, NB, 4)), axis=2) * scale
        return tl.sum(acc, axis=1) * 16384.0

    @triton.jit
    def _fp4_rows_dot(
        w_ptr, s_ptr, x_ptr, rows, K: tl.constexpr, BKB: tl.constexpr,
        MODE: tl.constexpr, F16: tl.constexpr, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Σ_k W[rows, k] · x[k] for packed rows `[BN, K/2]` bytes, scales `[BN, K/32]`;
        STAGES steps in flight (FP4_STAGES)."""
        if MODE == 2:
            return _fp4_words_dot(w_ptr, s_ptr, x_ptr, rows, K, BKB // 4, STAGES)
        BN: tl.constexpr = rows.shape[0]
        NB: tl.constexpr = BKB // 16  # 32-value blocks per step
        acc = tl.zeros((BN,), dtype=tl.float32)
        for kb in tl.range(0, K // 2, BKB, num_stages=STAGES):
            blocks = kb // 16 + tl.arange(0, NB)
            scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + blocks[None, :]))
            if F16:
                scale = scale * 16384.0
            if MODE == 0:
                cols = kb + tl.arange(0, BKB)
                b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :]).to(tl.int32)
                xe = tl.load(x_ptr + 2 * cols).to(tl.float32)
                xo = tl.load(x_ptr + 2 * cols + 1).to(tl.float32)
                lo, hi = _nibbles(b, F16)
                part = lo * xe[None, :] + hi * xo[None, :]
                per_block = tl.sum(tl.reshape(part, (BN, NB, 16)), axis=2)
            else:
                byte = blocks[:, None] * 16 + tl.arange(0, 16)[None, :]  # [NB, 16]
                ptrs = w_ptr + rows[:, None, None] * (K // 2) + byte[None, :, :]
                b = tl.load(ptrs).to(tl.int32)  # [BN, NB, 16]
                xe = tl.load(x_ptr + 2 * byte).to(tl.float32)
                xo = tl.load(x_ptr + 2 * byte + 1).to(tl.float32)
                lo, hi = _nibbles(b, F16)
                per_block = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
            acc += tl.sum(per_block * scale, axis=1)
        return acc

    @triton.jit
    def _gate_up_kernel(
        x_ptr, xd_ptr, experts_ptr, weights_ptr, slot_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr,
        h_ptr, hd_ptr, limit, TOPK: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
        BN: tl.constexpr, BKB: tl.constexpr, MODE: tl.constexpr, F16: tl.constexpr,
        PDL: tl.constexpr = False, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """Program (pick, row block): h = weight · SwiGLU(W1 x, W3 x) for BN rows. MODE 4 (the
        integer dots): x as int8 with its block steps at xd_ptr, h written as int8 with a step
        per 32 at hd_ptr (BN a multiple of 32), F16 meaning gate and up in one loop; the float
        modes read x and write float32 h (xd_ptr, hd_ptr unused)."""
        _await_inputs(PDL)
        pair = tl.program_id(0)  # token · TOPK + pick
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        slot = tl.load(slot_ptr + tl.load(experts_ptr + pair)).to(tl.int64)
        if slot >= 0:
            x_row = x_ptr + (pair // TOPK) * D
            w_off = slot * (INTER * (D // 2))
            s_off = slot * (INTER * (D // 32))
            w1, s1, w3, s3 = w1_ptr + w_off, s1_ptr + s_off, w3_ptr + w_off, s3_ptr + s_off
            if MODE == 4:
                xd = xd_ptr + (pair // TOPK) * (D // 32)
                if F16:
                    g, u = _fp4_q8_dot2(w1, s1, w3, s3, x_row, xd, rows, D, BKB // 4, STAGES)
                else:
                    g = _fp4_q8_dot(w1, s1, x_row, xd, rows, D, BKB // 4, STAGES)
                    u = _fp4_q8_dot(w3, s3, x_row, xd, rows, D, BKB // 4, STAGES)
            else:
                g = _fp4_rows_dot(w1, s1, x_row, rows, D, BKB, MODE, F16, STAGES)
                u = _fp4_rows_dot(w3, s3, x_row, rows, D, BKB, MODE, F16, STAGES)
            if limit > 0:
                g = tl.minimum(g, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            h = g * tl.sigmoid(g) * u * tl.load(weights_ptr + pair)
            if MODE == 4:
                first = pair * INTER + tl.program_id(1) * BN
                _store_q8(h, h_ptr + first, hd_ptr + first // 32)
            else:
                tl.store(h_ptr + pair * INTER + rows, h)

    @triton.jit
    def _down_kernel(
        h_ptr, hd_ptr, experts_ptr, slot_ptr, w2_ptr, s2_ptr, out_ptr,
        TOPK: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
        BN: tl.constexpr, BKB: tl.constexpr, MODE: tl.constexpr, F16: tl.constexpr,
        SPLIT: tl.constexpr, PDL: tl.constexpr = False, STAGES: tl.constexpr = 1,
    ):  # fmt: skip
        """SPLIT 0: program (token, row block) sums the token's picks → out `[T, D]`; SPLIT 1:
        program (pick, row block) → its pick's part, out `[T·TOPK, D]`. MODE 4: h as int8 with
        its block steps at hd_ptr (the gate/up kernel's)."""
        _await_inputs(PDL)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN,), dtype=tl.float32)
        picks: tl.constexpr = 1 if SPLIT else TOPK
        for j in tl.static_range(picks):
            pair = tl.program_id(0) if SPLIT else tl.program_id(0) * TOPK + j
            slot = tl.load(slot_ptr + tl.load(experts_ptr + pair)).to(tl.int64)
            if slot >= 0:
                w_at, s_at = w2_ptr + slot * (D * (INTER // 2)), s2_ptr + slot * (D * (INTER // 32))
                h_row = h_ptr + pair * INTER
                if MODE == 4:
                    hd = hd_ptr + pair * (INTER // 32)
                    acc += _fp4_q8_dot(w_at, s_at, h_row, hd, rows, INTER, BKB // 4, STAGES)
                else:
                    acc += _fp4_rows_dot(w_at, s_at, h_row, rows, INTER, BKB, MODE, F16, STAGES)
        tl.store(out_ptr + tl.program_id(0) * D + rows, acc)

    # `_fp4_dot8` in PTX. m: the codes' magnitudes (bits 0-2 of each nibble; prmt reads a
    # selector nibble's bit 3 as "replicate the sign", so it must be clear), f: per code, byte i
    # of the positive lookup or byte i + 4 of the negative one (bit 3 → bit 2). Tables: 2 × E2M1
    # of magnitudes 0-7 (0 1 2 3 4 6 8 12) and their negations, as little-endian bytes.
    _FP4_DOT8_PTX = tl.constexpr("""{
    .reg .b32 m, f, mh, fh, p, n, v0, v1, a;
    and.b32 m, $1, 0x77777777;
    and.b32 f, $1, 0x88888888;
    shr.u32 f, f, 1;
    or.b32 f, f, 0x32103210;
    shr.u32 mh, m, 16;
    shr.u32 fh, f, 16;
    prmt.b32 p, 0x03020100, 0x0C080604, m;
    prmt.b32 n, 0xFDFEFF00, 0xF4F8FAFC, m;
    prmt.b32 v0, p, n, f;
    prmt.b32 p, 0x03020100, 0x0C080604, mh;
    prmt.b32 n, 0xFDFEFF00, 0xF4F8FAFC, mh;
    prmt.b32 v1, p, n, fh;
    dp4a.s32.s32 a, v0, $2, 0;
    dp4a.s32.s32 $0, v1, $3, a;
    }""")

    @triton.jit
    def _e2m1_x2(code):
        """int32 codes 0..15 → twice their E2M1 values as int32 (0, ±1, ±2, ±3, ±4, ±6, ±8,
        ±12): magnitudes below 4 are themselves, then (2 + m₀) · 2^(m₂m₁ − 1)."""
        mag = code & 7
        big = (2 + (mag & 1)) << (((mag >> 1) - 1) & 3)
        v = tl.where(mag < 4, mag, big)
        return tl.where((code & 8) != 0, -v, v)

    @triton.jit
    def _fp4_dot8(q, xa, xb):
        """Σ_i 2·E2M1(code i) · x_i for int32 words q of eight codes (code i in bits 4i..4i+3,
        element 8j + i of its row) and the int8 activations of elements 0-3 (bytes of xa) and
        4-7 (xb) → int32, exact. On a GPU: six byte permutes and two dp4a (`_FP4_DOT8_PTX`);
        the interpreter, which runs no asm, takes the codes one by one."""
        if _INTERPRETED:
            total = q * 0
            for i in tl.static_range(8):
                xw = xa if i < 4 else xb
                xi = (xw << (24 - 8 * (i % 4))) >> 24  # byte i % 4, sign-extended
                total += _e2m1_x2((q >> (4 * i)) & 15) * xi
            return total
        return tl.inline_asm_elementwise(
            _FP4_DOT8_PTX, "=r,r,r,r", [q, xa, xb], dtype=tl.int32, is_pure=True, pack=1
        )

    @triton.jit
    def _q8_words(xq_ptr, xd_ptr, kw, BW: tl.constexpr):
        """int8 activations `[K]` (read as int32 words) and their block steps `[K/32]` → what
        weight words kw..kw+BW meet: the words of their elements 0-3 and 4-7 `[BW]` each, and
        the steps of their BW/4 blocks."""
        words = kw + tl.arange(0, BW)
        xp = xq_ptr.to(tl.pointer_type(tl.int32))
        steps = tl.load(xd_ptr + kw // 4 + tl.arange(0, BW // 4))
        return tl.load(xp + 2 * words), tl.load(xp + 2 * words + 1), steps

    @triton.jit
    def _fp4_q8_part(w_ptr, s_ptr, rows, kw, x, K: tl.constexpr, BW: tl.constexpr):
        """One step of `_fp4_q8_dot`: words kw..kw+BW of packed rows `[BN, K/2]` bytes with
        scales `[BN, K/32]` against `_q8_words`' x → `[BN, BW/4]` float32, per block its
        integer sum times the block's weight scale and step."""
        BN: tl.constexpr = rows.shape[0]
        NB: tl.constexpr = BW // 4  # 32-value blocks per step
        xa, xb, steps = x
        words = kw + tl.arange(0, BW)
        w = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (K // 8) + words[None, :])
        dots = tl.sum(tl.reshape(_fp4_dot8(w, xa[None, :], xb[None, :]), (BN, NB, 4)), axis=2)
        blocks = kw // 4 + tl.arange(0, NB)
        scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + blocks[None, :]))
        return dots.to(tl.float32) * (scale * steps[None, :])

    @triton.jit
    def _fp4_q8_dot(
        w_ptr, s_ptr, xq_ptr, xd_ptr, rows, K: tl.constexpr, BW: tl.constexpr,
        STAGES: tl.constexpr,
    ):  # fmt: skip
        """Σ_k W[rows, k] · x[k] (MODE 4) for packed rows `[BN, K/2]` bytes read as int32 words,
        scales `[BN, K/32]`, x as int8 `[K]` (read as words) with its block steps `[K/32]`: each
        block's integer sum times its weight scale and step; BW words a step (whole blocks)."""
        acc = tl.zeros((rows.shape[0], BW // 4), dtype=tl.float32)
        for kw in tl.range(0, K // 8, BW, num_stages=STAGES):
            acc += _fp4_q8_part(w_ptr, s_ptr, rows, kw, _q8_words(xq_ptr, xd_ptr, kw, BW), K, BW)
        return tl.sum(acc, axis=1) * 0.5

    @triton.jit
    def _fp4_q8_dot2(
        w1_ptr, s1_ptr, w3_ptr, s3_ptr, xq_ptr, xd_ptr, rows, K: tl.constexpr,
        BW: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """`_fp4_q8_dot` of two matrices on the same x in one loop (gate and up): each step's
        loads of both in flight together, x read once → (W1 · x, W3 · x) `[BN]` each."""
        acc1 = tl.zeros((rows.shape[0], BW // 4), dtype=tl.float32)
        acc3 = tl.zeros((rows.shape[0], BW // 4), dtype=tl.float32)
        for kw in tl.range(0, K // 8, BW, num_stages=STAGES):
            x = _q8_words(xq_ptr, xd_ptr, kw, BW)
            acc1 += _fp4_q8_part(w1_ptr, s1_ptr, rows, kw, x, K, BW)
            acc3 += _fp4_q8_part(w3_ptr, s3_ptr, rows, kw, x, K, BW)
        return tl.sum(acc1, axis=1) * 0.5, tl.sum(acc3, axis=1) * 0.5

    @triton.jit
    def _store_q8(v, q_ptr, d_ptr):
        """float32 `[N]` (N a multiple of 32) → int8 at q_ptr, a step per 32 at d_ptr, as
        `quant.quantize_q8` (a block holding Inf or NaN: step NaN, codes 0)."""
        N: tl.constexpr = v.shape[0]
        blocks = tl.reshape(v, (N // 32, 32))
        finite = tl.min((tl.abs(blocks) <= 3.4028234663852886e38).to(tl.int32), axis=1) > 0
        amax = tl.max(tl.where(finite[:, None], tl.abs(blocks), 0.0), axis=1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        q = tl.where(finite[:, None], blocks * inv[:, None], 0.0)
        q = (q + 12582912.0) - 12582912.0  # 1.5 · 2²³: rounds |q| ≤ 2²² to nearest even
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + tl.arange(0, N), tl.reshape(q, (N,)))
        tl.store(d_ptr + tl.arange(0, N // 32), tl.where(finite, amax / 127.0, float("nan")))

    @triton.jit
    def _q8_kernel(
        x_ptr, q_ptr, d_ptr, K: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False
    ):
        """Program (row, chunk): BK values of x `[T, K]` → int8 `[T, K]` and steps `[T, K/32]`."""
        _await_inputs(PDL)
        at = tl.program_id(0) * K + tl.program_id(1) * BK
        v = tl.load(x_ptr + at + tl.arange(0, BK)).to(tl.float32)
        _store_q8(v, q_ptr + at, d_ptr + at // 32)

    @triton.jit
    def _fp4_tile(w_ptr, s_ptr, rows, kb, K: tl.constexpr, BKB: tl.constexpr, DT: tl.constexpr):
        """Bytes kb..kb+BKB of packed rows `[BN, K/2]` → (even, odd) columns' values `[BN, BKB]`
        in DT, scaled (E2M1 × a power of two: exact in bf16/fp16 where the scale's range fits)."""
        cols = kb + tl.arange(0, BKB)
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :]).to(tl.int32)
        scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + cols[None, :] // 16)) * 16384.0
        lo, hi = _nibbles(b, 1)
        return (lo * scale).to(DT), (hi * scale).to(DT)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a `[M, K]` · bᵀ (b `[N, K]`) in float32 sums; IEEE: as float32, exact products (no
        TF32; also how the interpreter must run bf16 products, which it computes wrongly)."""
        if IEEE:
            a, b = a.to(tl.float32), b.to(tl.float32)
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        return tl.dot(a, tl.trans(b))

    # block0 varies per launch (each staged expert's first block): one compiled kernel for
    # all of its values, not one per Triton specialization (1, multiple of 16, other)
    @triton.jit(do_not_specialize=["block0"])
    def _grouped_gate_up_kernel(
        x_ptr, picks_ptr, blocks_ptr, block0, weights_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr,
        limit, TOPK: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Block b = (slot, start, end) of the picks sorted by slot: h[start:end, rows] =
        weight · SwiGLU(x W1ᵀ, x W3ᵀ) for up to BM picks of one expert, its weights read once."""
        _await_inputs(PDL)
        b = block0 + tl.program_id(0)
        slot = tl.load(blocks_ptr + 3 * b).to(tl.int64)
        if slot >= 0:  # −1: an expert not in the stack (decode tables list every pick)
            offs = tl.load(blocks_ptr + 3 * b + 1) + tl.arange(0, BM)
            live = offs < tl.load(blocks_ptr + 3 * b + 2)
            pick = tl.load(picks_ptr + offs, mask=live, other=0)
            x_rows = x_ptr + (pick // TOPK)[:, None] * D
            rows = tl.program_id(1) * BN + tl.arange(0, BN)
            w1, s1 = w1_ptr + slot * (INTER * (D // 2)), s1_ptr + slot * (INTER * (D // 32))
            w3, s3 = w3_ptr + slot * (INTER * (D // 2)), s3_ptr + slot * (INTER * (D // 32))
            DT = x_ptr.dtype.element_ty
            g = tl.zeros((BM, BN), dtype=tl.float32)
            u = tl.zeros((BM, BN), dtype=tl.float32)
            for kb in range(0, D // 2, BKB):
                j = 2 * (kb + tl.arange(0, BKB))[None, :]
                xe = tl.load(x_rows + j, mask=live[:, None], other=0.0)
                xo = tl.load(x_rows + j + 1, mask=live[:, None], other=0.0)
                lo, hi = _fp4_tile(w1, s1, rows, kb, D, BKB, DT)
                g += _dot(xe, lo, IEEE) + _dot(xo, hi, IEEE)
                lo, hi = _fp4_tile(w3, s3, rows, kb, D, BKB, DT)
                u += _dot(xe, lo, IEEE) + _dot(xo, hi, IEEE)
            if limit > 0:
                g = tl.minimum(g, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            h = g * tl.sigmoid(g) * u * tl.load(weights_ptr + pick, mask=live, other=0.0)[:, None]
            ptrs = h_ptr + offs[:, None] * INTER + rows[None, :]
            tl.store(ptrs, h.to(h_ptr.dtype.element_ty), mask=live[:, None])

    @triton.jit(do_not_specialize=["block0"])  # as the gate/up kernel
    def _grouped_down_kernel(
        h_ptr, picks_ptr, blocks_ptr, block0, w2_ptr, s2_ptr, out_ptr,
        D: tl.constexpr, INTER: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """out[pick, cols] = h[sorted position] · W2[cols]ᵀ for block b's picks (float32)."""
        _await_inputs(PDL)
        b = block0 + tl.program_id(0)
        slot = tl.load(blocks_ptr + 3 * b).to(tl.int64)
        if slot >= 0:
            offs = tl.load(blocks_ptr + 3 * b + 1) + tl.arange(0, BM)
            live = offs < tl.load(blocks_ptr + 3 * b + 2)
            pick = tl.load(picks_ptr + offs, mask=live, other=0)
            cols = tl.program_id(1) * BN + tl.arange(0, BN)
            w2, s2 = w2_ptr + slot * (D * (INTER // 2)), s2_ptr + slot * (D * (INTER // 32))
            h_rows = h_ptr + offs[:, None] * INTER
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kb in range(0, INTER // 2, BKB):
                j = 2 * (kb + tl.arange(0, BKB))[None, :]
                he = tl.load(h_rows + j, mask=live[:, None], other=0.0)
                ho = tl.load(h_rows + j + 1, mask=live[:, None], other=0.0)
                lo, hi = _fp4_tile(w2, s2, cols, kb, INTER, BKB, h_ptr.dtype.element_ty)
                acc += _dot(he, lo, IEEE) + _dot(ho, hi, IEEE)
            tl.store(out_ptr + pick[:, None] * D + cols[None, :], acc, mask=live[:, None])

    @triton.jit
    def _dequant_fp4_kernel(
        w_ptr,
        s_ptr,
        out_ptr,
        K: tl.constexpr,
        BN: tl.constexpr,
        BKB: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        _await_inputs(PDL)
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BKB + tl.arange(0, BKB)
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :]).to(tl.int32)
        scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + cols[None, :] // 16))
        lo = _e2m1(b & 15) * scale
        hi = _e2m1(b >> 4) * scale
        vals = tl.reshape(tl.join(lo, hi), (BN, 2 * BKB))  # element 2j = low nibble of byte j
        out_cols = tl.program_id(1) * 2 * BKB + tl.arange(0, 2 * BKB)
        ptrs = out_ptr + rows[:, None] * K + out_cols[None, :]
        tl.store(ptrs, vals.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _sinkhorn_tile(m, eps, ITERS: tl.constexpr):
        """`mhc.sinkhorn_ops` of one `[HC, HC]` tile in registers: row softmax (+eps), a column
        pass, then ITERS−1 (row, column) passes."""
        e = tl.exp(m - tl.max(m, axis=1)[:, None])
        m = e / tl.sum(e, axis=1)[:, None] + eps
        m = m / (tl.sum(m, axis=0)[None, :] + eps)
        for _ in range(ITERS - 1):
            m = m / (tl.sum(m, axis=1)[:, None] + eps)
            m = m / (tl.sum(m, axis=0)[None, :] + eps)
        return m

    @triton.jit
    def _sinkhorn_kernel(
        x_ptr,
        out_ptr,
        eps,
        ITERS: tl.constexpr,
        HC: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        _await_inputs(PDL)
        r = tl.arange(0, HC)
        offs = tl.program_id(0) * HC * HC + r[:, None] * HC + r[None, :]
        tl.store(out_ptr + offs, _sinkhorn_tile(tl.load(x_ptr + offs), eps, ITERS))

    @triton.jit
    def _softmax_pool_part(kv_ptr, g_ptr, stride, cols, R: tl.constexpr, RB: tl.constexpr):
        r = tl.arange(0, RB)
        live = (r < R)[:, None]
        offs = r[:, None] * stride + cols[None, :]
        gate = tl.load(g_ptr + offs, mask=live, other=float("-inf"))
        return tl.load(kv_ptr + offs, mask=live, other=0.0), gate

    @triton.jit
    def _softmax_pool_kernel(
        kv1, g1, s1, kv2, g2, s2, out_ptr, R1: tl.constexpr, RB1: tl.constexpr,
        R2: tl.constexpr, RB2: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """out[c] = Σ_r kv[r, c] · softmax over r of gate[:, c], rows from one or two pieces."""
        _await_inputs(PDL)
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        kva, ga = _softmax_pool_part(kv1, g1, s1, cols, R1, RB1)
        top = tl.max(ga, axis=0)
        if R2 > 0:
            kvb, gb = _softmax_pool_part(kv2, g2, s2, cols, R2, RB2)
            top = tl.maximum(top, tl.max(gb, axis=0))
        ea = tl.exp(ga - top[None, :])
        num = tl.sum(ea * kva, axis=0)
        den = tl.sum(ea, axis=0)
        if R2 > 0:
            eb = tl.exp(gb - top[None, :])
            num += tl.sum(eb * kvb, axis=0)
            den += tl.sum(eb, axis=0)
        tl.store(out_ptr + cols, num / den)

    @triton.jit
    def _pool_rows(kv_ptr, g_ptr, stride, sub, new_kv, new_g, cols, top, den, num,
                   R: tl.constexpr, RB: tl.constexpr):  # fmt: skip
        """Online softmax pooling over R rows `[R, C]` (row `sub` replaced by new_kv/new_g, the
        values this kernel is writing there; −1: none) into the running (top, den, num)."""
        for r0 in range(0, R, RB):
            r = r0 + tl.arange(0, RB)
            offs = r[:, None] * stride + cols[None, :]
            kv = tl.load(kv_ptr + offs)
            g = tl.load(g_ptr + offs)
            mine = (r == sub)[:, None]
            kv = tl.where(mine, new_kv[None, :], kv)
            g = tl.where(mine, new_g[None, :], g)
            new_top = tl.maximum(top, tl.max(g, axis=0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no −∞ − −∞
            alpha = tl.exp(top - shift)
            e = tl.exp(g - shift[None, :])
            den = den * alpha + tl.sum(e, axis=0)
            num = num * alpha + tl.sum(e * kv, axis=0)
            top = new_top
        return top, den, num

    @triton.jit
    def _compressor_step_kernel(
        kv_new_ptr, g_new_ptr, ape_ptr, kv_ptr, g_ptr, prev_kv_ptr, prev_g_ptr, pos_ptr,
        norm_ptr, inv_freq_ptr, out_ptr, index_ptr, eps,
        M: tl.constexpr, C: tl.constexpr, OVERLAP: tl.constexpr, HALF: tl.constexpr,
        RB: tl.constexpr, PDL: tl.constexpr = False, INTO: tl.constexpr = False,
    ):  # fmt: skip
        """`Compressor.step` after its two GEMVs, one program: the token's projection and gate
        (+ ape) into carry slot pos mod M. At a window's last token also: the window pooled
        (CSA: the previous window's A halves, then the current B halves); RMSNorm; RoPE at
        position ⌊pos/M⌋·M on the last 2·HALF channels → out `[C]` (its dtype); a CSA window's A
        halves → prev. Other tokens write zeros to out: row ⌊pos/M⌋ is scratch until its window
        closes (nobody reads it: the visible count is ⌊(pos+1)/M⌋), so pooling a partial window
        each token (an HCA layer's 128 rows, ~2/3 of the launch's time) is work thrown away.
        index ⌊pos/M⌋ either way. INTO: out is the store's rows `[capacity, C]` and the row
        goes to row index (no write of its own after). The rows written here are used from
        registers, never read back."""
        _await_inputs(PDL)
        _compress_one(kv_new_ptr, g_new_ptr, ape_ptr, kv_ptr, g_ptr, prev_kv_ptr, prev_g_ptr,
                      pos_ptr, norm_ptr, inv_freq_ptr, out_ptr, index_ptr, eps, M, C, OVERLAP,
                      HALF, RB, INTO)  # fmt: skip

    @triton.jit
    def _compressor_steps_kernel(
        pos_ptr,
        kv_new0, g_new0, ape0, kv0, g0, prev_kv0, prev_g0, norm0, inv_freq0, out0, index0, eps0,
        M0: tl.constexpr, C0: tl.constexpr, OVERLAP0: tl.constexpr, HALF0: tl.constexpr,
        RB0: tl.constexpr, INTO0: tl.constexpr,
        kv_new1, g_new1, ape1, kv1, g1, prev_kv1, prev_g1, norm1, inv_freq1, out1, index1, eps1,
        M1: tl.constexpr, C1: tl.constexpr, OVERLAP1: tl.constexpr, HALF1: tl.constexpr,
        RB1: tl.constexpr, INTO1: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Two `_compressor_step_kernel`s of one token in one launch, a program each (a CSA
        layer's compressor and its indexer's): one launch fewer, and their serial work side by
        side."""
        _await_inputs(PDL)
        if tl.program_id(0) == 0:
            _compress_one(kv_new0, g_new0, ape0, kv0, g0, prev_kv0, prev_g0, pos_ptr, norm0,
                          inv_freq0, out0, index0, eps0, M0, C0, OVERLAP0, HALF0, RB0, INTO0)  # fmt: skip
        else:
            _compress_one(kv_new1, g_new1, ape1, kv1, g1, prev_kv1, prev_g1, pos_ptr, norm1,
                          inv_freq1, out1, index1, eps1, M1, C1, OVERLAP1, HALF1, RB1, INTO1)  # fmt: skip

    @triton.jit
    def _compress_one(
        kv_new_ptr, g_new_ptr, ape_ptr, kv_ptr, g_ptr, prev_kv_ptr, prev_g_ptr, pos_ptr,
        norm_ptr, inv_freq_ptr, out_ptr, index_ptr, eps, M: tl.constexpr, C: tl.constexpr,
        OVERLAP: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr, INTO: tl.constexpr,
    ):  # fmt: skip
        """`_compressor_step_kernel`'s work."""
        W: tl.constexpr = 2 * C if OVERLAP else C
        B0: tl.constexpr = C if OVERLAP else 0  # where the current entry's half starts
        pos = tl.load(pos_ptr)
        slot = pos % M
        cols = tl.arange(0, C)
        kv_b = tl.load(kv_new_ptr + B0 + cols)
        g_b = tl.load(g_new_ptr + B0 + cols) + tl.load(ape_ptr + slot * W + B0 + cols)
        tl.store(kv_ptr + slot * W + B0 + cols, kv_b)
        tl.store(g_ptr + slot * W + B0 + cols, g_b)
        if OVERLAP:
            kv_a = tl.load(kv_new_ptr + cols)
            g_a = tl.load(g_new_ptr + cols) + tl.load(ape_ptr + slot * W + cols)
            tl.store(kv_ptr + slot * W + cols, kv_a)
            tl.store(g_ptr + slot * W + cols, g_a)
        dtype = out_ptr.dtype.element_ty
        index = pos // M
        tl.store(index_ptr, index)
        if INTO:
            out_ptr += index * C
        if slot != M - 1:
            tl.store(out_ptr + cols, tl.zeros((C,), dtype=tl.float32).to(dtype))
        else:
            top = tl.full((C,), float("-inf"), dtype=tl.float32)
            den = tl.zeros((C,), dtype=tl.float32)
            num = tl.zeros((C,), dtype=tl.float32)
            if OVERLAP:
                top, den, num = _pool_rows(prev_kv_ptr, prev_g_ptr, C, -1, kv_b, g_b, cols,
                                           top, den, num, M, RB)  # fmt: skip
            top, den, num = _pool_rows(kv_ptr + B0, g_ptr + B0, W, slot, kv_b, g_b, cols,
                                       top, den, num, M, RB)  # fmt: skip
            x = (num / den).to(dtype).to(tl.float32)  # the pooled row in the model's dtype
            y = x / tl.sqrt(tl.sum(x * x, axis=0) / C + eps) * tl.load(norm_ptr + cols)
            y = y.to(dtype).to(tl.float32)
            even, odd = tl.split(tl.reshape(y, (C // 2, 2)))
            pair = tl.arange(0, C // 2)
            j = pair - (C // 2 - HALF)  # rotated pairs: the last HALF
            turn = j >= 0
            angle = (index * M).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=turn, other=0.0)
            co, si = tl.cos(angle), tl.sin(angle)
            even2 = tl.where(turn, even * co - odd * si, even)
            odd2 = tl.where(turn, even * si + odd * co, odd)
            tl.store(out_ptr + cols, tl.reshape(tl.join(even2, odd2), (C,)).to(dtype))
            if OVERLAP:  # the closing window's A halves pool into the next entry
                tl.debug_barrier()  # every read of prev above is done
                for r0 in range(0, M, RB):
                    r = r0 + tl.arange(0, RB)
                    mine = (r == slot)[:, None]
                    a_kv = tl.where(
                        mine, kv_a[None, :], tl.load(kv_ptr + r[:, None] * W + cols[None, :])
                    )
                    a_g = tl.where(
                        mine, g_a[None, :], tl.load(g_ptr + r[:, None] * W + cols[None, :])
                    )
                    tl.store(prev_kv_ptr + r[:, None] * C + cols[None, :], a_kv)
                    tl.store(prev_g_ptr + r[:, None] * C + cols[None, :], a_g)  # fmt: skip

    @triton.jit
    def _row_block(k_ptr, r0, n, valid_ptr, limit, sub, own, D: tl.constexpr, RB: tl.constexpr,
                   MASKED: tl.constexpr, idx_ptr, GATHER: tl.constexpr):  # fmt: skip
        """Rows r0..r0+RB of `[n, D]` in own's type (row `sub` is `own` instead) and which count:
        r < n and (MASKED: valid[r] ≠ 0, else r ≤ limit). GATHER: row r is row idx[r] of k and
        of valid (a CSA layer's picks read where they are stored, not gathered first)."""
        r = r0 + tl.arange(0, RB)
        at = r
        if GATHER:
            at = tl.load(idx_ptr + r, mask=r < n, other=0)
        d = tl.arange(0, D)
        k = tl.load(k_ptr + at[:, None] * D + d[None, :], mask=(r < n)[:, None], other=0.0)
        k = tl.where((r == sub)[:, None], own[None, :], k.to(own.dtype))
        if MASKED:
            live = (r < n) & (tl.load(valid_ptr + at, mask=r < n, other=0) != 0)
        else:
            live = (r < n) & (r <= limit)
        return k, live

    @triton.jit
    def _attend_rows(q, k_ptr, n, valid_ptr, limit, sub, own, top, den, acc, scale,
                     D: tl.constexpr, N: tl.constexpr, RB: tl.constexpr, MASKED: tl.constexpr,
                     idx_ptr, GATHER: tl.constexpr):  # fmt: skip
        """Online softmax of one head over N rows `[N, D]` (float32 math): row r counts where
        r < n and (MASKED: valid[r] ≠ 0, else r ≤ limit); row `sub` is `own` instead."""
        for r0 in range(0, N, RB):
            k, live = _row_block(k_ptr, r0, n, valid_ptr, limit, sub, own, D, RB, MASKED,
                                 idx_ptr, GATHER)  # fmt: skip
            s = tl.where(live, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, axis=0))
            alpha = tl.exp(top - new_top)
            p = tl.exp(s - new_top)
            den = den * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * k, axis=0)
            top = new_top
        return top, den, acc

    @triton.jit
    def _decode_attention_split_kernel(
        q_ptr, win_ptr, own_ptr, comp_ptr, vis_ptr, pos_ptr, top_ptr, den_ptr, acc_ptr, scale,
        W: tl.constexpr, C: tl.constexpr, D: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
        SW: tl.constexpr, S: tl.constexpr, PDL: tl.constexpr = False, GATHER: tl.constexpr = False,
        idx_ptr=None,
    ):  # fmt: skip
        """Program (head, split): the online softmax of one head over CH rows, a split of the
        window ring (splits < SW: slots ≤ pos, the token's own slot as computed) or of the C
        compressed rows (those visible; GATHER: rows idx[0..C) of the store and its mask) → its
        running max, sum of exponentials and Σ p · row (without the sink:
        `_decode_attention_combine_kernel` adds it)."""
        _await_inputs(PDL)
        h = tl.program_id(0)
        s = tl.program_id(1)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + h * D + d).to(tl.float32)
        pos = tl.load(pos_ptr)
        own = tl.load(own_ptr + d).to(tl.float32)
        top = tl.full((), -1e30, tl.float32)  # finite: a split with no live row adds 0
        den = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), dtype=tl.float32)
        if s < SW:
            start = s * CH
            top, den, acc = _attend_rows(q, win_ptr + start * D, W - start, vis_ptr, pos - start,
                                         pos % W - start, own, top, den, acc, scale, D, CH, RB,
                                         False, idx_ptr, False)  # fmt: skip
        else:
            start = (s - SW) * CH
            at, idx = start, idx_ptr
            if GATHER:  # the split's rows are found through idx[start..]
                at, idx = 0, idx_ptr + start
            top, den, acc = _attend_rows(q, comp_ptr + at * D, C - start, vis_ptr + at, 0, -1,
                                         own, top, den, acc, scale, D, CH, RB, True, idx,
                                         GATHER)  # fmt: skip
        tl.store(top_ptr + h * S + s, top)
        tl.store(den_ptr + h * S + s, den)
        tl.store(acc_ptr + (h * S + s) * D + d, acc)

    @triton.jit
    def _attend_heads(q, k_ptr, n, valid_ptr, limit, sub, own, top, den, acc, scale,
                      D: tl.constexpr, N: tl.constexpr, RB: tl.constexpr, MASKED: tl.constexpr,
                      IEEE: tl.constexpr, idx_ptr, GATHER: tl.constexpr):  # fmt: skip
        """`_attend_rows` for a group of heads q `[HG, D]` at once: each row block read once for
        all of them, the scores and Σ p · row as products on the tensor cores (the scores'
        products exact in float32 from BF16; p · row in three TF32 passes, about float32's
        precision; IEEE: float32 products throughout)."""
        for r0 in range(0, N, RB):
            k, live = _row_block(k_ptr, r0, n, valid_ptr, limit, sub, own, D, RB, MASKED,
                                 idx_ptr, GATHER)  # fmt: skip
            scores = tl.where(live[None, :], _dot(q, k, IEEE) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            alpha = tl.exp(top - new_top)
            p = tl.exp(scores - new_top[:, None])
            den = den * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, k.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p, k.to(tl.float32), input_precision="tf32x3")
            acc = acc * alpha[:, None] + pv
            top = new_top
        return top, den, acc

    @triton.jit
    def _decode_attention_heads_kernel(
        q_ptr, win_ptr, own_ptr, comp_ptr, vis_ptr, pos_ptr, top_ptr, den_ptr, acc_ptr, scale,
        W: tl.constexpr, C: tl.constexpr, D: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
        SW: tl.constexpr, S: tl.constexpr, HG: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr = False, GATHER: tl.constexpr = False, idx_ptr=None,
    ):  # fmt: skip
        """`_decode_attention_split_kernel` with program (head group, split): HG heads share
        each row they read (V4's heads all attend to one row per position), which the
        one-head programs read once per head."""
        _await_inputs(PDL)
        heads = tl.program_id(0) * HG + tl.arange(0, HG)
        s = tl.program_id(1)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + heads[:, None] * D + d[None, :])
        own = tl.load(own_ptr + d)
        if IEEE or own.dtype != q.dtype:  # the rows in float32 (`_row_block` takes own's type)
            own = own.to(tl.float32)
        pos = tl.load(pos_ptr)
        top = tl.full((HG,), -1e30, tl.float32)  # finite: a split with no live row adds 0
        den = tl.zeros((HG,), dtype=tl.float32)
        acc = tl.zeros((HG, D), dtype=tl.float32)
        if s < SW:
            start = s * CH
            top, den, acc = _attend_heads(q, win_ptr + start * D, W - start, vis_ptr, pos - start,
                                          pos % W - start, own, top, den, acc, scale, D, CH, RB,
                                          False, IEEE, idx_ptr, False)  # fmt: skip
        else:
            start = (s - SW) * CH
            at, idx = start, idx_ptr
            if GATHER:  # as the one-head kernel
                at, idx = 0, idx_ptr + start
            top, den, acc = _attend_heads(q, comp_ptr + at * D, C - start, vis_ptr + at, 0, -1,
                                          own, top, den, acc, scale, D, CH, RB, True, IEEE, idx,
                                          GATHER)  # fmt: skip
        tl.store(top_ptr + heads * S + s, top)
        tl.store(den_ptr + heads * S + s, den)
        tl.store(acc_ptr + (heads[:, None] * S + s) * D + d[None, :], acc)

    @triton.jit
    def _decode_attention_combine_kernel(
        top_ptr, den_ptr, acc_ptr, sink_ptr, out_ptr, D: tl.constexpr, S: tl.constexpr,
        SB: tl.constexpr, PDL: tl.constexpr = False, KEEP: tl.constexpr = False, own_ptr=None,
        win_ptr=None, pos_ptr=None, W: tl.constexpr = 1, ROPE: tl.constexpr = False,
        cos_ptr=None, sin_ptr=None, HALF: tl.constexpr = 1,
    ):  # fmt: skip
        """One head per program: its S splits' partial softmaxes and the sink (a logit with no
        value, e^0 in the sum) merged → Σ p · row / Σ p. KEEP: program 0 also writes the
        token's own row into the window ring's slot pos mod W (every split has read the ring
        by now). ROPE: the result narrowed to out's dtype and its last 2·HALF channels rotated
        back as consecutive pairs, as `_rope_kernel` with SIGN −1 computes it."""
        _await_inputs(PDL)
        h = tl.program_id(0)
        d = tl.arange(0, D)
        if KEEP:  # noqa: SIM102 (a compile-time branch, then a run-time one)
            if h == 0:
                tl.store(win_ptr + (tl.load(pos_ptr) % W) * D + d, tl.load(own_ptr + d))
        top = tl.load(sink_ptr + h)
        den = top * 0.0 + 1.0
        acc = tl.zeros((D,), dtype=tl.float32)
        for s0 in range(0, S, SB):
            j = s0 + tl.arange(0, SB)
            live = j < S
            t = tl.load(top_ptr + h * S + j, mask=live, other=-1e30)
            new_top = tl.maximum(top, tl.max(t, axis=0))
            alpha = tl.exp(top - new_top)
            w = tl.where(live, tl.exp(t - new_top), 0.0)
            part = tl.load(acc_ptr + (h * S + j)[:, None] * D + d[None, :], mask=live[:, None],
                           other=0.0)  # fmt: skip
            den = den * alpha + tl.sum(w * tl.load(den_ptr + h * S + j, mask=live, other=0.0))
            acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
            top = new_top
        if ROPE:
            dtype = out_ptr.dtype.element_ty
            y = (acc / den).to(dtype).to(tl.float32)
            even, odd = tl.split(tl.reshape(y, (D // 2, 2)))
            j = tl.arange(0, D // 2) - (D // 2 - HALF)  # rotated pairs: the last HALF
            turn = j >= 0
            co = tl.load(cos_ptr + j, mask=turn, other=1.0)
            si = -tl.load(sin_ptr + j, mask=turn, other=0.0)
            even2 = tl.where(turn, even * co - odd * si, even)
            odd2 = tl.where(turn, even * si + odd * co, odd)
            tl.store(out_ptr + h * D + d, tl.reshape(tl.join(even2, odd2), (D,)).to(dtype))
        else:
            tl.store(out_ptr + h * D + d, acc / den)

    @triton.jit
    def _fp8_rows_put_kernel(
        rows_ptr, index_ptr, codes_ptr, exps_ptr, rope_ptr, NOPE: tl.constexpr, NB: tl.constexpr,
        NBP: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One row per program, `cache.Fp8Rows.encode` bit for bit, written at row index[r]:
        per 64 no-rope channels a power-of-two scale ≥ amax/448 (its biased exponent stored) and
        E4M3 codes rounded to nearest even (built from the bits: the interpreter's FP8 cast
        flushes subnormals, and rounds to BF16 by truncating), the rope channels as BF16."""
        _await_inputs(PDL)
        r = tl.program_id(0).to(tl.int64)
        dst = tl.load(index_ptr + r)
        b = tl.arange(0, NBP)
        j = tl.arange(0, 64)
        m = (b < NB)[:, None]
        offs = b[:, None] * 64 + j[None, :]
        v = tl.load(rows_ptr + r * (NOPE + ROPE) + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
        x = tl.div_rn(amax, amax * 0.0 + 448.0)  # rounded as torch's division (`/` is not)
        xb = x.to(tl.int32, bitcast=True)
        ex = ((xb >> 23) & 0xFF) + ((xb & 0x7FFFFF) != 0).to(tl.int32)  # 2^⌈log2 x⌉, biased
        q = v * ((254 - ex) << 23).to(tl.float32, bitcast=True)[:, None]  # ÷ 2^(ex−127), exact
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        qb = q.to(tl.int32, bitcast=True)
        a = tl.abs(q)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        steps = a * ((130 - e) << 23).to(tl.float32, bitcast=True)  # in units of 2^(e−3)
        steps = (steps + 12582912.0) - 12582912.0  # round half to even (1.5·2^23)
        code = (e + 6) * 8 + steps.to(tl.int32)  # exponent field e+7, mantissa steps−8
        code = code | ((qb >> 24) & 0x80)  # the sign bit
        tl.store(codes_ptr + dst * NOPE + offs, code.to(tl.uint8), mask=m)
        tl.store(exps_ptr + dst * NB + b, ex.to(tl.uint8), mask=b < NB)
        k = tl.arange(0, ROPE)
        rope = tl.load(rows_ptr + r * (NOPE + ROPE) + NOPE + k).to(tl.float32)
        rb = rope.to(tl.int32, bitcast=True)  # to BF16 rounding half to even, from the bits
        rb = ((rb + 0x7FFF + ((rb >> 16) & 1)) >> 16) & 0xFFFF
        tl.store(rope_ptr + dst * ROPE + k, rb.to(tl.uint16).to(tl.bfloat16, bitcast=True))

    @triton.jit
    def _fp8_rows_read_kernel(
        codes_ptr, exps_ptr, rope_ptr, index_ptr, out_ptr, NOPE: tl.constexpr,
        NB: tl.constexpr, NBP: tl.constexpr, ROPE: tl.constexpr, GATHER: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Row r of the output per program: `cache.Fp8Rows.decode` of stored row index[r] (or
        r), codes · 2^(exponent − 127), rope channels widened, in the output's dtype."""
        _await_inputs(PDL)
        r = tl.program_id(0).to(tl.int64)
        src = tl.load(index_ptr + r) if GATHER else r
        b = tl.arange(0, NBP)
        j = tl.arange(0, 64)
        m = (b < NB)[:, None]
        offs = b[:, None] * 64 + j[None, :]
        val = _e4m3(tl.load(codes_ptr + src * NOPE + offs, mask=m, other=0).to(tl.int32))
        ex = tl.load(exps_ptr + src * NB + b, mask=b < NB, other=127).to(tl.int32)
        val = val * (ex << 23).to(tl.float32, bitcast=True)[:, None]
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + r * (NOPE + ROPE) + offs, val.to(dtype), mask=m)
        k = tl.arange(0, ROPE)
        rope = tl.load(rope_ptr + src * ROPE + k).to(tl.float32)
        tl.store(out_ptr + r * (NOPE + ROPE) + NOPE + k, rope.to(dtype))

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        eps,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_W: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """One row per program: x · rsqrt(mean(x²) + eps) (· w), float32 math."""
        _await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, out_ptr, SIGN: tl.constexpr, H: tl.constexpr,
        D: tl.constexpr, HALF: tl.constexpr, NOPE_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
        PDL: tl.constexpr = False, NORM: tl.constexpr = False, w_ptr=None, eps=0.0,
        BLOCK: tl.constexpr = 1, HAS_W: tl.constexpr = False,
    ):  # fmt: skip
        """Row (token s, head) per program: the first D − 2·HALF channels copied, the last 2·HALF
        rotated as consecutive pairs by the token's angles (SIGN −1: the inverse rotation). x is
        taken as narrowed to out's dtype first (the attention output: float32 in, bf16 out).
        NORM: the row RMS-normed first (· w with HAS_W), as `_rms_norm_kernel` computes and
        rounds it, so that a norm and its rope are one launch."""
        _await_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        _rope_row(x_ptr, out_ptr, cos_ptr, sin_ptr, row, row // H, SIGN, D, HALF, NOPE_BLOCK,
                  HALF_BLOCK, NORM, w_ptr, eps, BLOCK, HAS_W)  # fmt: skip

    @triton.jit
    def _ropes_kernel(
        cos_ptr, sin_ptr, eps, T, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
        x0, o0, w0, H0: tl.constexpr, D0: tl.constexpr, NB0: tl.constexpr, B0: tl.constexpr,
        N0: tl.constexpr, W0: tl.constexpr,
        x1, o1, w1, H1: tl.constexpr, D1: tl.constexpr, NB1: tl.constexpr, B1: tl.constexpr,
        N1: tl.constexpr, W1: tl.constexpr,
        x2, o2, w2, H2: tl.constexpr, D2: tl.constexpr, NB2: tl.constexpr, B2: tl.constexpr,
        N2: tl.constexpr, W2: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Three tensors' rows roped in one launch (T tokens of Hp rows of Dp channels each),
        each as `_rope_kernel` ropes it forward (Np: RMS-normed first, · wp with Wp): a decode
        step's q, kv and the indexer's queries. The grid covers the parts in use, in order (a
        part left out has H 1 and no programs)."""
        _await_inputs(PDL)
        pid = tl.program_id(0).to(tl.int64)
        if pid < T * H0:
            _rope_row(x0, o0, cos_ptr, sin_ptr, pid, pid // H0, 1.0, D0, HALF, NB0, HALF_BLOCK,
                      N0, w0, eps, B0, W0)  # fmt: skip
        elif pid < T * (H0 + H1):
            row = pid - T * H0
            _rope_row(x1, o1, cos_ptr, sin_ptr, row, row // H1, 1.0, D1, HALF, NB1, HALF_BLOCK,
                      N1, w1, eps, B1, W1)  # fmt: skip
        else:
            row = pid - T * (H0 + H1)
            _rope_row(x2, o2, cos_ptr, sin_ptr, row, row // H2, 1.0, D2, HALF, NB2, HALF_BLOCK,
                      N2, w2, eps, B2, W2)  # fmt: skip

    @triton.jit
    def _rope_row(
        x_ptr, out_ptr, cos_ptr, sin_ptr, row, s, SIGN: tl.constexpr, D: tl.constexpr,
        HALF: tl.constexpr, NOPE_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
        NORM: tl.constexpr, w_ptr, eps, BLOCK: tl.constexpr, HAS_W: tl.constexpr,
    ):  # fmt: skip
        """`_rope_kernel`'s work on row `row` of x, token s's angles."""
        base = row * D
        nope = D - 2 * HALF
        dtype = out_ptr.dtype.element_ty
        r = 1.0
        if NORM:  # the whole row's mean square, summed as `_rms_norm_kernel` sums it
            cols = tl.arange(0, BLOCK)
            whole = tl.load(x_ptr + base + cols, mask=cols < D, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(whole * whole, axis=0) / D + eps)
        c = tl.arange(0, NOPE_BLOCK)
        kept = _normed(x_ptr + base, w_ptr, c, c < nope, r, NORM, HAS_W).to(dtype)
        tl.store(out_ptr + base + c, kept, mask=c < nope)
        i = tl.arange(0, HALF_BLOCK)
        m = i < HALF
        a = _normed(x_ptr + base, w_ptr, nope + 2 * i, m, r, NORM, HAS_W).to(dtype).to(tl.float32)
        b = _normed(x_ptr + base, w_ptr, nope + 2 * i + 1, m, r, NORM, HAS_W)
        b = b.to(dtype).to(tl.float32)
        co = tl.load(cos_ptr + s * HALF + i, mask=m, other=0.0)
        si = tl.load(sin_ptr + s * HALF + i, mask=m, other=0.0) * SIGN
        tl.store(out_ptr + base + nope + 2 * i, (a * co - b * si).to(dtype), mask=m)
        tl.store(out_ptr + base + nope + 2 * i + 1, (a * si + b * co).to(dtype), mask=m)

    @triton.jit
    def _normed(row_ptr, w_ptr, cols, mask, r, NORM: tl.constexpr, HAS_W: tl.constexpr):
        """Channels `cols` of a row: as stored, or (NORM) times the row's 1/RMS r (· w)."""
        v = tl.load(row_ptr + cols, mask=mask, other=0.0)
        if NORM:
            v = v.to(tl.float32) * r
            if HAS_W:
                v = v * tl.load(w_ptr + cols, mask=mask, other=0.0)
        return v

    @triton.jit
    def _hc_pre_kernel(
        mix_ptr, x_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr, hc_eps,
        ITERS: tl.constexpr, HC: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        PDL: tl.constexpr = False, NORM: tl.constexpr = False, w_ptr=None, eps=0.0,
        PARTS: tl.constexpr = 0, PB: tl.constexpr = 1, HEAD: tl.constexpr = False,
    ):  # fmt: skip
        """Program (token, D block): from the token's mixes `[(2+HC)·HC]` the pre weights and
        its block of the collapsed input u = Σ_j pre_j · x_j; block 0 also the post weights and
        the Sinkhorn-balanced comb (serial: the other blocks run beside it, not after it).
        NORM: two programs a token, block 0 post and comb only, block 1 (BLOCK_D = D) all of u,
        rounded to u's dtype and RMS-normed · w as `_rms_norm_kernel` does (the block's input
        norm in the same launch). PARTS: the mixes come as the previous `_hc_post_kernel`'s
        PARTS partial sums (`[PARTS, NM + 1]` a token, the last the sum of squares), finished
        here as `_hc_mixes_kernel` finishes them, eps being the mixes' RMS epsilon. HEAD: the
        model's last collapse (`mhc.hc_head`): HC mixes, pre weights only, no post or comb, one
        program a token (with NORM: all of u, normed: the final norm in the same launch)."""
        _await_inputs(PDL)
        s = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, HC)
        NM: tl.constexpr = HC if HEAD else (2 + HC) * HC
        U_PROGRAM: tl.constexpr = 0 if HEAD else 1  # the program that norms u
        rho = 1.0
        if PARTS > 0:
            mix = mix_ptr + s * PARTS * (NM + 1)
            p = tl.arange(0, PB)
            squares = tl.sum(tl.load(mix + p * (NM + 1) + NM, mask=p < PARTS, other=0.0), axis=0)
            rho = 1.0 / tl.sqrt(squares / (HC * D) + eps)
        else:
            mix = mix_ptr + s * NM
        pre = _mix_values(mix, r, NM, PARTS, PB, rho) * tl.load(scale_ptr) + tl.load(base_ptr + r)
        pre = tl.sigmoid(pre) + hc_eps
        if not HEAD:  # noqa: SIM102 (a compile-time branch, then a run-time one)
            if tl.program_id(1) == 0:
                post = _mix_values(mix, HC + r, NM, PARTS, PB, rho) * tl.load(scale_ptr + 1)
                post += tl.load(base_ptr + HC + r)
                tl.store(post_ptr + s * HC + r, 2 * tl.sigmoid(post))
                square = r[:, None] * HC + r[None, :]
                flat = 2 * HC + tl.arange(0, HC * HC)
                comb = tl.reshape(_mix_values(mix, flat, NM, PARTS, PB, rho), (HC, HC))
                comb = comb * tl.load(scale_ptr + 2)
                comb = _sinkhorn_tile(comb + tl.load(base_ptr + 2 * HC + square), hc_eps, ITERS)
                tl.store(comb_ptr + s * HC * HC + square, comb)
        if NORM:
            if tl.program_id(1) == U_PROGRAM:
                cols = tl.arange(0, BLOCK_D)
                xv = tl.load(x_ptr + s * HC * D + r[:, None] * D + cols[None, :]).to(tl.float32)
                u = tl.sum(xv * pre[:, None], axis=0).to(u_ptr.dtype.element_ty).to(tl.float32)
                u = u * tl.rsqrt(tl.sum(u * u, axis=0) / D + eps)
                u = u * tl.load(w_ptr + cols)
                tl.store(u_ptr + s * D + cols, u.to(u_ptr.dtype.element_ty))
        else:
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            xv = tl.load(x_ptr + s * HC * D + r[:, None] * D + cols[None, :]).to(tl.float32)
            u = tl.sum(xv * pre[:, None], axis=0)
            tl.store(u_ptr + s * D + cols, u.to(u_ptr.dtype.element_ty))

    @triton.jit
    def _mix_values(mix, idx, NM: tl.constexpr, PARTS: tl.constexpr, PB: tl.constexpr, rho):
        """A token's mixes at `idx` `[n]`: as stored, or (PARTS) its partial sums added, · rho."""
        if PARTS == 0:
            return tl.load(mix + idx)
        p = tl.arange(0, PB)
        parts = tl.load(mix + p[:, None] * (NM + 1) + idx[None, :], mask=(p < PARTS)[:, None],
                        other=0.0)  # fmt: skip
        return tl.sum(parts, axis=0) * rho

    @triton.jit
    def _hc_mixes_kernel(
        x_ptr,
        fn_ptr,
        out_ptr,
        eps,
        K: tl.constexpr,
        BK: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """Program (token s, mix j): ρ · x_s · fn[j] with ρ = 1/√(mean(x_s²) + eps), x_s the
        token's streams flattened `[K]`, float32 sums."""
        _await_inputs(PDL)
        s = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        acc = tl.zeros((BK,), dtype=tl.float32)
        squares = tl.zeros((BK,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + s * K + cols).to(tl.float32)
            acc += xv * tl.load(fn_ptr + j * K + cols)
            squares += xv * xv
        rho = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        tl.store(out_ptr + s * tl.num_programs(1) + j, tl.sum(acc, axis=0) * rho)

    @triton.jit
    def _route_kernel(
        logits_ptr, bias_ptr, picked_ptr, experts_ptr, weights_ptr, scale,
        resident_ptr, in_place_ptr, counts_ptr, device_picks_ptr, total_picks_ptr, host_ptr,
        E: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, HASH: tl.constexpr,
        RECORD: tl.constexpr, HAS_RESIDENT: tl.constexpr, HITS: tl.constexpr,
        IN_PLACE: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Token per program: scores √softplus(logits) `[E]`; its K experts (HASH: given in
        picked, else the K largest scores + bias, lowest index first among equals) and their
        scores normalized to sum to `scale`. RECORD: the picks also logged and the host's share
        written, as `_record_picks_kernel` does (atomics: a program per token)."""
        _await_inputs(PDL)
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BE)
        raw = tl.load(logits_ptr + t * E + e, mask=e < E, other=0.0)
        # softplus = max(x, 0) + log1p(e^−|x|), log1p by Goldberg's u = 1 + y form (few ulps)
        y = tl.exp(-tl.abs(raw))
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * y / tl.where(u == 1.0, 1.0, u - 1.0))
        scores = tl.sqrt(tl.maximum(raw, 0.0) + log1p)
        slots = tl.arange(0, BK)
        live = slots < K
        if HASH:
            chosen = tl.load(picked_ptr + t * K + slots, mask=live, other=-1)
        else:
            ranked = tl.where(e < E, scores + tl.load(bias_ptr + e, mask=e < E, other=0.0),
                              float("-inf"))  # fmt: skip
            chosen = tl.full((BK,), -1, dtype=tl.int64)
            for i in tl.static_range(K):
                top = tl.max(ranked, axis=0)
                pick = tl.min(tl.where(ranked == top, e, BE), axis=0)
                chosen = tl.where(slots == i, pick.to(tl.int64), chosen)
                ranked = tl.where(e == pick, float("-inf"), ranked)
        picked = tl.sum(tl.where(e[None, :] == chosen[:, None], scores[None, :], 0.0), axis=1)
        tl.store(experts_ptr + t * K + slots, chosen, mask=live)
        total = tl.sum(picked, axis=0)
        tl.store(weights_ptr + t * K + slots, picked / total * scale, mask=live)
        if RECORD:
            tl.atomic_add(counts_ptr + chosen, tl.full((BK,), 1, tl.int64), mask=live)
            tl.atomic_add(total_picks_ptr, K)
            host = chosen
            if HAS_RESIDENT:
                on = tl.load(resident_ptr + chosen, mask=live, other=0) != 0
                host = tl.where(on, -1, chosen)
                if HITS:
                    tl.atomic_add(device_picks_ptr, tl.sum((on & live).to(tl.int64), axis=0))
            if IN_PLACE:
                host = tl.where(tl.load(in_place_ptr + chosen, mask=live, other=0) != 0, -1, host)
            tl.store(host_ptr + t * K + slots, host, mask=live)

    @triton.jit
    def _block_output(f_ptr, add_ptr, add2_ptr, s, cols, D: tl.constexpr, N_ADD: tl.constexpr,
                      N_ADD2: tl.constexpr):  # fmt: skip
        """Token s's block output f at `cols`, widened to float32, plus its N_ADD and N_ADD2
        partial sums (`[S, N, D]` float32 each)."""
        f = tl.load(f_ptr + s * D + cols).to(tl.float32)
        if N_ADD > 0:
            parts = tl.zeros(cols.shape, dtype=tl.float32)
            for j in tl.static_range(N_ADD):
                parts += tl.load(add_ptr + (s * N_ADD + j) * D + cols)
            for j in tl.static_range(N_ADD2):
                parts += tl.load(add2_ptr + (s * N_ADD2 + j) * D + cols)
            f = f + parts
        return f

    @triton.jit
    def _sum_parts_kernel(
        f_ptr, add_ptr, add2_ptr, out_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        N_ADD: tl.constexpr, N_ADD2: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """(token, column block) per program: out = f + its partial sums, float32."""
        _await_inputs(PDL)
        s = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        f = _block_output(f_ptr, add_ptr, add2_ptr, s, cols, D, N_ADD, N_ADD2)
        tl.store(out_ptr + s * D + cols, f)

    @triton.jit
    def _hc_post_kernel(
        f_ptr, add_ptr, add2_ptr, x_ptr, post_ptr, comb_ptr, out_ptr,
        HC: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, N_ADD: tl.constexpr,
        N_ADD2: tl.constexpr, PDL: tl.constexpr = False, NM: tl.constexpr = 0,
        NMB: tl.constexpr = 1, fn_ptr=None, parts_ptr=None,
    ):  # fmt: skip
        """(token, column block) per program: new stream k = post_k · f + Σ_j comb[j, k] · x_j,
        where f is the block output plus its N_ADD and N_ADD2 partial sums (two tensors of them),
        rounded to the streams' dtype as the torch path rounds the block output. NM: also the
        next site's NM mixes of the new streams over this block's columns, unscaled, and their
        sum of squares → parts `[S, programs, NM + 1]` (`_hc_pre_kernel` finishes them: the
        mixes' own launch, a GEMV over all hc·D columns in a few programs, is not needed)."""
        _await_inputs(PDL)
        s = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        r = tl.arange(0, HC)
        xv = tl.load(x_ptr + s * HC * D + r[:, None] * D + cols[None, :]).to(tl.float32)
        comb = tl.load(comb_ptr + s * HC * HC + r[:, None] * HC + r[None, :])  # [j, k]
        mixed = tl.sum(comb[:, :, None] * xv[:, None, :], axis=0)  # [k, BLOCK_D]
        f = _block_output(f_ptr, add_ptr, add2_ptr, s, cols, D, N_ADD, N_ADD2)
        f = f.to(out_ptr.dtype.element_ty).to(tl.float32)
        out = tl.load(post_ptr + s * HC + r)[:, None] * f[None, :] + mixed
        ptrs = out_ptr + s * HC * D + r[:, None] * D + cols[None, :]
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(ptrs, out)
        if NM > 0:  # the streams as stored, as the mixes' kernel would read them back
            o = out.to(tl.float32)
            part = parts_ptr + (s * tl.num_programs(1) + tl.program_id(1)) * (NM + 1)
            tl.store(part + NM, tl.sum(tl.sum(o * o, axis=1), axis=0))
            # every mix's weights for these columns in one load (all in flight at once: one
            # mix at a time left each program 24 round trips to memory in series)
            j = tl.arange(0, NMB)
            w = tl.load(fn_ptr + j[:, None, None] * (HC * D) + r[None, :, None] * D
                        + cols[None, None, :], mask=(j < NM)[:, None, None], other=0.0)  # fmt: skip
            tl.store(part + j, tl.sum(tl.sum(w * o[None, :, :], axis=2), axis=1), mask=j < NM)

    @triton.jit
    def _swiglu_kernel(
        gate_ptr, up_ptr, out_ptr, limit, N, BLOCK: tl.constexpr, CLAMP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """silu(min(gate, limit)) · clamp(up, ±limit) in float32, stored in out's dtype (N a
        plain argument: a prompt's every chunk length runs the one compiled kernel)."""
        _await_inputs(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        g = tl.load(gate_ptr + offs, mask=live, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=live, other=0.0).to(tl.float32)
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _record_picks_kernel(
        experts_ptr, resident_ptr, in_place_ptr, counts_ptr, device_picks_ptr, total_picks_ptr,
        host_ptr, P: tl.constexpr, BP: tl.constexpr, HAS_RESIDENT: tl.constexpr,
        HITS: tl.constexpr, IN_PLACE: tl.constexpr = False, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One program: a layer's P picks counted per expert, their total and (HITS) the device
        cache's hits added to the routing log; the host's share written (−1 where resident, or
        where IN_PLACE the device reads the expert in place: not a hit)."""
        _await_inputs(PDL)
        offs = tl.arange(0, BP)
        live = offs < P
        e = tl.load(experts_ptr + offs, mask=live, other=0)
        tl.atomic_add(counts_ptr + e, tl.full((BP,), 1, tl.int64), mask=live)
        tl.store(total_picks_ptr, tl.load(total_picks_ptr) + P)
        host = e
        if HAS_RESIDENT:
            on = tl.load(resident_ptr + e, mask=live, other=0) != 0
            host = tl.where(on, -1, e)
            if HITS:
                hits = tl.sum((on & live).to(tl.int64), axis=0)
                tl.store(device_picks_ptr, tl.load(device_picks_ptr) + hits)
        if IN_PLACE:
            host = tl.where(tl.load(in_place_ptr + e, mask=live, other=0) != 0, -1, host)
        tl.store(host_ptr + offs, host, mask=live)

    @triton.jit
    def _index_scores_kernel(
        q_ptr, w_ptr, keys_ptr, kscale_ptr, pos_ptr, out_ptr, scale, C, RATIO: tl.constexpr,
        H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, IEEE: tl.constexpr,
        KSCALE: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One query and BT index keys per program: score_t = Σ_h scale·w_h · ReLU(q_h · K_t),
        float32 sums, −∞ from the query's visible count ⌊(pos+1)/RATIO⌋ on (the keys are read as
        stored; KSCALE: E4M3 code bytes, each key times its float32 scale, `cache.Fp8KeyRows`).
        The queries of a key block are neighbours in the grid, so its keys come from L2 for all
        but the first."""
        _await_inputs(PDL)
        s = tl.program_id(0).to(tl.int64)  # the query
        rows = tl.program_id(1) * BT + tl.arange(0, BT)
        live = rows < C
        h, d = tl.arange(0, H), tl.arange(0, D)
        q = tl.load(q_ptr + s * H * D + h[:, None] * D + d[None, :])
        at = keys_ptr + rows[:, None].to(tl.int64) * D + d[None, :]
        if KSCALE:  # codes widen exactly to q's dtype; the scale after the products
            keys = _e4m3(tl.load(at, mask=live[:, None], other=0).to(tl.int32)).to(q.dtype)
        else:
            keys = tl.load(at, mask=live[:, None], other=0.0)
        logits = _dot(q, keys, IEEE)  # [H, BT]
        if KSCALE:
            logits = logits * tl.load(kscale_ptr + rows, mask=live, other=0.0)[None, :]
        # weights_proj's output in the activations' dtype (float32 sums of a joined launch are
        # rounded here as torch's linear rounds them)
        w = tl.load(w_ptr + s * H + h).to(q_ptr.dtype.element_ty).to(tl.float32) * scale
        score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
        visible = (tl.load(pos_ptr + s) + 1) // RATIO
        tl.store(out_ptr + s * C + rows, tl.where(rows < visible, score, float("-inf")), mask=live)

    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, s_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
        X_STRIDE: tl.constexpr, GROUP_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, T, UNROLL: tl.constexpr = 1,
        PDL: tl.constexpr = False, STAGES: tl.constexpr = 1, GLU: tl.constexpr = False,
        GLU_LIMIT: tl.constexpr = 0.0, NORM: tl.constexpr = False, nw_ptr=None, eps=0.0,
        NORM_BLOCK: tl.constexpr = 1,
    ):  # fmt: skip
        """out[split, t, rows] = x[t, group's K share] · W[rows, K share]ᵀ (× the rows' 128×128
        tile scales): one token per program, BK columns per step (UNROLL steps at once; STAGES
        steps' loads in flight through shared memory), SPLIT programs sharing a row block's K.
        GLU: x's row holds gate then up (K each) and the product takes SwiGLU(gate, up) clamped
        at GLU_LIMIT (0: not), rounded to x's dtype as `_swiglu_kernel` stores it. NORM (one
        group): x's row RMS-normed over all of K (· nw) and rounded to x's dtype as
        `_rms_norm_kernel` computes it (the q_a norm read into `wq_b`: one launch fewer)."""
        _await_inputs(PDL)
        _linear_block(x_ptr, w_ptr, s_ptr, out_ptr, tl.program_id(0), tl.program_id(1),
                      tl.program_id(2), N, K, X_STRIDE, GROUP_ROWS, HAS_SCALE, BN, BK, SPLIT, T,
                      UNROLL, STAGES, GLU, GLU_LIMIT, NORM, nw_ptr, eps, NORM_BLOCK)  # fmt: skip

    @triton.jit
    def _linear_pair_kernel(
        T, x0, w0, s0, out0, N0: tl.constexpr, K0: tl.constexpr, X_STRIDE0: tl.constexpr,
        HAS_SCALE0: tl.constexpr, BN0: tl.constexpr, BK0: tl.constexpr,
        UNROLL0: tl.constexpr, STAGES0: tl.constexpr,
        x1, w1, s1, out1, N1: tl.constexpr, K1: tl.constexpr, X_STRIDE1: tl.constexpr,
        HAS_SCALE1: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr,
        UNROLL1: tl.constexpr, STAGES1: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """Two `_linear_kernel`s (one group, K unsplit) in one launch: row blocks 0..N0/BN0−1
        of the grid's second axis are the first's, the rest the second's (a decode step's
        linears that read one input but whose weights differ in kind: `wq_a`+`wkv` FP8 and the
        compressors' BF16 projections)."""
        _await_inputs(PDL)
        t, rb = tl.program_id(0), tl.program_id(1)
        if rb < N0 // BN0:
            _linear_block(x0, w0, s0, out0, t, rb, 0, N0, K0, X_STRIDE0, N0, HAS_SCALE0, BN0,
                          BK0, 1, T, UNROLL0, STAGES0, False, 0.0, False, w0, 0.0, 1)  # fmt: skip
        else:
            _linear_block(x1, w1, s1, out1, t, rb - N0 // BN0, 0, N1, K1, X_STRIDE1, N1,
                          HAS_SCALE1, BN1, BK1, 1, T, UNROLL1, STAGES1, False, 0.0, False, w1,
                          0.0, 1)  # fmt: skip

    @triton.jit
    def _linear_block(
        x_ptr, w_ptr, s_ptr, out_ptr, t, rb, kz, N: tl.constexpr, K: tl.constexpr,
        X_STRIDE: tl.constexpr, GROUP_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, T, UNROLL: tl.constexpr,
        STAGES: tl.constexpr, GLU: tl.constexpr, GLU_LIMIT: tl.constexpr, NORM: tl.constexpr,
        nw_ptr, eps, NORM_BLOCK: tl.constexpr,
    ):  # fmt: skip
        """`_linear_kernel`'s work for token t, row block rb, K share kz."""
        first = rb * BN
        rows = first + tl.arange(0, BN)
        share: tl.constexpr = K // SPLIT
        k0 = kz * share
        x_row = x_ptr + t * X_STRIDE + (first // GROUP_ROWS) * K
        r = 1.0
        if NORM:  # the whole row's mean square, summed as `_rms_norm_kernel` sums it
            kc = tl.arange(0, NORM_BLOCK)
            whole = tl.load(x_row + kc, mask=kc < K, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(whole * whole, axis=0) / K + eps)
        # Products are summed per thread across steps, and across threads once after the loop:
        # a sum across threads each step cost warp shuffles and block barriers, and the barriers
        # kept the next step's loads from being issued early. A program's rows lie in one
        # 128-row scale tile (BN divides 128), so the tile scales multiply x's columns, not W.
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for step in tl.range(0, share, BK, loop_unroll_factor=UNROLL, num_stages=STAGES):
            cols = k0 + step + tl.arange(0, BK)
            xs = tl.load(x_row + cols)
            if NORM:
                xs = (xs.to(tl.float32) * r * tl.load(nw_ptr + cols)).to(x_ptr.dtype.element_ty)
            if GLU:  # the shared expert's hidden, one launch fewer than SwiGLU on its own
                g, u = xs.to(tl.float32), tl.load(x_row + K + cols).to(tl.float32)
                if GLU_LIMIT > 0:
                    g = tl.minimum(g, GLU_LIMIT)
                    u = tl.minimum(tl.maximum(u, -GLU_LIMIT), GLU_LIMIT)
                xs = (g * tl.sigmoid(g) * u).to(x_ptr.dtype.element_ty)
            if HAS_SCALE:  # × a power of two: exact in x's own type, which is then spread
                sc = _e8m0(tl.load(s_ptr + (first // 128) * ((K + 127) // 128) + cols // 128))
                xs = (xs.to(tl.float32) * (sc * _fp8_unit(w_ptr))).to(x_ptr.dtype.element_ty)
            w = _fp8_weights(tl.load(w_ptr + rows[:, None] * K + cols[None, :]))
            acc += w * xs.to(tl.float32)[None, :]
        ptrs = out_ptr + (kz * T + t) * N + rows
        tl.store(ptrs, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _linear_dot_kernel(
        x_ptr, w_ptr, s_ptr, out_ptr, T, N: tl.constexpr, K: tl.constexpr,
        X_STRIDE: tl.constexpr, GROUP_ROWS: tl.constexpr, HAS_SCALE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr = False,
    ):  # fmt: skip
        """out[split, t, rows] = x[t, group's K share] · W[rows, K share]ᵀ (× tile scales) for up
        to BM tokens at once on the tensor cores (x's rows past T are zeros): W's bytes are read
        once for all of them, in BK-wide steps the compiler can pipeline (a product per step,
        no reduction across threads), and SPLIT programs share a row block's K."""
        _await_inputs(PDL)
        first = tl.program_id(0) * BN
        rows = first + tl.arange(0, BN)
        tokens = tl.program_id(2) * BM + tl.arange(0, BM)
        live = tokens < T
        share: tl.constexpr = K // SPLIT
        k0 = tl.program_id(1) * share
        x_rows = x_ptr + tokens[:, None] * X_STRIDE + (first // GROUP_ROWS) * K
        DT = x_ptr.dtype.element_ty
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for step in range(0, share, BK):
            kb = k0 + step
            cols = kb + tl.arange(0, BK)
            xt = tl.load(x_rows + cols[None, :], mask=live[:, None], other=0.0)
            w = _fp8_weights(tl.load(w_ptr + rows[:, None] * K + cols[None, :])).to(DT)
            part = _dot(xt, w, IEEE)
            if HAS_SCALE:  # BN and BK divide 128: one scale per row in this step
                scale = _e8m0(tl.load(s_ptr + (rows // 128) * ((K + 127) // 128) + kb // 128))
                part = part * (scale * _fp8_unit(w_ptr))[None, :]
            acc += part
        ptrs = out_ptr + tl.program_id(1) * T * N + tokens[:, None] * N + rows[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=live[:, None])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _pdl(device: torch.device) -> dict:
    """The launch options of programmatic dependent launch where it is on (PDL) and the GPU has
    it (compute capability 9.0 and later; `griddepcontrol` does not exist before): each kernel
    starts launching while its predecessor finishes, and waits in `_await_inputs`."""
    return {"PDL": True, "launch_pdl": True} if PDL and pdl_possible(device) else {}


# None: FP8 weights reach the kernels as Triton's fp8e4nv type where the GPU has it (compute
# capability 8.9, Ada, and later), as code bytes elsewhere; True / False: always / never bytes
FP8_AS_BYTES: bool | None = None


def native_fp8(device: torch.device | str) -> bool:
    """Whether the linears read FP8 weights as Triton's fp8e4nv type on `device`: Triton does not
    compile that type for GPUs before Ada (RTX 30 series, A100 and older), where they read the
    code bytes instead."""
    if FP8_AS_BYTES is not None:
        return not FP8_AS_BYTES
    device = torch.device(device)
    return device.type != "cuda" or INTERPRETED or _capability(device) >= (8, 9)


def pdl_possible(device: torch.device | str) -> bool:
    """Whether kernels on `device` can launch dependently (a CUDA GPU of compute capability 9.0
    or later, compiled kernels)."""
    device = torch.device(device)
    return device.type == "cuda" and not INTERPRETED and _capability(device) >= (9, 0)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _block(n: int, want: int) -> int:
    """The largest power of two ≤ want dividing n (V4 dims are powers of two; tiny test dims too)."""
    b = want
    while b > 1 and n % b:
        b //= 2
    return b


def moe(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    slot_of: torch.Tensor,
    stacks: tuple[torch.Tensor, ...],
    limit: float,
    tiles: tuple[int, int, int, int] | None = None,
    num_warps: int | None = None,
    mode: tuple[int, ...] | None = None,
    summed: bool = True,
    stages: int | None = None,
    floats: bool = False,
) -> torch.Tensor:
    """Σ over each token's picks held in the slot store of weight · expert(x).

    x `[T, D]` (any float dtype), experts `[T, k]` int, weights `[T, k]`, slot_of `[E]` int32
    (slot of each expert, −1 when not in the store), stacks = (w1 `[S, I, D/2]`, s1 `[S, I, D/32]`,
    w3, s3, w2 `[S, D, I/2]`, s2 `[S, D, I/32]`) packed bytes → `[T, D]` float32; picks with
    slot −1 add nothing (their part comes from elsewhere). `tiles`, `num_warps`, `mode`: the
    kernel shape (benchmarks sweep them; `mode` = (MODE, F16[, SPLIT]), see FP4_MODE and
    FP4_WORDS; by default `decode_shape`'s, `floats` asking for float activations); `stages`:
    steps in flight (FP4_STAGES).
    `summed` False: `[T, n, D]` partial sums instead (n = k or 1) for the caller to add in its
    next kernel (`hc_post`'s `add`), one launch fewer.
    """
    if mode is None:
        shape = decode_shape(x.device, floats)
        tiles, num_warps, mode = tiles or shape[0], num_warps or shape[1], shape[2]
    tiles, num_warps = tiles or TILES, num_warps or WARPS
    w1, s1, w3, s3, w2, s2 = (_bytes(t) for t in stacks)
    tokens, dim = x.shape
    topk = experts.shape[1]
    inter = w1.shape[1]
    if w1.shape[2] * 2 != dim or w2.shape[1:] != (dim, inter // 2) or dim % 32 or inter % 32:
        raise ValueError(f"expert stacks {w1.shape}/{w2.shape} do not fit activations {x.shape}")
    x = x.contiguous()
    if mode[0] in (2, 4) and any(t.data_ptr() % 4 for t in (x, w1, w3, w2)):
        mode = (0, 1, *mode[2:])  # MODES 2 and 4 read int32 words; an odd view reads bytes
    experts = experts.contiguous()
    weights = weights.to(torch.float32).contiguous()
    split = mode[2] if len(mode) > 2 else 0
    q8 = mode[0] == 4  # the integer dots: x, then h, as int8 with a step per 32 values
    if q8:
        x_in, x_steps = _quantize_q8(x)
        h = torch.empty((tokens * topk, inter), dtype=torch.int8, device=x.device)
        h_steps = torch.empty((tokens * topk, inter // 32), dtype=torch.float32, device=x.device)
    else:  # the float modes read x and write float32 h (no steps: their pointers unread)
        x_in = x_steps = x
        h = h_steps = torch.empty((tokens * topk, inter), dtype=torch.float32, device=x.device)
    # the down kernel reads h only where gate/up wrote it (picks in the store)
    out = torch.empty(
        (tokens * topk if split else tokens, dim), dtype=torch.float32, device=x.device
    )
    # MODE 4 quantizes h per 32 values: 32 gate/up rows a program at least
    bn_up = _block(inter, max(32, tiles[0]) if q8 else tiles[0])
    bkb_up = max(16, _block(dim // 2, tiles[1]))
    bn_down, bkb_down = _block(dim, tiles[2]), max(16, _block(inter // 2, tiles[3]))
    _gate_up_kernel[(tokens * topk, inter // bn_up)](
        x_in, x_steps, experts, weights, slot_of, w1, s1, w3, s3, h, h_steps, float(limit),
        TOPK=topk, D=dim, INTER=inter, BN=bn_up, BKB=bkb_up, MODE=mode[0], F16=mode[1],
        STAGES=stages or FP4_STAGES, num_warps=num_warps, **_pdl(x.device),
    )  # fmt: skip
    _down_kernel[(out.shape[0], dim // bn_down)](
        h, h_steps, experts, slot_of, w2, s2, out,
        TOPK=topk, D=dim, INTER=inter, BN=bn_down, BKB=bkb_down, MODE=mode[0],
        F16=0 if q8 else mode[1], SPLIT=split, STAGES=stages or FP4_STAGES, num_warps=num_warps,
        **_pdl(x.device),
    )  # fmt: skip
    parts = out.view(tokens, topk if split else 1, dim)
    return parts.sum(dim=1) if summed else parts


def decode_shape(device: torch.device | str, floats: bool = False) -> tuple:
    """The decode expert kernels' (tiles, warps, mode) on `device`: TILES, WARPS and FP4_MODE,
    but the built-in float decode (FLOAT_FP4, its own shape) where FP4_MODE is the integer
    dots (MODE 4) and `floats` asks for float activations (a float32 model; experts read in
    place across PCIe, which bounds them) or their check failed there."""
    if FP4_MODE[0] == 4 and (
        floats or (not INTERPRETED and not checked("FP4 int8 dots", device))
    ):  # fmt: skip
        return FLOAT_FP4
    return TILES, WARPS, FP4_MODE


def _quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, K]` → int8 `[T, K]` and a step per 32 values `[T, K/32]` float32, in one launch
    (`quant.quantize_q8`'s rounding)."""
    tokens, dim = x.shape
    q = torch.empty((tokens, dim), dtype=torch.int8, device=x.device)
    steps = torch.empty((tokens, dim // 32), dtype=torch.float32, device=x.device)
    bk = _block(dim, 1024)
    _q8_kernel[(tokens, dim // bk)](x, q, steps, K=dim, BK=bk, num_warps=4, **_pdl(x.device))
    return q, steps


def expert_blocks(
    counts: Sequence[int], slots: Sequence[int], start: int = 0, block_m: int | None = None
) -> list[tuple[int, int, int]]:
    """Experts whose picks lie together in a sorted pick order, `counts[i]` of them for the
    expert in stack slot `slots[i]`, from position `start` on → `(slot, start, end)` blocks of
    at most `block_m` picks (default GROUPED_TILES' first: what `moe_grouped` takes by default;
    a block longer than the kernel's tile would lose picks); experts with no picks get none."""
    block_m = block_m or GROUPED_TILES[0]
    blocks = []
    for n, slot in zip(counts, slots, strict=True):
        for first in range(start, start + n, block_m):
            blocks.append((int(slot), first, min(first + block_m, start + n)))
        start += n
    return blocks


def moe_grouped(
    x: torch.Tensor,
    picks: torch.Tensor,
    blocks: torch.Tensor,
    weights: torch.Tensor,
    stacks: tuple[torch.Tensor, ...],
    limit: float,
    out: torch.Tensor,
    h: torch.Tensor | None = None,
    first_block: int = 0,
    n_blocks: int | None = None,
    tiles: tuple[int, int, int] | None = None,
    num_warps: int | None = None,
) -> None:
    """Many tokens' picks, grouped by expert: each expert's packed weights are read once per
    block of up to `tiles[0]` picks and multiplied on the tensor cores (where `moe` reads them
    once per pick, and torch's path writes a dequantized copy of each first).

    x `[T, D]` (bf16/fp16/fp32), picks `[P]` int64 flat pick indices (token · k + j) sorted so
    that each block's picks are contiguous, blocks `[B, 3]` int32 (slot, start, end) into picks
    (`expert_blocks`; `first_block`/`n_blocks`: run only those), weights `[T·k]` float32, stacks
    as for `moe` → writes `out[pick]` (`[T·k, D]` float32) for the blocks' picks; `h` `[P, I]` in
    x's dtype: scratch for the SwiGLU outputs, by sorted position.
    """
    tiles, num_warps = tiles or GROUPED_TILES, num_warps or GROUPED_WARPS
    w1, s1, w3, s3, w2, s2 = (_bytes(t) for t in stacks)
    tokens, dim = x.shape
    topk = out.shape[0] // max(tokens, 1)
    inter = w1.shape[1]
    if w1.shape[2] * 2 != dim or w2.shape[1:] != (dim, inter // 2) or dim % 32 or inter % 32:
        raise ValueError(f"expert stacks {w1.shape}/{w2.shape} do not fit activations {x.shape}")
    if out.shape != (tokens * topk, dim) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 [tokens · k, {dim}], got {tuple(out.shape)}")
    n = blocks.shape[0] - first_block if n_blocks is None else n_blocks
    if n <= 0:
        return
    if h is None:
        h = torch.empty((picks.numel(), inter), dtype=x.dtype, device=x.device)
    bm, bn, bkb = tiles
    ieee = x.dtype == torch.float32 or INTERPRETED
    bn_up, bn_down = _block(inter, bn), _block(dim, bn)
    bkb_up, bkb_down = max(16, _block(dim // 2, bkb)), max(16, _block(inter // 2, bkb))
    x, picks, weights = x.contiguous(), picks.contiguous(), weights.contiguous()
    _grouped_gate_up_kernel[(n, inter // bn_up)](
        x, picks, blocks, first_block, weights, w1, s1, w3, s3, h, float(limit),
        TOPK=topk, D=dim, INTER=inter, BM=bm, BN=bn_up, BKB=bkb_up, IEEE=ieee,
        num_warps=num_warps, **_pdl(x.device),
    )  # fmt: skip
    _grouped_down_kernel[(n, dim // bn_down)](
        h, picks, blocks, first_block, w2, s2, out,
        D=dim, INTER=inter, BM=bm, BN=bn_down, BKB=bkb_down, IEEE=ieee, num_warps=num_warps,
        **_pdl(h.device),
    )  # fmt: skip


def moe_by_pick(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    slot_of: torch.Tensor,
    stacks: tuple[torch.Tensor, ...],
    limit: float,
    tiles: tuple[int, int, int] | None = None,
    num_warps: int | None = None,
    summed: bool = True,
) -> torch.Tensor:
    """`moe` (same arguments and result) through the grouped tensor-core kernels, every pick its
    own block: no sorting and no host read (a decode step), picks with slot −1 skipped."""
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    picks = torch.arange(flat.numel(), dtype=torch.int32, device=x.device)
    table = torch.stack((slot_of[flat].to(torch.int32), picks, picks + 1), dim=1)
    out = torch.zeros((tokens * k, x.shape[1]), dtype=torch.float32, device=x.device)
    flat_w = weights.reshape(-1).to(torch.float32)
    tiles, num_warps = tiles or BY_PICK_TILES, num_warps or BY_PICK_WARPS
    moe_grouped(x, picks, table, flat_w, stacks, limit, out, tiles=tiles, num_warps=num_warps)
    parts = out.view(tokens, k, -1)
    return parts.sum(dim=1) if summed else parts


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`mhc.sinkhorn_ops` of float32 `[..., hc, hc]` (hc a power of two) in one launch: as torch
    operations it is ~6 tiny kernels per iteration, ~240 per layer of a decode step."""
    hc = comb.shape[-1]
    if comb.dtype != torch.float32 or comb.shape[-2] != hc or hc & (hc - 1):
        raise ValueError(
            "sinkhorn takes float32 [..., n, n] with n a power of two, "
            f"got {comb.dtype} {tuple(comb.shape)}"
        )
    x = comb.contiguous()
    out = torch.empty_like(x)
    _sinkhorn_kernel[(x.numel() // (hc * hc),)](
        x,
        out,
        float(eps),
        ITERS=iters,
        HC=hc,
        **_pdl(x.device),
    )
    return out


def softmax_pool(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """The compressor's pooling of a window in one launch: Σ_r kv[r] · softmax_r(gate[r]) per
    channel over the rows of (kv, gate) `[R, C]` float32 (views with unit column stride), then
    those of `second` (CSA's previous half-window) → `[1, C]` float32. As torch ops it is a
    concatenation, a softmax across rows (a slow kernel shape: ~34 µs on an H200) and a sum."""
    kv1, g1 = first
    kv2, g2 = second if second is not None else first
    c = kv1.shape[1]
    for t in (kv1, g1, kv2, g2):
        if t.dtype != torch.float32 or t.stride(1) != 1 or t.shape[1] != c:
            raise ValueError(f"softmax_pool takes float32 [R, {c}] rows, got {t.dtype} {t.shape}")
    if g1.stride(0) != kv1.stride(0) or g2.stride(0) != kv2.stride(0):
        raise ValueError("softmax_pool: kv and gate pieces must share a row stride")
    out = torch.empty((1, c), dtype=torch.float32, device=kv1.device)
    r1, r2 = kv1.shape[0], (kv2.shape[0] if second is not None else 0)
    rb1, rb2 = triton.next_power_of_2(r1), triton.next_power_of_2(max(r2, 1))
    # ≤ 4096 values of each of kv and gate per program: 128 rows × 128 columns spilled registers
    block = _block(c, max(16, min(128, 4096 // (rb1 + (rb2 if r2 else 0)))))
    _softmax_pool_kernel[(c // block,)](
        kv1, g1, kv1.stride(0), kv2, g2, kv2.stride(0), out, R1=r1, RB1=rb1, R2=r2, RB2=rb2,
        BC=block, **_pdl(kv1.device),
    )  # fmt: skip
    return out


def compressor_step(
    kv_new: torch.Tensor, gate_new: torch.Tensor, ape: torch.Tensor, carry, pos: torch.Tensor,
    norm: torch.Tensor, inv_freq: torch.Tensor, eps: float, out_dtype: torch.dtype,
    into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """`Compressor.step` after its GEMVs (kv_new, gate_new `[1, W]` float32, W = C or 2·C with
    CSA's overlap) in one launch instead of ~25 → (the entry `[1, C]` in out_dtype, roped, at a
    window's last token, zeros before it: that row is scratch until then; its row index `[1]`
    int64) for the store, carry updated in place (`CompressorCarry`). `into`: the store's rows
    `[capacity, C]` in out_dtype (`RowStore.as_stored`): the entry is written there at its
    index by the same launch (one launch fewer a compressor), and nothing is returned."""
    args, consts, result = _compressor_args(
        kv_new, gate_new, ape, carry, norm, inv_freq, eps, out_dtype, into
    )
    _compressor_step_kernel[(1,)](
        *args[:7], pos, *args[7:], **consts, num_warps=8, **_pdl(kv_new.device)
    )
    return result


def compressor_steps(parts: Sequence[dict], pos: torch.Tensor) -> list:
    """Two `compressor_step`s of one token (each part its keyword arguments but `pos`: a CSA
    layer's compressor and its indexer's) in one launch → each one's result."""
    if len(parts) != 2:
        raise ValueError(f"compressor_steps: two compressors, not {len(parts)}")
    kwargs, results = {}, []
    for p, part in enumerate(parts):
        args, consts, result = _compressor_args(**part)
        kwargs |= {f"{n}{p}": v for n, v in zip(_COMPRESSOR_ARGS, args, strict=True)}
        kwargs |= {f"{n}{p}": v for n, v in consts.items()}
        results.append(result)
    _compressor_steps_kernel[(2,)](pos, **kwargs, num_warps=8, **_pdl(pos.device))
    return results


# `_compressor_args`' arguments in order, as `_compressor_steps_kernel` names each part's
_COMPRESSOR_ARGS = ("kv_new", "g_new", "ape", "kv", "g", "prev_kv", "prev_g", "norm", "inv_freq",
                    "out", "index", "eps")  # fmt: skip


def _compressor_args(kv_new, gate_new, ape, carry, norm, inv_freq, eps, out_dtype, into=None):
    """A compressor step's kernel arguments but pos (pointers and eps, `_COMPRESSOR_ARGS`), its
    constants, and what the caller gets back (None where the entry goes `into` the store)."""
    c = norm.shape[0]
    overlap = carry.prev_kv is not None
    m, w = carry.kv.shape
    if c & (c - 1) or w != (2 * c if overlap else c) or kv_new.dtype != torch.float32:
        raise ValueError(f"compressor_step: rows of {c} (a power of two) in a carry of {w}")
    if into is not None and (into.dtype != out_dtype or into.shape[1:] != (c,)):
        raise ValueError(f"compressor_step: rows {tuple(into.shape)} {into.dtype} do not take "
                         f"entries of {c} in {out_dtype}")  # fmt: skip
    out = into if into is not None else torch.empty((1, c), dtype=out_dtype, device=kv_new.device)
    index = torch.empty((1,), dtype=torch.int64, device=kv_new.device)
    prev_kv = carry.prev_kv if overlap else carry.kv
    prev_gate = carry.prev_gate if overlap else carry.gate
    rows = min(triton.next_power_of_2(m), max(1, 4096 // c))
    args = (kv_new.contiguous(), gate_new.contiguous(), ape, carry.kv, carry.gate, prev_kv,
            prev_gate, norm, inv_freq, out, index, float(eps))  # fmt: skip
    consts = {"M": m, "C": c, "OVERLAP": overlap, "HALF": inv_freq.shape[0], "RB": rows}
    consts["INTO"] = into is not None
    return args, consts, None if into is not None else (out, index)


def decode_attention_fits(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads `head_dim` wide (V4-Flash's 512 are)."""
    return head_dim > 0 and not head_dim & (head_dim - 1)


# A decode step's sink attention is split across programs by rows (flash-decoding): one program
# per head over all of a layer's rows left 64 programs on a GPU of 132 SMs, each walking
# 640 rows at 2K context (47 µs per layer on the H200) and 8K+ rows for an HCA layer at 1M.
# Rows per split: at least DECODE_ROWS_PER_SPLIT, more where a layer would need more than
# DECODE_MAX_SPLITS splits per head.
DECODE_ROWS_PER_SPLIT = 128
DECODE_MAX_SPLITS = 64
# "heads": a program per (group of DECODE_HEAD_GROUP heads, split), the scores and sums on the
# tensor cores, each row read once per group (`_decode_attention_heads_kernel`); "head": a
# program per (head, split), float32 products on the CUDA cores, each row read once per head.
# H200, run 6, 64 heads: 128 + 512 rows 27.6 µs per head, 22.3 in groups; + 1,024 rows 47.1
# against 24.2; + 8,192 rows 278.5 against 101.1 (64 rows per split). The sweep times both on
# each GPU; "head" where the head groups fail their per-GPU check
# (`_check_decode_attention_kinds`).
DECODE_ATTENTION = "heads"
DECODE_HEAD_GROUP = 16
DECODE_HEAD_WARPS = 8
# The head groups' rows per split; 0: by the layer's rows, about DECODE_HEAD_SPLITS splits of
# 16-128 rows. No one size won every row count: H200, run 6 / run 7, µs for 16 / 32 / 64 / 128
# rows a split: 640 rows (a CSA layer's picks) - / 14.6 / 22.3 / - and 15.7 / 13.4 / 21.2 / 35.3;
# 1,152 rows 25.9 / 24.9 / 23.1 / 37.4; 8,320 rows (an HCA layer at 1M) 217 / 128 / 100 / 88.
# ~20 splits names the fastest at each (32, 64, 128); and a layer of a short context (an HCA
# layer's 144 rows at 2K) gets 9 splits of 16 where 64 gave it 3 (19 µs in the model, run 7).
DECODE_HEAD_ROWS_PER_SPLIT = 0
DECODE_HEAD_SPLITS = 20


def decode_attention_split(
    window_rows: int, comp_rows: int, head_dim: int, rows_per_split: int | None = None,
    grouped: bool = False,
) -> tuple[int, int, int, int]:  # fmt: skip
    """How `decode_attention` splits a layer's rows → (rows per block, rows per split, window
    splits, splits in all): the launch's constexprs, shared with the AOT compile check. Head
    groups (`grouped`) take 16-row blocks, the tensor cores' least. `rows_per_split`: None
    the kind's default (DECODE_HEAD_ROWS_PER_SPLIT / DECODE_ROWS_PER_SPLIT), 0 by the rows."""
    rows = 16 if grouped else max(1, min(16, 8192 // head_dim))
    total = window_rows + comp_rows
    chunk = DECODE_HEAD_ROWS_PER_SPLIT if grouped else DECODE_ROWS_PER_SPLIT
    chunk = chunk if rows_per_split is None else rows_per_split
    if not rows_per_split:  # the default or 0 (by the rows): at most DECODE_MAX_SPLITS splits
        if chunk == 0:
            chunk = min(128, -(-total // DECODE_HEAD_SPLITS))
        chunk = max(chunk, -(-total // DECODE_MAX_SPLITS))
    chunk = -(-chunk // rows) * rows  # whole row blocks
    sw = -(-window_rows // chunk)
    return rows, chunk, sw, sw + -(-comp_rows // chunk)


def decode_attention(
    q: torch.Tensor, window: torch.Tensor, own: torch.Tensor, comp: torch.Tensor | None,
    visible: torch.Tensor | None, pos: torch.Tensor, sink: torch.Tensor, scale: float,
    rows_per_split: int | None = None, kind: str | None = None, group: int | None = None,
    keep_own: bool = False, rope: tuple | None = None, picks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """`Attention.step`'s sink attention of one token in two launches (as torch ops ~20
    kernels): q `[1, H, d]`, the window ring `[W, d]` in slot order (slots past `pos`
    unwritten), the token's own row `[1, d]` for its slot, compressed rows `[C, d]` with
    `visible` `[C]` bool (or None) → `[1, H, d]` float32. The rows split across programs
    (`rows_per_split`, tests pick small ones), then merged per head; `kind`/`group`: see
    DECODE_ATTENTION ("heads" where H is a multiple of a group of at least 16).

    Two launches fewer a layer where asked, in the merge's launch: `keep_own` writes own into
    the ring's slot pos mod W (a ring of own's dtype: the step's cache write); `rope` (cos,
    sin `[1, r/2]`, dtype) gives the output as `apply_rope(out, cos, sin, inverse=True,
    out_dtype=dtype)` does. `picks` `[k]` int64: the compressed rows attended are comp[picks]
    with visible[picks] (comp and visible a store's whole capacity), read where they lie: no
    gathered copies (two launches fewer a CSA layer)."""
    heads, dim = q.shape[1], q.shape[2]
    if not decode_attention_fits(dim) or window.shape[1] != dim:
        raise ValueError(f"decode_attention takes heads of a power-of-two width, got {q.shape}")
    w = window.shape[0]
    n = comp.shape[0] if comp is not None else 0
    gathered = {}
    if picks is not None:
        if comp is None or visible is None or visible.shape[0] != n:
            raise ValueError("decode_attention: picks index a store's rows and their mask")
        n, gathered = picks.numel(), {"GATHER": True, "idx_ptr": picks.contiguous()}
    kind, group = kind or DECODE_ATTENTION, group or DECODE_HEAD_GROUP
    grouped = kind == "heads" and heads % group == 0 and dim >= 16 and group >= 16
    rows, chunk, sw, splits = decode_attention_split(w, n, dim, rows_per_split, grouped)
    dev = q.device
    top = torch.empty((heads, splits), dtype=torch.float32, device=dev)
    den = torch.empty_like(top)
    acc = torch.empty((heads, splits, dim), dtype=torch.float32, device=dev)
    args = (
        q.contiguous(), window.contiguous(), own.contiguous(),
        comp.contiguous() if comp is not None else window,
        visible.contiguous() if visible is not None else pos, pos, top, den, acc, float(scale),
    )  # fmt: skip
    shape = {"W": w, "C": n, "D": dim, "RB": rows, "CH": chunk, "SW": sw, "S": splits}
    if grouped:
        ieee = q.dtype == torch.float32 or INTERPRETED
        _decode_attention_heads_kernel[(heads // group, splits)](
            *args,
            **shape,
            HG=group,
            IEEE=ieee,
            **gathered,
            num_warps=DECODE_HEAD_WARPS,
            **_pdl(q.device),
        )
    else:
        _decode_attention_split_kernel[(heads, splits)](
            *args,
            **shape,
            **gathered,
            num_warps=4,
            **_pdl(q.device),
        )
    extra = {}
    if keep_own:
        if window.dtype != own.dtype or not window.is_contiguous():
            raise ValueError(f"keep_own: a ring of {window.dtype} cannot take {own.dtype} rows")
        extra |= {"KEEP": True, "own_ptr": args[2], "win_ptr": window, "pos_ptr": pos, "W": w}
    if rope is not None:
        cos, sin, _ = rope
        extra |= {"ROPE": True, "cos_ptr": cos.contiguous(), "sin_ptr": sin.contiguous()}
        extra |= {"HALF": cos.shape[-1]}
    out = torch.empty((1, heads, dim), dtype=rope[2] if rope else torch.float32, device=dev)
    _decode_attention_combine_kernel[(heads,)](
        top, den, acc, sink, out, D=dim, S=splits, SB=min(8, triton.next_power_of_2(splits)),
        **extra, num_warps=4, **_pdl(top.device),
    )  # fmt: skip
    return out


def fp8_rows_fits(nope: int, rope: int) -> bool:
    """Whether the FP8 KV row kernels take rows of `nope` + `rope` channels."""
    return nope % 64 == 0 and rope > 0 and not rope & (rope - 1)


def fp8_rows_put(parts: Sequence[torch.Tensor], rows: torch.Tensor, index: torch.Tensor) -> None:
    """`cache.Fp8Rows` rows `[n, nope+rope]` encoded into its parts (codes `[N, nope]` uint8,
    exponents `[N, nope/64]` uint8, rope `[N, rope]` bf16) at rows `index` `[n]` int64, in one
    launch instead of ~15 torch kernels."""
    codes, exps, rope = parts
    nope, nb = codes.shape[1], exps.shape[1]
    _fp8_rows_put_kernel[(rows.shape[0],)](
        rows.contiguous(), index, codes, exps, rope, NOPE=nope, NB=nb,
        NBP=triton.next_power_of_2(nb), ROPE=rope.shape[1], **_pdl(rows.device),
    )  # fmt: skip


def fp8_rows_read(
    parts: Sequence[torch.Tensor], index: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """`cache.Fp8Rows.decode` of the rows at `index` `[n]` int64 (None: all) → `[n, nope+rope]`
    in `dtype`, in one launch instead of ~10 torch kernels."""
    codes, exps, rope = parts
    nope, nb = codes.shape[1], exps.shape[1]
    n = codes.shape[0] if index is None else index.shape[0]
    out = torch.empty((n, nope + rope.shape[1]), dtype=dtype, device=codes.device)
    if n:
        _fp8_rows_read_kernel[(n,)](
            codes, exps, rope, codes if index is None else index, out, NOPE=nope, NB=nb,
            NBP=triton.next_power_of_2(nb), ROPE=rope.shape[1], GATHER=index is not None,
            **_pdl(codes.device),
        )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`common.rms_norm` (over the last dim, float32 math, weight float32 or None, result in x's
    dtype) in one launch."""
    n = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    w = weight.contiguous() if weight is not None else x  # x: an unused pointer
    _rms_norm_kernel[(x.numel() // n,)](
        x, w, out, float(eps), N=n, BLOCK=triton.next_power_of_2(n), HAS_W=weight is not None,
        num_warps=4 if n <= 2048 else 8, **_pdl(x.device),
    )  # fmt: skip
    return out


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`rope.apply_rope` (x `[S, d]` or `[S, H, d]`, cos/sin `[S, r/2]` float32) in one launch;
    `out_dtype`: that of `x.to(out_dtype)` rotated, without the narrowing's own launch."""
    return _rope(x, cos, sin, inverse, out_dtype)


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """`apply_rope(rms_norm(x, weight, eps), cos, sin)` (x `[S, d]` or `[S, H, d]`, each row
    normed) in one launch, the same values: two launches fewer a decode layer (q and kv)."""
    if not fusing_norms(x.device):
        return apply_rope(rms_norm(x, weight, eps), cos, sin)
    return _rope(x, cos, sin, False, None, (weight, eps))


def norm_ropes(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor | None, bool]],
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> list[torch.Tensor]:
    """Each part (x `[S, d]` or `[S, H, d]`, norm weight or None, normed) →
    `norm_rope(x, weight, eps, cos, sin)` where normed, else `apply_rope(x, cos, sin)`: up to
    three in one launch (a decode step's q, kv and the indexer's queries: two launches fewer
    a CSA layer, one fewer another), the same values."""
    if not parts or len(parts) > 3:
        raise ValueError(f"norm_ropes: 1 to 3 parts, not {len(parts)}")
    if not fusing_norms(parts[0][0].device):
        return [norm_rope(x, w, eps, cos, sin) if n else apply_rope(x, cos, sin)
                for x, w, n in parts]  # fmt: skip
    return _norm_ropes(parts, eps, cos, sin)


def _norm_ropes(parts, eps, cos, sin) -> list[torch.Tensor]:
    half = cos.shape[-1]
    tokens = parts[0][0].shape[0]
    args, outs, rows = {}, [], 0
    for p in range(3):
        used = p < len(parts)  # a part left out repeats the last one's, without programs
        x, weight, normed = parts[p if used else -1]
        if x.shape[0] != tokens:
            raise ValueError("norm_ropes: the parts hold the same tokens")
        x = x.contiguous()
        d = x.shape[-1]
        heads = (x.shape[1] if x.dim() == 3 else 1) if used else 1
        out = torch.empty_like(x) if used else outs[-1]
        if used:
            outs.append(out)
            rows += tokens * heads
        w = weight.contiguous() if normed and weight is not None else x
        args |= {f"x{p}": x, f"o{p}": out, f"w{p}": w, f"H{p}": heads, f"D{p}": d,
                 f"NB{p}": triton.next_power_of_2(max(d - 2 * half, 1)),
                 f"B{p}": triton.next_power_of_2(d), f"N{p}": bool(normed),
                 f"W{p}": bool(normed and weight is not None)}  # fmt: skip
    _ropes_kernel[(rows,)](
        cos.contiguous(), sin.contiguous(), float(eps), tokens, HALF=half,
        HALF_BLOCK=triton.next_power_of_2(half), **args, **_pdl(cos.device),
    )  # fmt: skip
    return outs


def fusing_norms(device: torch.device) -> bool:
    """FUSED_NORMS, where the fused kernels passed their check on `device`."""
    return FUSED_NORMS and checked("RMSNorm fusion", device)


def _rope(x, cos, sin, inverse, out_dtype, norm=None) -> torch.Tensor:
    half = cos.shape[-1]
    d = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    normed = {}
    if norm is not None:
        weight, eps = norm
        normed = {"NORM": True, "eps": float(eps), "BLOCK": triton.next_power_of_2(d)}
        normed |= {"HAS_W": weight is not None, "w_ptr": x if weight is None else weight}
    _rope_kernel[(x.numel() // d,)](
        x, cos.contiguous(), sin.contiguous(), out, SIGN=-1.0 if inverse else 1.0, H=heads,
        D=d, HALF=half, NOPE_BLOCK=triton.next_power_of_2(max(d - 2 * half, 1)),
        HALF_BLOCK=triton.next_power_of_2(half), **normed, **_pdl(x.device),
    )  # fmt: skip
    return out


def hc_pre_tail(
    mixes: torch.Tensor,
    x: torch.Tensor,
    scale,
    base,
    iters: int,
    hc_eps: float,
    norm: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mhc.hc_pre` after its mixes `[S, (2+hc)·hc]` float32: → u `[S, D]` (x's dtype), post
    `[S, hc]`, comb `[S, hc, hc]` (Sinkhorn-balanced), in one launch. `norm` `[D]` float32: u
    comes back as `rms_norm(u, norm, norm_eps)` (the block's input norm) in that launch. The
    mixes may come as `hc_post(then=)`'s partial sums `[S, P, (2+hc)·hc + 1]`, finished here
    with the RMS epsilon norm_eps (that of the mixes and the norm alike). `out`: contiguous
    tensors of the results' shapes and dtypes to write them into (a captured step's fixed
    buffers), where the launch can; the caller copies what came back elsewhere."""
    # the fused norm takes the row as one block, a power of two
    if norm is not None and (x.shape[2] & (x.shape[2] - 1) or not fusing_norms(x.device)):
        u, post, comb = hc_pre_tail(mixes, x, scale, base, iters, hc_eps, None, norm_eps)
        return rms_norm(u, norm, norm_eps), post, comb
    return _hc_pre(mixes, x, scale, base, iters, hc_eps, norm, norm_eps, out)


def hc_head_tail(
    mixes: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    norm: torch.Tensor,
    norm_eps: float,
) -> torch.Tensor:
    """`rms_norm(mhc.hc_head(x, ...), norm, norm_eps)` after the head's mixes `[S, hc]` (or
    `hc_post(then=)`'s partial sums `[S, P, hc + 1]`) → `[S, D]` in x's dtype, in one launch
    (as torch ops six launches and the norm's). D a power of two, the norms fusing."""
    if x.shape[2] & (x.shape[2] - 1) or not fusing_norms(x.device):
        raise ValueError(f"hc_head_tail: streams of {x.shape[2]} (a power of two), norms fusing")
    return _hc_head_tail(mixes, x, scale, base, hc_eps, norm, norm_eps)


def _hc_head_tail(mixes, x, scale, base, hc_eps, norm, norm_eps) -> torch.Tensor:
    s, hc, dim = x.shape
    u = torch.empty((s, dim), dtype=x.dtype, device=x.device)
    parts = mixes.shape[1] if mixes.dim() == 3 else 0
    _hc_pre_kernel[(s, 1)](
        mixes.contiguous(), x.contiguous(), scale.contiguous(), base.contiguous(), u, u, u,
        float(hc_eps), ITERS=1, HC=hc, D=dim, BLOCK_D=dim, NORM=True, w_ptr=norm.contiguous(),
        eps=float(norm_eps), PARTS=parts, PB=triton.next_power_of_2(max(parts, 1)), HEAD=True,
        num_warps=8, **_pdl(x.device),
    )  # fmt: skip
    return u


def _hc_pre(mixes, x, scale, base, iters, hc_eps, norm, norm_eps, out=None):
    s, hc, dim = x.shape
    x = x.contiguous()
    parts = mixes.shape[1] if mixes.dim() == 3 else 0  # hc_post's partial sums
    if out is not None:
        u, post, comb = out
    else:
        u = torch.empty((s, dim), dtype=x.dtype, device=x.device)
        post = torch.empty((s, hc), dtype=torch.float32, device=x.device)
        comb = torch.empty((s, hc, hc), dtype=torch.float32, device=x.device)
    block, normed = _block(dim, 256), {}
    if norm is not None:  # block 1 takes the whole row: its norm needs all of it
        block, normed = dim, {"NORM": True, "w_ptr": norm.contiguous(), "eps": float(norm_eps)}
        normed["num_warps"] = 8
    normed.setdefault("eps", float(norm_eps))  # the partial mixes' RMS epsilon too
    _hc_pre_kernel[(s, 2 if norm is not None else dim // block)](
        mixes.contiguous(), x, scale.contiguous(), base.contiguous(), u, post, comb,
        float(hc_eps), ITERS=iters, HC=hc, D=dim, BLOCK_D=block, **normed, PARTS=parts,
        PB=triton.next_power_of_2(max(parts, 1)), **_pdl(mixes.device),
    )  # fmt: skip
    return u, post, comb


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, picked: torch.Tensor | None, k: int,
    scale: float, record: RoutingRecord | None = None, out: tuple | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """`moe.Router` after its gate GEMV in one launch (as torch ops ~8 kernels per layer):
    logits `[T, E]` float32, with `bias` `[E]` (top-k routing) or `picked` `[T, k]` (hash
    routing) → experts `[T, k]` int64, weights `[T, k]` float32; with `record`, also what
    `record_picks` does in the same launch, and the host ids `[T, k]` as a third result.
    `out`: contiguous tensors of those shapes to write them into (a captured decode step's
    fixed buffers: no copies after)."""
    tokens, n = logits.shape
    if (bias is None) == (picked is None) or logits.dtype != torch.float32:
        raise ValueError("route takes float32 logits and either a bias or hash picks")
    if out is None:
        experts = torch.empty((tokens, k), dtype=torch.int64, device=logits.device)
        weights = torch.empty((tokens, k), dtype=torch.float32, device=logits.device)
        host = torch.empty_like(experts) if record is not None else experts
    else:
        experts, weights, host = (*out, out[0])[:3]
    given = picked.to(torch.int64).contiguous() if picked is not None else experts
    logged = (record or _NO_RECORD).kernel_args(experts, host) | {"RECORD": record is not None}
    _route_kernel[(tokens,)](
        logits.contiguous(), bias if bias is not None else logits, given, experts, weights,
        float(scale), **logged, E=n, BE=triton.next_power_of_2(n), K=k,
        BK=triton.next_power_of_2(k), HASH=picked is not None, **_pdl(logits.device),
    )  # fmt: skip
    return (experts, weights) if record is None else (experts, weights, host)


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """`mhc._mixes` for a few tokens in one launch: x `[S, hc, D]`, fn `[n_mix, hc·D]` float32
    → `[S, n_mix]` float32 (as torch ops: a widening, the mean square, its root, a GEMV and a
    product: ~6 kernels, twice per layer)."""
    k = x.shape[1] * x.shape[2]
    if fn.dtype != torch.float32 or fn.shape[1] != k:
        raise ValueError(f"hc_mixes: fn {fn.dtype} {tuple(fn.shape)} does not fit x {x.shape}")
    x = x.contiguous()
    out = torch.empty((x.shape[0], fn.shape[0]), dtype=torch.float32, device=x.device)
    # One program per mix (24 for V4-Flash) walks the whole 16,384-long row: few programs, so
    # the serial steps bound it (run 5, H200: 8 µs a launch with 16 steps of 1,024); 4 steps of
    # 4,096 over 8 warps keep 4× the loads in flight per step.
    _hc_mixes_kernel[(x.shape[0], fn.shape[0])](
        x,
        fn.contiguous(),
        out,
        float(norm_eps),
        K=k,
        BK=_block(k, 4096),
        num_warps=8,
        **_pdl(x.device),
    )
    return out


def hc_post(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    add: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    then: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`mhc.hc_post` in one launch: new streams `[S, hc, D]` in x's dtype (into `out`, a
    contiguous tensor of that shape, where given); `add` `[S, D]` or `[S, n, D]` float32, or two
    such: partial sums added to f (the routed experts' share: the VRAM cache's and the in-place
    reads') before f is rounded to x's dtype.

    `then` (the next site's mixes weights `[n_mix, hc·D]` float32): → (the streams, their
    mixes as partial sums `[S, P, n_mix + 1]` for `hc_pre_tail`), the mixes' own launch saved."""
    s, hc, dim = x.shape
    if out is None:
        out = torch.empty((s, hc, dim), dtype=x.dtype, device=x.device)
    block = _block(dim, 256)
    mixed = {}
    if then is not None:
        if then.dtype != torch.float32 or then.shape[1] != hc * dim:
            raise ValueError(f"hc_post: mixes weights {tuple(then.shape)} for streams {x.shape}")
        # narrower blocks: more programs share the weights' reads (V4-Flash: 1.5 MB a site)
        block = _block(dim, 64)
        n = then.shape[0]
        sums = torch.empty((s, dim // block, n + 1), device=x.device)
        mixed = {"NM": n, "NMB": triton.next_power_of_2(n), "fn_ptr": then.contiguous()}
        mixed["parts_ptr"] = sums
    parts, counts = _partial_sums(f, add)
    _hc_post_kernel[(s, dim // block)](
        f.contiguous(), *parts, x.contiguous(), post.contiguous(), comb.contiguous(), out,
        HC=hc, D=dim, BLOCK_D=block, **counts, **mixed, **_pdl(f.device),
    )  # fmt: skip
    return (out, mixed["parts_ptr"]) if mixed else out


def _partial_sums(f: torch.Tensor, add) -> tuple[list[torch.Tensor], dict]:
    """`add` (None, `[S, D]` / `[S, n, D]`, or two such) → the two `[S, n, D]` tensors the
    kernels read (f as an unread filler where there are fewer) and their N_ADD, N_ADD2."""
    s, dim = f.shape
    adds = [] if add is None else list(add) if isinstance(add, tuple) else [add]
    parts = [a.reshape(s, -1, dim).contiguous() for a in adds]
    counts = {"N_ADD": parts[0].shape[1] if parts else 0}
    counts["N_ADD2"] = parts[1].shape[1] if len(parts) > 1 else 0
    return [*parts, f, f][:2], counts


def sum_parts(f: torch.Tensor, add, out: torch.Tensor) -> torch.Tensor:
    """f `[S, D]` widened plus its partial sums (`hc_post`'s `add`) → out `[S, D]` float32 in
    one launch (a host layer's device share, handed to the next segment: as torch ops a
    widening, a sum and an add per tensor, and a copy into the fixed buffer)."""
    s, dim = f.shape
    block = _block(dim, 256)
    parts, counts = _partial_sums(f, add)
    _sum_parts_kernel[(s, dim // block)](
        f.contiguous(), *parts, out, D=dim, BLOCK_D=block, **counts, **_pdl(f.device)
    )
    return out


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """`moe.swiglu` (gate, up `[..., I]` of one shape) in one launch → out_dtype (as torch ops:
    two widenings, two clamps, the SiLU, the product and the narrowing)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    n = gate.numel()
    block = min(1024, triton.next_power_of_2(n))
    _swiglu_kernel[(triton.cdiv(n, block),)](
        gate,
        up,
        out,
        float(limit),
        N=n,
        BLOCK=block,
        CLAMP=limit > 0,
        **_pdl(gate.device),
    )
    return out


@dataclasses.dataclass(frozen=True)
class RoutingRecord:
    """Where a layer's picks are logged and which the host leaves to the device (`route`'s
    `record`): counts `[E]` int64 and the totals (`runtime_experts.RoutingLog`'s), the device
    cache's `resident` and the in-place reads' `in_place` `[E]` bool or None, `hits`: count
    the cache's hits."""

    counts: torch.Tensor | None
    device_picks: torch.Tensor | None
    total_picks: torch.Tensor | None
    resident: torch.Tensor | None = None
    in_place: torch.Tensor | None = None
    hits: bool = True

    def kernel_args(self, experts: torch.Tensor, host: torch.Tensor) -> dict:
        """The record kernels' pointer and switch arguments, `experts` standing in for what is
        None (never read there), `host` the host ids' output."""
        pointers = {
            "resident_ptr": self.resident,
            "in_place_ptr": self.in_place,
            "counts_ptr": self.counts,
            "device_picks_ptr": self.device_picks,
            "total_picks_ptr": self.total_picks,
        }
        return {k: experts if v is None else v for k, v in pointers.items()} | {
            "host_ptr": host,
            "HAS_RESIDENT": self.resident is not None,
            "HITS": self.hits and self.resident is not None,
            "IN_PLACE": self.in_place is not None,
        }


_NO_RECORD = RoutingRecord(None, None, None)  # route's arguments where it logs nothing


def record_picks(
    experts: torch.Tensor,
    resident: torch.Tensor | None,
    counts: torch.Tensor,
    device_picks: torch.Tensor,
    total_picks: torch.Tensor,
    hits: bool = True,
    in_place: torch.Tensor | None = None,
) -> torch.Tensor:
    """`RoutingLog.record` of one layer's picks plus the host's share, in one launch (as torch
    ops ~7 kernels per layer): experts `[T, k]` int64 counted into `counts` `[E]` int64 and
    `total_picks`; with `resident` `[E]` bool (the device cache) the hits into `device_picks`
    (when `hits`) → host ids `[T, k]` (−1 where resident, and where `in_place` `[E]` bool: the
    zero-copy experts the device reads, two torch launches fewer)."""
    if experts.dtype != torch.int64 or counts.dtype != torch.int64:
        raise ValueError("record_picks takes int64 experts and counts")
    experts = experts.contiguous()
    host = torch.empty_like(experts)
    p = experts.numel()
    record = RoutingRecord(counts, device_picks, total_picks, resident, in_place, hits)
    _record_picks_kernel[(1,)](
        experts, **record.kernel_args(experts, host), P=p, BP=triton.next_power_of_2(p),
        **_pdl(experts.device),
    )  # fmt: skip
    return host


INDEX_ROWS = 64  # index keys per program of `index_scores`


def index_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    scale: float,
    keys: torch.Tensor,
    pos: torch.Tensor,
    ratio: int,
    key_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores in one launch (as torch ops: three widenings, two products, the
    ReLU, the mask: ~9 kernels per CSA layer, a float32 copy of every index key, and for a
    prompt's block of queries a `[b, H, C]` float32 temporary, 1 GB per block at 1M tokens):
    q `[H, d]` roped queries (or `[S, H, d]`: S queries), w `[H]` (`[S, H]`) the head weights
    before `scale` (taken as rounded to q's dtype, as `weights_proj` gives them), keys `[C, d]`
    of q's dtype, or E4M3 code bytes (uint8 / float8_e4m3fn) with `key_scale` `[C]` / `[C, 1]`
    float32 per key (`cache.Fp8KeyRows`, read without decoding them first), pos `[1]` (`[S]`) int64 positions → `[C]` (`[S, C]`) float32, −∞ from each query's
    ⌊(pos+1)/ratio⌋ on."""
    one = q.dim() == 2
    q3, w2 = (q[None], w[None]) if one else (q, w)
    queries, h, d = q3.shape
    rows = keys.shape[0]
    fp8 = key_scale is not None
    kind_fits = keys.dtype in (torch.uint8, torch.float8_e4m3fn) if fp8 else keys.dtype == q.dtype
    if not kind_fits or keys.shape[1] != d or w2.shape != (queries, h) or pos.numel() != queries:
        raise ValueError(
            f"index_scores: q {q.dtype} {tuple(q.shape)}, w {tuple(w.shape)}, pos "
            f"{tuple(pos.shape)} and keys {keys.dtype} {tuple(keys.shape)} do not fit"
        )
    if fp8 and (key_scale.dtype != torch.float32 or key_scale.numel() != rows):
        raise ValueError(f"index_scores: FP8 keys need a float32 scale per key ({rows})")
    if h < 16 or d < 16 or h & (h - 1) or d & (d - 1):
        raise ValueError(f"index_scores: {h} heads of {d}: need powers of two ≥ 16")
    out = torch.empty((queries, rows), dtype=torch.float32, device=q.device)
    keys = _bytes(keys) if fp8 else keys
    if queries and rows:
        _index_scores_kernel[(queries, triton.cdiv(rows, INDEX_ROWS))](
            q3.contiguous(), w2.contiguous(), keys.contiguous(),
            key_scale.contiguous() if fp8 else out, pos.contiguous(), out, float(scale), rows,
            RATIO=ratio, H=h, D=d, BT=INDEX_ROWS, IEEE=q.dtype == torch.float32 or INTERPRETED,
            KSCALE=fp8, **_pdl(q3.device),
        )  # fmt: skip
    return out[0] if one else out


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed `[O, K/2]` E2M1 bytes (low nibble first), scale `[O, K/32]` E8M0 → `[O, K]` dtype,
    in one pass (the same values as `runtime_experts.fp4_dequant_torch`; results below float32's
    normal range may read as 0)."""
    b, s = _bytes(packed).contiguous(), _bytes(scale).contiguous()
    rows, half = b.shape
    out = torch.empty((rows, 2 * half), dtype=dtype, device=b.device)
    bn, bkb = _block(rows, 16), _block(half, 64)
    if bkb < 16:
        raise ValueError(f"FP4 rows of {2 * half} values are not whole 32-value blocks")
    _dequant_fp4_kernel[(rows // bn, half // bkb)](
        b,
        s,
        out,
        K=2 * half,
        BN=bn,
        BKB=bkb,
        **_pdl(b.device),
    )
    return out


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    groups: int = 1,
    out_dtype: torch.dtype | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    kind: str | None = None,
    tiles: tuple[int, int, int] | None = None,
    split: int | None = None,
    num_stages: int | None = None,
    block_k: int | None = None,
    unroll: int | None = None,
    glu: float | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x `[T, G·K]` · W `[N, K]`ᵀ → `[T, N]` (out_dtype, default x's), float32 sums.

    W: FP8 E4M3 with `scale` `[⌈N/128⌉, ⌈K/128⌉]` E8M0 tile scales, or BF16/FP16/FP32 without.
    groups G > 1: rows split into G equal groups, group g multiplying x's g-th K slice (`wo_a`).
    `kind` "rows" (`block_n` rows per program, `block_k` columns per step, one token per
    program, float32 products) or "dot" (`tiles` = (tokens, rows, K step) per program on the
    tensor cores); `split` programs per row block's K (None: enough for LINEAR_MIN_PROGRAMS /
    LINEAR_ROWS_MIN_PROGRAMS; partial sums added after); `unroll`: "rows" steps unrolled
    together (at most); `num_stages`: the pipeline's depth ("dot") or steps in flight
    ("rows"). Defaults: LINEAR_KIND for FP8 weights with bf16/fp16 activations, else "rows"; the
    other options from LINEAR_ROWS, LINEAR_ROWS_K, LINEAR_ROWS_UNROLL, LINEAR_ROWS_STAGES,
    LINEAR_TILES, LINEAR_STAGES.
    `glu` (the clamp, 0 for none): x is `[T, 2K]`, gate then up, and the product takes
    `swiglu(gate, up, glu, x.dtype)` (the shared expert's w2 after its joined w1/w3), computed
    as the "rows" kernel reads x: one launch fewer; the "dot" kernel gets SwiGLU's launch first.
    `norm` (weight `[K]` float32, eps): the product takes `rms_norm(x, weight, eps)` instead
    of x, normed as the "rows" kernel reads it (`wq_b` after the q_a norm); the "dot" kernel
    gets the norm's launch first.
    """
    n, k = weight.shape
    if glu is not None and (groups != 1 or x.shape[-1] != 2 * k):
        raise ValueError(f"a SwiGLU input is [T, 2K] for W {tuple(weight.shape)}, one group")
    if norm is not None and (groups != 1 or glu is not None or norm[0].shape != (k,)):
        raise ValueError(f"a normed input is [T, K] for W {tuple(weight.shape)}, one group")
    if x.shape[-1] != groups * k * (1 if glu is None else 2) or n % groups:
        raise ValueError(
            f"x {tuple(x.shape)} does not fit W {tuple(weight.shape)} in {groups} groups"
        )
    if (scale is not None) != (weight.dtype == torch.float8_e4m3fn):
        raise ValueError("FP8 weights need their tile scales; other weights take none")
    group_rows = n // groups
    weight, s = _as_read(weight, scale)
    x = x.contiguous()
    tokens = x.shape[0]
    out = torch.empty((tokens, n), dtype=out_dtype or x.dtype, device=x.device)
    min_programs = LINEAR_ROWS_MIN_PROGRAMS
    if kind is None and block_n is None and num_warps is None and block_k is None and split is None:
        shaped = LINEAR_ROWS_BY_SHAPE.get((n, k, groups, weight.element_size()))
        if shaped is not None:
            kind, (block_n, num_warps, block_k, min_programs) = "rows", shaped
    if kind is None:
        halves = x.dtype in (torch.bfloat16, torch.float16)
        kind = LINEAR_KIND if scale is not None and halves else "rows"
    if kind == "dot":
        if glu is not None:  # the tensor cores read x as it is: SwiGLU's own launch first
            x = swiglu(x[:, :k], x[:, k:], glu, x.dtype)
        if norm is not None:  # and the norm's
            x = rms_norm(x, norm[0], norm[1])
        num_warps = num_warps or 4
        num_stages = num_stages or LINEAR_STAGES
        bm, bn, bk = tiles or LINEAR_TILES
        bn, bk = _block(math.gcd(group_rows, 128), bn), _block(math.gcd(k, 128), bk)
        if bk < 16 or bn < 16:
            raise ValueError(f"W {tuple(weight.shape)}: rows and K need multiples of 16")
        if split is None:
            split = _split_k((n // bn) * -(-tokens // bm), k, bk, LINEAR_MIN_PROGRAMS)
        if k % (split * bk):
            raise ValueError(f"K {k} does not split {split} ways in steps of {bk}")
        dest = out if split == 1 else torch.empty((split, tokens, n), dtype=torch.float32,
                                                  device=x.device)  # fmt: skip
        extra = {"num_stages": num_stages} if num_stages else {}
        _linear_dot_kernel[(n // bn, split, -(-tokens // bm))](
            x, weight, s, dest, tokens, N=n, K=k, X_STRIDE=groups * k, GROUP_ROWS=group_rows,
            HAS_SCALE=scale is not None, BM=bm, BN=bn, BK=bk, SPLIT=split,
            IEEE=x.dtype == torch.float32 or INTERPRETED, num_warps=num_warps, **extra,
            **_pdl(x.device),
        )  # fmt: skip
        if split > 1:
            out.copy_(dest.sum(dim=0))
        return out
    num_warps = num_warps or LINEAR_ROWS[1]
    bn, bk = _rows_tiles(group_rows, k, scale is not None, block_n, block_k)
    if split is None:
        split = _split_k(tokens * (n // bn), k, bk, min_programs)
    if k % (split * bk):
        raise ValueError(f"K {k} does not split {split} ways in steps of {bk}")
    dest = out if split == 1 else torch.empty((split, tokens, n), dtype=torch.float32,
                                              device=x.device)  # fmt: skip
    unroll = _block(k // (split * bk), unroll or LINEAR_ROWS_UNROLL)  # dividing the steps
    glu_args = {} if glu is None else {"GLU": True, "GLU_LIMIT": float(glu)}
    if norm is not None:
        glu_args |= {"NORM": True, "nw_ptr": norm[0].contiguous(), "eps": float(norm[1])}
        glu_args["NORM_BLOCK"] = triton.next_power_of_2(k)
    _linear_kernel[(tokens, n // bn, split)](
        x, weight, s, dest, N=n, K=k, X_STRIDE=x.shape[-1], GROUP_ROWS=group_rows,
        HAS_SCALE=scale is not None, BN=bn, BK=bk, SPLIT=split, T=tokens, UNROLL=unroll,
        STAGES=num_stages or LINEAR_ROWS_STAGES, num_warps=num_warps, **glu_args,
        **_pdl(x.device),
    )  # fmt: skip
    if split > 1:
        out.copy_(dest.sum(dim=0))
    return out


def _as_read(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple:
    """A linear's weight and scale pointers as its kernels read them: FP8 weights as bytes
    where the GPU has no FP8 type (decoded from the bits, `_fp8_weights`), E8M0 scales as
    bytes (the weight again where there are none: an unused pointer)."""
    if scale is None:
        return weight, weight
    if not native_fp8(weight.device):
        weight = weight.view(torch.uint8)
    return weight, _bytes(scale).contiguous()


def _rows_tiles(group_rows: int, k: int, scaled: bool, block_n=None, block_k=None) -> tuple:
    """The "rows" kernel's rows per program and columns per step (BN, BK) for a group of
    `group_rows` rows of K: the wanted ones (default LINEAR_ROWS, LINEAR_ROWS_K) where they
    divide, and within one 128-row scale tile for FP8 weights."""
    block_n, block_k = block_n or LINEAR_ROWS[0], block_k or LINEAR_ROWS_K
    bn = _block(math.gcd(group_rows, 128) if scaled else group_rows, block_n)
    bk = _block(k, block_k)
    if bk < 16:
        raise ValueError(f"rows of {k} values: need a multiple of 16")
    return bn, bk


def linear_pair(
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two `linear(x, weight, scale, out_dtype=...)`s, each (x, weight, scale, out_dtype) with
    x `[T, K]` of the same T, in one launch (`_linear_pair_kernel`): the same values. Where
    their shapes' options (LINEAR_ROWS_BY_SHAPE, else the defaults) are the "rows" kind with
    the same warps and K unsplit; else None (the caller launches each)."""
    plans, tokens = [], first[0].shape[0]
    for x, weight, scale, out_dtype in (first, second):
        n, k = weight.shape
        if (
            x.dim() != 2
            or x.shape != (tokens, k)
            or (scale is not None) != (weight.dtype == torch.float8_e4m3fn)
        ):
            return None
        halves = x.dtype in (torch.bfloat16, torch.float16)
        shaped = LINEAR_ROWS_BY_SHAPE.get((n, k, 1, weight.element_size()))
        if shaped is None and scale is not None and halves and LINEAR_KIND != "rows":
            return None  # the tensor cores' kind
        block_n, warps, block_k, wanted = shaped or (*LINEAR_ROWS, LINEAR_ROWS_K, 0)
        bn, bk = _rows_tiles(n, k, scale is not None, block_n, block_k)
        if n % bn or _split_k(tokens * (n // bn), k, bk, wanted) != 1:
            return None
        weight, s = _as_read(weight, scale)
        out = torch.empty((tokens, n), dtype=out_dtype, device=x.device)
        plans.append((warps, out, {"x": x.contiguous(), "w": weight, "s": s, "out": out, "N": n,
                                   "K": k, "X_STRIDE": k, "HAS_SCALE": scale is not None,
                                   "BN": bn, "BK": bk, "UNROLL": _block(k // bk, LINEAR_ROWS_UNROLL),
                                   "STAGES": LINEAR_ROWS_STAGES}))  # fmt: skip
    if plans[0][0] != plans[1][0]:
        return None
    args = {f"{name}{p}": v for p, plan in enumerate(plans) for name, v in plan[2].items()}
    blocks = sum(plan[2]["N"] // plan[2]["BN"] for plan in plans)
    _linear_pair_kernel[(tokens, blocks)](
        tokens, **args, num_warps=plans[0][0], **_pdl(first[0].device)
    )
    return plans[0][1], plans[1][1]


def _split_k(programs: int, k: int, step: int, wanted: int) -> int:
    """Programs per row block's K so that a launch has at least `wanted` programs (V4's skinny
    linears have few row blocks: too few loads in flight), each share ≥ 512 and whole steps."""
    split = 1
    while programs * split < wanted and (k // (2 * split)) % max(512, step) == 0:
        split *= 2
    return split


def _check_decode_attention_kinds(dev: torch.device) -> str | None:
    """`_check_decode_attention` of the built-in kind; where the head groups (tensor cores)
    fail it, the one-head-per-program kernel is checked and kept instead of torch's ops."""
    try:
        reason = _check_decode_attention(dev)
    except Exception as exc:  # could not compile or run
        reason = f"could not compile or run ({error_summary(exc)})"
    if reason is None or DECODE_ATTENTION != "heads":
        return reason
    globals()["DECODE_ATTENTION"] = "head"
    return _check_decode_attention(dev)


# kernels checked on their own at first use on a device (`checked`): name → check
CHECKS = {
    "compressor step": _check_compressor_step,
    "paired linears": _check_paired_linears,
    "hyper-connection mixes": _check_hc_mixes,
    "routing": _check_route,
    "decode attention": _check_decode_attention_kinds,
    "FP8 KV rows": _check_fp8_rows,
    "routing log": _check_record_picks,
    "RMSNorm fusion": _check_fused_norms,
    "indexer scores": _check_index_scores,
    "FP4 int8 dots": _check_q8_moe,
}
