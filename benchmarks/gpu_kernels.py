"""Routed experts held in VRAM, one layer of a decode step: the Triton kernels that read the packed
FP4 bytes (engine/gpu_kernels.py) against torch's dequantize-then-multiply, at V4-Flash's dims.

A GPU that holds an expert layer reads 6 picked experts × 13.37 MB per token from it; the bound
is those bytes at the device memory bandwidth measured here (a 1 GiB device-to-device copy,
read + write bytes). Printed: the fused kernels' GB/s and their ratio to that bandwidth, for
each tile shape tried (the fastest becomes the default: `gpu_kernels.TILES`), the speed-up over
the torch path, the time for 4 and 16 tokens, and the one-pass dequantization's GB/s (long
prompts). Picks rotate over 32 random sets of a 256-expert layer, so the 80 MB a step reads do
not sit in the 50–60 MB L2. The decode kernels (experts, linears) are timed as a decode step
runs them, replayed from a CUDA graph: device time, without Python's launch cost per call (on
the H200 that cost, tens of µs, hid the differences between shapes). Also: a prompt chunk's
experts through the grouped kernels, and which `linear` kind is fastest for V4's FP8 linears;
the fastest shapes are recorded for this GPU model (`engine.gpu_tuning`), and the runtime uses
them. Needs a CUDA GPU with Triton; elsewhere it says so and returns.
"""

from __future__ import annotations

import statistics
import time

import _machine

DIM, INTER, TOP_K, EXPERTS = 4096, 2048, 6, 256
SETS, REPS = 32, 64
# (rows, bytes per step) of gate/up, then of down; warps; (MODE, F16[, SPLIT]) of
# `gpu_kernels.moe`. First H200 sweep (MODE 0, F16 0): 8 rows × 256 bytes, 4 warps best at
# 389 GB/s (0.09 × copy). Later sweeps: F16 1 halved the time; MODE 1 (103-279 µs) and MODE 0
# without F16 (121-150 µs) lost to (0, 1) every time (70-72 µs) and are no longer timed; nor is
# (0, 1) since run 6 (71.6-82.7 µs against 65.8-71.3 for (0, 1, 1), the down split per pick).
TILE_CHOICES = [
    (tiles, warps, (0, 1, 1))
    for tiles, warps in (
        ((8, 256, 8, 256), 4),
        ((4, 512, 4, 512), 4),
        ((8, 512, 8, 512), 8),
        ((16, 256, 16, 256), 4),
    )
]
TILE_CHOICES += [((8, 512, 16, 512), 8, (0, 1, 1)), ((8, 512, 32, 256), 8, (0, 1, 1))]
# the word-wise decode (MODE 2, half the instructions per weight in sm_90's SASS): run 6 timed
# six shapes at 72-101 µs against 66 for (0, 1, 1); its best one stays in the sweep
TILE_CHOICES += [((32, 128, 32, 128), 4, (2, 0, 1))]
# the default shapes with 2-4 steps in flight (a fourth item: FP4_STAGES): Triton pipelines the
# loop's loads through shared memory (cp.async), where a plain loop awaits each step's bytes
TILE_CHOICES += [
    ((16, 256, 16, 256), 4, (0, 1, 1), 2),
    ((16, 256, 16, 256), 4, (0, 1, 1), 3),
    ((16, 256, 16, 256), 4, (0, 1, 1), 4),
    ((8, 256, 8, 256), 4, (0, 1, 1), 3),
    ((8, 512, 8, 512), 8, (0, 1, 1), 3),
]
# the integer dots (MODE 4: int8 activations, E2M1 codes to int8 by byte permutes, dp4a; about
# 2.4 instructions per weight in sm_90's SASS against 10.4): 32 gate/up rows a program (h is
# quantized per 32), a few steps' sizes, down rows, steps in flight, a whole row a step, and
# gate and up in one loop (mode (4, 1, 1)). Their values are checked against their own int8
# reference (`moe_q8_reference`).
TILE_CHOICES += [
    ((32, 512, 32, 512), 4, (4, 0, 1)),
    ((32, 256, 32, 256), 4, (4, 0, 1)),
    ((64, 256, 64, 256), 8, (4, 0, 1)),
    ((32, 512, 16, 512), 4, (4, 0, 1)),
    ((32, 2048, 32, 1024), 8, (4, 0, 1)),
    ((32, 512, 32, 512), 4, (4, 0, 1), 2),
    ((32, 512, 32, 512), 4, (4, 1, 1)),
    ((32, 256, 32, 256), 4, (4, 1, 1)),
]
# the fused decode (MODE 3: gate and up in one loop, sums per thread, steps unrolled) lost in
# run 7 (75-126 µs over eight shapes against 64.9) and is gone
# A decode step's experts through the grouped tensor-core kernels, one block per pick
# (`gpu_kernels.moe_by_pick`): (tokens, rows, bytes per step), warps.
BY_PICK_CHOICES = [
    ((16, 64, 64), 4),
    ((16, 32, 64), 4),
    ((16, 128, 64), 4),
    ((16, 64, 128), 4),
    ((16, 128, 128), 8),
]
# A prompt chunk's experts (`gpu_kernels.moe_grouped`): 1024 tokens × 6 picks over the layer's
# 256 experts (~24 picks each); (picks per block, rows, bytes per step), warps.
PROMPT_TOKENS = 1024
GROUPED_CHOICES = [
    ((32, 128, 64), 8),
    ((32, 64, 64), 4),
    ((32, 64, 64), 8),
    ((16, 64, 64), 4),
    ((64, 128, 64), 8),
    ((16, 128, 64), 4),
]
# V4-Flash linears timed as a decode step runs them: (name, N, K, groups, FP8? (else BF16),
# float32 activations? (else bf16)); the joined ones as the runtime holds them (gpu_linears)
LINEARS = [
    ("wq_b", 32768, 1024, 1, True, False),
    ("wo_a (8 groups)", 8192, 4096, 8, True, False),
    ("wo_b", 4096, 8192, 1, True, False),
    ("wq_a", 1024, 4096, 1, True, False),
    ("wkv", 512, 4096, 1, True, False),
    ("wq_a + wkv", 1536, 4096, 1, True, False),
    ("shared w1", 2048, 4096, 1, True, False),
    ("shared w1 + w3", 4096, 4096, 1, True, False),
    ("shared w2", 4096, 2048, 1, True, False),
    ("indexer wq_b", 8192, 1024, 1, True, False),
    ("wq_b + indexer wq_b", 40960, 1024, 1, True, False),
    ("router gate (bf16)", 256, 4096, 1, False, False),
    ("CSA compressor wkv + wgate (bf16)", 2048, 4096, 1, False, False),
    ("HCA compressor wkv + wgate (bf16)", 1024, 4096, 1, False, False),
    ("index compressor wkv + wgate (bf16)", 512, 4096, 1, False, False),
    ("CSA projections: both compressors' + indexer weights (bf16)", 2624, 4096, 1, False, False),
    ("head (bf16)", 129280, 4096, 1, False, True),
]
# `linear` kinds: ("rows", rows per program, warps, columns per step, programs wanted per launch
# (K split below that; 0: never)) or ("dot", tiles, warps, split, stages)
LINEAR_CHOICES = [
    ("rows", 16, 4, 512, 0),  # the built-in default (run 3: 128 columns per step lost 2x)
    ("rows", 16, 4, 512, 1024),
    ("rows", 8, 2, 256, 2048),
    # fewer rows and longer steps: more programs and more loads in flight for the small linears
    ("rows", 8, 4, 1024, 0),
    ("rows", 8, 8, 2048, 0),
    ("rows", 4, 4, 2048, 0),
    ("rows", 16, 8, 1024, 0),
    ("dot", (16, 64, 128), 4, None, None),
    ("dot", (16, 64, 128), 4, 1, None),
]


