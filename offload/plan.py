"""Plan: where every tensor group lives, how much KV fits, and whether the machine runs the model.

Placement is data (the runtime executes it): per layer, where its attention (weights + shared
expert + KV) runs, how many of its routed experts sit on the GPU, in RAM and on disk. It is chosen
greedily by what a byte on the GPU saves per token: the attention units and the head are read
whole every token (1 byte read per byte placed), the KV cache partly (the indexer scans every key,
attention reads only the selected entries), a routed expert only when picked (6 of 256). So:
attention, head and KV first; then whole expert layers; then the hottest experts of the rest.

The plan never over-commits: GPU contents stay within free VRAM minus the reserve and workspace,
host contents within available RAM (capped by the cgroup) minus the reserve; the pinned part stays
within the locked-memory cap and the rest is pageable. What does not fit in RAM is memory-mapped
from the checkpoint on disk and paged in per token, which the verdict prices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flashdesk.offload.figures import LayerFigures, ModelFigures
from flashdesk.offload.probe import GIB, HardwareProfile

GPU = "gpu"
PINNED = "pinned"
PAGEABLE = "pageable"
DISK = "disk"

FITS = "fits"
FITS_WITH_CHANGES = "fits_with_changes"
DOES_NOT_FIT = "does_not_fit"

KV_DTYPES = ("bf16", "fp8")
MIN_CONTEXT = 4096
# Pinning less than this is not worth a separate allocation path.
MIN_PINNED_BYTES = 1 * GIB

# Lower-bit GGUF builds of the same model the GGUF backend runs: average bits per weight over all
# parameters of typical mixed-precision MoE quantizations (experts 2-3 bit, attention higher).
GGUF_OPTIONS = (("~2-bit GGUF (IQ2-class)", 2.3), ("~3-bit GGUF (Q2_K/Q3-class)", 2.9))


class PlanError(ValueError):
    """Inputs the planner cannot use, with what is wrong and what to do."""


# Prompt tokens per GPU prefill call unless a plan chooses more (`predict.plan_and_predict`): each
# call copies the experts kept in RAM across PCIe once, so longer chunks copy less per token but
# need more GPU workspace.
DEFAULT_PREFILL_CHUNK = 1024
# The GPU workspace where the figures do not model a prefill's memory (GGUF models).
DEFAULT_GPU_WORKSPACE = 1 * GIB


@dataclass
class PlanOptions:
    """What the user asks for. Reserves default to a share of the device (see `resolved`)."""

    context: int = 131072
    kv_dtype: str = "bf16"
    vram_reserve_bytes: int | None = None  # CUDA context, display, fragmentation
    # GPU memory kept free for activations and prefill buffers; None: what a prefill chunk of
    # `prefill_chunk` tokens needs at this context (`ModelFigures.prefill_workspace`), or
    # DEFAULT_GPU_WORKSPACE where the figures do not model it
    gpu_workspace_bytes: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per GPU prefill call
    ram_reserve_bytes: int | None = None  # OS, the app, Python and torch
    expert_frequency: Any = None  # per layer: routing counts per expert (runtime-recorded)
    allow_disk: bool = True  # page experts that do not fit in RAM from the checkpoint files

    def validate(self, figures: ModelFigures) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise PlanError(f"KV dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}.")
        for name in ("vram_reserve_bytes", "ram_reserve_bytes", "gpu_workspace_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PlanError(f"{name} is {value}; reserves cannot be negative.")
        if self.prefill_chunk < 1:
            raise PlanError(f"prefill_chunk is {self.prefill_chunk}; it must be at least 1 token.")
        if not 1 <= self.context <= figures.max_context:
            raise PlanError(
                f"context {self.context} is outside 1..{figures.max_context} tokens, the range "
                f"{figures.name or 'this model'} supports."
            )


@dataclass
class LayerPlan:
    """One layer: where its attention runs, and where its routed experts live."""

    index: int
    attention: str  # "window" / "csa" / "hca"
    attention_on: str  # GPU or "cpu"
    kv_bytes: int
    experts_gpu: int
    experts_ram: int
    experts_disk: int
    whole_layer_on_gpu: bool
    hot_expert_ids: tuple[int, ...] | None  # the GPU-cached experts when a frequency profile chose
    gpu_hit_rate: float  # expected share of routed picks served from the GPU
    ram_hit_rate: float
    disk_rate: float


@dataclass
class Group:
    """A line of the placement summary: a tensor group, where it lives, how many bytes."""

    name: str
    location: str
    bytes: int
    detail: str = ""


# Prefill chunks of at least this many tokens compute their picks on the GPU, the host's experts
# streamed there (fewer: on the CPU), where no prediction has set a plan's crossover.
DEFAULT_STREAM_MIN_TOKENS = 256


@dataclass
class Plan:
    model: str
    mode: str  # "gpu+cpu", "cpu", "unified"
    context: int
    kv_dtype: str
    kv_bytes: int
    kv_bytes_gpu: int
    layers: list[LayerPlan]
    head_on: str
    groups: list[Group]
    memory: dict[str, dict[str, int]]
    pinned_bytes: int
    pageable_bytes: int
    disk_bytes: int
    verdict: str
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: PlanOptions | None = None
    # What the runtime does with a prefill chunk of host experts (`DEFAULT_STREAM_MIN_TOKENS`):
    # `predict.record_crossover` sets the prediction's crossover here (None: streaming never
    # wins on this machine up to 64K-token chunks, or there is nothing to stream).
    stream_min_tokens: int | None = DEFAULT_STREAM_MIN_TOKENS
    # Prompt tokens per GPU prefill call, and the GPU memory kept free for one (in `memory` too)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    gpu_workspace_bytes: int = 0
    # Of each host layer's pinned experts, the share whose picks the GPU reads in place across
    # PCIe beside the CPU (`predict.zero_copy_share`, set with the prediction; 0: none).
    zero_copy_share: float = 0.0

    @property
    def gpu_expert_layers(self) -> list[int]:
        return [lp.index for lp in self.layers if lp.whole_layer_on_gpu]

    @property
    def cpu_attention_layers(self) -> list[int]:
        return [lp.index for lp in self.layers if lp.attention_on != GPU]

    @property
    def hot_experts_per_layer(self) -> list[int]:
        return [0 if lp.whole_layer_on_gpu else lp.experts_gpu for lp in self.layers]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "mode": self.mode,
            "context": self.context,
            "kv_dtype": self.kv_dtype,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_gpu": self.kv_bytes_gpu,
            "head_on": self.head_on,
            "gpu_expert_layers": self.gpu_expert_layers,
            "cpu_attention_layers": self.cpu_attention_layers,
            "hot_experts_per_layer": self.hot_experts_per_layer,
            "groups": [asdict(g) for g in self.groups],
            "memory": self.memory,
            "pinned_bytes": self.pinned_bytes,
            "zero_copy_share": self.zero_copy_share,
            "pageable_bytes": self.pageable_bytes,
            "disk_bytes": self.disk_bytes,
            "verdict": self.verdict,
            "changes": self.changes,
            "notes": self.notes,
            "stream_min_tokens": self.stream_min_tokens,
            "prefill_chunk": self.prefill_chunk,
            "gpu_workspace_bytes": self.gpu_workspace_bytes,
            "layers": [asdict(lp) for lp in self.layers],
        }


# ----------------------------------------------------------------------------- frequencies


def expert_shares(figures: ModelFigures, frequency: Any) -> list[list[float]] | None:
    """Per layer, each expert's share of routed picks (sums to 1), from raw counts."""
    if frequency is None:
        return None
    n_layers, n_experts = len(figures.layers), figures.n_experts
    if isinstance(frequency, Mapping):
        rows = [frequency.get(i, frequency.get(str(i))) for i in range(n_layers)]
    elif isinstance(frequency, Sequence):
        rows = list(frequency)
    else:
        raise PlanError("the expert-frequency profile must be a list of per-layer count lists.")
    if len(rows) != n_layers:
        raise PlanError(
            f"the expert-frequency profile has {len(rows)} layers, the model {n_layers}; record it "
            "again with this model."
        )
    shares = []
    for i, row in enumerate(rows):
        if row is None:
            shares.append([1.0 / n_experts] * n_experts)
            continue
        counts = [float(c) for c in row]
        if len(counts) != n_experts or any(c < 0 or math.isnan(c) for c in counts):
            raise PlanError(
                f"layer {i} of the expert-frequency profile must hold {n_experts} non-negative "
                "counts; record it again with this model."
            )
        total = sum(counts)
        shares.append([c / total for c in counts] if total > 0 else [1.0 / n_experts] * n_experts)
    return shares


