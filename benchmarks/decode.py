"""Decode through the runtime at V4-Flash's real dimensions, against the bytes-moved bound.

A two-layer checkpoint (window + hash routing, CSA + bias routing; 16 routed experts, 6 active;
random weights in the official FP8/FP4 format) is written to a temporary folder and loaded with
`load_runtime` and the planner's plan for this machine. Each decode step is timed and split into
the device-side work (attention, router, shared expert, head — on the CPU when there is no GPU),
the routed experts (C kernels on host memory) and their overlap. The bound is the weight bytes a
step reads (as the runtime stores them: FP8 linears, FP4 experts, the head in the runtime's
`head_dtype` — bf16 on the CPU by default, float32 on a GPU) at the RAM read
bandwidth measured in the same run (GPU-resident bytes at the GPU's memory bandwidth when the
device is a GPU); the planner's prediction for the same plan is printed beside the measurement.
On the CPU the same loaded model is also timed with each head option (float32, bf16, FP8),
alternating rounds, since the head is read in full per token.

With a GPU it also times: all experts on the CPU vs all on the GPU, host→device copy bandwidth
(pinned) and a layer-streamed prefill against the PCIe bound.
"""

from __future__ import annotations

import tempfile
import time

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

PROMPT_TOKENS = 64
CPU_PREFILL_TOKENS = 256  # the timed CPU prefill (one chunk), for the planner's cpu_flops
WARMUP_STEPS = 2
DECODE_STEPS = 12
STREAM_PREFILL_TOKENS = 1024


def bench_config():
    from flashdesk.engine.config import ModelConfig

    return ModelConfig.v4_flash().replace(
        num_hidden_layers=2,
        compress_ratios=(0, 4),
        num_nextn_predict_layers=0,
        n_routed_experts=16,
        num_hash_layers=1,
    )


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _linear_bytes(lin) -> int:
    """A Linear's (or FP8 kernel's) weight and scale bytes; a bare weight tensor's bytes."""
    import torch

    if isinstance(lin, torch.Tensor):
        return _nbytes(lin)
    return _nbytes(lin.weight, getattr(lin, "scale", None))


def decode_bytes(rt) -> tuple[int, int]:
    """(bytes one decode step reads outside the routed experts, routed-expert bytes per step)."""
    model = rt.model
    c = rt.config
    head_scale = getattr(model.head_linear, "scale", None)  # the FP8 head's tile scales
    dense = _nbytes(model.head, head_scale, model.norm, *model.hc_head)
    dense += model.embed[0].numel() * 2
    experts = 0
    for block in model.blocks:
        a = block.attn
        dense += sum(_linear_bytes(x) for x in (a.wq_a, a.wq_b, a.wkv, a.wo_b)) + _linear_bytes(
            a.wo_a
        )
        for comp in (a.compressor, a.indexer.compressor if a.indexer else None):
            if comp is not None:
                dense += _linear_bytes(comp.wkv) + _linear_bytes(comp.wgate)
        if a.indexer is not None:
            dense += _linear_bytes(a.indexer.wq_b) + _linear_bytes(a.indexer.weights_proj)
        m = block.moe
        dense += _linear_bytes(m.router.weight) + sum(
            _linear_bytes(x) for x in (m.shared.w1, m.shared.w2, m.shared.w3)
        )
        one = _nbytes(*m.host.parts[0])
        experts += one * c.num_experts_per_tok
    return dense, experts


def host_expert_read(rt, expert_b: float) -> float:
    """Routed-expert bytes per step read from host RAM, of `expert_b`: each layer's share of
    experts not on the device (uniform routing: by count)."""
    n = rt.config.n_routed_experts
    shares = [1 - len(lp.device) / n for lp in rt.placement.layers]
    return expert_b * sum(shares) / len(shares)


