"""The runtime: a checkpoint plus a placement (from the planner's `Plan`) → a model that generates.

One executor applies placement as data (design.md, "The one idea"):

* everything every token touches (attention, compressors, indexer, mHC, router, shared expert,
  head) is built on the compute device: CUDA when there is one, else the CPU; the FP8 linears
  and the BF16 head keep their stored bytes and run from them (the C kernels on the CPU:
  `Fp8Linear`, `Bf16Head`; Triton in VRAM: `gpu_linears`). The embedding stays in host memory;
* routed experts stay in their stored FP4 form: in host memory (pinned, pageable or memory-mapped
  from the checkpoint) run by the C kernels on a worker thread while the device computes the
  shared expert, or in device memory (whole layers, then hot experts) — `runtime_experts`;
* on a GPU each decode step replays CUDA graphs of the same computation in fixed shapes, cut at
  the layers whose experts run on the CPU (`decode_graphs`), checked against it at load.

Public use::

    rt = load_runtime(path, plan=None, device=None)   # or placement=Placement.uniform(...)
    session = Session(rt, tokenizer, context_limit=rt.context_limit)
    rt.expert_hit_rate, rt.routing_counts(), rt.save_routing_counts(path)

`Runtime` has the model interface `Session` uses: `new_state()`, `prefill(ids, state)`,
`decode(token, state)`, plus `forward_full(ids)` for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashdesk.engine import gpu_kernels, host_heap, kernels
from flashdesk.engine.cache import KV_FORMATS, Fp8Rows
from flashdesk.engine.checkpoint import Checkpoint, CheckpointError
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.decode_graphs import GraphDecoder
from flashdesk.engine.gpu_linears import (
    CudaBf16Linear,
    CudaFp8Linear,
    JoinedRows,
    join_rows,
    run_pair,
)
from flashdesk.engine.model import qsim
from flashdesk.engine.model.common import Linear, Numerics
from flashdesk.engine.model.model import V4Model
from flashdesk.engine.quant import quantize_fp8
from flashdesk.engine.runtime_experts import (
    HOST_STORES,
    MMAP,
    PAGEABLE,
    PINNED,
    ExpertCache,
    HybridMoE,
    LayerExperts,
    RoutingLog,
)
from flashdesk.offload.figures import PREFILL_BASE_BYTES, prefill_bytes_of
from flashdesk.offload.plan import DEFAULT_PREFILL_CHUNK, DEFAULT_STREAM_MIN_TOKENS

Progress = Callable[[float, str], None]

# Tokens per prefill call the runtime asks of a Session on a GPU without a plan: each call copies
# every expert held in RAM across PCIe once (layer-streamed prefill), so larger chunks copy less
# per token but need more GPU workspace. A plan chooses its own (`Plan.prefill_chunk`, from
# `offload.predict.plan_and_predict`, its workspace `ModelFigures.prefill_workspace`).
GPU_PREFILL_CHUNK = DEFAULT_PREFILL_CHUNK
# The smallest call a prefill is split into when the GPU has less free memory than its chunk
# needs (another program took VRAM since the plan was made).
MIN_FITTING_CHUNK = 128
# Decode steps between refreshes of the hot-expert caches from the routing counts.
DEFAULT_REFRESH_EVERY = 256


class RuntimeLoadError(RuntimeError):
    """The runtime could not be built: what went wrong and what to do about it.

    kind: "oom" when memory ran out or a plan no longer fits what is free, else "load"."""

    def __init__(self, message: str, kind: str = "load"):
        super().__init__(message)
        self.kind = kind


class LoadCancelled(RuntimeError):
    """`cancel()` returned True while the runtime was loading."""


# ------------------------------------------------------------------------------------ placement


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer's routed experts live. `device`: resident in device memory; the host
    stores hold the rest (every expert not on the device is in exactly one host store).
    `zero_copy`: pinned experts whose decode picks the GPU reads in place across PCIe while the
    CPU computes the other host picks (a subset of `pinned`)."""

    device: tuple[int, ...] = ()
    pinned: tuple[int, ...] = ()
    pageable: tuple[int, ...] = ()
    mmap: tuple[int, ...] = ()
    zero_copy: tuple[int, ...] = ()

    def stores(self) -> dict[str, tuple[int, ...]]:
        return {PINNED: self.pinned, PAGEABLE: self.pageable, MMAP: self.mmap}


