"""Decode steps replayed from CUDA graphs: the GPU runtime's answer to its host dispatch floor.

Why: a V4-Flash decode step issues ~36,000 torch operations (~830 per layer); on the lent H200's
host the GPU sat idle for 142 of a 197 ms step waiting for them (README, Performance). A CUDA
graph replays a captured sequence of kernels with one launch. Capture needs a step whose every
shape and buffer address is fixed and which reads nothing back to the host: `Block.step_attention`
(`Attention.step`, `Compressor.step`, the stores' `put`/`rows`) and `HybridMoE.step_route` /
`step_device` are that step. The compressed stores' capacities are part of it: they are reserved
in powers of two (`rows_for`) and a step that needs more re-captures, so a context of N tokens
costs about log2(N/512) captures.

Routed experts a layer keeps in host memory cannot be in a graph (the C kernels run on the CPU
and need the picks), so the step is cut at those layers into segments:

    body 0: embedding → full-device layers → attention + routing of host layer h1
    device h1: shared expert + cached experts of h1     (replays while the CPU works)
    host h1:   picks and input copied to pinned memory, C kernels, sum copied back
    body 1: join h1 (device + host sums, hc_post) → … → routing of h2, and so on
    last body: … → hc_head, norm, head → logits

On the step that captures, each segment runs once for real (the warm-up CUDA graphs need) and is
then recorded; later steps replay. Without CUDA, or with `capture=False`, the same segments run
as plain torch operations (the tests compare them with the model's own decode).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator

import torch

from flashdesk.engine import cache, gpu_kernels, kernels
from flashdesk.engine.cache import SequenceState
from flashdesk.engine.model.attention import StepPositions
from flashdesk.engine.model.mhc import hc_post_then
from flashdesk.engine.model.model import V4Model
from flashdesk.engine.runtime_experts import HybridMoE

MIN_ROWS = 64  # compressed rows every store holds at least in a captured step
# Longest the CPU kernels' workers are kept spinning while the host waits for the GPU before a
# host-expert layer (the wait measured at that layer in the previous step, plus a margin).
MAX_AWAKE_S = 0.05


def rows_for(position: int, ratio: int, floor: int) -> int:
    """Rows a compressed store holds for a step at `position`: room for row ⌊position/ratio⌋,
    a power of two, at least `floor`."""
    need = position // ratio + 1
    return max(floor, 1 << (need - 1).bit_length())


def _state_tensors(state: SequenceState) -> Iterator[torch.Tensor]:
    """Every buffer of the main layers' state a step reads or writes (a capture's addresses)."""
    for layer in state.layers:
        yield from layer.window.buffers()
        for store in (layer.kv_entries, layer.index_keys):
            if store is not None:
                yield from store.buffers()
        for carry in (layer.carry, layer.index_carry):
            if carry is not None:
                yield from carry.tensors()


def _mailbox(dim: int, k: int, dtype: torch.dtype, device, pin: bool = False) -> tuple:
    """One byte buffer holding a host layer's CPU input → (the buffer, then views of it: the
    MoE input `[1, dim]` in `dtype`, the host picks `[1, k]` int64, the weights `[1, k]`
    float32); the int64 part starts at a multiple of 8 bytes (dim is a multiple of 32)."""
    sizes = (dim * dtype.itemsize, k * 8, k * 4)
    buf = torch.zeros(sum(sizes), dtype=torch.uint8, device=device, pin_memory=pin)
    a, b = sizes[0], sizes[0] + sizes[1]
    return (
        buf,
        buf[:a].view(dtype).view(1, dim),
        buf[a:b].view(torch.long).view(1, k),
        buf[b:].view(torch.float32).view(1, k),
    )


class _StepTables:
    """What a step's layers derive from its position alone (both RoPE tables' cos/sin, the
    window slot, the compressed rows visible at each store size) in fixed buffers that the first
    segment fills once a step and every segment reads: each segment made its own before, ~12
    launches more at every host-expert layer's cut."""

    def __init__(self, model: V4Model, pos: torch.Tensor, state: SequenceState, compressed):
        dev = pos.device
        self.pos = pos
        self._pos_f = torch.zeros(1, device=dev)

        def row(n: int) -> torch.Tensor:
            return torch.zeros(1, n, device=dev)

        # per table: inverse frequencies, angles, cos, sin `[1, r/2]` (`Rotary.cos_sin`'s)
        self._rope = [(r.inv_freq.to(dev), *(row(r.inv_freq.shape[0]) for _ in range(3)))
                      for r in model.rotaries]  # fmt: skip
        windows = {b.attn.window for b in model.blocks}
        self._slots = {w: torch.zeros(1, dtype=torch.long, device=dev) for w in windows}
        # per (rows, ratio): each row's last position before it is visible, and the mask:
        # row r is visible from position (r+1)·ratio − 1 on, i.e. r < ⌊(pos+1)/ratio⌋
        self._visible = {}
        for i, ratio, _ in compressed:
            rows = state.layers[i].kv_entries.capacity
            if (rows, ratio) not in self._visible:
                last = (torch.arange(rows, device=dev) + 1) * ratio - 1
                self._visible[rows, ratio] = (last, torch.zeros(rows, dtype=torch.bool, device=dev))

    def fill(self) -> None:
        """This step's values, in place (the first segment's first launches)."""
        self._pos_f.copy_(self.pos)
        for inv, angles, cos, sin in self._rope:
            torch.mul(self._pos_f[:, None], inv[None, :], out=angles)
            torch.cos(angles, out=cos)
            torch.sin(angles, out=sin)
        for window, slot in self._slots.items():
            torch.remainder(self.pos, window, out=slot)
        for last, visible in self._visible.values():
            torch.le(last, self.pos, out=visible)

    def tables(self) -> tuple[list, StepPositions]:
        """(cos, sin) per RoPE table, and the layers' `StepPositions`, for one segment."""
        made = {("slot", w): t for w, t in self._slots.items()}
        made |= {("visible", *key): v for key, (_, v) in self._visible.items()}
        return [(cos, sin) for _, _, cos, sin in self._rope], StepPositions(self.pos, made)


