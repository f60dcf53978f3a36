"""Where a layer's routed experts live and how one MoE step runs across the CPU and the GPU.

A layer's 256 experts stay in their stored FP4 form (packed E2M1 + E8M0 scales, spec §4.4):

* host experts are one `ExpertTable` row each, run by the C kernels (`kernels.expert_ffn`) on a
  worker thread. Their bytes are either copied once into a pinned buffer (fast host→device copies
  for prefill streaming), into a pageable buffer, or left as zero-copy views of the memory-mapped
  checkpoint ("mmap": paged in by the OS when picked). Never two resident copies;
* device experts (`ExpertCache`) are the same bytes in device memory, stacked by slot; a whole
  layer when the plan says so, else a set of hot experts that `refresh()` swaps towards the
  experts routing actually picks;
* zero-copy experts are pinned host experts stacked by slot that the GPU's decode kernels read
  in place across PCIe (an `ExpertCache` over the pinned stacks, nothing copied): in a host
  layer the GPU computes their picks while the CPU computes the others, both reading RAM. A few tokens' picks run from the packed bytes in two Triton
  launches with no host sync (`gpu_kernels.moe`); long prompts, or a GPU without Triton,
  dequantize each picked expert and multiply with torch.

`HybridMoE` replaces a block's `MoE`: router on the model's device, the token's host experts
submitted to the CPU thread, then the shared expert and the cached experts computed on the device
while the CPU works, and the two sums joined on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from flashdesk.engine import gpu_kernels, kernels
from flashdesk.engine.model.common import into
from flashdesk.engine.model.moe import MoE, Router, SharedExpert, swiglu

PINNED = "pinned"
PAGEABLE = "pageable"
MMAP = "mmap"
HOST_STORES = (PINNED, PAGEABLE, MMAP)

# The six stored tensors of one expert, in ExpertTable order.
PARTS = ("w1.weight", "w1.scale", "w3.weight", "w3.scale", "w2.weight", "w2.scale")

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """byte → (value of low nibble, value of high nibble) `[256, 2]`, one copy per device."""
    table = _PAIR_TABLES.get(device)
    if table is None:
        lut = torch.tensor(_E2M1, dtype=torch.float32)
        codes = torch.arange(256)
        table = torch.stack((lut[codes & 15], lut[codes >> 4]), dim=1).to(device)
        _PAIR_TABLES[device] = table
    return table


def fp4_dequant(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed `[O, I/2]` E2M1 bytes (low nibble first), scale `[O, I/32]` E8M0 → `[O, I]` on the
    tensors' device: on a GPU with Triton in one pass (`gpu_kernels.dequant_fp4`), else with torch."""
    if packed.is_cuda and gpu_kernels.available(packed.device):
        return gpu_kernels.dequant_fp4(packed, scale, dtype)
    return fp4_dequant_torch(packed, scale, dtype)


def fp4_dequant_torch(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`fp4_dequant` with torch ops (four passes over float32). Exact in float32 (the same values
    as `quant.dequant_fp4`)."""
    b = packed.view(torch.uint8)
    rows, half = b.shape
    vals = _pair_table(b.device).index_select(0, b.reshape(-1).int())  # [O·I/2, 2]
    s = torch.exp2(scale.view(torch.uint8).float() - 127.0)
    w = vals.view(rows, (2 * half) // 32, 32) * s[:, :, None]
    return w.view(rows, 2 * half).to(dtype)


def _owned_copy(tensors: Sequence[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """The tensors' bytes copied into one host buffer (pinned if asked, else on huge pages where
    the OS has them: `kernels.host_buffer`) → views of it."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    buf = None
    if pin:
        try:
            buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinning refused (no driver, lock limit): pageable; callers check
            buf = None
    if buf is None:
        buf = torch.from_numpy(kernels.host_buffer(sum(sizes)))
    out, at = [], 0
    for t, n in zip(tensors, sizes, strict=True):
        view = buf[at : at + n]
        view.copy_(t.reshape(-1).view(torch.uint8))
        out.append(view.view(t.dtype).view(t.shape))
        at += n
    return out


