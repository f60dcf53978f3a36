"""`flashdesk bench NAME [--json]`: run `benchmarks/NAME.py` from the source tree;
`flashdesk bench --synthetic v4-flash [--layers N]` runs benchmarks/synthetic.py on a model built
in memory.

A benchmark module defines `run(json_output: bool) -> dict`; it prints its human report itself
(machine first, then each figure with its bound and the ratio) and returns the JSON figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def benchmarks_dir() -> Path | None:
    """benchmarks/ beside the package sources (editable install) or under the working directory."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    for candidate in (Path.cwd() / "benchmarks", here):
        if candidate.is_dir():
            return candidate
    return None


def available() -> list[str]:
    folder = benchmarks_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashdesk.fit import _tokens  # `fit --ctx`'s token counts (128K, 1M); no torch
    from flashdesk.offload.plan import KV_DTYPES  # light: no torch

    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--all", action="store_true", help="run every benchmark")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    parser.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    synthetic = parser.add_argument_group(
        "synthetic model", "full-size runs on a model built in memory (benchmarks/synthetic.py)"
    )
    synthetic.add_argument(
        "--synthetic",
        metavar="MODEL",
        choices=["v4-flash"],
        help="build MODEL with random weights in memory and time decode and prefill",
    )
    synthetic.add_argument("--layers", type=int, help="keep only the first N layers")
    synthetic.add_argument("--prompt-tokens", type=int, help="prompt length to prefill")
    synthetic.add_argument("--decode-steps", type=int, help="greedy decode steps to time")
    synthetic.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="then profile STEPS decode steps (torch.profiler) and print the costliest operations",
    )
    synthetic.add_argument(
        "--kv", choices=KV_DTYPES, default="bf16", help="the KV-cache format to plan with"
    )
    synthetic.add_argument(
        "--depth",
        type=_tokens,
        nargs="+",
        default=[],
        metavar="N",
        help="then time decode with the context filled to N tokens (e.g. 128K 1M; random rows)",
    )
    synthetic.add_argument(
        "--vram",
        type=float,
        metavar="GIB",
        help="plan as if the GPU had GIB of memory (e.g. 24: most experts in host RAM, as on a "
        "desktop card; with --layers where RAM cannot hold the rest)",
    )
    synthetic.add_argument(
        "--profile-prefill",
        action="store_true",
        help="also profile one prefill chunk (torch.profiler) and print its costliest operations",
    )


def run(args: argparse.Namespace) -> int:
    names = available()
    if not names:
        print(
            "No benchmarks/ folder found: run `flashdesk bench` from a FlashDesk source checkout."
        )
        return 2
    synthetic = getattr(args, "synthetic", None)
    if synthetic:
        args.name, args.all = "synthetic", False
    if args.list or (not args.all and not args.name):
        print("benchmarks:", " ".join(names))
        return 0
    # --all skips the synthetic full-size run: it needs the memory of the whole model
    todo = [n for n in names if n != "synthetic"] if args.all else [args.name.replace("-", "_")]
    unknown = [n for n in todo if n not in names]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; available: {' '.join(names)}")
        return 2
    folder = benchmarks_dir()
    assert folder is not None
    if str(folder) not in sys.path:  # benchmarks import their shared helpers (_machine, decode)
        sys.path.insert(0, str(folder))
    for name in todo:
        spec = importlib.util.spec_from_file_location(
            f"flashdesk_bench_{name}", folder / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        extra = {}
        if name == "synthetic":
            extra = {
                "model": synthetic or "v4-flash",
                "layers": getattr(args, "layers", None),
                "prompt_tokens": getattr(args, "prompt_tokens", None),
                "decode_steps": getattr(args, "decode_steps", None),
                "profile_steps": getattr(args, "profile", 0),
                "profile_prefill": getattr(args, "profile_prefill", False),
                "kv_dtype": getattr(args, "kv", "bf16"),
                "depths": tuple(getattr(args, "depth", None) or ()),
                "vram_gib": getattr(args, "vram", None),
            }
        figures = module.run(json_output=args.json, **extra)
        if args.json:
            print(json.dumps({"benchmark": name, **figures}))
    return 0