@dataclass(frozen=True)
class Placement:
    """Per main layer, where its routed experts live; `device` is where the rest computes."""

    device: str
    layers: tuple[LayerPlacement, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def uniform(
        cls,
        config: ModelConfig,
        store: str = MMAP,
        device: str = "cpu",
        cached: int | Sequence[int] = 0,
    ) -> Placement:
        """Every layer alike: `cached` experts (a count → the first ones, or explicit ids) on the
        device, the others in `store` (pinned, pageable or mmap)."""
        if store not in HOST_STORES:
            raise ValueError(f"store must be one of {HOST_STORES}, got {store!r}")
        n = config.n_routed_experts
        on_dev = tuple(range(min(cached, n))) if isinstance(cached, int) else tuple(cached)
        rest = tuple(e for e in range(n) if e not in set(on_dev))
        layer = LayerPlacement(device=on_dev, **{store: rest})
        return cls(device, tuple(layer for _ in config.main_layers))

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        config: ModelConfig,
        device: str | None = None,
        expert_bytes: int | None = None,
        frequency: Any = None,
    ) -> Placement:
        """Apply an `offload.plan.Plan`: whole layers and hot experts on the GPU, RAM experts
        pinned (layer order, up to `plan.pinned_bytes`) then pageable, the rest memory-mapped.
        Without a GPU (or plan mode "cpu") nothing goes to the device."""
        n_layers, n = len(config.main_layers), config.n_routed_experts
        if len(plan.layers) != n_layers:
            raise RuntimeLoadError(
                f"the plan places {len(plan.layers)} layers but this checkpoint has {n_layers}: it "
                "was made for another model. Run `flashdesk fit --model DIR` again for this one."
            )
        if device is None:
            device = "cuda" if plan.mode != "cpu" and torch.cuda.is_available() else "cpu"
        on_gpu = torch.device(device).type != "cpu"
        notes = []
        if not on_gpu and any(lp.experts_gpu for lp in plan.layers):
            notes.append("the plan puts experts on a GPU but none is used; they stay in RAM")
        cpu_attention = [lp.index for lp in plan.layers if lp.attention_on != "gpu"]
        if on_gpu and cpu_attention:
            notes.append(
                f"the plan runs attention of layers {cpu_attention} on the CPU; this runtime keeps "
                "all attention on the GPU (a load that does not fit fails with a clear message)"
            )
        pin_left = plan.pinned_bytes if on_gpu else 0
        if pin_left and not torch.cuda.is_available():
            pin_left = 0
        share = float(getattr(plan, "zero_copy_share", 0.0) or 0.0) if pin_left else 0.0
        layers = []
        for lp in plan.layers:
            order = list(range(n))
            if frequency is not None:
                row = [float(c) for c in frequency[lp.index]]
                order.sort(key=lambda e: -row[e])
            if not on_gpu:
                dev: list[int] = []
            elif lp.whole_layer_on_gpu:
                dev = order
            elif lp.hot_expert_ids is not None:
                dev = list(lp.hot_expert_ids)
            else:
                dev = order[: lp.experts_gpu]
            on_device = set(dev)
            rest = [e for e in order if e not in on_device]
            # without a GPU the plan's GPU experts fall back to RAM; disk ones stay mapped
            ram_n = min(len(rest), lp.experts_ram + (0 if on_gpu else lp.experts_gpu))
            ram, disk = rest[:ram_n], rest[ram_n:]
            pinned: list[int] = []
            if pin_left and expert_bytes:
                take = min(len(ram), pin_left // expert_bytes)
                pinned, ram = ram[:take], ram[take:]
                pin_left -= take * expert_bytes
            layers.append(
                LayerPlacement(
                    device=tuple(sorted(dev)),
                    pinned=tuple(sorted(pinned)),
                    pageable=tuple(sorted(ram)),
                    mmap=tuple(sorted(disk)),
                    zero_copy=_zero_copy_ids(pinned, share, row if frequency is not None else None),
                )
            )
        return cls(device, tuple(layers), tuple(notes))

    def validate(self, config: ModelConfig) -> None:
        n = config.n_routed_experts
        for i, lp in enumerate(self.layers):
            if not set(lp.zero_copy) <= set(lp.pinned):
                raise RuntimeLoadError(f"layer {i}: zero-copy experts must be pinned ones")
        if len(self.layers) != len(config.main_layers):
            raise RuntimeLoadError(
                f"the placement covers {len(self.layers)} layers, the model has "
                f"{len(config.main_layers)}"
            )
        for i, lp in enumerate(self.layers):
            for name, ids in (("device", lp.device), *lp.stores().items()):
                if any(not 0 <= e < n for e in ids):
                    raise RuntimeLoadError(f"layer {i}: {name} expert ids outside 0..{n - 1}")
            host = [e for ids in lp.stores().values() for e in ids]
            if len(set(host)) != len(host):
                raise RuntimeLoadError(f"layer {i}: an expert is in two host stores")
            missing = set(range(n)) - set(host) - set(lp.device)
            if missing:
                raise RuntimeLoadError(
                    f"layer {i}: experts {sorted(missing)[:8]} are placed nowhere"
                )


def _zero_copy_ids(pinned: Sequence[int], share: float, counts=None) -> tuple[int, ...]:
    """The pinned experts whose picks the GPU reads in place: about `share` of the layer's
    pinned picks, by routing `counts` where known (the coldest first, until their counts reach
    that share), else by number."""
    if share <= 0 or not pinned:
        return ()
    if counts is None:
        return tuple(sorted(pinned[: round(share * len(pinned))]))
    order = sorted(pinned, key=lambda e: counts[e])
    total = sum(counts[e] for e in pinned)
    chosen, mass = [], 0.0
    for e in order:
        if total and mass + counts[e] > share * total:
            break
        chosen.append(e)
        mass += counts[e]
    return tuple(sorted(chosen))


# ------------------------------------------------------------------------------------ FP8 linears


class Fp8Linear(Linear):
    """`y = x · Wᵀ` straight from the stored FP8 weight and its 128×128 E8M0 scales (C kernel)."""

    __slots__ = ("_call", "dtype", "finite", "scale", "x_dtype")

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        x_dtype: torch.dtype | None = None,
    ):
        super().__init__(weight, True)
        self.scale = scale
        self.dtype = dtype  # of the output
        # what the kernel reads (`load_runtime`'s kernel_activations)
        self.x_dtype = x_dtype or dtype
        self.finite = kernels.fp8_finite(weight)  # no NaN code: the kernel's faster path
        self._call = kernels.BoundLinear("fp8", weight, scale, finite=self.finite)

    def __call__(self, x: torch.Tensor, simulate: bool = False) -> torch.Tensor:
        if simulate:
            x = qsim.act_snap(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(self.x_dtype).contiguous()
        out = torch.empty((x2.shape[0], self.weight.shape[0]), dtype=self.dtype)
        self._call(x2, out)
        return out.view(*lead, self.weight.shape[0])

    def to(self, device):
        raise RuntimeError("an FP8 linear runs on the CPU kernels; it does not move to a device")


class Fp8GroupedLinear:
    """V4's grouped output projection `wo_a` (`[G·R, K]` FP8, group g's rows see the g-th K
    inputs) straight from the stored bytes by one grouped C-kernel call: a quarter of the bytes
    of the float32 copy the einsum path reads per token (43 layers × 134 MB in V4-Flash)."""

    __slots__ = ("_call", "dtype", "finite", "groups", "scale", "weight", "x_dtype")

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        groups: int,
        dtype: torch.dtype,
        x_dtype: torch.dtype | None = None,
    ):
        self.weight, self.scale, self.groups, self.dtype = weight, scale, groups, dtype
        self.x_dtype = x_dtype or dtype
        self.finite = kernels.fp8_finite(weight)
        self._call = kernels.BoundLinear("fp8", weight, scale, groups=groups, finite=self.finite)

    def __call__(self, o: torch.Tensor) -> torch.Tensor:  # [S, G·K] → [S, G·R]
        x = o.to(self.x_dtype).contiguous()
        out = torch.empty((x.shape[0], self.weight.shape[0]), dtype=self.dtype)
        return self._call(x, out)