# ----------------------------------------------------------------------------- GPU filling


@dataclass
class _GpuFill:
    attention_gpu: set[int]
    head_gpu: bool
    whole_layers: set[int]
    hot: dict[int, list[int] | int]  # layer -> expert ids (frequency known) or a count
    used: int


def _attention_unit(
    figures: ModelFigures, layer: LayerFigures, ctx: int, kv: str, gpu: bool
) -> tuple[int, int]:
    """(bytes held, bytes read per token) of a layer's always-read part in VRAM or in RAM."""
    shared = layer.shared_on(gpu)
    size = layer.dense_on(gpu) + shared + figures.kv_layer_bytes(layer, ctx, kv)
    cost = layer.dense_read_on(gpu) + shared + figures.kv_read_layer_bytes(layer, ctx, kv)
    return size, cost


def _essentials_bytes(figures: ModelFigures, ctx: int, kv: str, gpu: bool) -> int:
    """Everything read every token, KV cache included, as held in VRAM or in RAM."""
    return figures.dense_total_on(gpu) + figures.kv_bytes(ctx, kv)


def _fill_gpu(
    figures: ModelFigures, ctx: int, kv: str, budget: int, shares: list[list[float]] | None
) -> _GpuFill:
    left = max(budget, 0)
    # 1. Units read every token, most bytes saved per byte placed first (ties: layers, then head).
    units = []
    for layer in figures.layers:
        size, cost = _attention_unit(figures, layer, ctx, kv, gpu=True)
        units.append((cost / size, 0, layer.index, size))
    head = figures.head_on(gpu=True)
    units.append((1.0, 1, -1, head))
    units.sort(key=lambda u: (-u[0], u[1], u[2]))
    attention_gpu: set[int] = set()
    head_gpu = False
    for _, _, index, size in units:
        if size <= left:
            left -= size
            if index < 0:
                head_gpu = True
            else:
                attention_gpu.add(index)
    # 2. Whole expert layers (flattest routing first: hot caching helps least there).
    layer_bytes = figures.layers[0].experts_bytes
    order = [layer.index for layer in figures.layers]
    if shares is not None:
        order.sort(key=lambda i: max(shares[i]))
    whole: set[int] = set()
    for index in order:
        if layer_bytes <= left:
            whole.add(index)
            left -= layer_bytes
    # 3. Hot experts in the other layers.
    rest = [i for i in order if i not in whole]
    slots = left // figures.expert_bytes if figures.expert_bytes else 0
    slots = min(slots, len(rest) * figures.n_experts)
    hot: dict[int, list[int] | int] = {}
    if rest and slots:
        if shares is not None:
            ranked = sorted(
                ((shares[i][e], i, e) for i in rest for e in range(figures.n_experts)),
                key=lambda t: (-t[0], t[1], t[2]),
            )
            picked: dict[int, list[int]] = {i: [] for i in rest}
            for _, i, e in ranked[:slots]:
                picked[i].append(e)
            hot = {i: sorted(ids) for i, ids in picked.items()}
        else:
            base, extra = divmod(slots, len(rest))
            hot = {i: base + (1 if k < extra else 0) for k, i in enumerate(sorted(rest))}
        left -= slots * figures.expert_bytes
    return _GpuFill(attention_gpu, head_gpu, whole, hot, max(budget, 0) - left)


