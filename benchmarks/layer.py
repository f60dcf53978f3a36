"""Decode time per layer type (SWA / CSA / HCA) at V4-Flash's real dimensions, on the CPU.

A three-layer checkpoint (window, CSA, HCA; 16 routed experts, 6 active; random weights in the
official FP8/FP4 format) is written to a temporary folder and loaded in bfloat16. After a prompt,
each decode step is timed per layer and split into attention, indexer, router, shared expert and
routed experts. Each layer's time is compared with the bound of reading the weights it touches
once at the RAM bandwidth measured in the same run, and the whole model's decode tok/s with the
transformers port loading the same checkpoint (same dtype, same prompt, its own cache).
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections import defaultdict

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

PROMPT_TOKENS = 512
WARMUP_STEPS = 2
DECODE_STEPS = 8
LAYER_TYPES = {0: "swa", 1: "csa", 2: "hca"}
PARTS = ("attention", "indexer", "router", "shared_expert", "routed_experts")


def bench_config():
    from flashdesk.engine.config import ModelConfig

    return ModelConfig.v4_flash().replace(
        num_hidden_layers=3,
        compress_ratios=(0, 4, 128),
        num_nextn_predict_layers=0,
        n_routed_experts=16,
        num_hash_layers=1,
    )


class _Timed:
    """Wraps a callable; adds its wall time to `totals[key]`."""

    def __init__(self, fn, totals, key):
        self.fn, self.totals, self.key = fn, totals, key

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.totals[self.key] += time.perf_counter() - t0
        return out


def _instrument(model, totals):
    for i, block in enumerate(model.blocks):
        kind = LAYER_TYPES[i]
        block.forward = _Timed(block.forward, totals, (kind, "total"))
        attn = block.attn
        attn.forward = _Timed(attn.forward, totals, (kind, "attention+indexer"))
        if attn.indexer is not None:
            ix = attn.indexer
            ix.queries = _Timed(ix.queries, totals, (kind, "indexer"))
            ix.scores = _Timed(ix.scores, totals, (kind, "indexer"))
            ix.compressor.update = _Timed(ix.compressor.update, totals, (kind, "indexer"))
        moe = block.moe
        moe.router = _Timed(moe.router, totals, (kind, "router"))
        moe.shared = _Timed(moe.shared, totals, (kind, "shared_expert"))
        moe.experts = _Timed(moe.experts, totals, (kind, "routed_experts"))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _decode_bytes(block, top_k: int) -> int:
    """Weight bytes one decode step reads in this block (routed experts: top_k of them)."""
    a = block.attn
    total = _nbytes(a.wq_a.weight, a.wq_b.weight, a.wkv.weight, a.wo_a, a.wo_b.weight)
    for comp in (a.compressor, a.indexer.compressor if a.indexer else None):
        if comp is not None:
            total += _nbytes(comp.wkv, comp.wgate)
    if a.indexer is not None:
        total += _nbytes(a.indexer.wq_b.weight, a.indexer.weights_proj.weight)
    m = block.moe
    total += _nbytes(m.router.weight, m.shared.w1.weight, m.shared.w2.weight, m.shared.w3.weight)
    ex = m.experts
    total += _nbytes(ex.w1, ex.w2, ex.w3) * top_k // ex.count
    return total


def _ours(folder, config, ids):
    import torch

    from flashdesk.engine import load_model

    model = load_model(folder, dtype=torch.bfloat16)
    layer_bytes = {
        LAYER_TYPES[i]: _decode_bytes(b, config.num_experts_per_tok)
        for i, b in enumerate(model.blocks)
    }
    state = model.new_state()
    t0 = time.perf_counter()
    logits = model.prefill(ids, state)
    prefill_s = time.perf_counter() - t0
    for _ in range(WARMUP_STEPS):
        logits = model.decode(int(logits.argmax()), state)
    totals = defaultdict(float)
    _instrument(model, totals)
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = model.decode(int(logits.argmax()), state)
    decode_s = time.perf_counter() - t0
    return totals, decode_s, prefill_s, layer_bytes


def _transformers(folder, ids):
    import torch
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    # Dequantize on load even where a GPU exists (its FP8 kernels run on the GPU only).
    fp8 = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    model = DeepseekV4ForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=fp8
    ).eval()
    with torch.no_grad():
        out = model(input_ids=ids[None], use_cache=True)
        cache = out.past_key_values
        token = out.logits[0, -1].argmax().view(1, 1)
        for _ in range(WARMUP_STEPS):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        return time.perf_counter() - t0


def run(json_output: bool = False) -> dict:
    import torch

    from flashdesk.engine import _kernels
    from flashdesk.engine.checkpoint import write_random

    info = _machine.describe()
    if not json_output:
        _machine.print_machine(info)
        print("writing a 3-layer real-dimension checkpoint (window, CSA, HCA; 16 experts)…")
    config = bench_config()
    threads = torch.get_num_threads()
    gbps = float(_kernels.read_bandwidth(1 << 30, info["logical_cores"], 1.0))
    ids = torch.randint(
        0, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory(prefix="flashdesk-bench-layer-") as folder:
        write_random(folder, config, seed=0)
        totals, decode_s, prefill_s, layer_bytes = _ours(folder, config, ids)
        gc.collect()
        hf_decode_s = _transformers(folder, ids)
    ms_per_layer, breakdown, bound_ms, bound_ratio = {}, {}, {}, {}
    for kind in LAYER_TYPES.values():
        total = totals[(kind, "total")] / DECODE_STEPS * 1e3
        parts = {p: totals[(kind, p)] / DECODE_STEPS * 1e3 for p in PARTS if p != "attention"}
        parts["attention"] = (
            totals[(kind, "attention+indexer")] / DECODE_STEPS * 1e3 - parts["indexer"]
        )
        parts["other"] = total - sum(parts.values())
        ms_per_layer[kind] = total
        breakdown[kind] = {p: parts[p] for p in (*PARTS, "other")}
        bound_ms[kind] = layer_bytes[kind] / (gbps * 1e9) * 1e3
        bound_ratio[kind] = bound_ms[kind] / total
    tok_s = DECODE_STEPS / decode_s
    hf_tok_s = DECODE_STEPS / hf_decode_s
    figures = {
        "machine": info,
        "dtype": "bfloat16",
        "torch_threads": threads,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_steps": DECODE_STEPS,
        "experts": f"{config.num_experts_per_tok} of {config.n_routed_experts}",
        "ram_read_gbps": gbps,
        "ms_per_layer": ms_per_layer,
        "breakdown_ms": breakdown,
        "bound_ms_per_layer": bound_ms,
        "bound_ratio": bound_ratio,
        "decode_bytes_per_layer": layer_bytes,
        "prefill_tok_s": PROMPT_TOKENS / prefill_s,
        "decode_tok_s": tok_s,
        "transformers_decode_tok_s": hf_tok_s,
        "vs_transformers": tok_s / hf_tok_s,
    }
    if not json_output:
        print(
            f"RAM read bound: {gbps:.2f} GB/s; torch threads {threads}; bf16; prompt {PROMPT_TOKENS}"
        )
        for kind in LAYER_TYPES.values():
            parts = ", ".join(f"{p} {v:.1f}" for p, v in breakdown[kind].items())
            print(
                f"{kind.upper()} layer decode: {ms_per_layer[kind]:.1f} ms "
                f"(bound {bound_ms[kind]:.1f} ms for {layer_bytes[kind] / 1e6:.0f} MB, "
                f"ratio {bound_ratio[kind]:.2f}) [{parts}]"
            )
        print(f"prefill: {figures['prefill_tok_s']:.1f} tok/s (3 layers + head)")
        print(
            f"decode: {tok_s:.2f} tok/s vs transformers {hf_tok_s:.2f} tok/s "
            f"(ratio {figures['vs_transformers']:.2f})"
        )
    return figures
