"""Full-size decode and prefill on a model built in memory: `flashdesk bench --synthetic v4-flash`.

For a machine with the memory for V4-Flash but not the disk for its 160 GB checkpoint (the lent
GPU host: one 80 GB GPU, 128 GB RAM, 64 GB disk). `SyntheticCheckpoint` makes every non-expert
tensor and a pool of routed experts with random weights in the official FP8/FP4 formats; the
planner plans for this machine as for the real model, and `load_runtime` copies each expert it
keeps into its own VRAM slot or pinned/pageable buffer, so a decode step reads distinct memory as
it would with the real weights. Then a prompt is prefilled and greedy decode steps run, and the
figures are ratios against the planner's own bounds measured in the same run:

* decode tok/s ÷ the bytes-moved bound measured here (what a step reads, as the runtime stores
  it, at the RAM read bandwidth — on a GPU the device-side bytes at the GPU's memory bandwidth
  beside the host experts' bytes at RAM bandwidth), and the planner's prediction ÷ measured;
* prefill tok/s ÷ the PCIe bound (the bytes of every host-resident expert over the pinned
  host→device bandwidth measured here, per prompt chunk), when experts stream to a GPU.

Random weights route near-uniformly, the worst case for the hot-expert cache: a real model's
skewed routing hits the VRAM cache more often, so real decode should be at least this fast.
`--layers N` keeps the first N layers (for machines with less memory, and for tests).
"""

from __future__ import annotations

import time

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

EXPERT_POOL = 8  # distinct generated experts per model; each layer's experts alias them


def _config(model: str, layers: int | None):
    from flashdesk.engine.config import ModelConfig

    if model != "v4-flash":
        raise SystemExit(f"unknown synthetic model {model!r}; use v4-flash")
    config = ModelConfig.v4_flash().replace(num_nextn_predict_layers=0)
    if layers is not None:
        if not 1 <= layers <= config.num_hidden_layers:
            raise SystemExit(f"--layers must be in [1, {config.num_hidden_layers}], got {layers}")
        config = config.replace(
            num_hidden_layers=layers,
            compress_ratios=config.compress_ratios[:layers],
            num_hash_layers=min(config.num_hash_layers, layers),
        )
    return config


def _plan_context(context: int, depths, decode_steps: int, max_context: int, name: str) -> int:
    """The context the plan is made for: decode at `depths` needs their KV cache, so room for
    the deepest and the steps after it, up to the model's window (a depth is filled
    DEPTH_MARGIN tokens short, which leaves its steps room there)."""
    if not depths:
        return context
    if max(depths) > max_context:
        raise SystemExit(
            f"--depth {max(depths)} is beyond the {max_context:,}-token context of {name}"
        )
    return min(max(context, *(d + 2 * decode_steps for d in depths)), max_context)


def _vram_reserve(usable: int, vram_gib: float) -> int:
    """The VRAM reserve that leaves a plan what a `vram_gib` GiB card would have: the memory
    above it, plus the planner's default reserve for such a card (0.5 GiB + 5 %)."""
    gib = 1 << 30
    card = int(vram_gib * gib)
    if not 0 < card <= usable:
        raise SystemExit(
            f"--vram {vram_gib:g} must be above 0 and at most this GPU's usable "
            f"{usable / gib:.1f} GiB"
        )
    return usable - card + gib // 2 + card // 20


