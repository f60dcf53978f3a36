"""`flashdesk generate` (one prompt, streamed) and `flashdesk chat` (a terminal conversation).

Both load the model through the runtime (`engine.runtime.load_runtime`): attention and the other
per-token weights on the GPU when there is one, routed experts in host memory on the CPU kernels.
`--fit` asks the planner for the placement (whole expert layers and hot experts in spare VRAM).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = {"non-think": "non-think", "high": "think-high", "max": "think-max"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashdesk.offload.plan import KV_DTYPES  # light: no torch

    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("--prompt", help="the user message (generate only)")
    parser.add_argument("--system", default="", help="an optional system message")
    parser.add_argument("--mode", choices=sorted(MODES), default="non-think", help="reasoning")
    parser.add_argument("--max-tokens", type=int, default=1024, metavar="N")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--context", type=int, default=None, help="context limit in tokens")
    parser.add_argument(
        "--kv",
        choices=KV_DTYPES,
        default=None,
        help="KV-cache format: bf16 (the reference's) or fp8 (~57%% of the bytes, rounds the "
        "no-rope channels); default: bf16 with --fit, else the model's dtype",
    )
    parser.add_argument(
        "--fit", action="store_true", help="place experts with the planner (spare VRAM as cache)"
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="draft each next token with the checkpoint's MTP block and verify it in the same "
        "step (CPU mode only so far; the same tokens greedy, the same distribution sampled)",
    )
    parser.add_argument("--json", action="store_true", help="generate: print one JSON object")


def _fail(message: str) -> int:
    print(f"flashdesk: {message}", file=sys.stderr)
    return 2


def _stats_line(stats) -> str:
    parts = [f"{stats.generated_tokens} tokens"]
    if stats.prefill_tok_s:
        parts.append(f"prefill {stats.prefill_tok_s:.1f} tok/s")
    if stats.decode_tok_s:
        parts.append(f"decode {stats.decode_tok_s:.2f} tok/s")
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    parts.append(f"context {stats.context_used:,}/{stats.context_limit:,}")
    if stats.expert_hit_rate is not None:
        parts.append(f"GPU expert hits {100 * stats.expert_hit_rate:.0f}%")
    if stats.draft_acceptance is not None:
        parts.append(f"drafts kept {100 * stats.draft_acceptance:.0f}%")
    parts.append(f"stop: {stats.stop_reason}")
    return "[" + " · ".join(parts) + "]"


def _load(args):
    """(runtime, tokenizer, context limit) or raises ValueError/RuntimeError with a message."""
    from flashdesk.engine.checkpoint import Checkpoint
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.engine.tokenizer import load_tokenizer

    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass the checkpoint folder with --model")
    device = None if args.device == "auto" else args.device
    with Checkpoint.open(folder) as ckpt:
        config = ckpt.config
    has_tokenizer = (folder / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(folder if has_tokenizer else None)
    if not has_tokenizer and config is not None and config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{folder} has no tokenizer.json and its vocabulary ({config.vocab_size}) is smaller "
            "than V4's; copy the model's tokenizer.json into the folder"
        )
    plan = None
    if args.fit:
        from flashdesk.fit import plan_for_loading

        plan, why = plan_for_loading(str(folder), args.context or 131072, args.kv or "bf16")
        if plan is None:
            print(f"note: no plan ({why}); routed experts stay memory-mapped", file=sys.stderr)
    progress = None
    if not args.json:

        def progress(fraction: float, message: str) -> None:
            print(f"\r{message} {100 * fraction:3.0f}%", end="", file=sys.stderr, flush=True)

    rt = load_runtime(
        folder, plan=plan, device=device, progress=progress, kv_dtype=args.kv,
        speculative=args.speculative,
    )  # fmt: skip
    if progress is not None:
        print(f"\r{rt.describe()}", file=sys.stderr)
        for note in rt.notes:
            print(f"note: {note}", file=sys.stderr)
    limit = min(args.context or rt.context_limit, rt.context_limit)
    return rt, tokenizer, limit


def _params(args):
    from flashdesk.engine.generate import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )


def _turn(session, tokenizer, messages, args, show: bool):
    """Stream one answer; → (reasoning, answer, final stats)."""
    from flashdesk.engine.chat import encode_messages

    prompt = encode_messages(messages, MODES[args.mode], tokenizer=tokenizer)
    reasoning, answer, stats, phase = [], [], None, None
    for event in session.stream(prompt.ids, _params(args)):
        stats = event.stats
        if not event.text:
            continue
        (reasoning if event.phase == "reasoning" else answer).append(event.text)
        if show:
            if event.phase != phase:
                print("\n[thinking]\n" if event.phase == "reasoning" else "\n", end="")
                phase = event.phase
            print(event.text, end="", flush=True)
    return "".join(reasoning), "".join(answer), stats


def run(args: argparse.Namespace) -> int:
    from flashdesk.engine.generate import ContextOverflowError, Session

    if args.command == "generate" and not args.prompt:
        return _fail("generate needs --prompt TEXT (or use `flashdesk chat` to talk)")
    if args.max_tokens < 1:
        return _fail("--max-tokens must be at least 1")
    try:
        rt, tokenizer, limit = _load(args)
    except (OSError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    try:
        session = Session(rt, tokenizer, context_limit=limit)
        base = [{"role": "system", "content": args.system}] if args.system else []
        if args.command == "generate":
            messages = [*base, {"role": "user", "content": args.prompt}]
            reasoning, answer, stats = _turn(session, tokenizer, messages, args, not args.json)
            if args.json:
                out = {"reasoning": reasoning, "answer": answer, "stats": vars_of(stats)}
                print(json.dumps(out, ensure_ascii=False))
            else:
                print("\n" + _stats_line(stats), file=sys.stderr)
            return 0
        return _chat(session, tokenizer, base, args)
    except ContextOverflowError as exc:
        return _fail(str(exc))
    finally:
        rt.close()


def vars_of(stats) -> dict:
    from dataclasses import asdict

    return asdict(stats)


def _chat(session, tokenizer, messages: list, args) -> int:
    print("Type a message; an empty line or Ctrl-D quits, /reset starts over.", file=sys.stderr)
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            session.reset()
            continue
        messages.append({"role": "user", "content": line})
        try:
            reasoning, answer, stats = _turn(session, tokenizer, messages, args, True)
        except KeyboardInterrupt:
            session.cancel()
            print("\n[stopped]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
        print("\n" + _stats_line(stats), file=sys.stderr)