class LayerExperts:
    """One layer's routed experts in host memory: `parts[e]` = its six stored tensors,
    `store_of[e]` = pinned / pageable / mmap. mmap views are valid while the checkpoint is open.
    `zero_copy` = pinned experts held in pinned stacks by slot (`zero_copy_stacks`, slot s =
    `zero_copy[s]`; their `parts` are views of them) for a GPU to read in place."""

    def __init__(
        self,
        parts: list[tuple[torch.Tensor, ...]],
        table: kernels.ExpertTable,
        store_of: list,
        zero_copy: tuple[int, ...] = (),
        zero_copy_stacks: tuple[torch.Tensor, ...] = (),
    ):
        self.parts = parts
        self.table = table
        self.store_of = store_of
        self.zero_copy = zero_copy
        self.zero_copy_stacks = zero_copy_stacks

    def __repr__(self) -> str:  # never print the tensors: mmap views may be closed
        counts = {s: self.store_of.count(s) for s in HOST_STORES if s in self.store_of}
        return f"LayerExperts({len(self.parts)} experts: {counts})"

    @classmethod
    def load(
        cls,
        checkpoint,
        prefix: str,
        n_experts: int,
        stores: dict[str, Sequence[int]],
        pin_ok: bool,
        zero_copy: Sequence[int] = (),
    ) -> LayerExperts:
        """Experts named in stores[PINNED] / stores[PAGEABLE] are copied into one owned buffer
        each; all others (stores[MMAP] and device-resident ones) stay views of the mapped file.
        `zero_copy` (pinned ones) go into pinned stacks by slot instead, where pinning works."""
        raw = [
            tuple(checkpoint.raw(f"{prefix}ffn.experts.{e}.{p}") for p in PARTS)
            for e in range(n_experts)
        ]
        store_of = [MMAP] * n_experts
        zc = tuple(sorted(set(zero_copy) & set(stores.get(PINNED, ())))) if pin_ok else ()
        stacks = _pinned_stacks([raw[e] for e in zc]) if zc else None
        if stacks is None:
            zc = ()
        for s, e in enumerate(zc):
            raw[e] = tuple(stack[s] for stack in stacks)
            store_of[e] = PINNED
        for store, pin in ((PINNED, pin_ok), (PAGEABLE, False)):
            ids = sorted(set(stores.get(store, ())) - set(zc))
            if not ids:
                continue
            flat = _owned_copy([t for e in ids for t in raw[e]], pin)
            pinned = bool(flat) and flat[0].is_pinned()
            for j, e in enumerate(ids):
                raw[e] = tuple(flat[6 * j : 6 * j + 6])
                store_of[e] = PINNED if store == PINNED and pinned else PAGEABLE
        return cls(raw, kernels.ExpertTable(raw), store_of, zc, stacks or ())