def run(
    json_output: bool = False,
    model: str = "v4-flash",
    layers: int | None = None,
    prompt_tokens: int | None = None,
    decode_steps: int | None = None,
    context: int = 8192,
    profile_steps: int = 0,
    profile_prefill: bool = False,
    kv_dtype: str = "bf16",
    depths: tuple[int, ...] = (),
    vram_gib: float | None = None,
) -> dict:
    import torch
    from decode import (  # as `bench decode`
        _gpu_copy_gbps,
        _sync,
        bound_seconds,
        decode_bytes,
        h2d_pinned_gbps,
        host_expert_read,
    )

    from flashdesk.engine import _kernels, gpu_kernels
    from flashdesk.engine.inventory import inventory
    from flashdesk.engine.runtime import RuntimeLoadError, load_runtime
    from flashdesk.engine.synthetic import SyntheticCheckpoint
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import DISK, PlanOptions
    from flashdesk.offload.predict import Efficiency, plan_and_predict, prefill_pieces
    from flashdesk.offload.probe import GIB, probe

    say, info = _machine.start(json_output)
    on_gpu = torch.cuda.is_available()
    prompt_tokens = prompt_tokens or (2048 if on_gpu else 64)
    decode_steps = decode_steps or (64 if on_gpu else 8)
    config = _config(model, layers)
    name = f"synthetic DeepSeek-V4-Flash, {config.num_hidden_layers} layers"
    figures_m = ModelFigures.from_inventory(inventory(config), config, name)
    profile = probe()
    # the runtime streams prompt chunks of the plan's size from its crossover on, as predicted
    context = _plan_context(context, depths, decode_steps, figures_m.max_context, name)
    options = PlanOptions(context=context, kv_dtype=kv_dtype)
    if vram_gib is not None:
        gpu = profile.gpu if on_gpu else None
        if gpu is None or gpu.usable_vram_bytes is None:
            raise SystemExit("--vram plans a GPU's memory: this machine has no usable GPU")
        options.vram_reserve_bytes = _vram_reserve(int(gpu.usable_vram_bytes), vram_gib)
        name += f", planned for a {vram_gib:g} GiB GPU"
    plan, prediction = plan_and_predict(
        figures_m, profile, options, prompt_tokens, Efficiency.load()
    )
    paged = plan.memory.get(DISK, {}).get("mapped", 0)
    out: dict = {
        "machine": info,
        "model": name,
        "layers": config.num_hidden_layers,
        "plan_verdict": plan.verdict,
        "prompt_tokens": prompt_tokens,
        "decode_steps": decode_steps,
    }
    if paged:
        msg = (
            f"this machine cannot hold {name} in memory: the plan pages "
            f"{paged / 2**30:.1f} GiB of experts from disk, which a model without files cannot "
            "do. Try --layers with fewer layers."
        )
        say(msg)
        return out | {"error": msg}
    say(f"{name}: plan '{plan.verdict}', building it in memory (experts share {EXPERT_POOL} …)")
    ckpt = SyntheticCheckpoint(config, seed=0, expert_pool=EXPERT_POOL, name=name)
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            say(f"  {fraction:4.0%} {message}")

    t0 = time.perf_counter()
    try:
        rt = load_runtime(ckpt, plan=plan, refresh_every=None, progress=progress)
    except RuntimeLoadError as exc:
        say(str(exc))
        return out | {"error": str(exc)}
    out["build_s"] = time.perf_counter() - t0
    with rt:
        say(f"built in {out['build_s']:.0f} s: {rt.describe()}")
        ids = torch.randint(
            0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)
        )
        chunk = rt.prefill_chunk or prompt_tokens  # as a Session prefills (the app, the CLI)
        # warm-up: a whole chunk, so that the kernels a prompt uses (on a GPU the streamed
        # experts' too) are compiled before the timing; Triton keeps them on disk after
        rt.prefill(ids[: min(chunk, prompt_tokens)], rt.new_state())
        state = rt.new_state()
        _sync()
        if on_gpu:  # the chunk's memory beside the weights, against the workspace planned for it
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        at = 0
        for size in prefill_pieces(prompt_tokens, chunk):  # as a Session splits the prompt
            logits = rt.prefill(ids[at : at + size], state)
            at += size
        _sync()
        prefill_s = time.perf_counter() - t0
        out["prefill_chunk"] = chunk
        if on_gpu:
            out["prefill_peak_gib"] = (torch.cuda.max_memory_allocated() - held) / GIB
            workspace = figures_m.prefill_workspace(min(chunk, prompt_tokens), prompt_tokens)
            out["prefill_workspace_gib"] = workspace / GIB
            say(
                f"prefill peak {out['prefill_peak_gib']:.2f} GiB beside the weights; the plan "
                f"keeps {out['prefill_workspace_gib']:.2f} GiB for a {chunk}-token chunk"
            )
        if profile_prefill:
            out |= _profile_prefill(rt, ids[:chunk], say)

        def timed_decode(warmup: int = 0) -> float:
            """Seconds per decode step over `decode_steps` (after `warmup` untimed ones)."""
            nonlocal logits
            for _ in range(warmup):
                logits = rt.decode(int(logits.argmax()), state)
            _sync()
            g = rt.graphs
            waited, experts = (g.host_wait_s, g.host_expert_s) if g is not None else (0.0, 0.0)
            t0 = time.perf_counter()
            for _ in range(decode_steps):
                logits = rt.decode(int(logits.argmax()), state)
            _sync()
            if g is not None and g.usable:  # where a replayed step's host time went
                host_split["host_waits_for_gpu_ms"] = (g.host_wait_s - waited) / decode_steps * 1e3
                host_split["host_experts_ms"] = (g.host_expert_s - experts) / decode_steps * 1e3
            return (time.perf_counter() - t0) / decode_steps

        host_split: dict = {}

        step_s = timed_decode(warmup=2)  # the first step after a prefill captures the graphs
        out |= {f"{k}_per_step": v for k, v in host_split.items()}
        graphs, rt.graphs = rt.graphs, None  # the A/B runs below take the plain path
        if graphs is not None:
            out["cuda_graphs"] = graphs.usable
            out["cuda_graph_captures"] = graphs.builds
            if graphs.usable:
                out["decode_tok_s_without_graphs"] = 1.0 / timed_decode(warmup=1)
            else:
                out["cuda_graphs_off"] = graphs.reason
        fused = [c for c in rt.caches if c is not None and c.fused]
        if fused:  # the same model with VRAM experts through torch's dequantize-then-multiply
            for c in fused:
                c.fused = False
            out["decode_tok_s_torch_experts"] = 1.0 / timed_decode()
            for c in fused:
                c.fused = True
        rt.graphs = graphs
        reading = [b.moe for b in rt.model.blocks if getattr(b.moe, "zero_copy", None) is not None]
        if reading:  # the other side of the in-place reads the load chose (graphs captured anew)
            from flashdesk.engine.decode_graphs import GraphDecoder

            on = reading[0].use_zero_copy
            other = "without" if on else "with"
            for moe in reading:
                moe.use_zero_copy = not on
            rt.graphs = GraphDecoder(rt.model) if graphs is not None else None
            out["zero_copy_experts"] = sum(len(m.zero_copy.ids) for m in reading)
            out["zero_copy_kept"] = on
            out[f"decode_tok_s_{other}_zero_copy"] = 1.0 / timed_decode(warmup=2)
            out[f"host_experts_ms_per_step_{other}_zero_copy"] = host_split.get("host_experts_ms")
            for moe in reading:
                moe.use_zero_copy = on
            rt.graphs = graphs
        int8 = [b.moe for b in rt.model.blocks if getattr(b.moe, "host_int8", False)]
        if int8:  # the CPU's share on bf16 activations instead (outside the graphs: no capture)
            for moe in int8:
                moe.host_int8 = False
            out["decode_tok_s_without_int8"] = 1.0 / timed_decode(warmup=1)
            out["host_experts_ms_per_step_without_int8"] = host_split.get("host_experts_ms")
            for moe in int8:
                moe.host_int8 = True
        if graphs is not None and graphs.usable:  # kernel switches: the other setting beside
            switches = ["FUSED_NORMS", "FUSED_SEAMS"]
            switches += ["PDL"] if gpu_kernels.pdl_possible(rt.device) else []
            for name in switches:
                out |= _other_setting(rt, name, timed_decode)
            if any(b.moe.cache is not None and b.moe.cache.int8 for b in rt.model.blocks):
                out |= _other_fp4_decode(rt, timed_decode)
            rt.graphs = graphs
        if profile_steps:
            out |= _profile(rt, state, logits, profile_steps, say)
        if depths:
            out["decode_at_depth"] = _decode_at_depths(rt, plan, figures_m, profile, depths, say)
        dense_b, expert_b = decode_bytes(rt)
        host_read = host_expert_read(rt, expert_b)
        host_expert_bytes = sum(
            t.numel() * t.element_size()
            for h in rt.hosts
            for e, parts in enumerate(h.parts)
            if h.store_of[e] != "mmap"
            for t in parts
        )
        out |= {
            "placement": rt.describe(),
            "expert_hit_rate": rt.expert_hit_rate,
        }
    # The bound, measured here: bytes a step reads (as this runtime stores them) at the
    # bandwidths measured in this run
    ram_gbps = _kernels.read_bandwidth(1 << 30, 0, 1.0)
    gpu_gbps = _gpu_copy_gbps() if on_gpu else None
    if on_gpu:
        out["gpu_memory_gbps"] = gpu_gbps
    bound_s = bound_seconds(dense_b, expert_b, host_read, ram_gbps, gpu_gbps)
    out |= {
        "ram_read_gbps": ram_gbps,
        "dense_bytes_per_token": dense_b,
        "expert_bytes_per_token": expert_b,
        "host_expert_bytes_per_token": host_read,
        "decode_tok_s": 1.0 / step_s,
        "bound_tok_s": 1.0 / bound_s,
        "decode_ratio": bound_s / step_s,
        "planner_bound_tok_s": prediction.decode_bound_tok_s,
        "predicted_tok_s": prediction.decode_tok_s,
        "predicted_over_measured": prediction.decode_tok_s * step_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "predicted_prefill_tok_s": prediction.prefill_tok_s,
    }
    if on_gpu and host_expert_bytes:
        h2d = h2d_pinned_gbps()
        # every host expert crosses PCIe once per prompt chunk when prefill streams them
        chunks = -(-prompt_tokens // out["prefill_chunk"])
        bound_s = chunks * host_expert_bytes / (h2d * 1e9)
        out |= {
            "h2d_pinned_gbps": h2d,
            "prefill_pcie_bound_tok_s": prompt_tokens / bound_s,
            "prefill_ratio": (prompt_tokens / prefill_s) / (prompt_tokens / bound_s),
        }
    say(
        f"decode: {out['decode_tok_s']:.2f} tok/s = {out['decode_ratio']:.2f} × the bound "
        f"measured here ({out['bound_tok_s']:.2f} tok/s: "
        f"{(dense_b + expert_b) / 1e9:.2f} GB/token, RAM {ram_gbps:.1f} GB/s); planner's "
        f"roofline {out['planner_bound_tok_s']:.2f}, prediction {out['predicted_tok_s']:.2f} "
        f"(predicted ÷ measured {out['predicted_over_measured']:.2f})"
    )
    line = f"prefill: {out['prefill_tok_s']:.1f} tok/s for {prompt_tokens} tokens"
    if "prefill_ratio" in out:
        line += (
            f" = {out['prefill_ratio']:.2f} × the PCIe bound "
            f"({out['prefill_pcie_bound_tok_s']:.1f} tok/s at {out['h2d_pinned_gbps']:.1f} GB/s)"
        )
    say(line)
    if on_gpu:  # per-layer floors of decode and prefill, for `flashdesk fit` on this machine
        layers = config.num_hidden_layers
        out["step_s_per_layer"] = step_s / layers
        out["prefill_s_per_token_layer"] = prefill_s / (prompt_tokens * layers)
        floors = _solved_floors(
            plan, figures_m, profile, prompt_tokens, Efficiency.load(), step_s, prefill_s
        )
        out["calibrated_floors"] = floors
        if floors:
            Efficiency.record(floors, f"bench --synthetic v4-flash, {layers} layers")
        say(
            f"decode time per layer {out['step_s_per_layer'] * 1e3:.2f} ms, prefill time per "
            f"token and layer {out['prefill_s_per_token_layer'] * 1e6:.1f} µs; recorded for fit: "
            + (", ".join(f"{k} {v:.3g}" for k, v in floors.items()) or "nothing (see below)")
        )
        for name in ("gpu_layer_seconds", "gpu_prefill_token_seconds"):
            if name not in floors:
                say(
                    f"  {name}: the planner's model does not reach this run's time with that "
                    "figure alone (another part, e.g. the CPU's experts or PCIe, sets it): "
                    "left as it was"
                )
    if "decode_tok_s_without_graphs" in out:
        say(
            f"decode steps replayed from CUDA graphs: {out['decode_tok_s']:.2f} tok/s; the same "
            f"steps issued op by op: {out['decode_tok_s_without_graphs']:.2f} tok/s "
            f"({out['cuda_graph_captures']} captures)"
        )
    elif "cuda_graphs_off" in out:
        say(f"CUDA graphs off: {out['cuda_graphs_off']}")
    if "host_experts_ms_per_step" in out:
        ms = 1e3 / out["decode_tok_s"]
        wait, cpu = out["host_waits_for_gpu_ms_per_step"], out["host_experts_ms_per_step"]
        say(
            f"host time per replayed step ({ms:.1f} ms): waiting for the GPU before the host-expert "
            f"layers {wait:.1f} ms, in the CPU's experts {cpu:.1f} ms (the GPU waits on them), "
            f"the rest {ms - wait - cpu:.1f} ms (launches, copies, the step's end)"
        )
    if "zero_copy_kept" in out:  # one of the two is the run's own decode_tok_s
        kept = out["zero_copy_kept"]
        with_zc = out["decode_tok_s"] if kept else out["decode_tok_s_with_zero_copy"]
        without = out.get("decode_tok_s_without_zero_copy", out["decode_tok_s"])
        cpu = out.get("host_experts_ms_per_step_without_zero_copy" if kept
                      else "host_experts_ms_per_step")  # fmt: skip
        say(
            f"the GPU reading {out['zero_copy_experts']} pinned experts' picks in place beside the "
            f"CPU: {with_zc:.2f} tok/s; the CPU computing all host picks: {without:.2f} tok/s"
            + (f" (CPU experts {cpu:.1f} ms per step)" if cpu is not None else "")
            + f"; the load's timing kept {'the former' if kept else 'the latter'}"
        )
    for label, what in (
        ("pdl", "programmatic dependent launch"),
        ("fused_norms", "RMSNorms fused into their neighbours' kernels"),
        ("fused_seams", "mixes, ring and row writes, de-rotation folded into neighbours"),
    ):
        if f"{label}_error" in out:
            say(f"{what}: the other setting failed ({out[f'{label}_error']})")
        if f"{label}_graphs" in out:  # one of the two is the run's own decode_tok_s
            with_it = out.get(f"decode_tok_s_{label}", out["decode_tok_s"])
            without = out.get(f"decode_tok_s_without_{label}", out["decode_tok_s"])
            say(f"{what}: {with_it:.2f} tok/s against {without:.2f} without "
                f"(graphs: {out[f'{label}_graphs']})")  # fmt: skip
    if "fp4_decode_error" in out:
        say(f"the VRAM experts' other decode failed ({out['fp4_decode_error']})")
    if "fp4_decode_graphs" in out:  # one of the two is the run's own decode_tok_s
        int8 = out.get("decode_tok_s_int8_dots", out["decode_tok_s"])
        floats = out.get("decode_tok_s_float_dots", out["decode_tok_s"])
        say(f"VRAM experts in integer dots (MODE 4): {int8:.2f} tok/s against {floats:.2f} with "
            f"the float decode (its check here: {'passed' if out['int8_dots_checked'] else 'failed'}"
            f"; graphs: {out['fp4_decode_graphs']})")  # fmt: skip
    if "decode_tok_s_without_int8" in out:
        cpu = out["host_experts_ms_per_step_without_int8"]
        say(
            f"the CPU's experts on int8 activations: {out['decode_tok_s']:.2f} tok/s; on bf16: "
            f"{out['decode_tok_s_without_int8']:.2f} tok/s"
            + (f" (CPU experts {cpu:.1f} ms per step)" if cpu is not None else "")
        )
    if "decode_tok_s_torch_experts" in out:
        say(
            f"VRAM experts through torch's dequantize-then-multiply instead of the Triton kernels: "
            f"{out['decode_tok_s_torch_experts']:.2f} tok/s"
        )
    say(
        "random weights route near-uniformly: the worst case for the VRAM expert cache "
        f"(hit rate {out['expert_hit_rate'] or 0:.2f}); a real model's skewed routing hits it more"
    )
    return out


def _solved_floors(plan, figures_m, profile, prompt_tokens, eff, step_s, prefill_s) -> dict:
    """The GPU's per-layer floors (`Efficiency.gpu_layer_seconds` for decode,
    `gpu_prefill_token_seconds` for prefill) at which the planner's prediction for this run's
    plan takes the measured time, each solved with the other figures as they are. Not the time
    divided by the layers: where the CPU's experts or PCIe set a run's speed (a plan for a
    24 GiB card on the lent H200: 1.12 ms a layer), that would charge them to the GPU's
    kernels, and every later prediction for this machine would carry it (43 layers predicted
    at 0.39 × their speed). A figure the model cannot fit that way is left out."""
    from dataclasses import replace

    from decode import _solve

    from flashdesk.offload.predict import predict
    from flashdesk.offload.probe import Sourced

    def with_floor(name: str, value: float):
        figure = Sourced(value, "calibrated", "solving")
        return predict(plan, figures_m, profile, prompt_tokens, replace(eff, **{name: figure}))

    def decode_s(v: float) -> float:
        return 1.0 / with_floor("gpu_layer_seconds", v).decode_tok_s

    def prefill_time(v: float) -> float:
        return prompt_tokens / with_floor("gpu_prefill_token_seconds", v).prefill_tok_s

    floors = {}
    layers = max(len(plan.layers), 1)
    for name, model, measured, hi in (  # hi: all of the time on the floor
        ("gpu_layer_seconds", decode_s, step_s, step_s / layers),
        ("gpu_prefill_token_seconds", prefill_time, prefill_s, prefill_s / prompt_tokens / layers),
    ):
        value = _solve(lambda v, model=model, measured=measured: model(v) - measured, 0.0, hi)
        if 0.0 < value < hi and abs(model(value) - measured) <= 0.01 * measured:
            floors[name] = value
    return floors


DEPTH_STEPS = 8  # decode steps timed at each depth (after two: a new capacity's graph captures)
DEPTH_MARGIN = 1024  # tokens short of each depth the context is filled to


def _decode_at_depths(rt, plan, figures_m, profile, depths, say) -> list[dict]:
    """Decode tok/s with the context filled to each depth (`synthetic.fill_context`: random
    rows, no prefill up to it), against the planner's figure at that depth: what a long
    document's conversation decodes at, up to 1M tokens."""
    import torch
    from decode import _sync

    from flashdesk.engine.synthetic import fill_context
    from flashdesk.offload.predict import Efficiency, decode_tok_s_at

    rows = []
    for depth in depths:
        state = rt.new_state()
        # a little short of the depth: a decode step's capacities are powers of two, and a
        # context at exactly 2^k tokens would time the next bucket, twice the rows
        fill_context(state, rt.model.config, max(0, depth - DEPTH_MARGIN))
        filled = state.position
        logits = rt.decode(1, state)
        logits = rt.decode(int(logits.argmax()), state)
        _sync()
        t0 = time.perf_counter()
        for _ in range(DEPTH_STEPS):
            logits = rt.decode(int(logits.argmax()), state)
        _sync()
        tok_s = DEPTH_STEPS / (time.perf_counter() - t0)
        predicted = decode_tok_s_at(plan, figures_m, profile, filled, Efficiency.load_or_defaults())
        kv_gib = state.nbytes / 2**30
        rows.append({"depth": depth, "filled_to": filled, "tok_s": tok_s,
                     "predicted_tok_s": predicted, "kv_gib": kv_gib})  # fmt: skip
        say(
            f"decode at {filled:,} tokens of context: {tok_s:.2f} tok/s (KV "
            f"{kv_gib:.2f} GiB); "
            f"planner {predicted:.2f} (predicted ÷ measured {predicted / tok_s:.2f})"
        )
        del state
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _profile_prefill(rt, ids, say) -> dict:
    """torch.profiler over one prefill chunk on a fresh state: the costliest operations on the
    device and on the host, and the device's busy time beside the chunk's wall time."""
    import torch
    from decode import _sync
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    state = rt.new_state()
    _sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        rt.prefill(ids, state)
        _sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_s = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    if on_gpu:
        say(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    say(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    say(
        f"profile, one {len(ids)}-token prefill chunk: {wall:.2f} s profiled, device busy "
        f"{device_s:.2f} s"
    )
    return {"profile_prefill_s": wall, "profile_prefill_device_s": device_s}


def _decode_with(rt, settings: dict, key: str, label: str, timed_decode) -> dict:
    """Decode with gpu_kernels' `settings` (name → value) in force, the steps captured again →
    {`key`: tok/s, `<label>_graphs`: usable or why not}, or {`<label>_error`: why}; the settings
    are restored after (the caller restores rt.graphs)."""
    from flashdesk.engine import gpu_kernels
    from flashdesk.engine.decode_graphs import GraphDecoder

    saved = {name: getattr(gpu_kernels, name) for name in settings}
    for name, value in settings.items():
        setattr(gpu_kernels, name, value)
    try:
        rt.graphs = GraphDecoder(rt.model)
        return {
            key: 1.0 / timed_decode(warmup=2),
            f"{label}_graphs": rt.graphs.usable or rt.graphs.reason,
        }
    except Exception as exc:  # reported, and the run goes on without it
        return {f"{label}_error": gpu_kernels.error_summary(exc)}
    finally:
        for name, value in saved.items():
            setattr(gpu_kernels, name, value)


def _other_setting(rt, name: str, timed_decode) -> dict:
    """Decode with gpu_kernels' on/off switch `name` (PDL, FUSED_NORMS, FUSED_SEAMS) flipped →
    `decode_tok_s_<name>` or `decode_tok_s_without_<name>` (lower case) and `<name>_graphs`, or
    `<name>_error` (`_decode_with`)."""
    from flashdesk.engine import gpu_kernels

    label, on = name.lower(), getattr(gpu_kernels, name)
    key = f"decode_tok_s_without_{label}" if on else f"decode_tok_s_{label}"
    return _decode_with(rt, {name: type(on)(not on)}, key, label, timed_decode)


def _other_fp4_decode(rt, timed_decode) -> dict:
    """Decode with the VRAM experts' other decode: the integer dots (MODE 4 in
    `gpu_kernels.FP4_INT8`'s shape) where FP4_MODE is a float one, else the built-in float
    decode (`FLOAT_FP4`) → `decode_tok_s_int8_dots` or `decode_tok_s_float_dots` and whether
    MODE 4 passed its check here, or `fp4_decode_error` (`_decode_with`)."""
    from flashdesk.engine import gpu_kernels

    to_int8 = gpu_kernels.FP4_MODE[0] != 4
    tiles, warps, mode = gpu_kernels.FP4_INT8 if to_int8 else gpu_kernels.FLOAT_FP4
    settings = {"TILES": tiles, "WARPS": warps, "FP4_MODE": mode, "FP4_STAGES": 1}
    key = "decode_tok_s_int8_dots" if to_int8 else "decode_tok_s_float_dots"
    out = _decode_with(rt, settings, key, "fp4_decode", timed_decode)
    if "fp4_decode_graphs" in out:
        out["int8_dots_checked"] = gpu_kernels.checked("FP4 int8 dots", rt.device)
    return out


def _profile(rt, state, logits, steps: int, say) -> dict:
    """torch.profiler over `steps` decode steps: what a step launches and waits for, and the
    device's busy time (beside the step's time measured unprofiled: how idle the GPU is) →
    figures; the table of the costliest operations is printed."""
    import torch
    from decode import _sync
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    _sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            logits = rt.decode(int(logits.argmax()), state)
        _sync()
    events = prof.key_averages()

    def per_step(*keys: str) -> float:
        return sum(e.count for e in events if e.key in keys) / steps

    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps
    figures = {
        "profile_steps": steps,
        "profile_device_busy_ms_per_step": device_us / 1e3,
        "profile_aten_ops_per_step": sum(e.count for e in events if e.key.startswith("aten::"))
        / steps,
        "profile_kernel_launches_per_step": per_step("cudaLaunchKernel", "cuLaunchKernel"),
        "profile_graph_launches_per_step": per_step("cudaGraphLaunch"),
        "profile_syncs_per_step": per_step(
            "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"
        ),
        "profile_memcpy_per_step": per_step("cudaMemcpyAsync", "cudaMemcpy"),
    }
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    say(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    say(
        "profile, per decode step: "
        + ", ".join(f"{k[8:]} {v:.1f}" for k, v in figures.items() if k != "profile_steps")
    )
    return figures
