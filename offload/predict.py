"""Roofline prediction of decode and prefill speed from a plan and the profile's bandwidths.

Decode is memory-bound: per layer, the attention unit reads its weights and KV on its device, then
the MoE runs the GPU part (shared expert, GPU-resident picks) and the CPU part (picks from RAM,
pages from disk) at the same time; each part costs bytes ÷ (bandwidth × efficiency). The bound is
the same sum at efficiency 1 with no hop overheads: `expert bytes from RAM ÷ RAM bandwidth` plus
the GPU part, the figure every speed claim is a ratio against.

Prefill is compute- or transfer-bound per chunk: the experts not on the GPU are either computed on
the CPU or streamed over PCIe to the GPU, whichever is faster for the chunk; the crossover batch
size is where streaming starts to win. Efficiency factors are `estimated` until a benchmark writes
`calibrated` ones (`Efficiency.save`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from flashdesk.offload.figures import ModelFigures
from flashdesk.offload.plan import GPU, Plan, PlanOptions, make_plan
from flashdesk.offload.probe import HardwareProfile, ProfileError, Sourced, estimated

# Tokens per prefill call of a Session on the CPU (engine.generate.PREFILL_CHUNK); on a GPU the
# plan's `prefill_chunk`, which `plan_and_predict` chooses among these.
CPU_PREFILL_CHUNK = 512
PREFILL_CHUNKS = (1024, 2048, 4096, 8192, 16384)
# A longer chunk is taken while it speeds up a long prompt's prefill by at least this share and
# its larger workspace costs decode (fewer experts in VRAM) at most this share.
CHUNK_MIN_GAIN = 0.10
CHUNK_MAX_DECODE_LOSS = 0.03
LONG_PROMPT = 65536  # the prompt (a long document) chunks are compared on, at most the context
WORKSPACE_MAX_SHARE = 0.25  # of the GPU's usable memory, at most, for a longer chunk's workspace
ATTENTION_FLOP_PER_CANDIDATE = 131072  # 4·H·d per (query, candidate) per layer (spec §6.2)
INDEXER_FLOP_PER_ENTRY = 16384  # 2·64·128 per (query, compressed entry) per CSA layer


def _eff(value: float, note: str) -> Sourced:
    return estimated(value, note)


@dataclass
class Efficiency:
    """Shares of the bandwidth/compute bound the kernels reach; `calibrated` when measured."""

    cpu_experts: Sourced = field(
        default_factory=lambda: _eff(0.75, "FP4 expert GEMV vs the RAM read bound")
    )
    cpu_dense: Sourced = field(
        default_factory=lambda: _eff(0.5, "FP8/BF16 attention GEMV on the CPU vs the RAM bound")
    )
    gpu_memory: Sourced = field(
        default_factory=lambda: _eff(0.6, "batch-1 GEMV vs the GPU memory bandwidth")
    )
    disk: Sourced = field(default_factory=lambda: _eff(0.6, "random 13 MB expert reads via mmap"))
    pcie: Sourced = field(default_factory=lambda: _eff(0.9, "large copies vs the copy bandwidth"))
    # The GPU's decode expert kernel reading pinned host memory in place (zero-copy) vs the
    # pinned copy rate. Measured on the lent H200 (2026-11-28, `bench gpu-kernels`, PCIe 5.0):
    # 43.3 GB/s against 54.9, 0.79.
    zero_copy: Sourced = field(
        default_factory=lambda: _eff(0.79, "decode experts read across PCIe vs the pinned copy")
    )
    # A whole CPU prefill (experts, linears, attention) vs `probe.estimate_cpu_gflops`' peak.
    # `bench decode` calibrates it (dev VM, Zen 5 with AVX512_BF16, 2 cores, 256-token prefill:
    # 0.42); the default stays below that, as a peak from the reported clock and core count
    # overstates many machines (all-core AVX-512 clocks are lower).
    cpu_flops: Sourced = field(
        default_factory=lambda: _eff(0.25, "CPU prefill vs the FP32-FMA / bf16-dot peak")
    )
    gpu_flops: Sourced = field(
        default_factory=lambda: _eff(0.4, "BF16 prefill matmuls vs the tensor-core peak")
    )
    # A CPU decode token's attention and CSA indexer at depth (`decode_attention_seconds`) vs the
    # same peak: the C indexer and attention kernels, not the prefill's mix of GEMMs, so a figure
    # of its own. `bench decode` solves it from its deepest context, the time the depth adds to
    # a step (1M tokens): 0.48 and 0.32 in two runs on the Intel dev VM (2 cores, its speed
    # drifting; prefill 0.27 and 0.24), ~0.5 on the AMD one (prefill 0.42-0.45).
    cpu_attention: Sourced = field(
        default_factory=lambda: _eff(0.4, "CPU decode attention and indexer at depth vs the peak")
    )
    hop_seconds: Sourced = field(
        default_factory=lambda: _eff(50e-6, "GPU↔CPU handoff per layer per token")
    )
    # A GPU decode step cannot finish a layer faster than its many small kernels run (a CUDA
    # graph replays them without the host's dispatch cost, but each still takes a few µs).
    # Measured on the lent H200 (`bench --synthetic v4-flash`, steps replayed from CUDA graphs).
    # Run 6 (2026-11-28, the fifteenth session's kernels with the sweep's shapes): 43 layers, five
    # with host experts, 16.8 ms per token (59.4 tok/s), which this model reproduces at 0.279 ms;
    # 21 layers planned as for a 24 GiB card (17 with host experts), 21.7 ms, at 0.222 ms. The
    # default takes the larger, 0.28 ms, so that a prediction errs low. Run 5 (the thirteenth
    # and fourteenth sessions' code): 18.9, 20.7 and 23.5 ms in the same three plans, one floor
    # of 0.35 ms. Run 4: 0.51 ms per layer when the floor was taken beside the CPU's experts;
    # earlier builds 0.57-0.76 ms. Op by op (no graphs): ~4 ms per layer.
    gpu_layer_seconds: Sourced = field(
        default_factory=lambda: _eff(
            0.28e-3, "small GPU kernels per layer per decode token (CUDA graphs, H200)"
        )
    )

    # A layer computed on the CPU also costs its torch/Python glue per decode token (norms,
    # rope, attention's small products, mHC, routing; a few dozen ops beside the C kernels),
    # which the bytes do not price. Measured on the dev VM (2026-11-27, 2 Zen 5 cores,
    # `bench decode` with the C kernels stubbed out): 1.04–1.09 ms per layer, 0.78 ms after the
    # tenth session's changes (the C linears bound once, the prefetch and expert_ffn fast paths);
    # `bench decode` records this machine's figure. V4-Flash's 43 layers make that ~34 ms of
    # each CPU token.
    cpu_layer_seconds: Sourced = field(
        default_factory=lambda: _eff(0.8e-3, "torch/Python glue per CPU layer per decode token")
    )

    # Likewise a GPU layer's prompt work per token (attention, the experts' grouped kernels,
    # the small kernels, the host's routing read-back per layer); a streamed layer's copies come
    # on top. Measured by `bench --synthetic v4-flash` on the lent H200, run 5 (2026-11-28):
    # 2,048 tokens in 1.85 s over 43 layers, 14 GB of RAM experts streamed in 0.25 s of it,
    # which leaves 17.6 µs per token and layer; planned as a 24 GiB card (17 of 21 layers
    # streamed), 15.1 µs. Run 6: 15.8 µs (43 layers) and 18.3 µs (the 24 GiB plan, 1,024-token
    # chunks), so 17.6 stays. Run 4: 21.0 µs with the copies counted in; 2026-11-27, 27.7 µs.
    # The benchmark records this machine's figure, solved in this model.
    gpu_prefill_token_seconds: Sourced = field(
        default_factory=lambda: _eff(17.6e-6, "GPU layer's prompt work per token (H200)")
    )

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name).to_json() for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> Efficiency:
        """The calibrated (measured) factors of `data`; every other one the built-in default: a
        file's estimates are copies of older defaults (files written before 2026-11-27 held them
        all), which would otherwise outlive the better figures a release ships."""
        eff = cls()
        for f in fields(cls):
            if f.name in data:
                value = Sourced.from_json(data[f.name], f"efficiency.{f.name}")
                if value.source == "calibrated":
                    setattr(eff, f.name, value)
        return eff

    def save(self, path: str | Path) -> None:
        """Write the calibrated factors (the rest are the built-in defaults when loaded)."""
        measured = {k: v for k, v in self.to_json().items() if v["source"] == "calibrated"}
        Path(path).write_text(json.dumps(measured, indent=2) + "\n", encoding="utf-8")

    @staticmethod
    def default_path() -> Path:
        from flashdesk.offload.bandwidth import cache_dir

        return cache_dir() / "calibration.json"

    @classmethod
    def record(cls, measured: dict[str, float], note: str, path: str | Path | None = None) -> Path:
        """Merge measured factors into the calibration file (default: the user cache), keeping the
        others it holds, so the next `flashdesk fit` / wizard prediction uses them. An unreadable
        file is replaced. Returns the file written."""
        path = Path(path) if path is not None else cls.default_path()
        try:
            eff = cls.load(path)
        except ProfileError:
            eff = cls()
        names = {f.name for f in fields(cls)}
        for name, value in measured.items():
            if name not in names:
                raise ValueError(f"unknown efficiency {name!r}; known: {sorted(names)}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"efficiency {name} = {value!r} is not a positive number")
            setattr(eff, name, Sourced(float(value), "calibrated", note))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        eff.save(tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None) -> Efficiency:
        """Calibrated factors from `path` (default: the user cache); defaults when absent."""
        if path is None:
            path = cls.default_path()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ProfileError(
                f"the calibration file {path} is unreadable ({exc}); delete it and run the "
                "benchmarks again."
            ) from None
        return cls.from_json(data)

    @classmethod
    def load_or_defaults(cls) -> Efficiency:
        """`load` for the app's live previews: an unreadable file gives the defaults (logged;
        `flashdesk fit` reports it to the user)."""
        try:
            return cls.load()
        except ProfileError as exc:
            logging.getLogger("flashdesk.offload.predict").warning("%s", exc)
            return cls()

    def all_calibrated(self) -> bool:
        return all(getattr(self, f.name).source == "calibrated" for f in fields(self))


@dataclass
class Prediction:
    decode_tok_s: float
    decode_bound_tok_s: float  # the roofline: efficiency 1, no handoff costs
    prefill_tok_s: float
    ttft_s: float | None  # None when nothing can run
    prompt_tokens: int
    prefill_experts: str  # "cpu", "gpu stream", "mixed", "gpu"
    crossover_tokens: int | None  # chunk size from which streaming experts to the GPU wins
    confidence: str  # "calibrated" or "estimated"
    gpu_hit_rate: float
    bytes_per_token: dict[str, float]  # decode: bytes read per token by device
    inputs: dict[str, dict]  # the bandwidths and factors used, each with value and source
    # What sets the decode speed: "memory" (the bytes at the kernels' rates) or "dispatch" (the
    # GPU layers' many small kernels, a floor per layer; `Efficiency.gpu_layer_seconds`)
    decode_limit: str = "memory"
    # Decode once the context is full (`decode_attention_seconds`): every token's attention and
    # CSA lightning indexer then score ~context/4 keys per CSA layer, compute that the bytes
    # above do not price (V4-Flash at 1M tokens: ~90 GFLOP per token; on a CPU, seconds).
    decode_full_tok_s: float = 0.0
    # The CPU mode drafts with the MTP block (speculative decoding): decode at DRAFT_ACCEPTANCE
    # of the drafts kept, and the share kept at which drafting breaks even; None elsewhere.
    speculative_tok_s: float | None = None
    speculative_break_even: float | None = None

    def to_json(self) -> dict:
        return {
            "decode_tok_s": self.decode_tok_s,
            "decode_bound_tok_s": self.decode_bound_tok_s,
            "prefill_tok_s": self.prefill_tok_s,
            "ttft_s": self.ttft_s,
            "prompt_tokens": self.prompt_tokens,
            "prefill_experts": self.prefill_experts,
            "crossover_tokens": self.crossover_tokens,
            "confidence": self.confidence,
            "gpu_hit_rate": self.gpu_hit_rate,
            "bytes_per_token": self.bytes_per_token,
            "inputs": self.inputs,
            "decode_limit": self.decode_limit,
            "decode_full_tok_s": self.decode_full_tok_s,
            "speculative_tok_s": self.speculative_tok_s,
            "speculative_break_even": self.speculative_break_even,
        }


@dataclass
class _Rates:
    ram: Sourced
    gpu_mem: Sourced
    disk: Sourced
    pinned: Sourced
    pageable: Sourced
    cpu_gflops: Sourced
    gpu_tflops: Sourced


def _rates(profile: HardwareProfile) -> _Rates:
    gpu = profile.gpu
    ram = profile.ram_bandwidth()
    disk = profile.disk_read_gbps
    if not disk.known:
        disk = estimated(0.5, "disk speed unknown: SATA-SSD figure")
    cpu = profile.cpu_gflops
    if not cpu.known:
        cores = int(profile.physical_cores.value) if profile.physical_cores.known else 4
        cpu = estimated(cores * 3.0 * 32, f"{cores} cores × 3 GHz × 32 FLOP/cycle")

    def gpu_field(name: str, fallback: float, why: str) -> Sourced:
        value = getattr(gpu, name) if gpu is not None else None
        if value is not None and value.known:
            return value
        return estimated(fallback, why)

    return _Rates(
        ram=ram,
        gpu_mem=gpu_field("memory_bandwidth_gbps", 500.0, "GPU memory bandwidth unknown"),
        disk=disk,
        pinned=gpu_field("h2d_pinned_gbps", 20.0, "PCIe unknown: typical 4.0 x16"),
        pageable=gpu_field("h2d_pageable_gbps", 6.0, "pageable copy speed unknown"),
        cpu_gflops=cpu,
        gpu_tflops=gpu_field("bf16_tflops", 50.0, "GPU compute unknown"),
    )


def zero_copy_share(plan: Plan, rates: _Rates, eff: Efficiency) -> float:
    """The share of a host layer's pinned experts' picks the GPU best reads in place across PCIe
    (zero-copy) while the CPU computes the rest: the share at which both finish together,
    R_zc / (R_cpu + R_zc). Both read the same RAM, so its read rate bounds the two together
    (`_decode_seconds`). 0 where nothing is pinned or there is no discrete GPU."""
    if plan.mode != "gpu+cpu" or plan.pinned_bytes <= 0:
        return 0.0
    cpu = float(rates.ram.value) * float(eff.cpu_experts.value)
    pcie = float(rates.pinned.value) * float(eff.zero_copy.value)
    return pcie / (cpu + pcie) if cpu > 0 and pcie > 0 else 0.0


def _decode_seconds(
    plan: Plan,
    figures: ModelFigures,
    rates: _Rates,
    eff: Efficiency,
    bound: bool,
    dispatch_floor: bool = True,
) -> tuple[float, dict[str, float]]:
    def e(s: Sourced) -> float:
        return 1.0 if bound else float(s.value)

    ram = float(rates.ram.value) * 1e9
    gpu = float(rates.gpu_mem.value) * 1e9
    disk = float(rates.disk.value) * 1e9
    hop = 0.0 if bound else float(eff.hop_seconds.value)
    dispatch = float(eff.gpu_layer_seconds.value) if dispatch_floor and not bound else 0.0
    glue = float(eff.cpu_layer_seconds.value) if dispatch_floor and not bound else 0.0
    hybrid = plan.mode == "gpu+cpu"
    k, eb = figures.experts_per_token, figures.expert_bytes
    by_index = {layer.index: layer for layer in figures.layers}
    # the picks of pinned experts the GPU reads in place (zero-copy): the pinned share of the
    # RAM experts times the split that balances the GPU's PCIe reads against the CPU's
    ram_experts = sum(lp.experts_ram for lp in plan.layers) * eb
    pinned_share = min(1.0, plan.pinned_bytes / ram_experts) if ram_experts else 0.0
    zc = pinned_share * zero_copy_share(plan, rates, eff)
    pinned_rate = float(rates.pinned.value) * 1e9
    read = {"gpu": 0.0, "ram": 0.0, "disk": 0.0}
    total = 0.0
    for lp in plan.layers:
        layer = by_index[lp.index]
        on_gpu = lp.attention_on == GPU
        attn = layer.dense_read_on(on_gpu) + figures.kv_read_layer_bytes(
            layer, plan.context, plan.kv_dtype
        )
        shared = layer.shared_on(on_gpu)
        gpu_side = cpu_side = layer_s = 0.0
        if on_gpu:
            layer_s += attn / (gpu * e(eff.gpu_memory))
            gpu_side += shared / (gpu * e(eff.gpu_memory))
            read["gpu"] += attn + shared
        else:
            layer_s += attn / (ram * e(eff.cpu_dense)) + glue
            cpu_side += shared / (ram * e(eff.cpu_dense))
            read["ram"] += attn + shared
            if hybrid:
                layer_s += hop
        gpu_bytes = k * eb * lp.gpu_hit_rate
        ram_bytes = k * eb * lp.ram_hit_rate
        disk_bytes = k * eb * lp.disk_rate
        gpu_side += gpu_bytes / (gpu * e(eff.gpu_memory))
        cpu_side += disk_bytes / (disk * e(eff.disk))
        if zc:  # the two read the same RAM: its read rate bounds them together
            read_in_place = ram_bytes * zc
            gpu_side += read_in_place / (pinned_rate * e(eff.zero_copy))
            cpu_side += max(
                (ram_bytes - read_in_place) / (ram * e(eff.cpu_experts)), ram_bytes / ram
            )
        else:
            cpu_side += ram_bytes / (ram * e(eff.cpu_experts))
        read["gpu"] += gpu_bytes
        read["ram"] += ram_bytes
        read["disk"] += disk_bytes
        host_work = hybrid and bool(ram_bytes or disk_bytes)
        if on_gpu and host_work:
            # the GPU's kernels up to the routing (its small kernels' floor, whatever their
            # bytes) come before the picks the CPU computes, and the next layer waits for
            # those: in series, not beside them. The lent H200 with 17 such layers of 21 took
            # 23.5 ms a token where the sum of the two sides' maxima said 20.6.
            total += max(layer_s, dispatch) + max(gpu_side, cpu_side) + hop
            continue
        layer_s += max(gpu_side, cpu_side)
        if host_work:
            layer_s += hop
        # a GPU layer's small kernels set a floor under it, whatever its bytes
        total += max(layer_s, dispatch) if on_gpu else layer_s
    head = figures.head_on(plan.head_on == GPU)
    if plan.head_on == GPU:
        total += head / (gpu * e(eff.gpu_memory))
        read["gpu"] += head
    else:
        total += head / (ram * e(eff.cpu_dense))
        read["ram"] += head
    read["ram"] += figures.embed_row_bytes
    return total, read


def attention_flops(layer, depth: float, window: int, index_topk: int = 512) -> float:
    """FLOPs of one query's attention in `layer` at `depth` tokens of context: the window and
    the compressed candidates (CSA: its top-k, HCA: all), and a CSA layer's lightning-indexer
    scores over every compressed entry (the prompt chunks' figure per query, spec §6.2)."""
    candidates = min(window, depth)
    flops = 0.0
    if layer.attention == "csa":
        entries = depth / layer.compress_ratio
        candidates += min(index_topk, entries)
        flops += INDEXER_FLOP_PER_ENTRY * entries
    elif layer.attention == "hca":
        candidates += depth / layer.compress_ratio
    return flops + ATTENTION_FLOP_PER_CANDIDATE * candidates


def decode_attention_seconds(
    plan: Plan, figures: ModelFigures, rates: _Rates, eff: Efficiency, depth: int
) -> float:
    """Seconds of a decode token's attention compute at `depth` tokens of context, each layer
    on the device that runs its attention: the GPU at its prompt FLOP rate, the CPU at
    `Efficiency.cpu_attention` of its peak (its C indexer and attention kernels)."""
    cpu_flops = float(rates.cpu_gflops.value) * 1e9 * float(eff.cpu_attention.value)
    gpu_flops = float(rates.gpu_tflops.value) * 1e12 * float(eff.gpu_flops.value)
    by_index = {layer.index: layer for layer in figures.layers}
    total = 0.0
    for lp in plan.layers:
        flops = attention_flops(by_index[lp.index], depth, figures.window)
        total += flops / (gpu_flops if lp.attention_on == GPU else cpu_flops)
    return total


def decode_tok_s_at(
    plan: Plan,
    figures: ModelFigures,
    profile: HardwareProfile,
    depth: int,
    efficiency: Efficiency | None = None,
) -> float:
    """Decode tok/s with `depth` tokens of context: `predict`'s decode (the bytes, the plan's
    KV reads) plus the attention compute at that depth (`decode_attention_seconds`)."""
    eff = efficiency or Efficiency()
    rates = _rates(profile)
    seconds, _ = _decode_seconds(plan, figures, rates, eff, bound=False)
    return 1.0 / (seconds + decode_attention_seconds(plan, figures, rates, eff, depth))


def prefill_pieces(tokens: int, chunk: int) -> list[int]:
    """Sizes of the calls a prompt of `tokens` is prefilled in: as few as chunks of at most
    `chunk` allow, equal to a token. A short tail would be the one call below the streaming
    crossover (its experts on the CPU) and pays a whole call's PCIe copies for few tokens:
    9,000 tokens in 8,192-token chunks run as 4,500 + 4,500, not 8,192 + 808."""
    if tokens <= 0:
        return []
    calls = -(-tokens // max(1, chunk))
    q, r = divmod(tokens, calls)
    return [q + 1] * r + [q] * (calls - r)


def _expected_distinct(n: int, picks: float) -> float:
    """Distinct experts out of `n` touched by `picks` uniform picks."""
    return n * (1.0 - (1.0 - 1.0 / n) ** picks) if n else 0.0


def _prefill_chunk_seconds(
    plan: Plan,
    figures: ModelFigures,
    rates: _Rates,
    eff: Efficiency,
    chunk: int,
    position: int,
    force: str | None = None,
) -> tuple[float, set[str]]:
    """Seconds to prefill `chunk` tokens starting at `position`, and which expert paths ran."""
    cpu_flops = float(rates.cpu_gflops.value) * 1e9 * float(eff.cpu_flops.value)
    gpu_flops = float(rates.gpu_tflops.value) * 1e12 * float(eff.gpu_flops.value)
    ram = float(rates.ram.value) * 1e9 * float(eff.cpu_experts.value)
    disk = float(rates.disk.value) * 1e9 * float(eff.disk.value)
    pcie_eff = float(eff.pcie.value)
    pinned_bw = float(rates.pinned.value or 0) * 1e9 * pcie_eff
    pageable_bw = float(rates.pageable.value or 0) * 1e9 * pcie_eff
    ram_experts = sum(lp.experts_ram for lp in plan.layers) * figures.expert_bytes
    pinned_share = plan.pinned_bytes / ram_experts if ram_experts else 0.0
    has_gpu = plan.mode != "cpu"
    k, eb, n = figures.experts_per_token, figures.expert_bytes, figures.n_experts
    mid = position + chunk / 2  # average context the chunk's queries see
    by_index = {layer.index: layer for layer in figures.layers}
    floor = chunk * float(eff.gpu_prefill_token_seconds.value) if has_gpu else 0.0
    total = 0.0
    paths: set[str] = set()
    for lp in plan.layers:
        layer = by_index[lp.index]
        flops = 2.0 * (layer.dense_params + layer.shared_params) * chunk
        flops += chunk * attention_flops(layer, mid, figures.window)
        layer_s = flops / (gpu_flops if lp.attention_on == GPU else cpu_flops)
        streamed = 0.0
        picks = chunk * k
        expert_flops = 2.0 * layer.expert_params
        gpu_part = picks * lp.gpu_hit_rate * expert_flops / gpu_flops if has_gpu else 0.0
        off_gpu = lp.ram_hit_rate + lp.disk_rate
        if off_gpu <= 0:
            layer_s += gpu_part
            paths.add("gpu")
        else:
            touched = _expected_distinct(n, picks) * off_gpu * eb
            disk_bytes = touched * (lp.disk_rate / off_gpu)
            ram_bytes = touched - disk_bytes
            from_disk = disk_bytes / disk
            cpu_time = max(picks * off_gpu * expert_flops / cpu_flops, ram_bytes / ram) + from_disk
            stream_time = math.inf
            can_copy = pinned_bw > 0 and (pageable_bw > 0 or pinned_share >= 1)
            if has_gpu and can_copy and plan.mode == "gpu+cpu":
                copy = touched * pinned_share / pinned_bw
                if pinned_share < 1:
                    copy += touched * (1 - pinned_share) / pageable_bw
                stream_time = max(copy, picks * off_gpu * expert_flops / gpu_flops) + from_disk
            if force == "cpu" or (force is None and cpu_time <= stream_time):
                layer_s += max(cpu_time, gpu_part)
                paths.add("cpu")
            else:
                # the grouped kernels wait for their layer's copies, in series with the floor's
                # work (the lent H200 planned as a 24 GiB card, 17 of 21 layers streamed:
                # ~93 ms a 2,048-token layer = its 56 ms of copies + the 43 ms floor)
                streamed = max(stream_time, gpu_part)
                paths.add("gpu stream")
        # a GPU layer's measured cost per prompt token is a floor under what the model says
        total += (max(layer_s, floor) if lp.attention_on == GPU else layer_s) + streamed
    return total, paths


def crossover_tokens(
    plan: Plan, figures: ModelFigures, rates: _Rates, eff: Efficiency
) -> int | None:
    """Smallest chunk (power of two up to 64K) for which streaming experts beats the CPU."""
    if plan.mode != "gpu+cpu" or not any(lp.ram_hit_rate + lp.disk_rate for lp in plan.layers):
        return None
    chunk = 1
    while chunk <= 65536:
        cpu, _ = _prefill_chunk_seconds(plan, figures, rates, eff, chunk, 0, force="cpu")
        best, paths = _prefill_chunk_seconds(plan, figures, rates, eff, chunk, 0)
        if "gpu stream" in paths and best < cpu:
            return chunk
        chunk *= 2
    return None


def record_crossover(plan: Plan, prediction: Prediction) -> None:
    """Give a GPU+CPU plan the prediction's crossover as the runtime's streaming threshold
    (`Plan.stream_min_tokens`): chunks below it keep their host experts on the CPU, as predicted."""
    if plan.mode == "gpu+cpu":
        plan.stream_min_tokens = prediction.crossover_tokens


# DeepSeek's reported acceptance of the MTP block's draft (the V3 report: 85-90 % for the second
# token); random weights cannot measure it, so a prediction with drafts says it assumed this.
DRAFT_ACCEPTANCE = 0.8


def drafting_gain(plain: float, step: float, acceptance: float) -> tuple[float, float]:
    """A speculative step (a draft and the two-token call that verifies it) costs `step` where a
    plain decode step costs `plain` (in seconds or in bytes read) and yields 1 + acceptance
    tokens → (its speed-up over plain decode, the acceptance at which it breaks even)."""
    return (1 + acceptance) * plain / step, step / plain - 1


def speculative_seconds(
    plan: Plan, figures: ModelFigures, rates: _Rates, eff: Efficiency
) -> tuple[float, float] | None:
    """In the CPU mode with an MTP block: (seconds a draft adds to a decode step, seconds the
    draft token adds to the step that verifies it). A draft reads the block's weights, its
    experts for one token (memory-mapped, in the page cache once used) and the head again; the
    verify reads the draft token's routed experts beside the step's own. None elsewhere."""
    if plan.mode != "cpu" or not figures.mtp_bytes:
        return None
    ram = float(rates.ram.value) * 1e9
    disk = float(rates.disk.value) * 1e9
    k, eb = figures.experts_per_token, figures.expert_bytes
    mtp_dense = max(0, figures.mtp_bytes - figures.n_experts * eb)
    draft = (mtp_dense + figures.head_on(False)) / (ram * float(eff.cpu_dense.value))
    draft += k * eb / (ram * float(eff.cpu_experts.value))
    draft += float(eff.cpu_layer_seconds.value)  # the block's own torch glue, as a layer's
    verify = sum(
        k * eb * lp.ram_hit_rate / (ram * float(eff.cpu_experts.value))
        + k * eb * lp.disk_rate / (disk * float(eff.disk.value))
        for lp in plan.layers
    )
    return draft, verify


def predict(
    plan: Plan,
    figures: ModelFigures,
    profile: HardwareProfile,
    prompt_tokens: int = 8192,
    efficiency: Efficiency | None = None,
) -> Prediction:
    """Decode tok/s, prefill tok/s and time to first token for a prompt of `prompt_tokens`."""
    eff = efficiency or Efficiency()
    rates = _rates(profile)
    if not plan.layers:
        return Prediction(
            0.0, 0.0, 0.0, None, prompt_tokens, "none", None, "estimated", 0.0, {}, {}
        )
    seconds, read = _decode_seconds(plan, figures, rates, eff, bound=False)
    bound_seconds, _ = _decode_seconds(plan, figures, rates, eff, bound=True)
    memory_seconds, _ = _decode_seconds(plan, figures, rates, eff, False, dispatch_floor=False)
    prompt = max(1, min(prompt_tokens, plan.context))
    chunk = CPU_PREFILL_CHUNK if plan.mode == "cpu" else plan.prefill_chunk
    prefill = 0.0
    paths: set[str] = set()
    position = 0
    for size in prefill_pieces(prompt, chunk):  # as a Session splits it
        t, used = _prefill_chunk_seconds(plan, figures, rates, eff, size, position)
        prefill += t
        paths |= used
        position += size
    prefill += (
        (figures.head_on(True) / (float(rates.gpu_mem.value) * 1e9))
        if plan.head_on == GPU
        else (figures.head_on(False) / (float(rates.ram.value) * 1e9))
    )
    if paths == {"gpu"}:
        mode = "gpu"
    elif "cpu" in paths and "gpu stream" in paths:
        mode = "mixed"
    elif "gpu stream" in paths:
        mode = "gpu stream"
    else:
        mode = "cpu"
    rate_inputs = {
        "ram_read_gbps": rates.ram,
        "disk_read_gbps": rates.disk,
        "cpu_gflops": rates.cpu_gflops,
    }
    if plan.mode != "cpu":
        rate_inputs |= {
            "gpu_memory_gbps": rates.gpu_mem,
            "gpu_bf16_tflops": rates.gpu_tflops,
            "h2d_pinned_gbps": rates.pinned,
            "h2d_pageable_gbps": rates.pageable,
        }
    inputs = {name: s.to_json() for name, s in rate_inputs.items()}
    inputs |= {f"efficiency.{k}": v for k, v in eff.to_json().items()}
    bandwidths_measured = rates.ram.source == "measured"
    confidence = "calibrated" if eff.all_calibrated() and bandwidths_measured else "estimated"
    total_picks = sum(lp.gpu_hit_rate for lp in plan.layers)
    full = seconds + decode_attention_seconds(plan, figures, rates, eff, plan.context)
    spec_tok_s = break_even = None
    extra = speculative_seconds(plan, figures, rates, eff)
    if extra is not None:
        speedup, break_even = drafting_gain(seconds, seconds + sum(extra), DRAFT_ACCEPTANCE)
        spec_tok_s = speedup / seconds
    return Prediction(
        decode_tok_s=1.0 / seconds,
        decode_bound_tok_s=1.0 / bound_seconds,
        prefill_tok_s=prompt / prefill,
        ttft_s=prefill,
        prompt_tokens=prompt,
        prefill_experts=mode,
        crossover_tokens=crossover_tokens(plan, figures, rates, eff),
        confidence=confidence,
        gpu_hit_rate=total_picks / len(plan.layers),
        bytes_per_token=read,
        inputs=inputs,
        decode_limit="dispatch" if seconds > 1.5 * memory_seconds else "memory",
        decode_full_tok_s=1.0 / full,
        speculative_tok_s=spec_tok_s,
        speculative_break_even=break_even,
    )


def plan_and_predict(
    figures: ModelFigures,
    profile: HardwareProfile,
    options: PlanOptions | None = None,
    prompt_tokens: int = 8192,
    efficiency: Efficiency | None = None,
    choose_chunk: bool = True,
) -> tuple[Plan, Prediction]:
    """`make_plan` and `predict`, the GPU prefill chunk chosen for this machine, the plan's
    streaming threshold set from the prediction (`record_crossover`).

    The chunk (`PREFILL_CHUNKS`): a prefill call copies every expert kept in RAM across PCIe
    once, so on a card that holds few of them a long prompt's prefill is bound by those copies
    and longer chunks are faster nearly in proportion (RTX 4090 + 192 GB DDR5 profile, 64K-token
    prompt: 163 tok/s predicted with 1024-token chunks, 560 with 4096); each costs workspace
    the experts' VRAM cache gives up. The longest chunk is kept whose prefill of a long prompt
    (`LONG_PROMPT`) gains at least CHUNK_MIN_GAIN over the shorter one and whose decode loses at
    most CHUNK_MAX_DECODE_LOSS against the shortest, at the same verdict, context and attention
    placement, its workspace at most WORKSPACE_MAX_SHARE of the GPU's memory.
    `choose_chunk` off, or an explicit workspace in `options`: the options' chunk as given."""
    options = options or PlanOptions()
    eff = efficiency or Efficiency()
    plan = make_plan(figures, profile, options)
    choose = (
        choose_chunk
        and options.gpu_workspace_bytes is None
        and figures.prefill_token_bytes > 0
        and plan.mode == "gpu+cpu"  # a CUDA runtime's chunks (unified memory runs on the CPU)
        and bool(plan.layers)
    )
    if choose:
        long = min(LONG_PROMPT, plan.context)
        first = predict(plan, figures, profile, long, eff)
        base_decode, last_prefill = first.decode_tok_s, first.prefill_tok_s
        for chunk in PREFILL_CHUNKS:
            if chunk <= plan.prefill_chunk:
                continue
            bigger = make_plan(figures, profile, replace(options, prefill_chunk=chunk))
            vram = profile.gpu.usable_vram_bytes or 0
            if (bigger.verdict, bigger.context, bigger.cpu_attention_layers) != (
                plan.verdict,
                plan.context,
                plan.cpu_attention_layers,
            ) or bigger.gpu_workspace_bytes > WORKSPACE_MAX_SHARE * vram:
                break
            guess = predict(bigger, figures, profile, long, eff)
            if (
                guess.prefill_tok_s < (1 + CHUNK_MIN_GAIN) * last_prefill
                or guess.decode_tok_s < (1 - CHUNK_MAX_DECODE_LOSS) * base_decode
            ):
                break
            plan, last_prefill = bigger, guess.prefill_tok_s
    prediction = predict(plan, figures, profile, prompt_tokens, eff)
    record_crossover(plan, prediction)
    plan.zero_copy_share = zero_copy_share(plan, _rates(profile), eff)  # as predicted
    if plan.zero_copy_share:
        for group in plan.groups:
            if group.name == "routed experts" and group.location == "pinned":
                group.detail += (
                    f"; the GPU reads ~{plan.zero_copy_share:.0%} of their picks in place across "
                    "PCIe beside the CPU"
                )
    return plan, prediction
