"""FlashDesk's native engine against llama.cpp on the same random V4 model, on the CPU.

A two-layer checkpoint at V4-Flash's real dimensions (window + hash routing, CSA; 16 routed
experts, 6 active; random weights in the official FP8/FP4 format) is written once, converted to
GGUF by llama.cpp's own converter (FP8 linears -> Q8_0, FP4 experts -> MXFP4 bit for bit, as
community V4 GGUFs are made), and run by both engines with the same thread count: a prompt of
PROMPT_TOKENS tokens (prefill tok/s), then DECODE_STEPS greedy steps (decode tok/s). The figures
are the ratios FlashDesk ÷ llama.cpp (goal: decode ≥ 1.5).

Needs the gguf extra and llama.cpp's converter source (FLASHDESK_LLAMA_CPP_SRC, or it is fetched
once with pip into the FlashDesk cache). The model files are cached between runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run
from decode import bench_config  # the same 2-layer real-dims model as `bench decode`

PROMPT_TOKENS = 300
WARMUP_STEPS = 2
DECODE_STEPS = 16
GOAL_DECODE_RATIO = 1.5


def _cache() -> Path:
    base = os.environ.get("FLASHDESK_CACHE_DIR") or Path.home() / ".cache" / "flashdesk"
    return Path(base) / "bench-vs-llamacpp"


def _model_files(say) -> tuple[Path, Path]:
    """(checkpoint folder, upstream GGUF), written and converted once."""
    from flashdesk.engine.checkpoint import Checkpoint, write_random
    from flashdesk.engine.gguf.convert import convert_checkpoint, fetch_llama_cpp_source

    folder = _cache() / "v4-2layer-16experts"
    gguf_path = _cache() / "v4-2layer-16experts.gguf"
    ok = False
    if (folder / "config.json").exists():
        with Checkpoint.open(folder) as ckpt:
            ok = ckpt.verify().ok
    if not ok:
        say("writing a 2-layer real-dimension checkpoint (window+hash, CSA; 16 experts)…")
        write_random(folder, bench_config(), seed=0, overwrite=True)
        gguf_path.unlink(missing_ok=True)
    if not gguf_path.exists():
        say("converting it with llama.cpp's converter (Q8_0 linears, MXFP4 experts)…")
        source = fetch_llama_cpp_source()
        convert_checkpoint(folder, gguf_path.with_suffix(".tmp"), source=source)
        gguf_path.with_suffix(".tmp").rename(gguf_path)
    return folder, gguf_path


def _time(model, state_factory, ids) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of greedy decoding after `ids`, in steady state: one untimed
    pass first, so neither engine is timed paging in its memory-mapped weights."""
    warm = state_factory()
    logits = model.prefill(ids, warm)
    for _ in range(WARMUP_STEPS):
        logits = model.decode(int(logits.argmax()), warm)
    del warm
    state = state_factory()
    t0 = time.perf_counter()
    logits = model.prefill(ids, state)
    prefill_s = time.perf_counter() - t0
    for _ in range(WARMUP_STEPS):
        logits = model.decode(int(logits.argmax()), state)
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        logits = model.decode(int(logits.argmax()), state)
    decode_s = time.perf_counter() - t0
    return len(ids) / prefill_s, DECODE_STEPS / decode_s


def run(json_output: bool = False) -> dict:
    import gc

    import torch

    from flashdesk.engine.gguf.backend import GGUFPlacement, LlamaCppModel
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.fit import evaluate

    say, info = _machine.start(json_output)
    folder, gguf_path = _model_files(say)
    threads = torch.get_num_threads()
    config = bench_config()
    ids = torch.randint(
        0, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)
    ).tolist()

    say(f"llama.cpp ({gguf_path.stat().st_size / 2**30:.1f} GiB GGUF), {threads} threads…")
    placement = GGUFPlacement(context=1024, threads=threads, kv_type="f16", cpu_moe=True)
    with LlamaCppModel(gguf_path, placement) as llama:
        llama_prefill, llama_decode = _time(llama, llama.new_state, ids)
    gc.collect()

    say(f"FlashDesk native engine, {threads} threads…")
    # as the app loads it: the planner's placement for this machine (CPU only here)
    _, _, plan, _ = evaluate(model=folder, context=1024, prompt_tokens=PROMPT_TOKENS)
    with load_runtime(folder, plan=plan, device="cpu", threads=threads, refresh_every=None) as rt:
        ours_prefill, ours_decode = _time(rt, rt.new_state, ids)

    figures = {
        "machine": info,
        "threads": threads,
        "prompt_tokens": PROMPT_TOKENS,
        "decode_steps": DECODE_STEPS,
        "flashdesk_decode_tok_s": ours_decode,
        "llamacpp_decode_tok_s": llama_decode,
        "decode_ratio": ours_decode / llama_decode,
        "flashdesk_prefill_tok_s": ours_prefill,
        "llamacpp_prefill_tok_s": llama_prefill,
        "prefill_ratio": ours_prefill / llama_prefill,
        "goal_decode_ratio": GOAL_DECODE_RATIO,
        "gguf_bytes": gguf_path.stat().st_size,
    }
    if not json_output:
        print(
            f"decode : FlashDesk {ours_decode:7.2f} tok/s   llama.cpp {llama_decode:7.2f} tok/s   "
            f"ratio {figures['decode_ratio']:.2f} (goal ≥ {GOAL_DECODE_RATIO})"
        )
        print(
            f"prefill: FlashDesk {ours_prefill:7.2f} tok/s   llama.cpp {llama_prefill:7.2f} tok/s   "
            f"ratio {figures['prefill_ratio']:.2f} ({PROMPT_TOKENS}-token prompt)"
        )
    return figures