def bound_seconds(dense_b, expert_b, host_b, ram_gbps, gpu_gbps=None) -> float:
    """A step's bytes at the bandwidths measured here: all at RAM speed on the CPU; on a GPU its
    device-side bytes at the GPU's memory bandwidth beside the host experts' at RAM speed (the
    two run at the same time)."""
    if gpu_gbps is None:
        return (dense_b + expert_b) / (ram_gbps * 1e9)
    return max((dense_b + expert_b - host_b) / (gpu_gbps * 1e9), host_b / (ram_gbps * 1e9))


class _Clock:
    """Wall time spent in the routed-expert kernels (wraps each layer's host part)."""

    def __init__(self, rt):
        self.seconds = 0.0
        for block in rt.model.blocks:
            inner = block.moe._host_part

            def timed(*args, _inner=inner, **kwargs):
                t0 = time.perf_counter()
                out = _inner(*args, **kwargs)
                self.seconds += time.perf_counter() - t0
                return out

            block.moe._host_part = timed


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode(rt, ids, steps=DECODE_STEPS) -> tuple[float, float]:
    """(seconds per decode step, seconds per step inside the expert kernels)."""
    state = rt.new_state()
    logits = rt.prefill(ids, state)
    for _ in range(WARMUP_STEPS):
        logits = rt.decode(int(logits.argmax()), state)
    clock = _Clock(rt)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = rt.decode(int(logits.argmax()), state)
    _sync()
    return (time.perf_counter() - t0) / steps, clock.seconds / steps


HEAD_ROUNDS = 2
HEAD_STEPS = 6


def _head_variants(rt, ids) -> dict:
    """Decode tok/s of the loaded CPU model with each head option, swapped in place on the same
    model (rounds alternate the options so a noisy machine affects them alike); → per option
    the tok/s of every round and the head's bytes."""
    import torch

    from flashdesk.engine.runtime import HEAD_DTYPES, Bf16Head, Fp8Head

    model = rt.model
    stored = rt.checkpoint.tensor("head.weight", torch.bfloat16).clone()
    heads = {"fp32": None, "bf16": Bf16Head(stored), "fp8": Fp8Head(stored)}
    f32 = stored.float()
    kept = (model.head, model.head_linear)
    result = {name: {"tok_s": [], "head_bytes": 0} for name in HEAD_DTYPES}
    try:
        for _ in range(HEAD_ROUNDS):
            for name in HEAD_DTYPES:
                head = heads[name]
                model.head = f32 if head is None else head.weight
                model.head_linear = head
                result[name]["head_bytes"] = _nbytes(model.head, getattr(head, "scale", None))
                step, _ = _decode(rt, ids, HEAD_STEPS)
                result[name]["tok_s"].append(1.0 / step)
    finally:
        model.head, model.head_linear = kept
    return result


def _int8_variants(rt, ids) -> dict:
    """Decode tok/s with the host experts' activations as int8 and as bf16, toggled in place on
    the same loaded model, rounds alternating (empty where the kernels have no int8 path or the
    runtime's kernel activations are float32)."""
    import torch

    from flashdesk.engine import kernels

    moes = [b.moe for b in rt.model.blocks if hasattr(b.moe, "host_int8")]
    if not moes or not kernels.has_int8() or moes[0].host_dtype != torch.bfloat16:
        return {}
    kept = [m.host_int8 for m in moes]
    result: dict = {"int8": [], "bf16": []}
    try:
        for _ in range(HEAD_ROUNDS):
            for name in result:
                for m in moes:
                    m.host_int8 = name == "int8"
                step, _ = _decode(rt, ids, HEAD_STEPS)
                result[name].append(1.0 / step)
    finally:
        for m, k in zip(moes, kept, strict=True):
            m.host_int8 = k
    return result