def _all_essentials_on_gpu(fill: _GpuFill, figures: ModelFigures) -> bool:
    return fill.head_gpu and len(fill.attention_gpu) == len(figures.layers)


# ----------------------------------------------------------------------------- budgets


@dataclass
class _Budgets:
    mode: str
    gpu_capacity: int
    gpu_budget: int  # for weights + KV (workspace and reserve already taken off)
    gpu_reserve: int
    gpu_workspace: int
    ram_capacity: int
    host_budget: int
    ram_reserve: int
    pin_cap: int
    pin_source: str


def _workspace(figures: ModelFigures, options: PlanOptions) -> int:
    """GPU bytes kept free for a prefill chunk (the option, else the figures' model)."""
    if options.gpu_workspace_bytes is not None:
        return options.gpu_workspace_bytes
    modelled = figures.prefill_workspace(options.prefill_chunk, options.context)
    return DEFAULT_GPU_WORKSPACE if modelled is None else modelled


def _budgets(profile: HardwareProfile, options: PlanOptions, figures: ModelFigures) -> _Budgets:
    ram_total = profile.ram_total_bytes.value if profile.ram_total_bytes.known else None
    usable = profile.usable_ram_bytes()
    ram_capacity = int(ram_total or usable)
    ram_reserve = options.ram_reserve_bytes
    if ram_reserve is None:
        ram_reserve = 4 * GIB + ram_capacity // 20
    host_budget = max(usable - ram_reserve, 0)
    gpu = profile.gpu
    pin = profile.pin_cap_bytes
    pin_cap = int(pin.value) if pin.known and pin.value is not None else 0
    if gpu is None or gpu.usable_vram_bytes is None:
        return _Budgets("cpu", 0, 0, 0, 0, ram_capacity, host_budget, ram_reserve, 0, "")
    vram = int(gpu.usable_vram_bytes)
    capacity = int(gpu.vram_total_bytes.value) if gpu.vram_total_bytes.known else vram
    reserve = options.vram_reserve_bytes
    if reserve is None:
        reserve = GIB // 2 + capacity // 20
    workspace = _workspace(figures, options)
    if gpu.unified.value:
        # One pool: the GPU's share comes out of the host budget (and Metal's working-set cap).
        gpu_budget = min(vram, host_budget) - workspace
        return _Budgets(
            "unified",
            capacity,
            max(gpu_budget, 0),
            0,
            workspace,
            ram_capacity,
            host_budget,
            ram_reserve,
            0,
            "",
        )
    gpu_budget = vram - reserve - workspace
    return _Budgets(
        "gpu+cpu",
        capacity,
        max(gpu_budget, 0),
        reserve,
        workspace,
        ram_capacity,
        host_budget,
        ram_reserve,
        pin_cap,
        pin.source,
    )


