"""Checkpoint reading at V4-Flash's real dimensions: open + verify, and dequantizing one expert.

Uses the checkpoint in $FLASHDESK_BENCH_CHECKPOINT if set (e.g. one written by
`flashdesk make-checkpoint --preset flash --layers 2`); otherwise writes a 2-layer real-dims
checkpoint (one CSA, one HCA layer, $FLASHDESK_BENCH_EXPERTS experts each, default all 256, about
9.5 GB) into a temporary folder and deletes it afterwards.

Bounds, measured in the same run: opening is compared with plainly reading and JSON-parsing every
shard header and the index (the work it cannot avoid); dequantizing an expert with moving its bytes (13.4 MB read, 100 MB
of float32 written) at the measured all-thread RAM read bandwidth.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

REPEATS = 5


def _best(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _read_headers(folder: Path) -> int:
    """The work no safetensors reader avoids: read and parse every header and the index."""
    total = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
            json.loads(raw)
            total += len(raw) + 8
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        json.loads(index.read_bytes())
    return total


def _write_default(folder: Path) -> Path:
    from flashdesk.engine.checkpoint import write_random
    from flashdesk.engine.config import ModelConfig

    experts = int(os.environ.get("FLASHDESK_BENCH_EXPERTS", "256"))
    config = ModelConfig.v4_flash().replace(
        num_hidden_layers=2,
        compress_ratios=(4, 128, 0),
        num_nextn_predict_layers=0,
        n_routed_experts=experts,
    )
    return write_random(folder / "flash-2-layers", config, seed=0)


def run(json_output: bool = False) -> dict:
    import psutil
    import torch

    from flashdesk.engine import _kernels
    from flashdesk.engine.checkpoint import Checkpoint

    info = _machine.describe()
    if not json_output:
        _machine.print_machine(info)
    given = os.environ.get("FLASHDESK_BENCH_CHECKPOINT")
    tmp = None
    if given:
        path = Path(given)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="flashdesk-bench-"))
        if not json_output:
            print(f"writing a real-dims 2-layer checkpoint into {tmp} ...", flush=True)
        t = time.perf_counter()
        path = _write_default(tmp)
        if not json_output:
            print(f"  written in {time.perf_counter() - t:.1f} s")
    try:
        files = list(path.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in files)
        rss0 = psutil.Process().memory_info().rss
        ck = Checkpoint.open(path)
        report = ck.verify()
        rss_open = psutil.Process().memory_info().rss - rss0
        if not report.ok:
            raise RuntimeError(f"the benchmark checkpoint does not verify:\n{report}")
        header_bytes = _read_headers(path)
        header_s = _best(lambda: _read_headers(path))
        open_s = _best(lambda: Checkpoint.open(path))
        verify_s = _best(ck.verify)

        layer = 0
        n_exp = ck.config.n_routed_experts
        for e in range(min(4, n_exp)):  # map the pages in once: the figure is RAM, not disk
            ck.expert(layer, e)
        counter = iter(range(10**9))
        expert_s = _best(lambda: ck.expert(layer, next(counter) % min(4, n_exp)), repeats=10)
        bufs = tuple(torch.empty_like(t) for t in ck.expert(layer, 0))
        expert_out_s = _best(
            lambda: ck.expert(layer, next(counter) % min(4, n_exp), out=bufs), repeats=10
        )
        stored = sum(
            ck.info(f"layers.{layer}.ffn.experts.0.{w}.{k}").nbytes
            for w in ("w1", "w2", "w3")
            for k in ("weight", "scale")
        )
        produced = sum(t.nbytes for t in ck.expert(layer, 0))
        threads = info["logical_cores"]
        ram = _kernels.read_bandwidth(1 << 28, threads, 0.5, details=True)["best_gbps"]
        bound_s = (stored + produced) / (ram * 1e9)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "machine": info,
        "checkpoint_bytes": size,
        "shards": len(files),
        "tensors": len(ck),
        "rss_after_open_verify_mb": rss_open / 1e6,
        "open_s": open_s,
        "verify_s": verify_s,
        "header_read_s": header_s,
        "header_bytes": header_bytes,
        "open_ratio": header_s / open_s,
        "expert_dequant_s": expert_s,
        "expert_bytes_stored": stored,
        "expert_bytes_float32": produced,
        "ram_read_gbps": ram,
        "expert_bound_s": bound_s,
        "expert_ratio": bound_s / expert_s,
        "expert_dequant_into_buffers_s": expert_out_s,
        "expert_into_buffers_ratio": bound_s / expert_out_s,
        "torch_threads": torch.get_num_threads(),
    }
    if not json_output:
        print(
            f"checkpoint: {size / 1e9:.2f} GB, {len(files)} shards, {len(ck)} tensors; RSS after "
            f"open+verify: +{rss_open / 1e6:.1f} MB"
        )
        print(
            f"read + parse all headers and the index (the bound): {header_s * 1e3:.2f} ms ({header_bytes / 1e6:.2f} MB)"
        )
        print(f"Checkpoint.open: {open_s * 1e3:.2f} ms = {figures['open_ratio']:.2f} x the bound")
        print(f"verify(): {verify_s * 1e3:.2f} ms")
        print(
            f"dequantize one routed expert to float32 (bound: {stored / 1e6:.1f} MB read + "
            f"{produced / 1e6:.1f} MB written at {ram:.1f} GB/s = {bound_s * 1e3:.2f} ms): "
            f"{expert_s * 1e3:.2f} ms = {figures['expert_ratio']:.2f} x the bound"
        )
        print(
            f"  the same into reused float32 buffers (no page faults on fresh memory): "
            f"{expert_out_s * 1e3:.2f} ms = {figures['expert_into_buffers_ratio']:.2f} x the bound"
        )
    return figures