class ExpertCache:
    """Experts held in device memory as their packed bytes: slot s holds expert `ids[s]`.

    `stacks` = the six stored parts stacked by slot (w1 `[S, I, D/2]`, its scales, w3, …, w2
    `[S, D, I/2]`, its scales); `slot_of` maps expert → slot on the host, `slot_dev` the same on
    the device (−1: not resident) for kernels that look picks up without a host sync.
    """

    def __init__(
        self,
        host: LayerExperts,
        ids: Sequence[int],
        device: torch.device,
        n: int,
        stacks: tuple[torch.Tensor, ...] | None = None,
        int8: bool = False,
    ):
        """`stacks`: read these (pinned host stacks by slot, slot s = ids[s]) in place instead of
        copying the experts into device memory: the zero-copy experts, which `refresh` keeps.
        `int8`: the decode kernels may quantize the activations to int8 where FP4_MODE says
        (`gpu_kernels.moe` MODE 4); else they keep float ones."""
        self.host = host
        self.device = device
        self.n_experts = n
        self.capacity = len(ids)
        self.in_place = stacks is not None
        self.keep_out: tuple[int, ...] = ()  # experts `refresh` never takes (read elsewhere)
        self.slot_of = torch.full((n,), -1, dtype=torch.long)  # host-side map expert → slot
        self.slot_dev = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.resident = torch.zeros(n, dtype=torch.bool, device=device)
        self.fused = gpu_kernels.available(device)
        self.int8 = int8 and stacks is None  # zero-copy reads: PCIe bounds them, keep floats
        first = host.parts[ids[0]] if ids else ()
        self.stacks = stacks if stacks is not None else tuple(
            torch.empty((self.capacity, *t.shape), dtype=t.dtype, device=device) for t in first
        )  # fmt: skip
        self.slots: list[list[torch.Tensor]] = []
        self.ids: list[int] = []
        for e in ids:
            slot = len(self.ids)
            self.slots.append([stack[slot] for stack in self.stacks])  # views: own bytes
            if not self.in_place:
                for dst, src in zip(self.slots[slot], host.parts[e], strict=True):
                    dst.copy_(src)
            self._assign(slot, int(e))
            self.ids.append(int(e))

    def _assign(self, slot: int, e: int) -> None:
        self.slot_of[e] = slot
        self.slot_dev[e] = slot
        self.resident[e] = True

    @property
    def whole_layer(self) -> bool:
        return self.capacity == self.n_experts

    def weights(
        self, e: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 `[I, D]`, w3 `[I, D]`, w2 `[D, I]`) of a resident expert, dequantized."""
        w1, s1, w3, s3, w2, s2 = self.slots[int(self.slot_of[e])]
        return fp4_dequant(w1, s1, dtype), fp4_dequant(w3, s3, dtype), fp4_dequant(w2, s2, dtype)

    def fused_sum(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, limit: float,
        summed: bool = True,
    ) -> torch.Tensor | None:  # fmt: skip
        """Σ weight · expert(x) over the resident picks, from the packed bytes → `[T, D]` float32
        (`summed` False: the kernels' partial sums `[T, n, D]`); None where the fused kernels do
        not apply (no Triton, too many tokens)."""
        if not self.fused or x.shape[0] > gpu_kernels.MAX_TOKENS:
            return None
        if gpu_kernels.DECODE_MOE == "by pick":
            return gpu_kernels.moe_by_pick(
                x, experts, weights, self.slot_dev, self.stacks, limit, summed=summed
            )  # fmt: skip
        # pinned host stacks (zero-copy) keep the plain loop the H200 measured across PCIe
        stages = None if self.stacks[0].is_cuda else 1
        return gpu_kernels.moe(
            x, experts, weights, self.slot_dev, self.stacks, limit, summed=summed, stages=stages,
            floats=not self.int8,
        )  # fmt: skip

    def add_grouped(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, limit: float,
        out: torch.Tensor,
    ) -> None:  # fmt: skip
        """Many tokens: out[pick] = weight · expert(x) for the resident picks (`[T·k, D]`
        float32, rows by flat pick; the others untouched), each expert's bytes read once per
        block of picks (`gpu_kernels.moe_grouped`). One host read: the picks per slot."""
        slots = self.slot_dev[experts.reshape(-1)].long()
        order = torch.argsort(slots, stable=True)  # not resident (−1) first, then by slot
        counts = torch.bincount(slots + 1, minlength=self.capacity + 1).tolist()
        blocks = gpu_kernels.expert_blocks(counts[1:], range(self.capacity), counts[0])
        if blocks:
            table = torch.tensor(blocks, dtype=torch.int32).to(x.device)
            flat_w = weights.reshape(-1).to(torch.float32)
            gpu_kernels.moe_grouped(x, order, table, flat_w, self.stacks, limit, out)

    def refresh(self, counts: torch.Tensor) -> int:
        """Swap cold resident experts for hotter absent ones (by routing `counts` `[E]`);
        → experts replaced. A whole-layer or empty cache has nothing to do."""
        if self.capacity == 0 or self.whole_layer or self.in_place:
            return 0
        counts = counts.detach().to("cpu", torch.float64)
        if self.keep_out:  # the zero-copy experts: the device reads them in place already
            counts[list(self.keep_out)] = -1.0
        want = set(torch.topk(counts, self.capacity).indices.tolist())
        have = set(self.ids)
        incoming = sorted(want - have, key=lambda e: -int(counts[e]))
        outgoing = sorted(have - want, key=lambda e: int(counts[e]))
        swapped = 0
        for e_in, e_out in zip(incoming, outgoing, strict=False):
            if counts[e_in] <= counts[e_out]:
                break
            slot = int(self.slot_of[e_out])
            for dst, src in zip(self.slots[slot], self.host.parts[e_in], strict=True):
                dst.copy_(src, non_blocking=True)
            self.slot_of[e_out] = -1
            self.slot_dev[e_out] = -1
            self.resident[e_out] = False
            self._assign(slot, e_in)
            self.ids[slot] = e_in
            swapped += 1
        return swapped


class RoutingLog:
    """Routing counts per layer and expert, plus how many picks the device cache served.

    All three live on the model's device and are only added to there (a decode step replayed
    from a CUDA graph records its picks too); reading `hit_rate` waits for the device."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        self.counts = torch.zeros((n_layers, n_experts), dtype=torch.long, device=device)
        self.device_picks = torch.zeros((), dtype=torch.long, device=device)
        self.total_picks = torch.zeros((), dtype=torch.long, device=device)

    def record(self, layer: int, experts: torch.Tensor, on_device: torch.Tensor | None) -> None:
        flat = experts.reshape(-1)
        self.counts[layer].index_add_(0, flat, torch.ones_like(flat))
        self.total_picks += flat.numel()
        if on_device is not None:
            self.device_picks += on_device.sum()

    @property
    def hit_rate(self) -> float | None:
        """Share of routed picks served from device memory; None before any pick."""
        total = int(self.total_picks)
        if not total:
            return None
        return int(self.device_picks) / total

    def reset_hits(self) -> None:
        self.device_picks.zero_()
        self.total_picks.zero_()