# ----------------------------------------------------------------------------- the planner


def make_plan(
    figures: ModelFigures, profile: HardwareProfile, options: PlanOptions | None = None
) -> Plan:
    """Place `figures` on `profile` for the asked context; the verdict says what had to change."""
    options = options or PlanOptions()
    options.validate(figures)
    shares = expert_shares(figures, options.expert_frequency)
    budgets = _budgets(profile, options, figures)
    plan = _place(figures, budgets, options, shares)
    if plan is None:
        # The parts read every token do not fit in RAM at this context: find the largest one.
        for ctx in _smaller_contexts(options.context):
            smaller = replace(options, context=ctx)
            budgets = _budgets(profile, smaller, figures)  # a smaller workspace too
            plan = _place(figures, budgets, smaller, shares)
            if plan is not None:
                plan.changes.insert(
                    0,
                    f"smaller context: {ctx:,} tokens instead of {options.context:,} (the KV "
                    f"cache at {options.context:,} tokens does not fit in RAM beside the weights)",
                )
                plan.verdict = FITS_WITH_CHANGES
                break
    if plan is None:
        plan = _does_not_fit(figures, profile, budgets, options)
        plan.prefill_chunk, plan.gpu_workspace_bytes = options.prefill_chunk, budgets.gpu_workspace
        return plan
    plan.prefill_chunk, plan.gpu_workspace_bytes = options.prefill_chunk, budgets.gpu_workspace
    _assess(plan, figures, profile, budgets, options, shares)
    if plan.disk_bytes and not options.allow_disk:
        plan.verdict = DOES_NOT_FIT
        plan.changes.insert(
            0,
            f"does not fit without paging from disk: {_gb(plan.disk_bytes)} of routed experts "
            "do not fit in RAM (paging is switched off)",
        )
    if len(profile.gpus) > 1 and budgets.mode != "cpu":
        plan.notes.append(
            f"{len(profile.gpus)} GPUs found; this plan uses GPU {profile.gpu.index} (the most "
            "free memory) and leaves the others idle"
        )
    return plan


def _smaller_contexts(context: int) -> list[int]:
    out, ctx = [], 1 << max(context - 1, 1).bit_length() - 1
    while ctx >= MIN_CONTEXT:
        if ctx < context:
            out.append(ctx)
        ctx //= 2
    return out