# A decode step's sink attention (one token, V4-Flash's 64 heads of 512, the 128-slot window):
# the CSA layers' 512 picks (any context), and an HCA layer's rows at 128K and at 1M context.
ATTENTION = (64, 512, 128)
ATTENTION_ROWS = (512, 1024, 8192)
ATTENTION_SPLITS = (64, 128, 256, 512)  # rows per split; and one split per part (A/B)
# the same for head groups on the tensor cores; 0: by the rows (DECODE_HEAD_ROWS_PER_SPLIT 0)
ATTENTION_HEAD_SPLITS = (0, 16, 32, 64, 128)


# A decode step reads each weight (and each layer's KV rows) long after it left the L2 cache: 43
# layers' weights pass between. Called again and again on the same bytes, a kernel is timed
# reading L2 instead (50-72 MB on the GPUs we target; run 6's and run 7's sweeps of the linears
# did that: `wq_b` "1.12 × copy", and 46 µs a layer for linears the model ran in 69). So the
# timed calls cycle over copies of the operands, together at least this many bytes.
COLD_BYTES = 192 << 20
MAX_COPIES = 256


def _cold_copies(dev, tensors: tuple, nbytes: int) -> list[tuple]:
    """`tensors` (`nbytes` together) and clones of them: enough that a pass over them all reads
    COLD_BYTES (at most MAX_COPIES); on the CPU (the interpreter) no clones."""
    n = min(MAX_COPIES, -(-COLD_BYTES // max(nbytes, 1))) if dev == "cuda" else 1
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def _replay_ms(fn, reps: int, calls: int = 32) -> float:
    """Device time of one call as a decode step replays it: `calls` consecutive calls
    fn(0..calls−1) captured in a CUDA graph, the replay timed (median of `reps`) ÷ calls. Timed
    eagerly instead, a call of a few µs of GPU work measures the host's launch cost (a Triton
    launch from Python is tens of µs); on the CPU (the interpreter) that is what it falls back
    to."""
    import torch

    if not torch.cuda.is_available():
        return _time_ms(fn, reps)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return _time_ms(lambda i: graph.replay(), max(3, reps // 8)) / calls


def _time_ms(fn, reps: int) -> float:
    """Median time of one call (CUDA events; the clock for CPU tensors), after two warm-ups."""
    import torch

    fn(0)
    fn(1)
    times = []
    for i in range(reps):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(json_output: bool = False) -> dict:
    import torch

    from flashdesk.engine import gpu_kernels

    if not torch.cuda.is_available() or not gpu_kernels.available("cuda"):
        msg = "gpu_kernels needs a CUDA GPU with Triton; skipped on this machine"
        if not json_output:
            _machine.print_machine(_machine.describe())
            print(msg)
        return {"machine": _machine.describe(), "skipped": msg}
    return measure("cuda", json_output)


def measure(
    dev: str,
    json_output: bool = False,
    dims: tuple[int, int, int] = (DIM, INTER, EXPERTS),
    reps: int = REPS,
    tile_choices=TILE_CHOICES,
    token_counts: tuple[int, ...] = (4, 16),
    linears=LINEARS,
    by_pick_choices=BY_PICK_CHOICES,
    grouped_choices=GROUPED_CHOICES,
    prompt_tokens: int = PROMPT_TOKENS,
    linear_choices=LINEAR_CHOICES,
    attention=ATTENTION,
    attention_rows=ATTENTION_ROWS,
    attention_splits=ATTENTION_SPLITS,
    attention_head_splits=ATTENTION_HEAD_SPLITS,
) -> dict:
    """The figures on `dev` (tests run it on the CPU in Triton's interpreter at small `dims`)."""
    import torch
    import torch.nn.functional as F
    from decode import _gpu_copy_gbps

    from flashdesk.engine import gpu_kernels
    from flashdesk.engine.model.moe import swiglu
    from flashdesk.engine.runtime_experts import fp4_dequant_torch

    say, info = _machine.start(json_output)
    dim, inter, experts = dims
    g = torch.Generator(device=dev).manual_seed(0)

    def packed(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device=dev)

    def scales(*shape):
        return torch.randint(120, 130, shape, generator=g, dtype=torch.uint8, device=dev)

    stacks = (
        packed(experts, inter, dim // 2),
        scales(experts, inter, dim // 32),
        packed(experts, inter, dim // 2),
        scales(experts, inter, dim // 32),
        packed(experts, dim, inter // 2),
        scales(experts, dim, inter // 32),
    )
    expert_bytes = sum(t[0].numel() for t in stacks)
    slot_of = torch.arange(experts, dtype=torch.int32, device=dev)
    cpu_g = torch.Generator().manual_seed(1)
    picks = [
        torch.stack([torch.randperm(experts, generator=cpu_g)[:TOP_K] for _ in range(16)]).to(dev)
        for _ in range(SETS)
    ]
    # seeded, as the picks are: every run (and the tests' interpreted one) times the same inputs
    weights = torch.rand((16, TOP_K), generator=g, device=dev) + 0.1
    x = torch.randn((16, dim), generator=g, device=dev).to(torch.bfloat16) / 4
    limit = 10.0
    copy_gbps = _gpu_copy_gbps() if dev == "cuda" else 1.0
    step_bytes = TOP_K * expert_bytes
    say(
        f"one decode step of one expert layer: {TOP_K} experts × {expert_bytes / 1e6:.2f} MB; "
        f"device copy bandwidth measured here {copy_gbps:.0f} GB/s"
    )

    def fused(tokens, tiles, warps, mode, stacks_at=stacks, stages=None):  # from stacks_at
        return lambda i: gpu_kernels.moe(
            x[:tokens], picks[i % SETS][:tokens], weights[:tokens], slot_of, stacks_at, limit,
            tiles=tiles, num_warps=warps, mode=mode, stages=stages,
        )  # fmt: skip

    want = fused(1, *gpu_kernels.FLOAT_FP4)(0)  # the built-in float decode
    want_q8 = None  # MODE 4's own reference (int8 activations), on the CPU when first needed
    rows = []
    for tiles, warps, mode, *more in tile_choices:  # more: the steps in flight (FP4_STAGES)
        stages = more[0] if more else None
        if mode[0] == 4 and want_q8 is None:
            want_q8 = _q8_reference(x[:1], picks[0][:1], weights[:1], stacks, limit).to(dev)
        ref = want_q8 if mode[0] == 4 else want
        err = ((fused(1, tiles, warps, mode, stages=stages)(0) - ref).norm() / ref.norm()).item()
        ms = _replay_ms(fused(1, tiles, warps, mode, stages=stages), reps)
        gbps = step_bytes / ms / 1e6
        rows.append(
            {"tiles": list(tiles), "warps": warps, "mode": list(mode), "ms": ms, "gbps": gbps}
            | {"err": err, "stages": stages}
        )
        say(
            f"  mode {mode} tiles {tiles} warps {warps}"
            + (f" stages {stages}" if stages else "")
            + f": {ms * 1e3:7.1f} µs = {gbps:6.0f} GB/s = "
            f"{gbps / copy_gbps:.2f} × copy (rel. diff. to "
            + ("the int8 reference" if mode[0] == 4 else "the float path")
            + f" {err:.1e})"
        )
    # MODE 4 against its own reference: an h within float rounding of a tie between two int8
    # codes may round either way, a step of its block (~1e-3 of the output each); a wrong
    # layout or scale is off by the whole output
    good = [r for r in rows if r["err"] < (1e-2 if r["mode"][0] == 4 else 1e-5)]
    best = min(good, key=lambda r: r["ms"])
    tiles, warps, mode = tuple(best["tiles"]), best["warps"], tuple(best["mode"])
    stages = best["stages"]
    by_pick = []
    for bp_tiles, bp_warps in by_pick_choices:

        def call(i, bp_tiles=bp_tiles, bp_warps=bp_warps):
            return gpu_kernels.moe_by_pick(
                x[:1], picks[i % SETS][:1], weights[:1], slot_of, stacks, limit,
                tiles=bp_tiles, num_warps=bp_warps,
            )  # fmt: skip

        err = ((call(0) - want).norm() / want.norm()).item()
        ms = _replay_ms(call, reps)
        gbps = step_bytes / ms / 1e6
        by_pick.append({"tiles": list(bp_tiles), "warps": bp_warps, "ms": ms, "gbps": gbps})
        by_pick[-1]["err"] = err
        say(
            f"  by pick, tiles {bp_tiles} warps {bp_warps}: {ms * 1e3:7.1f} µs = {gbps:6.0f} GB/s "
            f"= {gbps / copy_gbps:.2f} × copy (rel. diff. to default {err:.1e}; bf16 SwiGLU)"
        )

    def torch_path(i):
        out = torch.zeros((1, dim), dtype=torch.float32, device=dev)
        for e in picks[i % SETS][0].tolist():  # the runtime's per-expert loop (host sync)
            w1, s1, w3, s3, w2, s2 = (t[e] for t in stacks)
            h = swiglu(
                F.linear(x[:1], fp4_dequant_torch(w1, s1, torch.bfloat16)),
                F.linear(x[:1], fp4_dequant_torch(w3, s3, torch.bfloat16)),
                limit,
            )
            out += F.linear(h.bfloat16(), fp4_dequant_torch(w2, s2, torch.bfloat16)).float()
        return out

    torch_ms = _time_ms(torch_path, max(2, reps // 4))
    multi = {t: _replay_ms(fused(t, tiles, warps, mode, stages=stages), reps) for t in token_counts}
    one = gpu_kernels.dequant_fp4(stacks[0][0], stacks[1][0], torch.bfloat16)
    deq_bytes = stacks[0][0].numel() + stacks[1][0].numel() + one.numel() * one.element_size()
    deq_ms = _time_ms(
        lambda i: gpu_kernels.dequant_fp4(
            stacks[0][i % experts], stacks[1][i % experts], torch.bfloat16
        ),
        reps,
    )
    out = {
        "machine": info,
        "copy_gbps": copy_gbps,
        "step_bytes": step_bytes,
        "tiles": rows,
        "best_tiles": list(tiles),
        "best_warps": warps,
        "best_mode": list(mode),
        "fused_us": best["ms"] * 1e3,
        "fused_gbps": best["gbps"],
        "bandwidth_ratio": best["gbps"] / copy_gbps,
        "torch_us": torch_ms * 1e3,
        "speedup_over_torch": torch_ms / best["ms"],
        "tokens_us": {t: ms * 1e3 for t, ms in multi.items()},
        "dequant_gbps": deq_bytes / deq_ms / 1e6,
    }
    say(
        f"fused, best mode {mode} tiles {tiles} warps {warps}: {out['fused_us']:.1f} µs per step = "
        f"{out['fused_gbps']:.0f} GB/s = {out['bandwidth_ratio']:.2f} × the copy bandwidth; "
        f"torch dequantize-then-multiply {out['torch_us']:.0f} µs "
        f"({out['speedup_over_torch']:.1f}× slower)"
    )
    tokens = ", ".join(f"{t} tokens {us:.0f} µs" for t, us in out["tokens_us"].items())
    say(f"{tokens}; one-pass dequantization to bf16 {out['dequant_gbps']:.0f} GB/s (read + write)")
    if by_pick:
        fastest = min(by_pick, key=lambda r: r["ms"])
        out["by_pick"] = by_pick
        out["decode_moe_best"] = "by pick" if fastest["ms"] < best["ms"] else "rows"
        say(
            f"decode experts: best by pick {fastest['ms'] * 1e3:.1f} µs (tiles "
            f"{tuple(fastest['tiles'])}, warps {fastest['warps']}) vs rows "
            f"{best['ms'] * 1e3:.1f} µs → {out['decode_moe_best']}"
        )
    out["zero_copy"] = _zero_copy_figures(
        dev, stacks, lambda stacks_at: fused(1, tiles, warps, mode, stacks_at, stages), want,
        step_bytes, reps, say,
    )  # fmt: skip
    if grouped_choices:
        out["prompt"] = _prompt_figures(
            dev, stacks, expert_bytes, prompt_tokens, grouped_choices, reps, copy_gbps, say
        )
    out["linears"] = [
        _linear_figures(dev, spec, reps, copy_gbps, say, linear_choices) for spec in linears
    ]
    if attention_splits:
        out["attention"] = _attention_figures(
            dev,
            attention,
            attention_rows,
            (attention_splits, attention_head_splits),
            reps,
            copy_gbps,
            say,
        )
    out["choices"] = _choices(out, tiles, warps, mode, stages)
    say(f"fastest here: {out['choices']}")
    if dev == "cuda":
        from flashdesk.engine import gpu_tuning

        gpu = torch.cuda.get_device_name()
        where = gpu_tuning.record(gpu, out["choices"], "flashdesk bench gpu-kernels")
        say(f"recorded for {gpu} in {where}: the runtime uses them on this GPU from now on")
    return out


def _zero_copy_figures(dev, stacks, call_with, want, step_bytes, reps, say) -> dict:
    """The decode expert kernel reading its experts straight from pinned host memory across PCIe
    (zero-copy: a pinned page is addressable from the GPU, no copy first), against the pinned
    host→device copy rate: the figure that decides whether a GPU should take part of a host
    layer's picks beside the CPU (the GPU waits on the CPU's share at host layers, ~9 ms a step
    on the H200). `call_with(stacks)` → fn(i) running one decode step on those stacks."""
    import torch
    from decode import h2d_pinned_gbps

    from flashdesk.engine import gpu_kernels

    host = tuple(t.cpu().pin_memory() if dev == "cuda" else t.cpu() for t in stacks)
    call = call_with(host)
    try:
        got = call(0)
    except Exception as exc:  # the launcher may refuse host pointers on some stacks
        reason = gpu_kernels.error_summary(exc)
        say(f"zero-copy decode experts: not possible here ({reason})")
        return {"error": reason}
    err = ((got - want).norm() / want.norm()).item()
    ms = _time_ms(call, reps)
    h2d = h2d_pinned_gbps() if torch.cuda.is_available() else 1.0
    gbps = step_bytes / ms / 1e6
    say(
        f"zero-copy decode experts (pinned host memory read by the kernel): {ms * 1e3:.1f} µs = "
        f"{gbps:.1f} GB/s = {gbps / h2d:.2f} × the pinned copy rate ({h2d:.1f} GB/s; rel. diff. "
        f"{err:.1e})"
    )
    return {"us": ms * 1e3, "gbps": gbps, "h2d_pinned_gbps": h2d, "ratio": gbps / h2d, "err": err}


def _q8_reference(x, experts, weights, stacks, limit):
    """`gpu_kernels.moe_q8_reference` for a few tokens' picks, with only those experts' weights
    brought to the CPU (not the layer's 3.4 GB)."""
    import torch

    from flashdesk.engine import gpu_kernels

    used = sorted(set(experts.flatten().tolist()))
    index = torch.tensor(used, device=experts.device)
    slot_of = torch.full((max(used) + 1,), -1, dtype=torch.int32)
    slot_of[used] = torch.arange(len(used), dtype=torch.int32)
    few = tuple(t.index_select(0, index).cpu() for t in stacks)
    return gpu_kernels.moe_q8_reference(x, experts, weights, slot_of, few, limit)


def _choices(out: dict, tiles, warps, mode, stages=None) -> dict:
    """The gpu_kernels settings this run found fastest (`engine.gpu_tuning` names)."""
    choices = {"TILES": tuple(tiles), "WARPS": warps, "FP4_MODE": (*mode, 0)[:3]}
    choices["FP4_STAGES"] = stages or 1
    if "by_pick" in out:
        fastest = min(out["by_pick"], key=lambda r: r["ms"])
        choices |= {"DECODE_MOE": out["decode_moe_best"], "BY_PICK_TILES": tuple(fastest["tiles"])}
        choices["BY_PICK_WARPS"] = fastest["warps"]
    if "prompt" in out:
        best = out["prompt"]["best"]
        choices |= {"GROUPED_TILES": tuple(best["tiles"]), "GROUPED_WARPS": best["warps"]}
    # one linear kind for all FP8 linears: the choice with the least time summed over them
    fp8 = [lin for lin in out["linears"] if lin["fp8"]]
    totals: dict[tuple, float] = {}
    for lin in fp8:
        for row in lin["choices"]:
            if row["err"] < 1e-4:
                totals[row["spec"]] = totals.get(row["spec"], 0.0) + row["ms"]
    complete = {spec: ms for spec, ms in totals.items() if all(
        any(r["spec"] == spec and r["err"] < 1e-4 for r in lin["choices"]) for lin in fp8)}  # fmt: skip
    if complete:
        spec = min(complete, key=complete.get)
        if spec[0] == "rows":
            choices |= {"LINEAR_KIND": "rows", "LINEAR_ROWS": (spec[1], spec[2])}
            choices |= {"LINEAR_ROWS_K": spec[3], "LINEAR_ROWS_MIN_PROGRAMS": spec[4]}
        else:
            choices |= {"LINEAR_KIND": "dot", "LINEAR_TILES": tuple(spec[1])}
            choices["LINEAR_STAGES"] = spec[4]
            # split None: automatic (LINEAR_MIN_PROGRAMS); 1: never (0 programs wanted)
            choices["LINEAR_MIN_PROGRAMS"] = 0 if spec[3] == 1 else 1024
    # and each shape's own fastest "rows" shape where that beat every other choice for it
    # (gpu_kernels.LINEAR_ROWS_BY_SHAPE: the runtime's linears of that shape take it)
    from flashdesk.engine.gpu_tuning import shape_name

    by_shape = {
        shape_name(lin["shape"]): tuple(lin["best_spec"][1:])  # JSON keys
        for lin in out["linears"]
        if lin["best_spec"][0] == "rows"
    }
    if by_shape:
        choices["LINEAR_ROWS_BY_SHAPE"] = by_shape
    if "attention" in out:
        choices["DECODE_ROWS_PER_SPLIT"] = out["attention"]["best_rows_per_split"]
        if "best_kind" in out["attention"]:
            choices["DECODE_ATTENTION"] = out["attention"]["best_kind"]
            choices["DECODE_HEAD_ROWS_PER_SPLIT"] = out["attention"]["best_head_rows_per_split"]
    return choices


def _attention_figures(dev, shape, row_counts, kinds_splits, reps, copy_gbps, say) -> dict:
    """A decode step's sink attention (`gpu_kernels.decode_attention`) over the window and
    `row_counts` compressed rows: each rows-per-split choice, and one split per part (the
    window's and the rows': a program per head walking them all, as before the split) → the
    times, and the choice with the least time summed over the row counts."""
    import torch

    from flashdesk.engine import gpu_kernels

    heads, dim, window = shape
    splits, head_splits = kinds_splits  # rows per split: per head, per head group
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn((1, heads, dim), generator=g, device=dev).to(torch.bfloat16)
    ring = torch.randn((window, dim), generator=g, device=dev).to(torch.bfloat16)
    own = torch.randn((1, dim), generator=g, device=dev).to(torch.bfloat16)
    sink = torch.randn((heads,), generator=g, device=dev)
    pos = torch.tensor([10 * window], device=dev)
    sizes = []
    for n in row_counts:
        comp = torch.randn((n, dim), generator=g, device=dev).to(torch.bfloat16)
        visible = torch.rand((n,), generator=g, device=dev) < 0.9
        nbytes = (window + n) * dim * 2
        copies = _cold_copies(dev, (ring, comp), nbytes)  # each call's rows from device memory
        calls = max(32, len(copies))
        times, want = {}, None
        whole_part = max(window, n)
        for split in (*splits, None):  # None: one split per part

            def call(i, rows=split or whole_part, copies=copies, visible=visible):
                ring_i, comp_i = copies[i % len(copies)]
                return gpu_kernels.decode_attention(
                    q, ring_i, own, comp_i, visible, pos, sink, dim**-0.5, rows_per_split=rows
                )

            got = call(0)
            want = got if want is None else want
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                raise AssertionError(f"decode attention split by {split} rows gave other values")
            times[split] = _replay_ms(call, reps, calls)
        whole = times.pop(None)
        best = min(times, key=times.get)
        grouped = {}  # head groups (DECODE_ATTENTION "heads"), where the heads make a group
        for split in head_splits if heads % gpu_kernels.DECODE_HEAD_GROUP == 0 else ():

            def call(i, rows=split, copies=copies, visible=visible):
                ring_i, comp_i = copies[i % len(copies)]
                return gpu_kernels.decode_attention(
                    q, ring_i, own, comp_i, visible, pos, sink, dim**-0.5, rows_per_split=rows,
                    kind="heads",
                )  # fmt: skip

            if not torch.allclose(call(0), want, rtol=1e-4, atol=1e-5):
                raise AssertionError(f"decode attention in head groups ({split} rows) differs")
            grouped[split] = _replay_ms(call, reps, calls)
        sizes.append({"rows": n, "ms": times, "one_split_ms": whole, "heads_ms": grouped})
        say(
            f"decode attention, {window} + {n} rows ({nbytes / 1e6:.1f} MB): "
            + ", ".join(f"{k} rows per split {v * 1e3:.1f}" for k, v in times.items())
            + f" µs; best {best}: {nbytes / times[best] / 1e6 / copy_gbps:.2f} × copy; one "
            f"split per part {whole * 1e3:.1f} µs ({whole / times[best]:.1f}× slower); head "
            "groups: "
            + ", ".join(f"{k or 'by the'} rows {v * 1e3:.1f}" for k, v in grouped.items())
            + " µs"
        )
    total = {k: sum(size["ms"][k] for size in sizes) for k in splits}
    out = {"sizes": sizes, "best_rows_per_split": min(total, key=total.get)}
    if all(size["heads_ms"] for size in sizes):
        by_group = {k: sum(size["heads_ms"][k] for size in sizes) for k in head_splits}
        out["best_head_rows_per_split"] = min(by_group, key=by_group.get)
        faster = by_group[out["best_head_rows_per_split"]] < total[out["best_rows_per_split"]]
        out["best_kind"] = "heads" if faster else "head"
    return out


def _prompt_figures(dev, stacks, expert_bytes, tokens, choices, reps, copy_gbps, say) -> dict:
    """A prompt chunk's routed experts of one layer, all in VRAM: the grouped kernels (picks
    sorted by expert, each expert's bytes read once per block) for each tile shape, against the
    torch path they replace (each picked expert dequantized to bf16, then multiplied)."""
    import torch
    import torch.nn.functional as F

    from flashdesk.engine import gpu_kernels
    from flashdesk.engine.model.moe import swiglu

    experts, dim = stacks[0].shape[0], stacks[0].shape[2] * 2
    g = torch.Generator().manual_seed(2)
    picks = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)])
    picks = picks.to(dev)
    weights = torch.rand((tokens, TOP_K), device=dev) + 0.1
    x = (torch.randn((tokens, dim), device=dev) / 4).to(torch.bfloat16)
    flat = picks.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()
    touched = sum(1 for c in counts if c)
    nbytes = touched * expert_bytes
    flat_w = weights.reshape(-1)

    def grouped(i, tiles=GROUPED_CHOICES[0][0], warps=GROUPED_CHOICES[0][1]):
        blocks = gpu_kernels.expert_blocks(counts, range(experts), 0, tiles[0])
        table = torch.tensor(blocks, dtype=torch.int32).to(dev)
        out = torch.zeros((tokens * TOP_K, dim), dtype=torch.float32, device=dev)
        gpu_kernels.moe_grouped(
            x, order, table, flat_w, stacks, 10.0, out, tiles=tiles, num_warps=warps
        )
        return out.view(tokens, TOP_K, dim).sum(dim=1)

    def torch_path(i):
        y = torch.zeros((tokens, dim), dtype=torch.float32, device=dev)
        start = 0
        for e in range(experts):
            rows = order[start : start + counts[e]] // TOP_K
            slot = order[start : start + counts[e]] % TOP_K
            start += counts[e]
            if not len(rows):
                continue
            w1, w3, w2 = (
                gpu_kernels.dequant_fp4(stacks[2 * j][e], stacks[2 * j + 1][e], torch.bfloat16)
                for j in range(3)
            )
            h = swiglu(F.linear(x[rows], w1), F.linear(x[rows], w3), 10.0)
            h = (h * weights[rows, slot, None]).to(torch.bfloat16)
            y[rows] += F.linear(h, w2).float()
        return y

    want = torch_path(0)
    rows = []
    for tiles, warps in choices:
        got = grouped(0, tiles, warps)
        err = ((got - want).norm() / want.norm()).item()
        ms = _time_ms(lambda i, t=tiles, w=warps: grouped(i, t, w), max(2, reps // 8))
        gbps = nbytes / ms / 1e6
        rows.append({"tiles": list(tiles), "warps": warps, "ms": ms, "gbps": gbps, "err": err})
        say(
            f"  prompt chunk, grouped tiles {tiles} warps {warps}: {ms:7.2f} ms = {gbps:6.0f} "
            f"GB/s = {gbps / copy_gbps:.2f} × copy (rel. diff. to torch's path {err:.1e})"
        )
    best = min((r for r in rows if r["err"] < 2e-2), key=lambda r: r["ms"])
    torch_ms = _time_ms(torch_path, 2)
    say(
        f"a {tokens}-token chunk's experts of one layer ({touched} experts, "
        f"{nbytes / 1e9:.2f} GB): grouped {best['ms']:.2f} ms (tiles {tuple(best['tiles'])}, "
        f"warps {best['warps']}) = {best['gbps'] / copy_gbps:.2f} × copy; torch's dequantize "
        f"then multiply {torch_ms:.1f} ms ({torch_ms / best['ms']:.1f}× slower)"
    )
    return {"tokens": tokens, "bytes": nbytes, "choices": rows, "best": best, "torch_ms": torch_ms}


def _linear_figures(dev, spec, reps, copy_gbps, say, choices=LINEAR_CHOICES) -> dict:
    """One decode-step linear (1 token) from its stored bytes: each kernel choice, and the torch
    path (dequantize per call, then matmul) on the same weight."""
    import torch
    import torch.nn.functional as F

    from flashdesk.engine import gpu_kernels, quant
    from flashdesk.engine.model.attention import grouped_linear

    name, n, k, groups, fp8, x_float32 = spec
    g = torch.Generator(device=dev).manual_seed(n)
    if fp8:
        codes = torch.randint(0, 126, (n, k), generator=g, device=dev, dtype=torch.uint8)
        weight = codes.view(torch.float8_e4m3fn)
        scale = torch.randint(
            120, 130, (-(-n // 128), -(-k // 128)), generator=g, device=dev, dtype=torch.uint8
        )
    else:
        weight = torch.randn((n, k), generator=g, device=dev).to(torch.bfloat16)
        scale = None
    nbytes = weight.numel() * weight.element_size()
    copies = _cold_copies(dev, (weight,) if scale is None else (weight, scale), nbytes)
    calls = max(32, len(copies))  # each timed call reads its copy from device memory

    def operands(i):  # call i's weight and scale
        w, *s = copies[i % len(copies)]
        return w, s[0] if s else None

    # the activations a decode step gives it: bf16 (the head's float32)
    x = torch.randn((1, groups * k), generator=g, device=dev).to(torch.bfloat16)
    if x_float32:
        x = x.float()
    want = None
    rows = []
    options_of = {}  # each choice's `linear` options, by its label
    for choice in choices:
        if choice[0] == "rows":
            _, block_n, warps, block_k, wanted = choice
            programs = n // gpu_kernels._block(n // groups, block_n)
            split = gpu_kernels._split_k(programs, k, gpu_kernels._block(k, block_k), wanted)
            options = {"kind": "rows", "block_n": block_n, "num_warps": warps}
            options |= {"block_k": block_k, "split": split}
            label = f"rows {block_n}x{block_k}/{warps}w" + (f" split {split}" if split > 1 else "")
        else:
            _, tiles, warps, split, stages = choice
            options = {"kind": "dot", "tiles": tiles, "num_warps": warps, "split": split}
            options["num_stages"] = stages
            label = f"dot {tiles[1]}x{tiles[2]}/{warps}w" + (
                f" split {split}" if split else ""
            ) + (f" {stages} stages" if stages else "")  # fmt: skip

        def call(i, options=options):
            return gpu_kernels.linear(x, *operands(i), groups, torch.float32, **options)

        try:
            got = call(0)
        except ValueError:  # a shape this choice does not take
            continue
        want = got if want is None else want
        err = ((got - want).norm() / want.norm()).item()
        ms = _replay_ms(call, reps, calls)
        rows.append({"choice": label, "spec": choice, "ms": ms, "err": err})
        options_of[label] = options
    best = min((r for r in rows if r["err"] < 1e-4), key=lambda r: r["ms"])
    # A/B of the built-in unroll (gpu_kernels.LINEAR_ROWS_UNROLL): the best "rows" choice with
    # its steps one at a time
    best_rows = min((r for r in rows if r["spec"][0] == "rows"), key=lambda r: r["ms"])
    one_step = options_of[best_rows["choice"]]
    one_step_ms = _replay_ms(
        lambda i: gpu_kernels.linear(x, *operands(i), groups, torch.float32, unroll=1, **one_step),
        reps,
        calls,
    )
    # and with 3 steps' loads in flight instead (LINEAR_ROWS_STAGES), not unrolled
    staged = one_step | {"num_stages": 3}
    staged_ms = _replay_ms(
        lambda i: gpu_kernels.linear(x, *operands(i), groups, torch.float32, unroll=1, **staged),
        reps,
        calls,
    )

    def torch_path(i):
        w = quant.dequant_fp8(weight, scale, dtype=torch.bfloat16) if fp8 else weight
        xs = x.to(w.dtype)
        if groups == 1:
            return F.linear(xs, w)
        return grouped_linear(xs, w.view(groups, n // groups, k))

    torch_ms = _time_ms(torch_path, max(2, reps // 4))
    gbps = nbytes / best["ms"] / 1e6
    say(
        f"linear {name} [{n}, {k}]: " + ", ".join(
            f"{r['choice']} {r['ms'] * 1e3:.1f}" for r in rows
        ) + f" µs; best {best['choice']} {gbps:.0f} GB/s = {gbps / copy_gbps:.2f} × copy; "
        f"torch dequantize + matmul {torch_ms * 1e3:.0f} µs; {best_rows['choice']} "
        f"{best_rows['ms'] * 1e3:.1f} µs against {one_step_ms * 1e3:.1f} without unrolled steps "
        f"and {staged_ms * 1e3:.1f} with 3 steps in flight"
    )  # fmt: skip
    return {
        "name": name, "fp8": fp8, "bytes": nbytes, "choices": rows, "best": best["choice"],
        "gbps": gbps, "torch_us": torch_ms * 1e3, "rows_unroll_1_us": one_step_ms * 1e3,
        "rows_stages_3_us": staged_ms * 1e3,
        "shape": [n, k, groups, weight.element_size()], "best_spec": best["spec"],
    }  # fmt: skip