def _pinned_stacks(experts: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...] | None:
    """The experts' six parts copied into six pinned stacks `[n, *part shape]` (slot s = the
    s-th expert), as the decode kernels read a device cache; None where pinning is refused."""
    try:
        stacks = tuple(
            torch.empty((len(experts), *t.shape), dtype=t.dtype, pin_memory=True)
            for t in experts[0]
        )
    except RuntimeError:  # no driver, or the lock limit: these experts stay ordinary ones
        return None
    for s, parts in enumerate(experts):
        for stack, t in zip(stacks, parts, strict=True):
            stack[s].copy_(t)
    return stacks


class HybridMoE(MoE):
    """A block's MoE with routed experts split between host (C kernels) and device cache.

    forward(x `[T, D]` normed, ids `[T]`) → `[T, D]` in x's dtype, like `MoE.forward`.
    """

    def __init__(
        self,
        layer: int,
        router: Router,
        shared: SharedExpert,
        host: LayerExperts,
        cache: ExpertCache | None,
        limit: float,
        log: RoutingLog,
        pool: ThreadPoolExecutor | None,
        threads: int | None = None,
        stream_min_tokens: int | None = None,
        staging: dict | None = None,
        host_dtype: torch.dtype = torch.bfloat16,
        zero_copy: ExpertCache | None = None,
        host_int8: bool = False,
    ):
        super().__init__(router, host, shared)
        self.layer = layer
        self.host = host
        self.cache = cache
        self.limit = float(limit)
        self.log = log
        self.pool = pool  # None: the CPU part runs inline (CPU-only mode: no thread hop)
        self.threads = threads
        # Prefill of at least this many tokens computes every picked expert on the device,
        # copying the absent ones there for the call (None: never).
        self.stream_min_tokens = stream_min_tokens
        self.staging = {} if staging is None else staging  # `_StagingRing`s, shared by layers
        self.host_dtype = host_dtype  # the activations the C expert kernels take
        self.host_int8 = host_int8  # ... quantized to int8 per 32 for their integer dots
        # pinned experts the device's decode kernels read in place (None: the CPU computes all
        # host picks); `use_zero_copy` off gives those picks back to the CPU (A/B runs)
        self.zero_copy = zero_copy if zero_copy is not None and zero_copy.fused else None
        self.use_zero_copy = True  # toggle only before a GraphDecoder captures the step
        if self.zero_copy is not None and cache is not None:
            cache.keep_out = tuple(self.zero_copy.ids)  # a pick is read in one place only

    def _zero_copy_applies(self, x: torch.Tensor) -> bool:
        """Whether the device reads this call's zero-copy picks (a decode step's few tokens, the
        kernels `ExpertCache.fused_sum` runs); else the CPU computes them with the other host
        picks."""
        return (
            self.zero_copy is not None
            and self.use_zero_copy
            and x.shape[0] <= gpu_kernels.MAX_TOKENS
        )

    # -- a decode step in fixed-shape pieces (`engine.decode_graphs` captures them in CUDA graphs)
    @property
    def host_computes(self) -> bool:
        """Whether some of this layer's picks run on the host (the device does not hold it all)."""
        return not (self.cache is not None and self.cache.whole_layer)

    def step_route(self, x: torch.Tensor, ids: torch.Tensor, record_hits: bool = True, out=None):
        """x `[T, D]` normed, ids `[T]` → experts, weights `[T, k]` and the host's share of the
        picks (`[T, k]`, −1 where the device cache holds the expert), recorded in the log (the
        cache's hits too, unless `record_hits` is off); no host reads. `out`: three tensors to
        hold them (a captured step's fixed buffers; the fused routing writes them directly)."""
        resident = self.cache.resident if self.cache is not None and self.cache.capacity else None
        few = x.shape[0] <= gpu_kernels.MAX_TOKENS  # one program: a decode step's picks
        # the device reads these in place (step_device_parts): not the host's either
        in_place = self.zero_copy.resident if self._zero_copy_applies(x) else None
        logged = few and gpu_kernels.applies(x) and gpu_kernels.checked("routing log", x.device)
        if logged and gpu_kernels.checked("routing", x.device):  # routed and logged at once
            log = self.log
            record = gpu_kernels.RoutingRecord(
                log.counts[self.layer],
                log.device_picks,
                log.total_picks,
                resident,
                in_place,
                record_hits,
            )
            return self.router.route_and_record(x, ids, record, out)
        return into(out, self._route_apart(x, ids, resident, in_place, logged, record_hits))

    def _route_apart(self, x, ids, resident, in_place, logged: bool, record_hits: bool):
        """`step_route` where the routing and its log take launches of their own."""
        experts, weights = self.router(x, ids)
        if logged:
            log = self.log
            return experts, weights, gpu_kernels.record_picks(
                experts, resident, log.counts[self.layer], log.device_picks, log.total_picks,
                hits=record_hits, in_place=in_place,
            )  # fmt: skip
        on_device = None if resident is None else resident[experts]
        self.log.record(self.layer, experts, on_device if record_hits else None)
        host_ids = experts if on_device is None else experts.masked_fill(on_device, -1)
        if in_place is not None:
            host_ids = host_ids.masked_fill(in_place[experts], -1)
        return experts, weights, host_ids

    def step_device(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, out=None
    ) -> torch.Tensor:
        """The device's share → `[T, D]` float32: the shared expert plus the cached picks through
        the fused kernels (no host reads; the caller checked `cache.fused`). `out`: a float32
        tensor to write it into (a captured step's fixed buffer), on a GPU in one launch."""
        f, parts = self.step_device_parts(x, experts, weights)
        if out is not None and gpu_kernels.applies(f) and f.dim() == 2:
            return gpu_kernels.sum_parts(f, parts, out)
        y = f.float()
        for part in () if parts is None else parts if isinstance(parts, tuple) else (parts,):
            y = y + part.sum(dim=1)
        return y if out is None else out.copy_(y)

    def step_device_parts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
        """`step_device` as (the shared expert's output `[T, D]` in x's dtype, or float32 with
        the cached picks added; the cached picks' float32 partial sums `[T, n, D]`, a pair of
        such with the in-place reads', or None), for `mhc.hc_post` to widen and add in its own
        launch."""
        f = self.shared(x, widen=False)
        parts = None
        if self.cache is not None and self.cache.capacity:
            parts = self.cache.fused_sum(x, experts, weights, self.limit, summed=False)
            if parts is None:
                f = f.float()
                self._add_cached(x, experts, weights, f)
        if self._zero_copy_applies(x):
            read = self.zero_copy.fused_sum(x, experts, weights, self.limit, summed=False)
            parts = read if parts is None else (parts, read)  # hc_post adds both: no cat
        return f, parts

    def _add_cached(self, x, experts, weights, y) -> None:
        """y += Σ weight · expert(x) over the picks the device cache holds: the fused kernels
        for a few tokens (no host reads), else torch per picked expert (reads the picks)."""
        fused = self.cache.fused_sum(x, experts, weights, self.limit)
        if fused is not None:
            y += fused
            return
        if self.cache.fused and gpu_kernels.tensor_cores(x.device):  # many tokens: by expert
            tokens, k = experts.shape
            out = torch.zeros((tokens * k, x.shape[1]), dtype=torch.float32, device=x.device)
            self.cache.add_grouped(x, experts, weights, self.limit, out)
            y += out.view(tokens, k, -1).sum(dim=1)
            return
        picked = experts[self.cache.resident[experts]]
        for e in torch.unique(picked).tolist():
            rows, slot = torch.where(experts == e)
            w1, w3, w2 = self.cache.weights(e, x.dtype)
            self._device_expert(x, w1, w3, w2, rows, slot, weights, y)

    def _host_part(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, out=None):
        """Σ over the host experts (ids −1 are skipped) → `[T, D]` float32 on the host (added
        into `out` when given)."""
        if out is None:
            out = torch.zeros(tuple(x.shape), dtype=torch.float32)
        kernels.expert_ffn(
            x, self.host.table, weights, out, ids=experts, limit=self.limit, int8=self.host_int8,
            threads=self.threads,
        )  # fmt: skip
        return out

    def _device_expert(self, x, w1, w3, w2, rows, slot, weights, out) -> None:
        xs = x[rows].to(w1.dtype)
        h = swiglu(F.linear(xs, w1), F.linear(xs, w3), self.limit)
        h = (h * weights[rows, slot, None]).to(x.dtype)
        out[rows] += F.linear(h.to(w2.dtype), w2).float()

    def forward(self, x: torch.Tensor, ids: torch.Tensor, simulate: bool = False) -> torch.Tensor:
        if simulate:
            raise ValueError(
                "the hybrid runtime does not simulate the reference's FP8 activation rounding "
                "(simulate_quant); load it with simulate_quant off"
            )
        streaming = (
            self.stream_min_tokens is not None
            and x.shape[0] >= self.stream_min_tokens
            and x.device.type != "cpu"
        )
        # [T, k] on x's device; streamed prompts compute every pick on the device: no cache hits
        experts, weights, host_ids = self.step_route(x, ids, record_hits=not streaming)

        # 1. Host experts: start the CPU kernels (they release the GIL) before the device work.
        job: Future | torch.Tensor | None = None
        if not streaming and self.host_computes:
            xh = x.detach().to("cpu", self.host_dtype)
            ih, wh = host_ids.to("cpu"), weights.to("cpu", torch.float32)
            if self.pool is None:
                job = self._host_part(xh, ih, wh)
            else:
                job = self.pool.submit(self._host_part, xh, ih, wh)

        # 2. Device work meanwhile: the shared expert, then the device-resident experts.
        y = self.shared(x)
        if streaming:
            self._stream_all(x, experts, weights, y)
        else:
            if self.cache is not None and self.cache.capacity:
                self._add_cached(x, experts, weights, y)
            if self._zero_copy_applies(x):  # step_route left these picks to the device
                y += self.zero_copy.fused_sum(x, experts, weights, self.limit)

        # 3. Join.
        if job is not None:
            host = job.result() if isinstance(job, Future) else job
            y += host.to(y.device, non_blocking=False)
        return y.to(x.dtype)

    def _stream_all(self, x, experts, weights, y) -> None:
        """Long prompts: every picked expert computed on the device, y += their sum.

        One host read per call (how many rows each expert has: the picks sorted by expert on the
        device); the host experts' bytes cross PCIe on a side stream into a ring of staging
        slots, a few experts ahead of the one computing, so copies and compute overlap. With
        Triton the experts run grouped from their packed bytes (the cached ones in one launch
        pair, each staged one in its own); else each is dequantized and multiplied by torch."""
        n = len(self.host.parts)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # picks grouped by expert
        counts = torch.bincount(flat, minlength=n).tolist()  # the one host read
        picked = [e for e in range(n) if counts[e]]
        slot_of_expert = self.cache.slot_of if self.cache is not None else None
        held = {e for e in picked if slot_of_expert is not None and int(slot_of_expert[e]) >= 0}
        incoming = [e for e in picked if e not in held]
        starts, at = {}, 0  # where each expert's picks begin in the sorted order
        for e in picked:
            starts[e], at = at, at + counts[e]
        ring = _StagingRing.for_layer(self, x.device)
        ring.start([self.host.parts[e] for e in incoming])
        stream = self._stream_grouped if gpu_kernels.tensor_cores(x.device) else self._stream_each
        stream(x, experts, weights, y, order, counts, held, incoming, starts, ring)

    def _stream_grouped(self, x, experts, weights, y, order, counts, held, incoming, starts, ring):
        tokens, k = experts.shape
        blocks = []  # the cached experts' blocks (their slots in the cache's stacks), then …
        for e in sorted(held):
            slot = int(self.cache.slot_of[e])
            blocks += gpu_kernels.expert_blocks([counts[e]], [slot], starts[e])
        first_staged = len(blocks)
        spans = []  # (first block, blocks) of each staged expert, slot 0 of its staging slot
        for e in incoming:
            mine = gpu_kernels.expert_blocks([counts[e]], [0], starts[e])
            spans.append((len(blocks), len(mine)))
            blocks += mine
        table = torch.tensor(blocks, dtype=torch.int32).to(x.device)
        out = torch.zeros((tokens * k, x.shape[1]), dtype=torch.float32, device=x.device)
        h = torch.empty((tokens * k, self.host.parts[0][0].shape[0]), dtype=x.dtype,
                        device=x.device)  # fmt: skip
        flat_w = weights.reshape(-1).to(torch.float32)
        run = functools.partial(gpu_kernels.moe_grouped, x, order, table, flat_w)
        if first_staged:
            run(self.cache.stacks, self.limit, out, h, 0, first_staged)
        for i, (first, n_blocks) in enumerate(spans):
            stack = tuple(t.unsqueeze(0) for t in ring.take(i))
            run(stack, self.limit, out, h, first, n_blocks)
            ring.done(i)  # the next copy into this slot waits for these kernels
        y += out.view(tokens, k, -1).sum(dim=1)

    def _stream_each(self, x, experts, weights, y, order, counts, held, incoming, starts, ring):
        k = experts.shape[1]
        rows_of, slot_of = order // k, order % k
        staged = 0
        for e in sorted(held | set(incoming)):
            start = starts[e]
            rows, slot = rows_of[start : start + counts[e]], slot_of[start : start + counts[e]]
            if e in held:
                w1, w3, w2 = self.cache.weights(e, x.dtype)
            else:
                p = ring.take(staged)
                w1 = fp4_dequant(p[0], p[1], x.dtype)
                w3 = fp4_dequant(p[2], p[3], x.dtype)
                w2 = fp4_dequant(p[4], p[5], x.dtype)
                ring.done(staged)  # the slot's bytes are dequantized: the next copy may land
                staged += 1
            self._device_expert(x, w1, w3, w2, rows, slot, weights, y)