def _place(
    figures: ModelFigures,
    budgets: _Budgets,
    options: PlanOptions,
    shares: list[list[float]] | None,
) -> Plan | None:
    """Placement at `options.context`; None when the always-read parts do not fit in RAM."""
    ctx, kv = options.context, options.kv_dtype
    gpu_budget = budgets.gpu_budget
    if budgets.mode == "unified":  # leave the shared pool room for the embedding
        gpu_budget = min(
            gpu_budget, budgets.host_budget - budgets.gpu_workspace - figures.embed_bytes
        )
    fill = _fill_gpu(figures, ctx, kv, gpu_budget, shares)
    if budgets.mode == "cpu":
        fill = _GpuFill(set(), False, set(), {}, 0)
    host_budget = budgets.host_budget
    if budgets.mode == "unified":
        host_budget -= fill.used + budgets.gpu_workspace
    eb, n_exp = figures.expert_bytes, figures.n_experts

    # Host must hold: the embedding, and every always-read part that is not on the GPU.
    must_host = figures.embed_bytes
    kv_gpu = 0
    for layer in figures.layers:
        size, _ = _attention_unit(figures, layer, ctx, kv, gpu=False)
        if layer.index in fill.attention_gpu:
            kv_gpu += figures.kv_layer_bytes(layer, ctx, kv)
        else:
            must_host += size
    if not fill.head_gpu:
        must_host += figures.head_on(gpu=False)
    # The CPU mode drafts with the MTP block (speculative decoding): its weights but its experts
    # (those stay memory-mapped) are built in RAM.
    mtp_host = max(0, figures.mtp_bytes - n_exp * eb) if budgets.mode == "cpu" else 0
    must_host += mtp_host
    if must_host > host_budget:
        return None

    # Routed experts not on the GPU: RAM while it lasts, the rest paged from disk.
    gpu_count = {}
    for layer in figures.layers:
        if layer.index in fill.whole_layers:
            gpu_count[layer.index] = n_exp
        else:
            hot = fill.hot.get(layer.index, 0)
            gpu_count[layer.index] = len(hot) if isinstance(hot, list) else hot
    need = {i: n_exp - c for i, c in gpu_count.items()}
    ram_slots = (host_budget - must_host) // eb if eb else 0
    if ram_slots >= sum(need.values()):
        ram_count = dict(need)
    else:
        ram_count = _spread_ram(figures, need, ram_slots, fill, shares)

    layers = []
    for layer in figures.layers:
        i = layer.index
        hot = fill.hot.get(i)
        hot_ids = tuple(hot) if isinstance(hot, list) else None
        gpu_n, ram_n = gpu_count[i], ram_count[i]
        disk_n = n_exp - gpu_n - ram_n
        if shares is not None:
            gpu_ids = set(range(n_exp)) if i in fill.whole_layers else set(hot_ids or ())
            order = sorted(
                (e for e in range(n_exp) if e not in gpu_ids), key=lambda e: -shares[i][e]
            )
            gpu_hit = sum(shares[i][e] for e in gpu_ids)
            ram_hit = sum(shares[i][e] for e in order[:ram_n])
        else:
            gpu_hit, ram_hit = gpu_n / n_exp, ram_n / n_exp
        layers.append(
            LayerPlan(
                index=i,
                attention=layer.attention,
                attention_on=GPU if i in fill.attention_gpu else "cpu",
                kv_bytes=figures.kv_layer_bytes(layer, ctx, kv),
                experts_gpu=gpu_n,
                experts_ram=ram_n,
                experts_disk=disk_n,
                whole_layer_on_gpu=i in fill.whole_layers,
                hot_expert_ids=hot_ids,
                gpu_hit_rate=gpu_hit,
                ram_hit_rate=ram_hit,
                disk_rate=max(0.0, 1.0 - gpu_hit - ram_hit),
            )
        )

    ram_experts = sum(ram_count.values()) * eb
    disk_bytes = sum(lp.experts_disk for lp in layers) * eb
    pinned = 0
    if budgets.mode == "gpu+cpu" and budgets.pin_cap >= MIN_PINNED_BYTES:
        pinned = min(ram_experts, (budgets.pin_cap // eb) * eb)
    host_used = must_host + ram_experts
    pageable = host_used - pinned
    gpu_used = fill.used + (budgets.gpu_workspace if budgets.mode != "cpu" else 0)

    memory: dict[str, dict[str, int]] = {}
    if budgets.mode != "cpu":
        gpu_budget = budgets.gpu_budget + budgets.gpu_workspace
        memory[GPU] = {
            "capacity": budgets.gpu_capacity,
            "reserve": budgets.gpu_reserve,
            "budget": gpu_budget,
            "used": gpu_used,
            "headroom": gpu_budget - gpu_used,
        }
    ram_used = host_used + (gpu_used if budgets.mode == "unified" else 0)
    memory["ram"] = {
        "capacity": budgets.ram_capacity,
        "reserve": budgets.ram_reserve,
        "budget": budgets.host_budget,
        "used": ram_used,
        "headroom": budgets.host_budget - ram_used,
        "pinned": pinned,
        "pageable": pageable,
    }
    memory[DISK] = {"mapped": disk_bytes}

    head_on = GPU if fill.head_gpu else "cpu"
    plan = Plan(
        model=figures.name,
        mode=budgets.mode,
        context=ctx,
        kv_dtype=kv,
        kv_bytes=figures.kv_bytes(ctx, kv),
        kv_bytes_gpu=kv_gpu,
        layers=layers,
        head_on=head_on,
        groups=_groups(figures, layers, fill, budgets, pinned, ram_experts, disk_bytes, mtp_host),
        memory=memory,
        pinned_bytes=pinned,
        pageable_bytes=pageable,
        disk_bytes=disk_bytes,
        verdict=FITS,
        options=options,
    )
    return plan


def _spread_ram(
    figures: ModelFigures,
    need: dict[int, int],
    slots: int,
    fill: _GpuFill,
    shares: list[list[float]] | None,
) -> dict[int, int]:
    """Share RAM slots among layers: hottest remaining experts first, else evenly."""
    slots = max(int(slots), 0)
    if shares is not None:
        ranked = []
        for i, n in need.items():
            if not n:
                continue
            hot = fill.hot.get(i)
            on_gpu = set(hot) if isinstance(hot, list) else set()
            ranked += [(shares[i][e], i) for e in range(figures.n_experts) if e not in on_gpu]
        ranked.sort(key=lambda t: -t[0])
        count = dict.fromkeys(need, 0)
        for _, i in ranked[:slots]:
            count[i] += 1
        return count
    count = dict.fromkeys(need, 0)
    open_layers = sorted(i for i, n in need.items() if n)
    while slots and open_layers:
        share = max(slots // len(open_layers), 1)
        for i in list(open_layers):
            take = min(share, need[i] - count[i], slots)
            count[i] += take
            slots -= take
            if count[i] == need[i]:
                open_layers.remove(i)
            if not slots:
                break
    return count


def _groups(
    figures, layers, fill, budgets, pinned, ram_experts, disk_bytes, mtp_host=0
) -> list[Group]:
    gpu_layers = [lp for lp in layers if lp.attention_on == GPU]
    cpu_layers = [lp for lp in layers if lp.attention_on != GPU]
    host = PAGEABLE
    by_index = {layer.index: layer for layer in figures.layers}
    groups = []

    def attention_bytes(lps, gpu: bool):
        return sum(
            by_index[lp.index].dense_on(gpu) + by_index[lp.index].shared_on(gpu) for lp in lps
        )

    if gpu_layers:
        groups.append(
            Group(
                "attention, compressors, indexer, mHC, router, shared expert",
                GPU,
                attention_bytes(gpu_layers, gpu=True),
                f"{len(gpu_layers)} layers",
            )
        )
        groups.append(
            Group(
                "KV cache", GPU, sum(lp.kv_bytes for lp in gpu_layers), f"{len(gpu_layers)} layers"
            )
        )
    if cpu_layers:
        groups.append(
            Group(
                "attention, compressors, indexer, mHC, router, shared expert",
                host,
                attention_bytes(cpu_layers, gpu=False),
                f"{len(cpu_layers)} layers, computed on the CPU",
            )
        )
        groups.append(
            Group(
                "KV cache",
                host,
                sum(lp.kv_bytes for lp in cpu_layers),
                f"{len(cpu_layers)} layers, read by the CPU",
            )
        )
    head_loc = GPU if fill.head_gpu else host
    groups.append(Group("LM head + final norm", head_loc, figures.head_on(head_loc == GPU)))
    groups.append(Group("embedding", host, figures.embed_bytes, "one row read per token"))
    eb = figures.expert_bytes
    whole = [lp for lp in layers if lp.whole_layer_on_gpu]
    if whole:
        groups.append(
            Group(
                "routed experts, whole layers",
                GPU,
                len(whole) * figures.n_experts * eb,
                "layers " + _ranges([lp.index for lp in whole]),
            )
        )
    hot = sum(lp.experts_gpu for lp in layers if not lp.whole_layer_on_gpu)
    if hot:
        groups.append(
            Group(
                "routed experts, hot cache",
                GPU,
                hot * eb,
                f"{hot} experts over {sum(1 for lp in layers if lp.experts_gpu and not lp.whole_layer_on_gpu)} layers",
            )
        )
    if pinned:
        groups.append(Group("routed experts", PINNED, pinned, f"{pinned // eb} experts"))
    if ram_experts - pinned > 0:
        groups.append(
            Group(
                "routed experts",
                PAGEABLE,
                ram_experts - pinned,
                f"{(ram_experts - pinned) // eb} experts",
            )
        )
    if disk_bytes:
        groups.append(
            Group(
                "routed experts",
                DISK,
                disk_bytes,
                f"{disk_bytes // eb} experts memory-mapped from the checkpoint, paged in when picked",
            )
        )
    if mtp_host:
        detail = "drafts the next token (speculative decoding); its experts memory-mapped"
        groups.append(Group("MTP block", host, mtp_host, detail))
    else:
        groups.append(
            Group("MTP block", "not loaded", figures.mtp_bytes, "speculative decoding off")
        )
    return groups


def _ranges(indices: list[int]) -> str:
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


# ----------------------------------------------------------------------------- verdict


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _gb(n: float) -> str:
    return f"{n / 1e9:.0f} GB"


def _assess(
    plan: Plan,
    figures: ModelFigures,
    profile: HardwareProfile,
    budgets: _Budgets,
    options: PlanOptions,
    shares: list[list[float]] | None,
) -> None:
    """Set the verdict and name each change the plan made and each alternative that would help."""
    from flashdesk.offload import predict

    changed = plan.verdict == FITS_WITH_CHANGES
    ctx, kv = plan.context, plan.kv_dtype
    cpu_attn = plan.cpu_attention_layers
    if budgets.mode != "cpu" and (cpu_attn or plan.head_on != GPU):
        changed = True
        moved = []
        if cpu_attn:
            moved.append(
                f"the attention and KV cache of {len(cpu_attn)} of {len(plan.layers)} layers "
                f"(layers {_ranges(cpu_attn)}) run on the CPU from RAM"
            )
        if plan.head_on != GPU:
            moved.append("the LM head runs on the CPU")
        plan.changes.append(
            f"GPU too small for everything read every token at {ctx:,} tokens "
            f"({_gib(_essentials_bytes(figures, ctx, kv, gpu=True))} needed, "
            f"{_gib(budgets.gpu_budget)} usable): " + "; ".join(moved)
        )
        plan.changes += _gpu_alternatives(figures, budgets, options, shares)
    if plan.disk_bytes:
        changed = True
        pred = predict.predict(plan, figures, profile)
        disk = pred.inputs["disk_read_gbps"]
        per_token = sum(
            lp.disk_rate * figures.experts_per_token * figures.expert_bytes for lp in plan.layers
        )
        plan.changes.append(
            f"experts paged from disk: {_gb(plan.disk_bytes)} of routed experts do not fit in RAM "
            f"and are read from the checkpoint when picked (~{per_token / 1e9:.2f} GB from disk "
            f"per token at {disk['value']:.1f} GB/s [{disk['source']}]) → "
            f"~{pred.decode_tok_s:.2f} tok/s predicted"
        )
        plan.changes += _memory_alternatives(figures, budgets, plan)
    if (
        budgets.mode == "gpu+cpu"
        and plan.pinned_bytes < sum(lp.experts_ram for lp in plan.layers) * figures.expert_bytes
    ):
        pin = profile.pin_cap_bytes
        if budgets.pin_cap < MIN_PINNED_BYTES:
            plan.notes.append(
                f"locked-memory limit is {_limit_text(pin.value)} [{pin.source}]: the experts stay "
                "in pageable RAM (decode is unaffected; prefill streams them to the GPU at the "
                "pageable copy speed). Raise it (`ulimit -l unlimited`, or memlock in "
                "/etc/security/limits.conf) to pin them."
            )
        else:
            plan.notes.append(
                f"only {_gib(plan.pinned_bytes)} of the experts can be pinned "
                f"(cap {_gib(budgets.pin_cap)} [{pin.source}]{': ' + pin.note if pin.note else ''}); "
                "the rest is pageable"
            )
    if budgets.mode == "cpu":
        plan.notes.append("no usable GPU: CPU-only plan")
    if budgets.mode == "unified":
        plan.notes.append("unified memory: GPU and CPU share one pool; nothing is counted twice")
    plan.notes.append(
        f"reserves: {_gib(budgets.ram_reserve)} RAM for the OS and app"
        + (
            f", {_gib(budgets.gpu_reserve)} VRAM + {_gib(budgets.gpu_workspace)} GPU workspace"
            + (
                f" (prompts in {options.prefill_chunk:,}-token chunks)"
                if figures.prefill_token_bytes and options.gpu_workspace_bytes is None
                else ""
            )
            if budgets.mode == "gpu+cpu"
            else ""
        )
    )
    plan.verdict = FITS_WITH_CHANGES if changed else FITS


def _limit_text(value: Any) -> str:
    if value is None:
        return "unknown"
    return f"{int(value) >> 20} MiB" if int(value) < GIB else _gib(int(value))


def _gpu_alternatives(figures, budgets, options, shares) -> list[str]:
    ctx, kv = options.context, options.kv_dtype
    out = []
    if kv == "bf16":
        fill = _fill_gpu(figures, ctx, "fp8", budgets.gpu_budget, shares)
        if _all_essentials_on_gpu(fill, figures):
            out.append(
                f"or --kv fp8: the KV cache takes {_gib(figures.kv_bytes(ctx, 'fp8'))} instead of "
                f"{_gib(figures.kv_bytes(ctx, 'bf16'))} and everything read every token stays on "
                "the GPU"
            )
    for smaller in _smaller_contexts(ctx):
        fill = _fill_gpu(figures, smaller, kv, budgets.gpu_budget, shares)
        if _all_essentials_on_gpu(fill, figures):
            out.append(
                f"or --ctx {smaller}: keeps all attention, the KV cache and the head on the GPU"
            )
            break
    need = _essentials_bytes(figures, ctx, kv, gpu=True) + budgets.gpu_workspace
    need_total = math.ceil((need + GIB // 2) / 0.95 / GIB)
    out.append(f"or a GPU with at least {need_total} GB of free VRAM for {ctx:,} tokens of {kv} KV")
    return out


def _lower_bit_options(figures: ModelFigures) -> list[tuple[str, int]]:
    return [(label, int(figures.total_params * bpw / 8)) for label, bpw in GGUF_OPTIONS]


def _memory_alternatives(figures: ModelFigures, budgets: _Budgets, plan: Plan) -> list[str]:
    out = []
    extra_ram = plan.disk_bytes - max(plan.memory["ram"]["headroom"], 0)
    need_ram = budgets.ram_capacity + extra_ram
    out.append(
        f"or more RAM: about {math.ceil(need_ram / 1e9 / 16) * 16} GB in total holds every expert "
        "in memory"
    )
    pool = budgets.host_budget + (budgets.gpu_budget if budgets.mode == "gpu+cpu" else 0)
    where = "RAM+VRAM" if budgets.mode == "gpu+cpu" else "RAM"
    for label, size in _lower_bit_options(figures):
        if size + 2 * GIB <= pool:
            verdict = f"fits in {where} ({_gb(pool)} usable; GGUF backend)"
        else:
            verdict = f"is {_gb(size + 2 * GIB - pool)} more than the usable {where} ({_gb(pool)})"
        out.append(f"or a lower-bit model: a {label} of ~{_gb(size)} {verdict}")
    return out


def _does_not_fit(
    figures: ModelFigures, profile: HardwareProfile, budgets: _Budgets, options: PlanOptions
) -> Plan:
    """Even at the smallest context the always-read parts do not fit: say what would."""
    ctx = MIN_CONTEXT
    in_ram = _essentials_bytes(figures, ctx, options.kv_dtype, gpu=False)
    need_host = figures.embed_bytes + in_ram
    if budgets.mode == "gpu+cpu":  # the share the GPU can hold leaves RAM
        on_gpu = _essentials_bytes(figures, ctx, options.kv_dtype, gpu=True)
        need_host -= in_ram * min(budgets.gpu_budget, on_gpu) // max(on_gpu, 1)
    elif budgets.mode == "unified":  # the GPU's workspace comes out of the same pool
        need_host += budgets.gpu_workspace
    need_ram = need_host + budgets.ram_reserve
    changes = [
        f"does not fit: the weights read every token need {_gib(need_host)} of RAM"
        + (" beside the GPU" if budgets.mode == "gpu+cpu" else "")
        + f" even at {ctx:,} tokens, and {_gib(budgets.host_budget)} is usable",
        f"smallest hardware change: at least {math.ceil(need_ram / GIB)} GiB of RAM (experts then "
        "paged from disk)",
    ]
    for label, size in _lower_bit_options(figures):
        changes.append(f"or a lower-bit model: a {label} needs ~{_gb(size)} of RAM+VRAM")
    memory = {
        "ram": {
            "capacity": budgets.ram_capacity,
            "reserve": budgets.ram_reserve,
            "budget": budgets.host_budget,
            "used": 0,
            "headroom": budgets.host_budget,
            "pinned": 0,
            "pageable": 0,
        }
    }
    return Plan(
        model=figures.name,
        mode=budgets.mode,
        context=options.context,
        kv_dtype=options.kv_dtype,
        kv_bytes=figures.kv_bytes(options.context, options.kv_dtype),
        kv_bytes_gpu=0,
        layers=[],
        head_on="none",
        groups=[],
        memory=memory,
        pinned_bytes=0,
        pageable_bytes=0,
        disk_bytes=0,
        verdict=DOES_NOT_FIT,
        changes=changes,
        options=options,
    )
