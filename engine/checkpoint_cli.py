"""`flashdesk make-checkpoint`: write a random checkpoint in the official V4 layout.

`--preset flash --layers 2` writes layers at V4-Flash's real dimensions (about 3.6 GB per layer
with all 256 experts; `--experts` reduces that), for tests, benchmarks and peers (llama.cpp's
converter, transformers) that need the real format without the 160 GB download.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--preset", choices=("tiny", "flash"), default="tiny")
    parser.add_argument("--layers", type=int, help="main layers (default: the preset's)")
    parser.add_argument(
        "--experts", type=int, help="routed experts per layer (default: the preset's)"
    )
    parser.add_argument(
        "--ratios",
        help="compress ratios of the main layers, comma-separated (0 window, 4 CSA, 128 HCA); "
        "default: the preset's schedule cut to --layers",
    )
    parser.add_argument("--mtp", type=int, help="MTP blocks (default: the preset's, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace the folder's contents")


def build_config(args: argparse.Namespace):
    from flashdesk.engine.config import ModelConfig

    base = ModelConfig.tiny() if args.preset == "tiny" else ModelConfig.v4_flash()
    n_layers = args.layers if args.layers is not None else base.num_hidden_layers
    n_mtp = args.mtp if args.mtp is not None else base.num_nextn_predict_layers
    if args.ratios:
        ratios = [int(r) for r in args.ratios.split(",")]
        if len(ratios) != n_layers:
            raise ValueError(f"--ratios has {len(ratios)} entries but --layers is {n_layers}")
    elif n_layers <= base.num_hidden_layers:
        ratios = list(base.compress_ratios[:n_layers])
    else:
        extended = ModelConfig.tiny(num_hidden_layers=n_layers) if args.preset == "tiny" else None
        if extended is None:
            raise ValueError(
                f"V4-Flash has {base.num_hidden_layers} layers; --layers {n_layers} is more"
            )
        ratios = list(extended.compress_ratios[:n_layers])
    changes = {
        "num_hidden_layers": n_layers,
        "num_nextn_predict_layers": n_mtp,
        "compress_ratios": tuple(ratios + [0] * n_mtp),
    }
    if args.experts is not None:
        changes["n_routed_experts"] = args.experts
    return base.replace(**changes)


def run(args: argparse.Namespace) -> int:
    from flashdesk.engine.checkpoint import Checkpoint, CheckpointError, write_random
    from flashdesk.engine.config import ConfigError
    from flashdesk.engine.inventory import inventory

    try:
        config = build_config(args)
    except (ValueError, ConfigError) as exc:
        print(f"make-checkpoint: {exc}", file=sys.stderr)
        return 1
    inv = inventory(config)
    print(
        f"writing {inv.count} tensors, {inv.total_bytes / 1e9:.2f} GB in {len(inv.shards)} shards "
        f"({config.num_hidden_layers} layers, {config.n_routed_experts} experts) to {args.out}"
    )
    start = time.perf_counter()

    def progress(shard: str, done: int, total: int) -> None:
        print(f"  {shard}  ({done}/{total}, {time.perf_counter() - start:.1f} s)", flush=True)

    try:
        path = write_random(args.out, config, args.seed, overwrite=args.force, progress=progress)
        report = Checkpoint.open(path).verify()
    except (CheckpointError, OSError) as exc:
        print(f"make-checkpoint: {exc}", file=sys.stderr)
        return 1
    print("verify: OK" if report.ok else str(report))
    return 0 if report.ok else 1