class _StagingRing:
    """Device buffers for a few experts' packed bytes, filled from host memory on a side
        stream (on a GPU; plain copies elsewhere) with events ordering each slot's copy, use and
        reuse. One ring per device and expert shape in the `staging` dict the layers of a runtime
    share (they run one at a time)."""

    SLOTS = 3

    def __init__(self, template: tuple[torch.Tensor, ...], device: torch.device):
        self.size = self.SLOTS
        self.slots = [
            [torch.empty(t.shape, dtype=t.dtype, device=device) for t in template]
            for _ in range(self.size)
        ]
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.ready: list = [None] * self.size  # copy finished (recorded on the side stream)
        self.free: list = [None] * self.size  # last use finished (recorded on the compute stream)
        self.queue: Sequence = ()  # the experts being streamed (`start`)

    @classmethod
    def for_layer(cls, moe: HybridMoE, device: torch.device) -> _StagingRing:
        template = moe.host.parts[0]
        key = (device, tuple((tuple(t.shape), t.dtype) for t in template))
        ring = moe.staging.get(key)
        if ring is None:
            ring = moe.staging[key] = cls(template, device)
        return ring

    def load(self, j: int, parts: tuple[torch.Tensor, ...]) -> None:
        if self.stream is None:
            for dst, src in zip(self.slots[j], parts, strict=True):
                dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            if self.free[j] is not None:
                self.stream.wait_event(self.free[j])
            for dst, src in zip(self.slots[j], parts, strict=True):
                dst.copy_(src, non_blocking=True)  # asynchronous from pinned memory
            self.ready[j] = torch.cuda.Event()
            self.ready[j].record(self.stream)

    def start(self, queue: Sequence[tuple[torch.Tensor, ...]]) -> None:
        """Stream these experts' bytes, in the order they will be used: the first few copy now,
        each later one as `done` frees a slot."""
        self.queue = queue
        for j in range(min(self.size, len(queue))):
            self.load(j, queue[j])

    def take(self, i: int) -> list[torch.Tensor]:
        """Queued expert i's device copy (the compute stream waits for its copy)."""
        j = i % self.size
        if self.ready[j] is not None:
            torch.cuda.current_stream(self.slots[j][0].device).wait_event(self.ready[j])
        return self.slots[j]

    def done(self, i: int) -> None:
        """Queued expert i's use is enqueued: its slot takes the expert `size` places ahead."""
        j = i % self.size
        if self.stream is not None:
            self.free[j] = torch.cuda.Event()
            self.free[j].record(torch.cuda.current_stream(self.slots[j][0].device))
        if i + self.size < len(self.queue):
            self.load(j, self.queue[i + self.size])