def _cpu_glue_seconds(rt, ids) -> float:
    """Seconds per layer of a CPU decode step outside the C kernels (torch ops, Python): steps
    timed with the kernels' entry points stubbed out (they return at once, their outputs left
    as allocated) ÷ the layers, the step's few fixed costs included. What such a step computes
    is meaningless; only its time is read, on a throw-away sequence."""
    from flashdesk.engine import _kernels

    state = rt.new_state()
    rt.prefill(ids[:8], state)
    token = int(ids[0])
    saved = {name: getattr(_kernels, name) for name in ("quant_linear", "expert_ffn")}
    try:
        for name in saved:
            setattr(_kernels, name, lambda *args, **kwargs: None)
        for _ in range(WARMUP_STEPS):
            rt.decode(token, state)
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            rt.decode(token, state)
        step = (time.perf_counter() - t0) / DECODE_STEPS
    finally:
        for name, fn in saved.items():
            setattr(_kernels, name, fn)
    return step / len(rt.model.blocks)


# context depths a CPU decode is timed at (the state filled, not prefilled)
DEPTHS = (65536, 262144, 1048576)
DEPTH_ROUNDS = 2
DEPTH_STEPS = 3


def _depth_timings(rt) -> list[dict]:
    """Decode at each of DEPTHS tokens of context (`synthetic.fill_context`): tok/s with the
    CSA indexer's C kernel, with the torch ops it replaced, and at the start of a context
    (rounds interleaved, the states rewound between them). The start's steps, timed beside the
    deep ones, give the time the depth adds in the same phase of a machine whose speed drifts
    (the dev VM's RAM reads at ~50 GB/s at some times and ~70 at others). The planner's
    figures are added once this run has calibrated it (`_depth_predictions`)."""
    from flashdesk.engine.model import attention
    from flashdesk.engine.synthetic import fill_context

    kernel = attention.host_scores
    paths = {"kernel": kernel, "torch": lambda *args: None, "start": kernel}
    start = rt.new_state()
    rt.decode(1, start)
    start_mark = start.mark()
    rows = []
    try:
        for depth in DEPTHS:
            state = rt.new_state()
            fill_context(state, rt.model.config, depth)
            rt.decode(1, state)  # warm
            mark = state.mark()
            tok_s: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(DEPTH_ROUNDS):
                for name, fn in paths.items():
                    attention.host_scores = fn
                    seq = start if name == "start" else state
                    seq.rewind(start_mark if name == "start" else mark)
                    t0 = time.perf_counter()
                    for _ in range(DEPTH_STEPS):
                        rt.decode(1, seq)
                    tok_s[name].append(DEPTH_STEPS / (time.perf_counter() - t0))
            rows.append(
                {"depth": depth, "tok_s": max(tok_s["kernel"]),
                 "torch_indexer_tok_s": max(tok_s["torch"]), "start_tok_s": max(tok_s["start"])}
            )  # fmt: skip
            del state
    finally:
        attention.host_scores = kernel
    return rows


def _depth_predictions(rows, model_figures, profile, plan) -> list[dict]:
    """The timed depths with the planner's figure at each (`predict.decode_tok_s_at`, with the
    calibration this run recorded), and the milliseconds per token the depth adds, predicted
    and measured (against the start-of-context steps timed beside it)."""
    from flashdesk.offload.predict import Efficiency, decode_tok_s_at

    eff = Efficiency.load_or_defaults()
    start_s = 1.0 / decode_tok_s_at(plan, model_figures, profile, 1, eff)
    out = []
    for row in rows:
        predicted = decode_tok_s_at(plan, model_figures, profile, row["depth"], eff)
        added = 1e3 * (1.0 / predicted - start_s)
        measured = 1e3 * (1.0 / row["tok_s"] - 1.0 / row["start_tok_s"])
        out.append(row | {"predicted_tok_s": predicted,
                          "predicted_over_measured": predicted / row["tok_s"],
                          "added_ms_predicted": added, "added_ms_measured": measured})  # fmt: skip
    return out


def _cpu_prefill_seconds(rt, config) -> float:
    """Seconds for a CPU prefill of CPU_PREFILL_TOKENS tokens into a new sequence (after a short
    warm-up one)."""
    import torch

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (CPU_PREFILL_TOKENS,), generator=g)
    rt.prefill(prompt[:16], rt.new_state())
    t0 = time.perf_counter()
    rt.prefill(prompt, rt.new_state())
    return time.perf_counter() - t0


