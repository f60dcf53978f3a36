"""`flashdesk serve`: the local OpenAI-compatible server from the command line.

Loads a V4 checkpoint folder through the hybrid runtime, placed by the planner for this machine
as the app does (routed experts stay stored FP4 bytes), and serves it on loopback (127.0.0.1:8437
by default) until Ctrl+C. `--test-model` serves the tiny random-weights test model instead, to try a
client without the real weights (its answers are noise; the protocol is real).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

V4_VOCAB = 129_280
API_KEY_ENV = "FLASHDESK_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashdesk.engine.server import DEFAULT_PORT  # light: no torch, no web framework
    from flashdesk.offload.plan import KV_DTYPES  # light: no torch

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="DIR", help="a DeepSeek-V4 checkpoint folder (official layout)"
    )
    source.add_argument(
        "--test-model",
        action="store_true",
        help="serve the tiny test model with random weights (no download; answers are noise)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every request (or set ${API_KEY_ENV}, "
        "which keeps the key out of the process list)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=8192,
        metavar="TOKENS",
        help="context window in tokens (default 8192; capped at the model's maximum)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--kv",
        choices=KV_DTYPES,
        default="bf16",
        help="KV-cache format: bf16 (the reference's, default) or fp8 (~57%% of the bytes)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=4,
        metavar="N",
        help="requests that may wait behind the running one; more get HTTP 429 (default 4)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=32,
        metavar="MB",
        help="largest request body accepted, in MB (default 32)",
    )
    parser.add_argument(
        "--default-mode",
        choices=("non-think", "think-high", "think-max"),
        default="think-high",
        help="reasoning mode when a request names none (default think-high, like DeepSeek's API)",
    )


def _fail(message: str) -> int:
    print(f"flashdesk serve: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace, scratch: Path):
    """(name, model, tokenizer, context) of the requested model; ValueError says what is wrong.

    The test model is written into `scratch`, which the caller removes when serving ends.
    """
    import torch

    from flashdesk.engine.checkpoint import CheckpointError
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.engine.tokenizer import TokenizerError, load_tokenizer
    from flashdesk.fit import plan_for_loading

    if args.test_model:
        from flashdesk.engine.checkpoint import write_random
        from flashdesk.engine.config import ModelConfig

        folder = scratch / "test-model"
        print(f"Writing the tiny test model (random weights) to {folder} ...", flush=True)
        write_random(folder, ModelConfig.tiny(vocab_size=V4_VOCAB), seed=0, overwrite=True)
        name = "flashdesk-test-model"
    else:
        folder = Path(args.model).expanduser()
        if folder.is_file() and folder.suffix.lower() == ".gguf":
            raise ValueError(
                f"{folder} is a GGUF file. `flashdesk serve` runs the native engine, which reads "
                "the official safetensors checkpoint folder; pass that folder with --model."
            )
        if not folder.exists():
            raise ValueError(f"{folder} does not exist. Pass the checkpoint folder with --model.")
        name = folder.resolve().name
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    plan = None
    if not args.test_model and (folder / "config.json").is_file():
        # the hybrid runtime's placement for this machine, as the app loads it: the experts
        # stay stored FP4 bytes (pinned / pageable RAM, VRAM cache) instead of being widened
        plan, why = plan_for_loading(str(folder), args.context, args.kv, None)
        if plan is None:
            print(f"note: no plan ({why}); routed experts stay memory-mapped", flush=True)
    print(f"Loading {name} on {device} ({dtype_name}) ...", flush=True)
    try:
        model = load_runtime(folder, plan=plan, device=device, dtype=dtype, kv_dtype=args.kv)
    except (CheckpointError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"could not load {folder}: {exc}") from exc
    print(model.describe(), flush=True)
    for note in model.notes:
        print(f"note: {note}", flush=True)
    vocab = int(model.config.vocab_size)
    if vocab < V4_VOCAB:
        raise ValueError(
            f"{folder} has a vocabulary of {vocab:,} tokens, smaller than the V4 tokenizer's "
            f"{V4_VOCAB:,}; prompts would use ids the model does not have. Write test "
            f"checkpoints with vocab_size={V4_VOCAB} (or use --test-model)."
        )
    try:
        tokenizer = load_tokenizer(folder if (folder / "tokenizer.json").is_file() else None)
    except TokenizerError as exc:
        raise ValueError(str(exc)) from exc
    if not (folder / "tokenizer.json").is_file() and not args.test_model:
        print(f"note: {folder} has no tokenizer.json; using the bundled DeepSeek-V4 tokenizer.")
    context = max(2, min(args.context, int(model.config.max_position_embeddings)))
    return name, model, tokenizer, context


def run(args: argparse.Namespace) -> int:
    from flashdesk.engine.chat import Mode
    from flashdesk.engine.server import ServerOptions

    if args.max_queue < 0:
        return _fail("--max-queue must be 0 or more.")
    if args.max_body_mb <= 0:
        return _fail("--max-body-mb must be more than 0.")
    if args.context < 2:
        return _fail("--context must be at least 2 tokens.")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    options = ServerOptions(
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_waiting=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        default_mode=Mode(args.default_mode),
    )
    with tempfile.TemporaryDirectory(prefix="flashdesk-serve-", ignore_cleanup_errors=True) as tmp:
        try:
            name, model, tokenizer, context = _load(args, Path(tmp))
        except ValueError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:
            return _fail("interrupted while loading the model.")
        try:
            return _serve(options, name, model, tokenizer, context, args.host)
        finally:
            model.close()  # the checkpoint's mapping, before a test model's folder goes


def _serve(options, name: str, model, tokenizer, context: int, host: str) -> int:
    """Serve until Ctrl+C (or the server stops by itself)."""
    from flashdesk.engine.generate import Session
    from flashdesk.engine.server import ServedModel, ServerStartError, start_server, warn_if_exposed

    served = ServedModel(name, Session(model, tokenizer, context_limit=context), tokenizer)
    try:
        handle = start_server(lambda: served, options=options)
    except ServerStartError as exc:
        return _fail(str(exc))
    warning = warn_if_exposed(host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"Serving {name} (context {context:,} tokens) at {handle.url} — OpenAI-compatible "
        f"(GET /v1/models, POST /v1/chat/completions)"
        f"{'; API key required' if options.api_key else ''}. "
        "Ctrl+C stops.",
        flush=True,
    )
    try:
        while not handle.wait(0.5):
            pass
    except KeyboardInterrupt:
        print("Stopping ...", flush=True)
    finally:
        handle.stop()
    return 0
