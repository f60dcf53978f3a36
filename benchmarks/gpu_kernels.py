"""Routed experts held in VRAM, one layer of a decode step: the Triton kernels that read the packed
FP4 bytes (engine/gpu_kernels.py) against torch's dequantize-then-multiply, at V4-Flash's dims.

A GPU that holds an expert layer reads 6 picked experts × 13.37 MB per token from it; the bound
is those bytes at the device memory bandwidth measured here (a 1 GiB device-to-device copy,
read + write bytes). Printed: the fused kernels' GB/s and their ratio to that bandwidth, for
each tile shape tried (the fastest becomes the default: `gpu_kernels.TILES`), the speed-up over
the torch path, the time for 4 and 16 tokens, and the one-pass dequantization's GB/s (long
prompts). Picks rotate over 32 random sets of a 256-expert layer, so the 80 MB a step reads do
not sit in the 50–60 MB L2. Needs a CUDA GPU with Triton; elsewhere it says so and returns.
"""

from __future__ import annotations

import statistics
import time

import _machine

DIM, INTER, TOP_K, EXPERTS = 4096, 2048, 6, 256
SETS, REPS = 32, 64
# (rows, bytes per step) of gate/up, then of down; warps; (MODE, F16) of `gpu_kernels.moe`.
# First H200 sweep (MODE 0, F16 0): 8 rows × 256 bytes, 4 warps best at 389 GB/s (0.09 × copy);
# 16 / 32 rows 270-300 GB/s, 4 rows × 1024 bytes 302 GB/s.
TILE_CHOICES = [
    (tiles, warps, mode)
    for mode in ((0, 0), (0, 1), (1, 0), (1, 1))
    for tiles, warps in (
        ((8, 256, 8, 256), 4),
        ((4, 512, 4, 512), 4),
        ((8, 512, 8, 512), 8),
        ((16, 256, 16, 256), 4),
    )
] + [((2, 1024, 2, 1024), 2, (1, 1)), ((4, 256, 4, 256), 2, (1, 1))]
# the down projection split per pick (not yet measured): the best shapes above, and deeper rows
TILE_CHOICES += [
    (tiles, warps, (0, 1, 1))
    for tiles, warps in (
        ((8, 512, 8, 512), 8),
        ((8, 256, 8, 256), 4),
        ((8, 512, 16, 512), 8),
        ((8, 512, 32, 256), 8),
    )
]
# V4-Flash linears timed as a decode step runs them: (name, N, K, groups, FP8?)
LINEARS = [
    ("wq_b", 32768, 1024, 1, True),
    ("wo_a (8 groups)", 8192, 4096, 8, True),
    ("wo_b", 4096, 8192, 1, True),
    ("head (bf16)", 129280, 4096, 1, False),
]
LINEAR_BLOCKS = [(16, 4), (32, 4), (64, 8), (8, 2)]  # (rows per program, warps)


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
    weights = torch.rand((16, TOP_K), device=dev) + 0.1
    x = torch.randn((16, dim), device=dev).to(torch.bfloat16) / 4
    limit = 10.0
    copy_gbps = _gpu_copy_gbps() if dev == "cuda" else 1.0
    step_bytes = TOP_K * expert_bytes
    say(
        f"one decode step of one expert layer: {TOP_K} experts × {expert_bytes / 1e6:.2f} MB; "
        f"device copy bandwidth measured here {copy_gbps:.0f} GB/s"
    )

    def fused(tokens, tiles, warps, mode):
        return lambda i: gpu_kernels.moe(
            x[:tokens], picks[i % SETS][:tokens], weights[:tokens], slot_of, stacks, limit,
            tiles=tiles, num_warps=warps, mode=mode,
        )  # fmt: skip

    want = fused(1, gpu_kernels.TILES, gpu_kernels.WARPS, gpu_kernels.FP4_MODE)(0)
    rows = []
    for tiles, warps, mode in tile_choices:
        err = ((fused(1, tiles, warps, mode)(0) - want).norm() / want.norm()).item()
        ms = _time_ms(fused(1, tiles, warps, mode), reps)
        gbps = step_bytes / ms / 1e6
        rows.append(
            {"tiles": list(tiles), "warps": warps, "mode": list(mode), "ms": ms, "gbps": gbps}
            | {"err": err}
        )
        say(
            f"  mode {mode} tiles {tiles} warps {warps}: {ms * 1e3:7.1f} µs = {gbps:6.0f} GB/s "
            f"= {gbps / copy_gbps:.2f} × copy (rel. diff. to default {err:.1e})"
        )
    good = [r for r in rows if r["err"] < 1e-5]
    best = min(good, key=lambda r: r["ms"])
    tiles, warps, mode = tuple(best["tiles"]), best["warps"], tuple(best["mode"])

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
    multi = {t: _time_ms(fused(t, tiles, warps, mode), reps) for t in token_counts}
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
    out["linears"] = [_linear_figures(dev, spec, reps, copy_gbps, say) for spec in linears]
    return out


def _linear_figures(dev, spec, reps, copy_gbps, say) -> dict:
    """One decode-step linear (1 token) from its stored bytes: each block shape, and the torch
    path (dequantize per call, then matmul) on the same weight."""
    import torch
    import torch.nn.functional as F

    from flashdesk.engine import gpu_kernels, quant
    from flashdesk.engine.model.attention import grouped_linear

    name, n, k, groups, fp8 = spec
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
    x = torch.randn((1, groups * k), generator=g, device=dev).to(torch.bfloat16)
    want = None
    rows = []
    for block_n, warps in LINEAR_BLOCKS:

        def call(i, block_n=block_n, warps=warps):
            return gpu_kernels.linear(
                x, weight, scale, groups, torch.float32, block_n=block_n, num_warps=warps
            )

        got = call(0)
        want = got if want is None else want
        err = ((got - want).norm() / want.norm()).item()
        ms = _time_ms(call, reps)
        rows.append({"block_n": block_n, "warps": warps, "ms": ms, "err": err})
    best = min((r for r in rows if r["err"] < 1e-5), key=lambda r: r["ms"])

    def torch_path(i):
        w = quant.dequant_fp8(weight, scale, dtype=torch.bfloat16) if fp8 else weight
        if groups == 1:
            return F.linear(x, w)
        return grouped_linear(x, w.view(groups, n // groups, k))

    torch_ms = _time_ms(torch_path, max(2, reps // 4))
    gbps = nbytes / best["ms"] / 1e6
    say(
        f"linear {name} [{n}, {k}]: " + ", ".join(
            f"{r['block_n']} rows/{r['warps']} warps {r['ms'] * 1e3:.0f} µs" for r in rows
        ) + f"; best {gbps:.0f} GB/s = {gbps / copy_gbps:.2f} × copy; torch dequantize + "
        f"matmul {torch_ms * 1e3:.0f} µs"
    )  # fmt: skip
    return {"name": name, "bytes": nbytes, "blocks": rows, "gbps": gbps, "torch_us": torch_ms * 1e3}