def _calibrated(
    model_figures, profile, plan, prediction, step_s, expert_s, gbps, on_gpu, prefill_s=None,
    glue_s=None,
):  # fmt: skip
    """The efficiencies this run measured, fed back into the planner's prediction.

    CPU: the planner's own byte count for a part ÷ its measured time ÷ the RAM bound (routed
    experts; the rest of the step less its layers' glue, `glue_s` seconds per layer outside the
    kernels, which becomes `cpu_layer_seconds`); with a timed prefill (`prefill_s`), the
    compute efficiency `cpu_flops` that makes the planner's prefill take it (solved with the
    decode figures in place, as they share its expert-read term).

    GPU: the one figure that sets the planner's decode time there, solved so that its
    prediction takes the measured step: the per-layer floor of the small kernels where the
    prediction is dispatch-bound (a two-layer step on a fast GPU is), else the memory
    efficiency. Dividing the step's bytes by its time would charge the floor to the bandwidth:
    an H200 "measured" 0.22 that way, and the planner then predicted 0.66 × the run."""
    from flashdesk.offload.predict import Efficiency, predict

    def step_with(name: str, value: float) -> float:
        got = predict(plan, model_figures, profile, PROMPT_TOKENS, _efficiency({name: value}))
        return 1.0 / got.decode_tok_s

    measured = {}
    if on_gpu:
        if prediction.decode_limit == "dispatch":
            name, lo, hi = "gpu_layer_seconds", 0.0, step_s
        else:
            name, lo, hi = "gpu_memory", 0.01, 2.0
        measured[name] = _solve(lambda v: step_with(name, v) - step_s, lo, hi)
    else:
        k, eb = model_figures.experts_per_token, model_figures.expert_bytes
        read = prediction.bytes_per_token
        expert_ram = sum(k * eb * lp.ram_hit_rate for lp in plan.layers)
        device_s = step_s - expert_s
        if expert_s > 0:
            measured["cpu_experts"] = expert_ram / expert_s / (gbps * 1e9)
        # the glue the prediction adds per CPU layer (this run's, else the default), at most 90 %
        # of the step's rest (more is not credible), and the rest's bytes in what remains
        cpu_layers = sum(lp.attention_on != "gpu" for lp in plan.layers)
        per_layer = glue_s if glue_s is not None else float(Efficiency().cpu_layer_seconds.value)
        per_layer = min(per_layer, 0.9 * device_s / max(cpu_layers, 1))
        measured["cpu_layer_seconds"] = per_layer
        dense_s = device_s - cpu_layers * per_layer
        measured["cpu_dense"] = (read["ram"] - expert_ram) / dense_s / (gbps * 1e9)
    prefill = {}
    if prefill_s is not None:
        tokens = CPU_PREFILL_TOKENS

        def ttft_with(value: float) -> float:
            eff = _efficiency(measured | {"cpu_flops": value})
            return predict(plan, model_figures, profile, tokens, eff).ttft_s

        before = predict(plan, model_figures, profile, tokens, _efficiency(measured)).ttft_s
        measured["cpu_flops"] = _solve(lambda v: ttft_with(v) - prefill_s, 0.01, 8.0)
        prefill = {
            "prefill_tokens": tokens,
            "prefill_tok_s": tokens / prefill_s,
            "predicted_prefill_tok_s": tokens / before,
            "predicted_prefill_over_measured": prefill_s / before,
        }
    again = predict(plan, model_figures, profile, PROMPT_TOKENS, _efficiency(measured))
    result = {
        "measured_efficiency": measured,
        "predicted_calibrated_tok_s": again.decode_tok_s,
        "predicted_calibrated_over_measured": again.decode_tok_s * step_s,
    }
    return result | prefill