class _Segment:
    """One stretch of the step: `run` replays its graph once captured, else calls `fn`."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class GraphDecoder:
    """`decode(token_id, state)` like `V4Model.decode`, as fixed-shape segments that CUDA graphs
    capture and replay. For the runtime's model (every block's MoE a `HybridMoE`); every device
    expert cache must run the fused kernels when capturing (`usable` says why not)."""

    def __init__(self, model: V4Model, capture: bool | None = None):
        if not all(isinstance(b.moe, HybridMoE) for b in model.blocks):
            raise ValueError(
                "GraphDecoder runs the runtime's model (load_runtime), not a plain one"
            )
        self.model = model
        self.config = c = model.config
        self.device = dev = model.device
        self.capture = dev.type == "cuda" if capture is None else capture
        self.reason: str | None = None  # why steps do not replay graphs, in words
        if self.capture and any(
            b.moe.cache is not None and b.moe.cache.capacity and not b.moe.cache.fused
            for b in model.blocks
        ):
            self.reason = "the experts cached in VRAM need the Triton kernels to be captured"
        self.cuts = [i for i, b in enumerate(model.blocks) if b.moe.host_computes]
        self.builds = 0  # how many times the segments were built (captured, on CUDA)
        # host seconds at the host-expert layers, summed over steps (benchmarks read them):
        # waiting for the device's work before a layer's picks, and in the CPU's share
        self.host_wait_s = self.host_expert_s = 0.0
        self._waited: dict[int, float] = {}  # the last step's wait before each host layer

        dt = model.numerics.dtype
        hc, dim, k = c.hc_mult, c.hidden_size, c.num_experts_per_tok

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # What one step's segments hand each other, at fixed addresses.
        self.pos, self.ids = zeros(1, dtype=torch.long), zeros(1, dtype=torch.long)
        self.embed = zeros(1, dim, dtype=dt)
        self.x = zeros(1, hc, dim, dtype=dt)
        self.post, self.comb = zeros(1, hc), zeros(1, hc, hc)
        self.experts = zeros(1, k, dtype=torch.long)
        self.y, self.host_y = zeros(1, dim), zeros(1, dim)
        self.logits = zeros(c.vocab_size)
        pin = dev.type == "cuda"
        host_dt = next((b.moe.host_dtype for b in model.blocks if hasattr(b.moe, "host_dtype")), dt)
        # What a host layer's CPU share reads (the MoE input as its kernels take it, the host
        # picks, the routing weights) side by side in one device buffer and one pinned buffer:
        # one copy before each host layer instead of three, each a PCIe round trip in series
        self.box, self.xn_host, self.host_ids, self.weights = _mailbox(dim, k, host_dt, dev)
        self.h_box, self.h_xn, self.h_ids, self.h_w = _mailbox(dim, k, host_dt, "cpu", pin)
        # the device's share takes the input in the model's dtype (the same tensor if it is)
        self.xn = self.xn_host if host_dt == dt else zeros(1, dim, dtype=dt)
        self.h_y = torch.zeros((1, dim), pin_memory=pin)

        # per main layer (index, compress ratio, rows its stores hold at least) for the compressed
        # ones: the host's per-step bookkeeping without building the layers' specs each step
        topk = c.index_topk
        self._compressed = [
            (i, spec.compress_ratio, max(MIN_ROWS, topk) if spec.has_indexer else MIN_ROWS)
            for i, spec in enumerate(c.main_layers)
            if spec.compress_ratio
        ]
        self._key: tuple | None = None
        # the state and `cache.allocations()` the key was last built for: the same count means
        # no state buffer moved since, so the key stands without reading every address again
        self._keyed: tuple[weakref.ref, int] | None = None
        self._room = 0  # positions below this need no store to grow (for the keyed state)
        self._plan: list[tuple[str, object]] = []  # ("body", segment) / ("cut", (layer, segment))
        self._tables: _StepTables | None = None  # the plan's per-step tables
        self._pool = None

    @property
    def usable(self) -> bool:
        return self.reason is None

    @torch.inference_mode()
    def self_check(self, prompt: int = 8, steps: int = 6) -> str | None:
        """Replay against the same segments run eagerly, on scratch states, before any real
        decode (at load): a GPU, driver or torch on which captured steps do not give the eager
        numbers turns graphs off here instead of corrupting answers. → `reason` (None: usable).
        The routing record is left as it was; the scratch graphs are dropped."""
        if not self.capture or self.reason is not None:
            return self.reason
        ids = self._scratch_ids(prompt + steps)
        eager = GraphDecoder(self.model, capture=False)
        try:
            with self._scratch():
                want, got = self._prefilled(ids[:prompt]), self._prefilled(ids[:prompt])
                for t in ids[prompt:]:
                    expect, seen = eager.decode(t, want), self.decode(t, got)
                    if self.reason is not None:
                        break
                    scale = float(expect.abs().max())
                    worst = float((seen - expect).abs().max())
                    if not worst <= 1e-2 * max(scale, 1.0):  # NaN fails too
                        self.reason = (
                            f"replayed CUDA graphs gave other logits than the same step run "
                            f"directly (max difference {worst:.3g} of {scale:.3g})"
                        )
                        break
        except Exception as exc:  # e.g. out of memory for the scratch states: no graphs
            self.reason = f"the CUDA graph check failed ({gpu_kernels.error_summary(exc)})"
        return self.reason

    @torch.inference_mode()
    def step_seconds(self, prompt: int = 8, steps: int = 10) -> float:
        """The median wall time of a decode step on a scratch state (the first two, which may
        capture, left out): for choices the planner's model cannot settle, timed on this
        machine at load. Routing record and graphs as `self_check` leaves them."""
        ids = self._scratch_ids(prompt + steps + 2)
        times = []
        with self._scratch():
            state = self._prefilled(ids[:prompt])
            for t in ids[prompt:]:
                t0 = time.perf_counter()
                self.decode(t, state)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - t0)
        return float(sorted(times[2:])[len(times[2:]) // 2])

    def _scratch_ids(self, n: int) -> list[int]:
        vocab = self.config.vocab_size
        return [(7919 * i + 11) % vocab for i in range(n)]

    def _prefilled(self, ids: list[int]) -> SequenceState:
        state = self.model.new_state()
        self.model.prefill(ids, state)
        return state

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[None]:
        """Steps on scratch states leave the routing record as it was and drop the graphs they
        captured (the real states' buffers differ)."""
        log = self.model.blocks[0].moe.log
        saved = [t.clone() for t in (log.counts, log.device_picks, log.total_picks)]
        try:
            yield
        finally:
            for t, v in zip((log.counts, log.device_picks, log.total_picks), saved, strict=True):
                t.copy_(v)
            self._key, self._keyed, self._plan, self._pool = None, None, [], None

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def decode(self, token_id: int, state: SequenceState) -> torch.Tensor:
        """One token after the state's last one → logits of the next `[V]` float32."""
        position = state.position
        token = int(self.model._ids([token_id])[0])
        if position + 1 > self.model.config.max_position_embeddings:
            raise ValueError(f"position {position} is past the model's context")
        key = self._reserve(state, position)
        capturing = False
        if key != self._key:
            self._plan = self._segments(state)
            self._key = key
            self.builds += 1
            capturing = self.capture and self.reason is None
            self._pool = None  # the old graphs' memory goes with them
        self.pos.fill_(position)
        self.ids.fill_(token)
        self.embed.copy_(self.model.embed[token].view(1, -1), non_blocking=True)
        for kind, item in self._plan:
            if kind == "body":
                self._run(item, capturing)
            else:
                layer, device_part = item
                self._host_layer(layer, device_part, capturing)
        self._advance(state, position + 1)
        return self.logits.clone()

    def _run(self, segment: _Segment, capturing: bool) -> None:
        if not capturing:
            segment.run()
            return
        # The warm-up a capture needs is this step's real work: run it, then record it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            segment.fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.reason is not None:  # an earlier segment failed to capture this step
            return
        try:
            if self._pool is None:  # one pool for the segments of a capture (replayed in order)
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                segment.fn()
            segment.graph = graph
        except Exception as exc:  # finish this step eagerly; later steps take the model's path
            self.reason = f"CUDA graph capture failed ({gpu_kernels.error_summary(exc)})"

    def _host_layer(self, layer: int, device_part: _Segment, capturing: bool) -> None:
        """Host layer `layer`: its picks to the CPU, the device's share meanwhile, the CPU's
        share back (the next body adds them)."""
        moe = self.model.blocks[layer].moe
        self.h_box.copy_(self.box, non_blocking=True)  # h_xn, h_ids, h_w at once
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._run(device_part, capturing)
        t0 = time.perf_counter()
        if ready is not None:
            # workers asleep since the last host layer would wake late and join only what is
            # left of the job: keep them spinning through the wait, so it starts on all of them
            kernels.keep_threads_awake(min(self._waited.get(layer, 0.0) + 1e-3, MAX_AWAKE_S))
            ready.synchronize()
        t1 = time.perf_counter()
        self._waited[layer] = t1 - t0
        self.h_y.zero_()
        moe._host_part(self.h_xn, self.h_ids, self.h_w, out=self.h_y)
        self.host_y.copy_(self.h_y, non_blocking=True)
        self.host_wait_s += t1 - t0
        self.host_expert_s += time.perf_counter() - t1

    # ------------------------------------------------------------------ capacities and key

    def _reserve(self, state: SequenceState, position: int) -> tuple:
        """Give every compressed store the rows this step needs (CSA entries and index keys the
        same count) → the key of the buffers a capture would use."""
        keyed = self._key is not None and self._keyed is not None and self._keyed[0]() is state

        def unmoved() -> bool:  # no state buffer (re)allocated since the key was read
            return keyed and self._keyed[1] == cache.allocations()

        if unmoved() and position < self._room:  # every store holds this step's row already
            return self._key
        self._room = 1 << 62
        for i, ratio, floor in self._compressed:
            layer = state.layers[i]
            stores = [s for s in (layer.kv_entries, layer.index_keys) if s is not None]
            rows = max(rows_for(position, ratio, floor), *(s.capacity for s in stores))
            for store in stores:
                store.reserve(rows)
            self._room = min(self._room, rows * ratio)  # row ⌊p/ratio⌋ fits while p < this
        if unmoved():  # the stores had room
            return self._key
        self._keyed = (weakref.ref(state), cache.allocations())
        return tuple((t.data_ptr(), t.shape[0]) for t in _state_tensors(state))

    def _advance(self, state: SequenceState, position: int) -> None:
        """The host-side counts the replayed step cannot update itself."""
        state.position = position
        for i, ratio, _ in self._compressed:
            layer = state.layers[i]
            layer.kv_entries.n = position // ratio
            if layer.index_keys is not None:
                layer.index_keys.n = position // ratio

    # ------------------------------------------------------------------ segments

    def _segments(self, state: SequenceState) -> list[tuple[str, object]]:
        n = len(self.model.blocks)
        self._tables = _StepTables(self.model, self.pos, state, self._compressed)
        plan: list[tuple[str, object]] = []
        joined = None
        for cut in [*self.cuts, None]:
            first = 0 if joined is None else joined + 1
            last = n if cut is None else cut
            plan.append(("body", _Segment(self._body(state, joined, range(first, last), cut))))
            if cut is not None:
                plan.append(("cut", (cut, _Segment(self._device_part(cut)))))
            joined = cut
        return plan

    def _body(self, state, joined: int | None, layers: range, cut: int | None):
        """The segment function: after host layer `joined` (None: from the embedding), the
        full-device `layers`, then the attention and routing of layer `cut` (None: the head)."""
        model, c = self.model, self.config
        blocks = model.blocks
        step_tables = self._tables

        def body() -> None:
            # per step, not per layer or segment: the angles (main, compress), window slot,
            # visible rows, made by the first segment
            if joined is None:
                step_tables.fill()
            tables = step_tables.tables()
            mixes = None  # the next site's, as the hyper-connection update computed them
            if joined is None:
                x = self.embed.unsqueeze(1).expand(-1, c.hc_mult, -1)
            else:
                x, mixes = hc_post_then(
                    self.y, self.x, self.post, self.comb, self.host_y, self._mixes_of(joined + 1)
                )
            for i in layers:
                x, a, post, comb = self._attention(i, x, tables, state, mixes)
                experts, weights, _ = blocks[i].moe.step_route(a, self.ids)
                f, parts = blocks[i].moe.step_device_parts(a, experts, weights)
                x, mixes = hc_post_then(f, x, post, comb, parts, self._mixes_of(i + 1))
            if cut is None:
                self.logits.copy_(model.logits_from_streams(x, mixes)[0])
                return
            # the streams, MoE input, post and comb, then the routing, written by their kernels
            # into the fixed buffers the next segments read (no copies after)
            fixed = (self.x, self.xn, self.post, self.comb)
            _, a, _, _ = self._attention(cut, x, tables, state, mixes, fixed)
            blocks[cut].moe.step_route(a, self.ids, out=(self.experts, self.weights, self.host_ids))
            if self.xn_host is not self.xn:  # the CPU's kernels take another dtype
                self.xn_host.copy_(a)

        return body

    def _attention(self, i: int, x, tables, state, mixes, out=None):
        block = self.model.blocks[i]
        angles, at = tables
        cos, sin = angles[1] if block.spec.has_compressor else angles[0]
        return block.step_attention(x, self.pos, cos, sin, state.layers[i], at, mixes, out)

    def _mixes_of(self, layer: int) -> torch.Tensor:
        """The mixes weights of `layer`'s attention site (past the last layer: the head's)."""
        blocks = self.model.blocks
        return blocks[layer].hc_attn[0] if layer < len(blocks) else self.model.hc_head[0]

    def _device_part(self, layer: int):
        moe = self.model.blocks[layer].moe

        def device_part() -> None:
            moe.step_device(self.xn, self.experts, self.weights, out=self.y)

        return device_part