class Bf16Linear:
    """`x · Wᵀ` in float32 from a stored BF16 weight by the C kernel (each weight widened
    exactly): the reference's FP32-math linears (router gate, compressor wkv/wgate) at half the
    bytes of their float32 copies and on every core."""

    __slots__ = ("_call", "weight")

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self._call = kernels.BoundLinear("bf16", weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        out = torch.empty((x2.shape[0], self.weight.shape[0]), dtype=torch.float32)
        self._call(x2, out)
        return out.view(*x.shape[:-1], self.weight.shape[0])


def _blocks(model: V4Model) -> list:
    """The main blocks, then the MTP block's (loaded for speculative decoding)."""
    return [*model.blocks, *(m.block for m in model.mtp)]


def _bf16_kernel_slots(model: V4Model):
    """(owner, attribute, checkpoint name) of the FP32-math linears stored in BF16."""
    for block in _blocks(model):
        a = block.spec.prefix + "attn."
        for owner, p in (
            (block.attn.compressor, a + "compressor."),
            (getattr(block.attn.indexer, "compressor", None), a + "indexer.compressor."),
        ):
            if owner is not None:
                yield owner, "wkv", p + "wkv.weight"
                yield owner, "wgate", p + "wgate.weight"
        yield block.moe.router, "weight", block.spec.prefix + "ffn.gate.weight"


def _bf16_kernel_names(config: ModelConfig) -> list[str]:
    names = []
    for spec in (*config.main_layers, *config.mtp_layers):
        a = spec.prefix + "attn."
        if spec.has_compressor:
            names += [a + "compressor.wkv.weight", a + "compressor.wgate.weight"]
        if spec.has_indexer:
            names += [a + "indexer.compressor.wkv.weight", a + "indexer.compressor.wgate.weight"]
        names.append(spec.prefix + "ffn.gate.weight")
    return names


# ------------------------------------------------------------------------------------ CPU head

HEAD_DTYPES = ("fp32", "bf16", "fp8")
# The head ([129280, 4096] in V4) is read in full per token: bf16 halves those bytes (and its
# VRAM) and keeps the stored weights exactly (the checkpoint stores the head in BF16).
DEFAULT_HEAD_DTYPE = "bf16"
_HEAD_QUANT_ROWS = 8192  # rows quantized at a time (a multiple of the 128-row FP8 tile)


class Bf16Head:
    """Logits from the stored BF16 head by the C kernel: each weight widened exactly, float32
    activations and sums, so the float32 head's logits (up to summation order) at half its bytes
    per token; torch's bf16 GEMM would round the activations and the logits to bf16 and read
    slower (dev VM: 41 vs 32 GB/s)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.bfloat16).contiguous()
        self._call = kernels.BoundLinear("bf16", self.weight)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float().reshape(-1, h.shape[-1]).contiguous()
        out = torch.empty((x.shape[0], self.weight.shape[0]), dtype=torch.float32)
        self._call(x, out)
        return out.view(*h.shape[:-1], self.weight.shape[0])


class Fp8Head:
    """Logits from the head quantized once at load to FP8 E4M3 with 128×128 E8M0 tile scales
    (the official quantizer's format), computed by the C FP8 kernel into float32."""

    def __init__(self, weight: torch.Tensor):
        rows = weight.shape[0]
        codes, scales = [], []
        for s in range(0, rows, _HEAD_QUANT_ROWS):
            c, sc = quantize_fp8(weight[s : s + _HEAD_QUANT_ROWS])
            codes.append(c)
            scales.append(sc)
        self.weight = torch.cat(codes).view(torch.float8_e4m3fn)
        self.scale = torch.cat(scales)
        self.finite = kernels.fp8_finite(self.weight)
        self._call = kernels.BoundLinear("fp8", self.weight, self.scale, finite=self.finite)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float().reshape(-1, h.shape[-1]).contiguous()
        out = torch.empty((x.shape[0], self.weight.shape[0]), dtype=torch.float32)
        self._call(x, out)
        return out.view(*h.shape[:-1], self.weight.shape[0])


def join_gpu_linears(model: V4Model) -> None:
    """On a GPU the linears that read one input run in one launch (`gpu_linears.join_rows`):
    `wq_a` with `wkv`, the shared expert's `w1` with `w3`, each compressor's `wkv` with
    `wgate` (about 3.5 launches fewer per V4 layer); the separate ones stay, as views. A CSA
    layer's decode step also takes `wq_b` with the indexer's `wq_b`, and both compressors'
    projections with the indexer's head weights, in one launch each (`_join_csa`), and a
    compressed layer's step its `wq_a`+`wkv` with its compressors' projections in one
    (`Attention.step_inputs`)."""
    for block in model.blocks:
        attn, shared = block.attn, block.moe.shared
        sites = [(attn, ("wq_a", "wkv"), "wq_a_wkv"), (shared, ("w1", "w3"), "w13")]
        if attn.indexer is not None:
            _join_csa(attn)
        for comp in (attn.compressor, getattr(attn.indexer, "compressor", None)):
            if comp is not None and comp.wkv_wgate is None:
                sites.append((comp, ("wkv", "wgate"), "wkv_wgate"))
        for owner, names, joined_attr in sites:
            made = join_rows([getattr(owner, n) for n in names])
            if made is not None:
                joined, views = made
                setattr(owner, joined_attr, joined)
                for n, view in zip(names, views, strict=True):
                    setattr(owner, n, view)
        # what reads the attention input, FP8 and BF16, in one launch (`gpu_linears.run_pair`)
        inputs = attn.csa_inputs or (attn.compressor and attn.compressor.wkv_wgate)
        if attn.wq_a_wkv is not None and inputs is not None:
            attn.step_inputs = functools.partial(run_pair, attn.wq_a_wkv, inputs)


def _join_csa(attn) -> None:
    """A CSA layer's decode-step joins: `wq_b` with the indexer's `wq_b` (both read the normed
    q_a) as `attn.wq_b_ix`, and the compressor's `wkv`/`wgate`, the indexer compressor's and
    the indexer's `weights_proj` as `attn.csa_inputs` (its float32 sums are rounded to the
    activations' dtype by `gpu_kernels.index_scores`, as torch's linear rounds them); each
    compressor's pair stays joined as a view of the rows."""
    ix = attn.indexer
    made = join_rows([attn.wq_b, ix.wq_b])
    if made is not None:
        attn.wq_b_ix, (attn.wq_b, ix.wq_b) = made
    comps = (attn.compressor, ix.compressor)
    parts = [lin for c in comps for lin in (c.wkv, c.wgate)]
    proj = ix.weights_proj
    with_weights = isinstance(proj, Linear) and proj.weight.dtype in (torch.bfloat16, torch.float32)
    if with_weights:  # stored in BF16: a float32 copy holds the same values, read the same
        as_bf16 = proj.weight.to(torch.bfloat16)
        with_weights = torch.equal(as_bf16.to(proj.weight.dtype), proj.weight)
    if with_weights:
        parts.append(CudaBf16Linear(as_bf16))
    made = join_rows(parts)
    if made is None:
        return
    joined, views = made
    attn.csa_inputs, start = joined, 0
    for j, comp in enumerate(comps):
        wkv, wgate = views[2 * j : 2 * j + 2]
        n_kv, n_gate = wkv.weight.shape[0], wgate.weight.shape[0]
        pair = CudaBf16Linear(joined.linear.weight[start : start + n_kv + n_gate])
        pair.fused = wkv.fused
        comp.wkv, comp.wgate, comp.wkv_wgate = wkv, wgate, JoinedRows(pair, (n_kv, n_gate))
        start += n_kv + n_gate
    if with_weights and proj.weight.dtype == torch.bfloat16:  # held once
        ix.weights_proj = Linear(views[4].weight, False)


def _install_head(model: V4Model, head_dtype: str) -> None:
    """Replace the model's float32 head by the `head_dtype` one (`model.head` then holds what is
    read per token: bf16 values, or FP8 codes with `model.head_linear.scale`)."""
    if head_dtype == "fp32":
        return
    if model.device.type != "cpu":
        head = CudaBf16Linear(model.head)
    else:
        head = Bf16Head(model.head) if head_dtype == "bf16" else Fp8Head(model.head)
    model.head = head.weight
    model.head_linear = head


_ATTN_LINEARS = ("wq_a", "wq_b", "wkv", "wo_b")


def _fp8_linear_names(config: ModelConfig) -> list[str]:
    """Checkpoint names of the weights the blocks wrap in `Linear` (stored FP8 in V4), and
    `wo_a` where its groups split into whole 64-row kernel units."""
    names = []
    grouped_ok = config.o_lora_rank % 64 == 0  # rows per group (the kernel's unit)
    for spec in (*config.main_layers, *config.mtp_layers):
        a = spec.prefix + "attn."
        names += [f"{a}{attr}.weight" for attr in _ATTN_LINEARS]
        if grouped_ok:
            names.append(f"{a}wo_a.weight")
        if spec.has_indexer:
            names.append(f"{a}indexer.wq_b.weight")
        names += [f"{spec.prefix}ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        if spec.is_mtp:
            names += [f"{spec.prefix}{w}_proj.weight" for w in ("e", "h")]
    return names


def _fp8_linear_slots(model: V4Model):
    """(owner, attribute, checkpoint name) of those Linears in the built model."""
    for mtp in model.mtp:
        for w in ("e_proj", "h_proj"):
            yield mtp, w, f"{mtp.block.spec.prefix}{w}.weight"
    for block in _blocks(model):
        p = block.spec.prefix
        a = p + "attn."
        for attr in _ATTN_LINEARS:
            yield block.attn, attr, f"{a}{attr}.weight"
        if block.attn.indexer is not None:
            yield block.attn.indexer, "wq_b", f"{a}indexer.wq_b.weight"
        for w in ("w1", "w2", "w3"):
            yield block.moe.shared, w, f"{p}ffn.shared_experts.{w}.weight"


# ------------------------------------------------------------------------------------ runtime


# A CPU decode step runs torch's own ops on one thread, at any context: they are small (one
# query), and torch's OpenMP team spinning on the cores our C kernels' pool streams weights on
# costs more than it saves (dev VM, 2 cores, 2-layer benchmark: 65-75 → 52-54 ms per step at 64
# and 4096 tokens). What grows with the context runs on that pool too: the CSA indexer's scores
# (`kernels.index_scores`) and each layer's attention over its window and compressed rows
# (`kernels.sink_attention`); before them torch took its threads back past 32K tokens. Dev VM,
# window + CSA + HCA layers at real dimensions: 41.2 / 46.2 / 67.2 ms per step at 64K / 256K / 1M
# tokens against 65.2 / 76.0 / 97.2 with torch's two threads.
# The same for prefill calls of at most this many tokens (a follow-up chat turn): 4 / 16 / 64 new
# tokens after 64 took 67 / 182 / 456 ms single-threaded against 92 / 210 / 484 ms (dev VM).
# Longer prompts keep torch's threads, which their attention math needs on machines with many
# cores.
SINGLE_THREAD_TOKENS = 64


@contextmanager
def _torch_single_threaded():
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Runtime:
    """A loaded model executing a placement. Thread-safety: one generating thread at a time."""

    def __init__(
        self,
        model: V4Model,
        checkpoint: Checkpoint,
        placement: Placement,
        log: RoutingLog,
        caches: list[ExpertCache | None],
        hosts: list[LayerExperts],
        pool: ThreadPoolExecutor | None,
        refresh_every: int | None,
        fp8_linears: int,
        head_dtype: str = "fp32",
        graphs: GraphDecoder | None = None,
        gpu_prefill_chunk: int = GPU_PREFILL_CHUNK,
    ):
        self.model = model
        self.config = model.config
        self.checkpoint = checkpoint
        self.placement = placement
        self.device = model.device
        self.log = log
        self.caches = caches
        self.hosts = hosts
        self._pool = pool
        self.refresh_every = refresh_every
        self.fp8_linears = fp8_linears  # how many linears run on the C FP8 kernel
        self.head_dtype = head_dtype  # what the head is stored and read as per token
        self.graphs = graphs  # decode steps replayed from CUDA graphs (None: not asked for)
        self._decodes = 0
        self.context_limit = int(self.config.max_position_embeddings)
        self.gpu_prefill_chunk = gpu_prefill_chunk  # the plan's (a GPU prefill's call size)
        self._chunk_cap: int | None = None  # set when a prefill call ran out of GPU memory
        # None: the Session's own (CPU prefill reads the experts from RAM at any chunk size)
        self.prefill_chunk = gpu_prefill_chunk if self.device.type == "cuda" else None
        # a prefill call's GPU memory: (bytes per token of the call, per token of context)
        self._prefill_bytes = prefill_bytes_of(self.config)
        # Hash-routed layers pick their experts by token id: the memory-mapped ones a decode token
        # will need are known before the step and paged in from disk while earlier work runs.
        self._hash_prefetch = []  # (host-side tid2eid [V, k], that layer's LayerExperts)
        for block, host in zip(model.blocks, hosts, strict=True):
            table = block.moe.router.tid2eid
            if table is not None and MMAP in host.store_of:
                self._hash_prefetch.append((table.to("cpu"), host))

    # -- the model interface Session uses
    def new_state(self, kv_format: str | None = None):
        """A sequence's empty state; its KV rows in `kv_format` (default: the runtime's)."""
        return self.model.new_state(kv_format)

    @property
    def kv_format(self) -> str:
        """How sequences store their KV rows (`cache.KV_FORMATS`; from the plan's KV choice)."""
        return self.model.numerics.kv_format

    def _open(self) -> V4Model:
        if self.checkpoint is None:
            raise RuntimeError("this runtime was closed; load the model again")
        return self.model

    def prefill(self, ids, state, chunk_size=None) -> torch.Tensor:
        """Feed `ids` into `state` → the last token's logits (`V4Model.prefill`). On a GPU the
        calls are sized to the memory free now (`fitting_chunk`), and a call that still runs out
        of it is undone (`SequenceState.rewind`) and run again in halves, down to
        MIN_FITTING_CHUNK tokens; later calls keep the smaller size and `notes` says so."""
        model = self._open()
        n = len(ids)
        chunk = min(chunk_size or n, n, self._chunk_cap or n) if n else chunk_size
        if self.device.type == "cuda" and n:
            free, _ = torch.cuda.mem_get_info(self.device)
            spare = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
            chunk = fitting_chunk(chunk, state.position, free + spare, *self._prefill_bytes)
        with self._torch_threads(state, n):
            if self.device.type != "cuda" or not n:
                return model.prefill(ids, state, chunk)
            logits, smaller = prefill_in_pieces(model.prefill, ids, state, chunk)
        if smaller is not None:
            self._chunk_cap = smaller
        return logits

    def set_interrupt(self, asked) -> None:
        """`V4Model.set_interrupt`: a cancel stops a prompt chunk between layers."""
        self.model.set_interrupt(asked)

    def decode(self, token_id: int, state) -> torch.Tensor:
        model = self._open()
        self._prefetch_hash_experts(int(token_id))
        if self.graphs is not None and self.graphs.usable:
            logits = self.graphs.decode(token_id, state)
        else:
            with self._torch_threads(state, 1):
                logits = model.decode(token_id, state)
        self._decodes += 1
        if self.refresh_every and self._decodes % self.refresh_every == 0:
            self.refresh_caches()
        return logits

    def forward_full(self, ids) -> torch.Tensor:
        return self._open().forward_full(ids)

    # -- speculative decoding (`load_runtime(speculative=True)`; the contract of `Session`)
    @property
    def speculative(self) -> bool:
        return self.model.speculative

    def draft(self, token_id: int, state) -> torch.Tensor:
        model = self._open()
        with self._torch_threads(state, 1):
            return model.draft(token_id, state)

    def verify(self, ids, state) -> torch.Tensor:
        model = self._open()
        for token_id in ids:
            self._prefetch_hash_experts(int(token_id))
        with self._torch_threads(state, len(ids)):
            logits = model.verify(ids, state)
        self._decodes += 1
        return logits

    def reject_last(self, state) -> None:
        self.model.reject_last(state)

    def _prefetch_hash_experts(self, token_id: int) -> int:
        """Page in the memory-mapped experts the hash-routed layers will run for this token
        (`kernels.prefetch`: returns at once) → bytes advised."""
        done = 0
        for table, host in self._hash_prefetch:
            if 0 <= token_id < table.shape[0]:
                for e in table[token_id].tolist():
                    if host.store_of[e] == MMAP:
                        done += kernels.prefetch(host.parts[e])
        return done

    def _torch_threads(self, state, tokens: int):
        """torch single-threaded for a decode step or a short prompt call in CPU mode (its ops
        are small there, see SINGLE_THREAD_TOKENS); otherwise as it is."""
        short = tokens <= SINGLE_THREAD_TOKENS
        return _torch_single_threaded() if self.device.type == "cpu" and short else nullcontext()

    # -- expert cache and routing record
    @property
    def expert_hit_rate(self) -> float | None:
        """Share of routed picks served from device memory since load (None before any)."""
        if not any(c is not None and c.capacity for c in self.caches):
            return None
        return self.log.hit_rate

    def refresh_caches(self) -> int:
        """Move each layer's hot-expert cache towards the experts routing picks; → swaps."""
        return sum(
            c.refresh(self.log.counts[i]) for i, c in enumerate(self.caches) if c is not None
        )

    def routing_counts(self) -> list[list[int]]:
        """Per main layer, how often each routed expert was picked (the planner's
        `PlanOptions.expert_frequency`)."""
        return self.log.counts.cpu().tolist()

    def save_routing_counts(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "layers": len(self.config.main_layers),
                    "experts": self.config.n_routed_experts,
                    "counts": self.routing_counts(),
                }
            )
        )

    @property
    def notes(self) -> list[str]:
        """What differs from the asked placement, in words (for logs and the CLI)."""
        notes = list(self.placement.notes)
        lost = sum(
            1
            for lp, host in zip(self.placement.layers, self.hosts, strict=True)
            for e in lp.pinned
            if host.store_of[e] != PINNED
        )
        if lost:
            notes.append(
                f"{lost} experts planned for pinned RAM are in pageable RAM: pinning needs a CUDA "
                "driver and enough lockable memory (raise the memlock limit, or run `flashdesk fit` "
                "again); host-to-GPU copies of those experts are slower"
            )
        if self.graphs is not None and not self.graphs.usable:
            notes.append(
                f"decode steps run without CUDA graphs, slower per token: {self.graphs.reason} "
                "(FLASHDESK_CUDA_GRAPHS=0 skips the attempt)"
            )
        if self.device.type == "cuda" and not gpu_kernels.available(self.device):
            notes.append(
                "the weights kept in VRAM run through torch's dequantize-then-multiply, several "
                f"times slower per token: {gpu_kernels.unavailable_reason(self.device)} (on Linux "
                "install a C compiler, e.g. build-essential, for Triton)"
            )
        notes += gpu_kernels.fallback_notes(self.device)
        if self._chunk_cap is not None:
            notes.append(
                f"a prompt chunk ran out of GPU memory and was run again in smaller calls; "
                f"prompts now prefill {self._chunk_cap} tokens per call (slower for long "
                "prompts: close other programs using the GPU, or run `flashdesk fit` again)"
            )
        return notes

    def describe(self) -> str:
        """One line: where things live (for logs and the app's plan summary). Pinned experts
        without a CUDA driver to pin them are counted as the pageable copies they became."""
        dev = sum(len(lp.device) for lp in self.placement.layers)
        counts = dict.fromkeys(HOST_STORES, 0)
        for lp, host in zip(self.placement.layers, self.hosts, strict=True):
            for e, store in enumerate(host.store_of):
                counts[store] += e not in lp.device
        where = [f"{dev} on {self.device}"] if dev else []
        where += [f"{n} {s}" for s, n in counts.items() if n]
        in_place = sum(
            len(b.moe.zero_copy.ids) for b in self.model.blocks
            if getattr(b.moe, "zero_copy", None) is not None and b.moe.use_zero_copy
        )  # fmt: skip
        if in_place:
            where.append(f"the GPU reads {in_place} pinned ones in place")
        line = f"attention on {self.device}; routed experts: {', '.join(where)}"
        if any(getattr(b.moe, "host_int8", False) for b in self.model.blocks):
            line += "; host experts take int8 activations"
        if self.kv_format != "native":
            line += f"; KV cache {self.kv_format}"
        if self.speculative:
            line += "; the MTP block drafts the next token"
        if self.graphs is not None and self.graphs.usable:
            line += "; decode replays CUDA graphs"
        if gpu_kernels.TUNED.get(str(self.device)):
            line += "; kernel shapes tuned for this GPU"
        return line

    def close(self) -> None:
        """Release the worker thread and unmap the checkpoint (the experts' mmap views die with
        it, so the runtime refuses further work)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.checkpoint is not None:
            self.checkpoint.close()
            self.checkpoint = None
        host_heap.release()  # the prompts' kept temporaries (`host_heap.keep_large_blocks`)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeLoadError(
            "a CUDA GPU was asked for but this torch build sees none (no NVIDIA driver, or a "
            "CPU-only torch); run on the CPU (device='cpu') or install a CUDA build of torch"
        )
    return device


def _check_vram(plan: Any, device: torch.device) -> None:
    """A plan made earlier may no longer fit: another program took VRAM since."""
    if plan is None or device.type != "cuda" or "gpu" not in getattr(plan, "memory", {}):
        return
    need = int(plan.memory["gpu"]["used"])
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise RuntimeLoadError(
            f"the plan needs {need / 2**30:.1f} GiB of GPU memory but only {free / 2**30:.1f} GiB "
            "is free now (another program may be using the GPU). Close it, or run the "
            "hardware-fit wizard again (`flashdesk fit`) for a plan that fits what is free.",
            kind="oom",
        )


def fitting_chunk(
    want: int, position: int, available: int, per_token: int, per_context: int
) -> int:
    """Tokens per prefill call at `position` that fit `available` GPU bytes: `want` halved until
    its workspace (`ModelFigures.prefill_workspace`'s model) fits, down to MIN_FITTING_CHUNK (a
    call that does not fit even then runs and reports the out-of-memory error)."""
    chunk = want
    while chunk > MIN_FITTING_CHUNK:
        if PREFILL_BASE_BYTES + chunk * per_token + (position + chunk) * per_context <= available:
            break
        chunk = max(MIN_FITTING_CHUNK, chunk // 2)
    return chunk


def prefill_in_pieces(prefill, ids, state, chunk: int) -> tuple[torch.Tensor, int | None]:
    """`prefill(piece, state)` over `ids` in pieces of `chunk` tokens; a piece that runs out of
    GPU memory is undone (`SequenceState.rewind`: its first layers were written) and run again
    in halves, down to MIN_FITTING_CHUNK tokens (then the error stands) → (the last token's
    logits, the smaller chunk it settled on or None)."""
    done, logits, smaller = 0, None, None
    while done < len(ids):
        piece = ids[done : done + chunk]
        mark = state.mark()
        try:
            logits = prefill(piece, state)
        except torch.OutOfMemoryError:
            state.rewind(mark)
            if len(piece) <= MIN_FITTING_CHUNK:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the failed piece's blocks, for the smaller one
            chunk = smaller = max(MIN_FITTING_CHUNK, len(piece) // 2)
            continue
        done += len(piece)
    return logits, smaller


def streaming_threshold(stream_min_tokens: int | str | None, plan: Any) -> int | None:
    """`load_runtime`'s stream_min_tokens with "plan" resolved: the plan's (the predicted
    crossover, where `fit.evaluate` recorded it), or DEFAULT_STREAM_MIN_TOKENS without a plan."""
    if stream_min_tokens == "plan":
        return getattr(plan, "stream_min_tokens", DEFAULT_STREAM_MIN_TOKENS)
    if stream_min_tokens is not None and (
        isinstance(stream_min_tokens, str) or int(stream_min_tokens) < 1
    ):
        raise ValueError(
            f"stream_min_tokens must be a positive token count, None or 'plan', got "
            f"{stream_min_tokens!r}"
        )
    return stream_min_tokens


def load_runtime(
    path: str | Path | Checkpoint,
    plan: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    placement: Placement | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    fp8_linears: bool | None = None,
    threads: int | None = None,
    stream_min_tokens: int | str | None = "plan",
    refresh_every: int | None = DEFAULT_REFRESH_EVERY,
    frequency: Any = None,
    head_dtype: str | None = None,
    cuda_graphs: bool | None = None,
    kv_dtype: str | None = None,
    kernel_activations: torch.dtype = torch.bfloat16,
    int8_experts: bool | None = None,
    speculative: bool = False,
) -> Runtime:
    """Open the checkpoint at `path` (or take an open `Checkpoint`, e.g. a `SyntheticCheckpoint`;
    the runtime then owns and closes it) and build the runtime.

    plan: an `offload.plan.Plan` (placement from it); placement: an explicit one instead; neither:
      every expert memory-mapped on the host, no device cache.
    device: where the non-expert part computes (default: CUDA if present, else CPU).
    dtype: activations and dequantized weights (default bfloat16 on a GPU, float32 on the CPU).
    fp8_linears: run the FP8 linears from their stored bytes (default on): on the CPU with the C
      kernel, on a GPU held as stored in VRAM (`gpu_linears`); off: widened to `dtype` at load.
    progress(fraction, message), cancel() → True aborts with LoadCancelled.
    stream_min_tokens: on a GPU, prefill calls of at least this many tokens compute all picked
      experts there, fewer keep the host's on the CPU (None: always the CPU); "plan" (default):
      the plan's `stream_min_tokens` (the predicted crossover where `fit.evaluate` made it),
      else DEFAULT_STREAM_MIN_TOKENS.
    refresh_every: decode steps between hot-cache refreshes (None: never).
    frequency: per-layer routing counts (a file saved by `save_routing_counts`, or a list):
      orders which experts a plan's GPU/RAM counts pick.
    head_dtype: how the output head is held and read per token: "bf16" (default; the stored BF16
      values, half the bytes of float32, float32 logits from the C kernel or in VRAM from
      `gpu_linears.CudaBf16Linear`), "fp8" (CPU only: quantized at load to FP8 with 128×128 tile
      scales, a quarter of the bytes; weight error ~2⁻⁴ relative) or "fp32" (the reference's
      float32 head).
    cuda_graphs: on a GPU, replay each decode step from CUDA graphs (`decode_graphs`; default
      on unless FLASHDESK_CUDA_GRAPHS=0). Checked at load against the same step run directly;
      where capture fails or disagrees, decode runs the plain way and `notes` says why. The
      placement's zero-copy experts (pinned, `LayerPlacement.zero_copy`) have their decode picks
      read in place by the GPU beside the CPU's share (FLASHDESK_ZERO_COPY=0: the CPU computes
      every host pick).
    kv_dtype: how sequences store their KV cache, as the planner names it: "bf16" (the
      reference cache; on the CPU half the bytes of float32 rows) or "fp8" (spec §3.2's packed
      layout, ~57% of BF16, rounds the no-rope channels to FP8). Default: the plan's `kv_dtype`;
      without a plan the rows stay in `dtype`.
    kernel_activations: what the C kernels take where the reference rounds the activations (to
      FP8) anyway: the host's routed experts and, on a CPU device, the FP8 linears. bfloat16
      (default; their vdpbf16ps paths run prompts 1.5–2.6× faster than float32 on AVX512_BF16
      CPUs, dev VM) or float32 (parity with a float32 model to summation order). The router,
      compressors and head keep float32 inputs, as in the reference.
    int8_experts: with bfloat16 kernel_activations, the host's routed experts quantize their
      activations to int8 per 32 elements and multiply them in integer SIMD (`kernels.expert_ffn`
      int8=): 2-3× the bf16 path per core on x86 (dev VM, one core in cache), at a rounding finer
      than the reference's FP8 rounding of the same activations. None (default): where the kernel
      variant's measured rates favour it (`kernels.int8_experts()`; FLASHDESK_INT8=0 turns it
      off); float32 kernel_activations never use it. The GPU's experts take int8 activations
      where `gpu_kernels.FP4_MODE` is the integer dots (MODE 4, a sweep's choice) and this is
      not False (None: unless FLASHDESK_INT8=0).
    speculative: also load the checkpoint's MTP block and draft with it (`Session` then feeds
      each token with a draft of the next; see `V4Model.enable_speculation`). CPU mode only so
      far (a GPU's decode steps replay one-token CUDA graphs); the block's experts stay
      memory-mapped, its other weights (~0.2 GB in V4-Flash) are built as the layers' are.
    """
    stream_min_tokens = streaming_threshold(stream_min_tokens, plan)
    if kernel_activations not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"kernel_activations must be torch.bfloat16 or torch.float32, got {kernel_activations}"
        )
    dev = _resolve_device(device if device is not None else getattr(placement, "device", None))
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    if head_dtype is None:
        head_dtype = DEFAULT_HEAD_DTYPE
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"head_dtype must be one of {HEAD_DTYPES}, got {head_dtype!r}")
    if head_dtype == "fp8" and dev.type != "cpu":
        raise ValueError(
            f"head_dtype='fp8' is for the CPU mode; on {dev.type} use 'bf16' (the default: the "
            "stored values) or 'fp32'"
        )
    if kv_dtype is None:
        kv_dtype = getattr(plan, "kv_dtype", None) or "native"
    if kv_dtype not in KV_FORMATS:
        raise ValueError(f"kv_dtype must be 'bf16', 'fp8' or None, got {kv_dtype!r}")
    if isinstance(frequency, (str, Path)):
        frequency = json.loads(Path(frequency).read_text())["counts"]
    progress = progress or (lambda f, m: None)
    progress(0.0, "Opening the checkpoint")
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    if cuda_graphs is None:
        cuda_graphs = os.environ.get("FLASHDESK_CUDA_GRAPHS", "1") != "0"
    # the GPU's experts: their integer dots cost no speed (`gpu_kernels.moe` MODE 4), so only
    # the precision asked for decides
    allowed = kernels.int8_allowed() if int8_experts is None else bool(int8_experts)
    device_int8 = kernel_activations == torch.bfloat16 and allowed
    if int8_experts is None:
        int8_experts = kernel_activations == torch.bfloat16 and kernels.int8_experts()
    int8_experts = bool(int8_experts) and kernel_activations == torch.bfloat16
    try:
        if speculative:
            _check_speculation(ckpt, path, dev)
        return _build(
            ckpt, path, plan, dev, dtype, placement, progress, cancel, fp8_linears, threads,
            stream_min_tokens, refresh_every, frequency, head_dtype, cuda_graphs and dev.type == "cuda",
            kv_dtype, kernel_activations, int8_experts, speculative, device_int8,
        )  # fmt: skip
    except BaseException:
        ckpt.close()
        raise


def _check_speculation(ckpt, path, dev: torch.device) -> None:
    """Speculative decoding needs the MTP block in the checkpoint and, so far, the CPU mode."""
    if dev.type != "cpu":
        raise RuntimeLoadError(
            "speculative decoding (MTP drafts) runs in the CPU mode only so far: a GPU's decode "
            "steps replay one-token CUDA graphs. Load without it, or on the CPU (device='cpu')."
        )
    if not ckpt.has_mtp:
        raise RuntimeLoadError(
            f"{path} holds no MTP block (mtp.0.*), which speculative decoding drafts with; "
            "load without it, or use the complete official checkpoint"
        )


def _build(
    ckpt, path, plan, dev, dtype, placement, progress, cancel, fp8_linears, threads,
    stream_min_tokens, refresh_every, frequency, head_dtype="fp32", cuda_graphs=False,
    kv_format="native", kernel_activations=torch.bfloat16, int8_experts=False, speculative=False,
    device_int8=False,
) -> Runtime:  # fmt: skip
    config = ckpt.config
    if config is None:
        raise CheckpointError(
            f"{path} has no config.json next to its weights; FlashDesk needs it to know the "
            "model's shape. Download config.json from the model's page into that folder."
        )
    unfit = Fp8Rows.unfit_reason(config.head_dim, config.qk_rope_head_dim)
    if kv_format == "fp8" and unfit:
        raise RuntimeLoadError(
            f"{unfit}; choose the bf16 KV cache in the hardware-fit wizard "
            "(`flashdesk fit --kv bf16`)"
        )
    if placement is None and plan is not None:
        prefix = config.main_layers[0].prefix + "ffn.experts.0."
        eb = sum(ckpt.info(prefix + p).nbytes for p in ("w1.weight", "w2.weight", "w3.weight"))
        eb += sum(ckpt.info(prefix + p).nbytes for p in ("w1.scale", "w2.scale", "w3.scale"))
        placement = Placement.from_plan(plan, config, str(dev), eb, frequency)
    if placement is None:
        placement = Placement.uniform(config, MMAP, str(dev))
    placement.validate(config)
    if getattr(ckpt, "shares_expert_storage", False):
        paged = sum(len(lp.stores().get(MMAP, ())) for lp in placement.layers)
        if paged:
            raise RuntimeLoadError(
                f"{path}: the placement leaves {paged} routed experts memory-mapped from disk, "
                "but this model has no files (its experts share storage until the runtime copies "
                "them). Use a plan that holds every expert in RAM or VRAM: fewer layers, or a "
                "machine with more memory."
            )
    _check_vram(plan, dev)
    use_fp8 = fp8_linears is None or fp8_linears
    cancel = cancel or (lambda: False)

    # Tensors that become Fp8Linear are fetched as zero-stride placeholders (no memory).
    fp8_names: set[str] = set()
    if use_fp8:
        for name in _fp8_linear_names(config):
            if name in ckpt and ckpt.info(name).dtype == "F8_E4M3" and ckpt.scale_of(name):
                fp8_names.add(name)
    # FP32-math linears stored BF16: kept as stored (views on the CPU, run by the C kernel; in
    # VRAM through `gpu_kernels.linear`), never as float32 copies.
    bf16_names = {
        n for n in _bf16_kernel_names(config) if n in ckpt and ckpt.info(n).dtype == "BF16"
    }
    n_names = max(1, len(ckpt.names()))
    done = [0]
    pin_ok = torch.cuda.is_available()

    def fetch(name: str, want: torch.dtype) -> torch.Tensor:
        if cancel():
            raise LoadCancelled("loading was cancelled")
        done[0] += 1
        progress(0.9 * min(done[0], n_names) / n_names, "Loading weights")
        if name in fp8_names and want is dtype:  # already on the device: `.to(dev)` keeps it
            return torch.zeros((), dtype=want, device=dev).expand(ckpt.info(name).shape)
        if name == "head.weight" and head_dtype != "fp32":
            want = torch.bfloat16  # never a float32 copy; `_install_head` replaces it
        if name in bf16_names:
            return ckpt.tensor(name, torch.bfloat16)  # the stored bytes; wrapped below
        t = ckpt.tensor(name, want)
        if t.data_ptr() == ckpt.raw(name).data_ptr():
            t = t.clone()  # own the values: raw views are for the experts only
        return t

    hosts: dict[int, LayerExperts] = {}
    # the GPU reads the placement's zero-copy experts in place where that measures faster at load
    # (FLASHDESK_ZERO_COPY=0: the CPU computes every host pick, as before 2026-11-28; 1: the
    # placement's share without measuring)
    zero_copy_env = os.environ.get("FLASHDESK_ZERO_COPY", "")
    zero_copy_on = dev.type == "cuda" and zero_copy_env != "0"

    def make_experts(spec):
        if cancel():
            raise LoadCancelled("loading was cancelled")
        if spec.is_mtp:  # speculative decoding: memory-mapped (no RAM the plan did not count),
            # in RAM only for a model without files
            every = tuple(range(config.n_routed_experts))
            shared = getattr(ckpt, "shares_expert_storage", False)
            lp = LayerPlacement(pageable=every) if shared else LayerPlacement(mmap=every)
        else:
            lp = placement.layers[spec.index]
        hosts[spec.index] = LayerExperts.load(
            ckpt, spec.prefix, config.n_routed_experts, lp.stores(), pin_ok,
            lp.zero_copy if zero_copy_on else (),
        )  # fmt: skip
        return hosts[spec.index]

    try:
        model = V4Model(
            config,
            fetch,
            device=dev,
            numerics=Numerics(dtype=dtype, kv_format=kv_format),
            with_mtp=speculative,
            make_experts=make_experts,
        )
        _install_head(model, head_dtype)
        n_fp8 = 0
        if use_fp8:

            def stored(name: str) -> tuple[torch.Tensor, torch.Tensor]:
                raw, scale = ckpt.raw(name), ckpt.raw(ckpt.scale_of(name))
                return (raw, scale) if dev.type == "cpu" else (raw.to(dev), scale.to(dev))

            for owner, attr, name in _fp8_linear_slots(model):
                if name in fp8_names:
                    w, s = stored(name)
                    lin = (
                        Fp8Linear(w, s, dtype, kernel_activations)
                        if dev.type == "cpu"
                        else CudaFp8Linear(w, s, dtype)
                    )
                    setattr(owner, attr, lin)
                    n_fp8 += 1
            for block in _blocks(model):
                name = f"{block.spec.prefix}attn.wo_a.weight"
                if name in fp8_names:
                    w, s = stored(name)
                    g = config.o_groups
                    block.attn.wo_a = (
                        Fp8GroupedLinear(w, s, g, dtype, kernel_activations)
                        if dev.type == "cpu"
                        else CudaFp8Linear(w, s, dtype, groups=g)
                    )
                    n_fp8 += 1
            _check_no_placeholders(model)
        for owner, attr, name in _bf16_kernel_slots(model):
            if name in bf16_names:
                wrap = Bf16Linear if dev.type == "cpu" else CudaBf16Linear
                setattr(owner, attr, wrap(getattr(owner, attr)))
        if dev.type != "cpu":
            join_gpu_linears(model)
        progress(0.92, "Placing experts")
        log = RoutingLog(len(config.main_layers), config.n_routed_experts, dev)
        pool = ThreadPoolExecutor(1, "flashdesk-experts") if dev.type != "cpu" else None
        caches: list[ExpertCache | None] = []
        staging: dict = {}  # prefill's staging slots for streamed experts, shared by the layers
        for block in model.blocks:
            i = block.spec.index
            lp = placement.layers[i]
            cache = (
                ExpertCache(hosts[i], lp.device, dev, config.n_routed_experts, int8=device_int8)
                if lp.device
                else None
            )
            caches.append(cache)
            host = hosts[i]
            zero_copy = (
                ExpertCache(host, host.zero_copy, dev, config.n_routed_experts,
                            stacks=host.zero_copy_stacks)
                if host.zero_copy
                else None
            )  # fmt: skip
            block.moe = HybridMoE(
                i,
                block.moe.router,
                block.moe.shared,
                hosts[i],
                cache,
                config.swiglu_limit,
                log,
                pool,
                threads,
                stream_min_tokens if dev.type != "cpu" else None,
                staging,
                kernel_activations,
                zero_copy,
                int8_experts,
            )
        for mtp in model.mtp:  # its routing is recorded apart: the plan's counts are per layer
            i = mtp.block.spec.index
            mtp.block.moe = HybridMoE(
                0, mtp.block.moe.router, mtp.block.moe.shared, hosts[i], None,
                config.swiglu_limit, RoutingLog(1, config.n_routed_experts, dev), pool, threads,
                None, staging, kernel_activations, None, int8_experts,
            )  # fmt: skip
        if speculative:
            model.enable_speculation()
    except torch.OutOfMemoryError as exc:
        raise RuntimeLoadError(
            f"the GPU ran out of memory while loading ({exc}). Another program may be using it: "
            "close it, or run the hardware-fit wizard (`flashdesk fit`) for a smaller plan.",
            kind="oom",
        ) from exc
    except MemoryError as exc:
        raise RuntimeLoadError(
            "not enough system memory to load the model with this placement; run `flashdesk fit` "
            "for a plan that memory-maps more experts, or close other programs",
            kind="oom",
        ) from exc
    graphs = None
    if cuda_graphs:
        progress(0.98, "Checking CUDA graphs on this GPU")
        graphs = GraphDecoder(model)
        graphs.self_check()
        if zero_copy_env != "1":
            progress(0.99, "Timing the GPU's reads of experts in host memory")
            graphs, placement = measured_zero_copy(model, graphs, placement)
    progress(1.0, "Ready")
    return Runtime(
        model,
        ckpt,
        placement,
        log,
        caches,
        [hosts[b.spec.index] for b in model.blocks],
        pool,
        refresh_every,
        n_fp8,
        head_dtype,
        graphs,
        getattr(plan, "prefill_chunk", None) or GPU_PREFILL_CHUNK,
    )


# The planner's in-place share must beat the CPU alone by this much to stay (the runs' noise)
ZERO_COPY_MARGIN = 0.02


def measured_zero_copy(
    model: V4Model, graphs: GraphDecoder, placement: Placement
) -> tuple[GraphDecoder, Placement]:
    """Whether the GPU's in-place reads of pinned experts pay on this machine, timed on scratch
    decode steps with and without them; the faster kept → (graphs, placement with a note when
    they were turned off). Why measured: both sides read the same RAM, and how much each loses
    to the other the planner cannot know. The lent H200 host of run 5 gained 22 % from them on
    a 24 GiB plan; run 6's, whose CPU alone read 0.89 of its RAM bandwidth, lost 3 %."""
    reading = [b.moe for b in model.blocks if getattr(b.moe, "zero_copy", None) is not None]
    if not reading or not graphs.usable:
        return graphs, placement
    try:
        with_s = graphs.step_seconds()
        for moe in reading:
            moe.use_zero_copy = False
        without = GraphDecoder(model)
        if without.self_check() is None:
            without_s = without.step_seconds()
            if without_s < with_s * (1 - ZERO_COPY_MARGIN):
                n = sum(len(m.zero_copy.ids) for m in reading)
                note = (
                    f"the CPU computes the picks of all host experts: a decode step took "
                    f"{without_s * 1e3:.1f} ms that way against {with_s * 1e3:.1f} ms with the "
                    f"GPU reading {n} pinned experts in place, as planned "
                    "(FLASHDESK_ZERO_COPY=1 keeps the plan's share)"
                )
                return without, dataclasses.replace(placement, notes=(*placement.notes, note))
    except Exception:  # a failed measurement (scratch states out of memory) keeps the plan
        pass
    for moe in reading:
        moe.use_zero_copy = True
    return graphs, placement


def _check_no_placeholders(model: V4Model) -> None:
    """Every zero-stride placeholder was replaced by an FP8 kernel (else: an unmapped weight)."""
    for block, mtp in [*((b, None) for b in model.blocks), *((m.block, m) for m in model.mtp)]:
        for obj in (block.attn, block.attn.indexer, block.attn.compressor, block.moe.shared, mtp):
            if obj is None:
                continue
            for name in dir(obj):
                value = getattr(obj, name, None)
                weight = value.weight if isinstance(value, Linear) else value
                if isinstance(weight, torch.Tensor) and weight.dim() and 0 in weight.stride():
                    raise RuntimeLoadError(
                        f"internal: {block.spec.prefix}{name} was not mapped to the FP8 "
                        "kernel; load with fp8_linears=False"
                    )