def _efficiency(measured: dict):
    """The planner's factors with this run's measured ones in place."""
    from flashdesk.offload.predict import Efficiency
    from flashdesk.offload.probe import Sourced

    eff = Efficiency()
    for name, value in measured.items():
        setattr(eff, name, Sourced(value, "calibrated", "bench decode, 2 real-dims layers"))
    return eff


def _attention_calibrated(rows, model_figures, profile, plan, measured: dict) -> float:
    """`cpu_attention` that makes the planner's time added by the deepest timed context (with
    this run's other factors) equal the measured one, against the start-of-context steps timed
    beside it: the context a long conversation's speed is quoted at (1M tokens)."""
    from flashdesk.offload.predict import decode_tok_s_at

    deepest = max(rows, key=lambda row: row["depth"])
    added_s = 1.0 / deepest["tok_s"] - 1.0 / deepest["start_tok_s"]

    def added_with(value: float) -> float:
        eff = _efficiency(measured | {"cpu_attention": value})
        at = decode_tok_s_at(plan, model_figures, profile, deepest["depth"], eff)
        return 1.0 / at - 1.0 / decode_tok_s_at(plan, model_figures, profile, 1, eff)

    return _solve(lambda v: added_with(v) - added_s, 0.01, 8.0)


def _solve(f, lo: float, hi: float, rounds: int = 60) -> float:
    """A root of the monotone `f` in [lo, hi] by bisection (the nearer end where f keeps one
    sign there: the prediction cannot reach the measurement with this figure alone)."""
    f_lo, f_hi = f(lo), f(hi)
    if f_lo * f_hi > 0:
        return lo if abs(f_lo) < abs(f_hi) else hi
    for _ in range(rounds):
        mid = (lo + hi) / 2
        if (f(mid) > 0) == (f_lo > 0):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _gpu_copy_gbps() -> float:
    """Device memory bandwidth measured here: a 1 GiB device-to-device copy (read + write)."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    _sync()
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    _sync()
    return 5 * 2 * a.numel() / (time.perf_counter() - t0) / 1e9


def h2d_pinned_gbps() -> float:
    """Pinned host → GPU copy bandwidth, 512 MiB copies (GB/s)."""
    import torch

    src = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    _sync()
    t0 = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    _sync()
    return 4 * src.numel() / (time.perf_counter() - t0) / 1e9


def _gpu_figures(folder, config, ids, out: dict) -> None:
    """All experts on the CPU vs all on the GPU; pinned H2D bandwidth; streamed prefill."""
    import torch

    from flashdesk.engine.runtime import Placement, load_runtime

    n = config.n_routed_experts
    for name, placement in (
        ("experts_cpu", Placement.uniform(config, "pinned", device="cuda")),
        ("experts_gpu", Placement.uniform(config, "mmap", device="cuda", cached=n)),
    ):
        with load_runtime(folder, placement=placement, refresh_every=None) as rt:
            step, _ = _decode(rt, ids)
            out[f"decode_tok_s_{name}"] = 1.0 / step
    h2d = h2d_pinned_gbps()
    out["h2d_pinned_gbps"] = h2d
    prompt = torch.randint(0, config.vocab_size, (STREAM_PREFILL_TOKENS,))
    placement = Placement.uniform(config, "pinned", device="cuda")
    with load_runtime(folder, placement=placement, stream_min_tokens=256) as rt:
        rt.prefill(prompt[:256], rt.new_state())  # warm-up
        _sync()
        t0 = time.perf_counter()
        rt.prefill(prompt, rt.new_state())
        _sync()
        prefill_s = time.perf_counter() - t0
        expert_bytes = sum(_nbytes(*p) for h in rt.hosts for p in h.parts)
    out["stream_prefill_tok_s"] = STREAM_PREFILL_TOKENS / prefill_s
    bound_s = expert_bytes / (h2d * 1e9)
    out["stream_prefill_pcie_bound_tok_s"] = STREAM_PREFILL_TOKENS / bound_s
    out["stream_prefill_ratio"] = bound_s / prefill_s


def run(json_output: bool = False) -> dict:
    import torch

    from flashdesk.engine.checkpoint import write_random
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.fit import evaluate

    info = _machine.describe()
    if not json_output:
        _machine.print_machine(info)
        print("writing a 2-layer real-dimension checkpoint (window+hash, CSA; 16 experts)…")
    config = bench_config()
    ids = torch.randint(
        0, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)
    )
    figures: dict = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="flashdesk-bench-decode-") as folder:
        write_random(folder, config, seed=0)
        # remeasure: the bound is RAM bandwidth measured in this run, not a cached figure
        model_figures, profile, plan, prediction = evaluate(
            model=folder, context=4096, prompt_tokens=PROMPT_TOKENS, remeasure=True
        )
        gbps = float(profile.ram_read_gbps.value)
        # the runtime's own dtype: float32 activations on the CPU (torch's bf16 CPU ops are
        # several times slower there), bfloat16 on a GPU
        with load_runtime(folder, plan=plan, refresh_every=None) as rt:
            where = rt.describe()
            dense_b, expert_b = decode_bytes(rt)
            host_b = host_expert_read(rt, expert_b)
            step_s, expert_s = _decode(rt, ids)
            on_gpu = rt.device.type == "cuda"
            head_dtype = rt.head_dtype
            figures["decode_tok_s_by_expert_activations"] = _int8_variants(rt, ids)
            prefill_s = glue_s = None
            depths: list[dict] = []
            if not on_gpu:
                figures["decode_tok_s_by_head"] = _head_variants(rt, ids)
                prefill_s = _cpu_prefill_seconds(rt, config)
                glue_s = _cpu_glue_seconds(rt, ids)
                depths = _depth_timings(rt)
        device_s = step_s - expert_s
        gpu_gbps = _gpu_copy_gbps() if on_gpu else None
        if on_gpu:
            figures["gpu_memory_gbps"] = gpu_gbps
        bound_s = bound_seconds(dense_b, expert_b, host_b, gbps, gpu_gbps)
        figures |= {
            "placement": where,
            "plan_mode": plan.mode,
            "head_dtype": head_dtype,
            "ram_read_gbps": gbps,
            "prompt_tokens": PROMPT_TOKENS,
            "decode_steps": DECODE_STEPS,
            "dense_bytes_per_token": dense_b,
            "expert_bytes_per_token": expert_b,
            "host_expert_bytes_per_token": host_b,
            "decode_tok_s": 1.0 / step_s,
            "bound_tok_s": 1.0 / bound_s,
            "ratio": bound_s / step_s,
            "predicted_tok_s": prediction.decode_tok_s,
            "predicted_over_measured": prediction.decode_tok_s * step_s,
            "ms_per_token": {
                "total": step_s * 1e3,
                "experts": expert_s * 1e3,
                "device_side": device_s * 1e3,
                # on a GPU the experts run beside the device work: time hidden by the overlap
                "overlap": max(0.0, device_s + expert_s - step_s) * 1e3 if on_gpu else 0.0,
            },
        }
        figures |= _calibrated(
            model_figures, profile, plan, prediction, step_s, expert_s, gbps, on_gpu, prefill_s,
            glue_s,
        )  # fmt: skip
        if depths:
            measured = figures["measured_efficiency"]
            measured["cpu_attention"] = _attention_calibrated(
                depths, model_figures, profile, plan, measured
            )
        # Fed back: the planner's next prediction (`flashdesk fit`, the wizard) uses them.
        from flashdesk.offload.predict import Efficiency

        note = f"bench decode {time.strftime('%Y-%m-%d')}, 2 real-dims layers, {where}"
        figures["calibration_file"] = str(Efficiency.record(figures["measured_efficiency"], note))
        if on_gpu:
            _gpu_figures(folder, config, ids, figures)
        else:
            figures["decode_at_depth"] = _depth_predictions(depths, model_figures, profile, plan)
    if not json_output:
        ms = figures["ms_per_token"]
        print(f"placement: {where}; head {head_dtype}")
        print(f"RAM read: {gbps:.2f} GB/s (measured); plan mode {plan.mode}")
        print(
            f"decode: {figures['decode_tok_s']:.2f} tok/s; bound {figures['bound_tok_s']:.2f} "
            f"tok/s ({(dense_b + expert_b) / 1e6:.0f} MB/token); ratio {figures['ratio']:.2f}"
        )
        print(
            f"  per token: {ms['total']:.1f} ms = experts {ms['experts']:.1f} ms + device-side "
            f"{ms['device_side']:.1f} ms (overlap {ms['overlap']:.1f} ms)"
        )
        print(
            f"planner predicted {figures['predicted_tok_s']:.2f} tok/s "
            f"(predicted ÷ measured {figures['predicted_over_measured']:.2f})"
        )
        effs = ", ".join(
            f"{k} {v * 1e3:.2f} ms" if k.endswith("_seconds") else f"{k} {v:.2f}"
            for k, v in figures["measured_efficiency"].items()
        )
        print(
            f"measured efficiencies: {effs}; planner with them: "
            f"{figures['predicted_calibrated_tok_s']:.2f} tok/s (predicted ÷ measured "
            f"{figures['predicted_calibrated_over_measured']:.2f})"
        )
        if "prefill_tok_s" in figures:
            print(
                f"CPU prefill of {figures['prefill_tokens']} tokens: "
                f"{figures['prefill_tok_s']:.1f} tok/s; planner predicted "
                f"{figures['predicted_prefill_tok_s']:.1f} (predicted ÷ measured "
                f"{figures['predicted_prefill_over_measured']:.2f}; cpu_flops calibrated to "
                f"{figures['measured_efficiency']['cpu_flops']:.2f})"
            )
        print(f"calibration written to {figures['calibration_file']} (used by `flashdesk fit`)")
        for row in figures.get("decode_at_depth", []):
            print(
                f"decode at {row['depth']:,} tokens of context: {row['tok_s']:.2f} tok/s "
                f"({row['torch_indexer_tok_s']:.2f} with the indexer as torch ops; "
                f"{row['start_tok_s']:.2f} at the start, timed beside it); planner "
                f"{row['predicted_tok_s']:.2f} (predicted ÷ measured "
                f"{row['predicted_over_measured']:.2f}); the depth adds "
                f"{row['added_ms_measured']:.1f} ms per token, the planner "
                f"{row['added_ms_predicted']:.1f}"
            )
        if "cpu_attention" in figures["measured_efficiency"]:
            print(
                f"cpu_attention calibrated to {figures['measured_efficiency']['cpu_attention']:.2f}"
                " (the time the deepest context adds)"
            )
        for name, tok_s in figures["decode_tok_s_by_expert_activations"].items():
            rounds = ", ".join(f"{t:.2f}" for t in tok_s)
            print(f"  host experts' activations {name}: decode {rounds} tok/s")
        for name, v in figures.get("decode_tok_s_by_head", {}).items():
            rounds = ", ".join(f"{t:.2f}" for t in v["tok_s"])
            print(f"  head {name} ({v['head_bytes'] / 1e6:.0f} MB): decode {rounds} tok/s")
        for key in ("decode_tok_s_experts_cpu", "decode_tok_s_experts_gpu", "h2d_pinned_gbps"):
            if key in figures:
                print(f"{key}: {figures[key]:.2f}")
        if "stream_prefill_tok_s" in figures:
            print(
                f"streamed prefill: {figures['stream_prefill_tok_s']:.0f} tok/s; PCIe bound "
                f"{figures['stream_prefill_pcie_bound_tok_s']:.0f} tok/s; ratio "
                f"{figures['stream_prefill_ratio']:.2f}"
            )
    return figures
