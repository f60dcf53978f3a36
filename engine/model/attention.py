"""V4 attention: low-rank queries, one shared K=V vector per token, a 128-token sliding window,
compressed entries (CSA: top-k chosen by the indexer; HCA: all), attention sinks, inverse RoPE on
the output and the grouped low-rank output projection (spec §2.6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flashdesk.engine import gpu_kernels, kernels
from flashdesk.engine.cache import Fp8KeyRows, Fp8Rows, LayerState, RowStore
from flashdesk.engine.model import qsim
from flashdesk.engine.model.common import Linear, rms_norm
from flashdesk.engine.model.compressor import Compressor, step_together
from flashdesk.engine.model.indexer import Indexer, host_scores
from flashdesk.engine.model.rope import Rotary, apply_rope, norm_rope

# Above this many visible compressed entries, CSA gathers its top-k rows per query instead of
# scoring every entry and masking (a multiple of index_topk).
DENSE_CSA_FACTOR = 2
GATHER_QUERY_BLOCK = 16


def grouped_linear(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """o `[S, G·K]`, w `[G, R, K]` → `[S, G·R]`: group g's K inputs through w[g] (`wo_a`)."""
    groups = w.shape[0]
    return torch.einsum("sgk,grk->sgr", o.view(o.shape[0], groups, -1), w).flatten(1)


class _CompressedRows:
    """One prefill call's reads of a compressed store: every row decoded at most once (blocks
    that attend densely), a gathering block's picks decoded alone (a packed store is not
    widened whole to read 512 of its rows)."""

    def __init__(self, store: RowStore):
        self.store = store
        self._all: torch.Tensor | None = None

    def all(self) -> torch.Tensor:
        """`[n, d]` in the compute dtype."""
        if self._all is None:
            self._all = self.store.view()
        return self._all

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at `index` `[b, k]` → `[b, k, d]`."""
        return self.store.gather(index)

    def stored(self, t: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The first `t` rows as `kernels.sink_attention` reads them: the packed FP8 rows as
        stored (codes, exponents, rope), other formats decoded (a view where they need none)."""
        if isinstance(self.store.codec, Fp8Rows):
            return tuple(p[:t] for p in self.store.buffers())
        return self.all()[:t]


class _IndexKeys:
    """One prefill call's CSA indexer: the chunk's index queries and the store's keys. Scores by
    the GPU kernel (queries as computed, keys as stored: `gpu_kernels.index_scores`), the CPU
    kernel (`indexer.host_scores`), or the torch ops over the keys decoded once per call."""

    def __init__(
        self, store: RowStore, indexer: Indexer, qr, a, cos, sin, start: int, ratio: int, simulate
    ):
        self.store, self.indexer, self.start, self.ratio = store, indexer, start, ratio
        # as computed: the GPU kernel widens and scales them itself; the others take them widened
        self._q, self._w = indexer.queries(qr, a, cos, sin, simulate, widen=False)
        self._stored = _gpu_index_keys(store, indexer, self._q, whole=False)
        self._widened: tuple[torch.Tensor, torch.Tensor] | None = None
        self._keys: torch.Tensor | None = None

    def scores(self, q0: int, q1: int, t: int) -> torch.Tensor:
        """Queries q0..q1-1 of the chunk → scores of the store's first `t` keys `[b, t]`
        (float32; the GPU kernel also sets −∞ past each query's visible count)."""
        if self._stored is not None:
            keys, key_scale = self._stored
            pos = torch.arange(self.start + q0, self.start + q1, device=self._q.device)
            return gpu_kernels.index_scores(
                self._q[q0:q1], self._w[q0:q1], self.indexer.weight_scale, keys[:t], pos,
                self.ratio,
                None if key_scale is None else key_scale[:t],
            )  # fmt: skip
        if self._widened is None:
            self._widened = self.indexer.widen(self._q, self._w)
        qi, wi = (x[q0:q1] for x in self._widened)
        got = host_scores(qi, wi, self.store, t)
        if got is not None:
            return got
        if self._keys is None:
            self._keys = self.store.view().float()
        return self.indexer.scores(qi, wi, self._keys[:t])


def _gpu_index_keys(store: RowStore, indexer: Indexer, q: torch.Tensor, whole: bool):
    """(keys, key scales or None) as `gpu_kernels.index_scores` reads them — every row of the
    store's capacity (`whole`: a decode step's fixed shapes) or the rows it holds — where that
    kernel applies to these queries `q` (on a GPU, checked there; keys of q's dtype, or FP8 with
    a scale per key); else None."""
    fp8 = isinstance(store.codec, Fp8KeyRows)
    fits = (fp8 or store.codec.dtype == q.dtype) and all(
        n >= 16 and not n & (n - 1) for n in (indexer.n_heads, indexer.head_dim)
    )
    if not (fits and gpu_kernels.applies(q)) or not gpu_kernels.checked("indexer scores", q.device):
        return None
    if fp8:
        codes, scale = store.buffers()
        return (codes, scale) if whole else (codes[: store.n], scale[: store.n])
    return (store.rows(), None) if whole else (store.view(), None)


class StepPositions:
    """What each layer of a decode step derives from the position alone (its window slot, the
    compressed rows visible in a store of a given capacity and ratio), made once per step and
    shared by the layers: on a GPU each was a few kernels per layer."""

    def __init__(self, pos: torch.Tensor, made: dict | None = None):  # [1] int64 on the device
        self.pos = pos
        # `made`: tables already made for this position (a captured step's fixed buffers)
        self._made: dict[tuple, torch.Tensor] = dict(made or {})

    def slot(self, window: int) -> torch.Tensor:
        """pos mod window `[1]`."""
        key = ("slot", window)
        if key not in self._made:
            self._made[key] = self.pos % window
        return self._made[key]

    def visible(self, capacity: int, ratio: int) -> torch.Tensor:
        """`[capacity]` bool: the rows below the visible count ⌊(pos+1)/ratio⌋."""
        key = ("visible", capacity, ratio)
        if key not in self._made:
            rows = torch.arange(capacity, device=self.pos.device)
            self._made[key] = rows < (self.pos + 1) // ratio
        return self._made[key]


class Attention:
    def __init__(
        self,
        *,
        wq_a: Linear,  # [q_lora, D]
        q_norm: torch.Tensor,  # [q_lora] fp32
        wq_b: Linear,  # [H·d, q_lora]
        wkv: Linear,  # [d, D]
        kv_norm: torch.Tensor,  # [d] fp32
        wo_a: torch.Tensor,  # [G·R, H·d/G]
        wo_b: Linear,  # [D, G·R]
        sink: torch.Tensor,  # [H] fp32
        n_heads: int,
        head_dim: int,
        o_groups: int,
        window: int,
        ratio: int,
        rotary: Rotary,
        eps: float,
        compressor: Compressor | None = None,
        indexer: Indexer | None = None,
    ):
        self.wq_a, self.q_norm, self.wq_b = wq_a, q_norm, wq_b
        self.wkv, self.kv_norm = wkv, kv_norm
        # the GPU runtime's wq_a and wkv in one launch (`gpu_linears.JoinedRows`), or None
        self.wq_a_wkv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        # a CSA layer's on the GPU: wq_b with the indexer's wq_b, and the compressors' wkv and
        # wgate with the indexer's weights_proj, each in one launch (`runtime.join_gpu_linears`)
        self.wq_b_ix: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self.csa_inputs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        # a compressed layer's on the GPU: a → ((q_a, kv), the compressors' projections as
        # csa_inputs or the compressor's wkv_wgate gives them) in one launch
        self.step_inputs: Callable[[torch.Tensor], tuple[tuple, tuple]] | None = None
        self.wo_a = wo_a.view(o_groups, -1, wo_a.shape[-1])  # [G, R, H·d/G]
        self.wo_b = wo_b
        self.sink = sink
        self.n_heads, self.head_dim, self.o_groups = n_heads, head_dim, o_groups
        self.window = window
        self.ratio = ratio
        self.rotary = rotary
        self.eps = eps
        self.scale = head_dim**-0.5
        self.compressor = compressor
        self.indexer = indexer

    def forward(
        self,
        a: torch.Tensor,
        start: int,
        state: LayerState,
        query_block: int = 128,
        simulate: bool = False,
    ) -> torch.Tensor:
        """a `[S, D]` (normed block input) for positions start..start+S-1 → `[S, D]`."""
        s = a.shape[0]
        dtype = a.dtype
        cos, sin = self.rotary.cos_sin_span(start, s, a.device)
        qr, q, kv = self._project(a, cos, sin, simulate)

        n_prev = min(start, self.window - 1)
        keys = torch.cat((state.window.recent(start, n_prev).to(kv.dtype), kv))
        state.window.write(kv, start)

        entries = index_keys = None
        if self.compressor is not None:
            new = self.compressor.update(a, start, state.carry, dtype, simulate)
            state.kv_entries.append(new)
            entries = _CompressedRows(state.kv_entries)
        if self.indexer is not None:
            new = self.indexer.compressor.update(a, start, state.index_carry, dtype, simulate)
            state.index_keys.append(new)
            index_keys = _IndexKeys(
                state.index_keys, self.indexer, qr, a, cos, sin, start, self.ratio, simulate
            )

        o = torch.empty(s, self.n_heads, self.head_dim, dtype=torch.float32, device=a.device)
        block = query_block
        if self.indexer is not None:
            visible_max = (start + s) // self.ratio
            if visible_max > DENSE_CSA_FACTOR * self.indexer.topk:
                block = min(block, GATHER_QUERY_BLOCK)
        for q0 in range(0, s, block):
            q1 = min(s, q0 + block)
            o[q0:q1] = self._attend_block(
                q[q0:q1], keys, n_prev, start, q0, q1, entries, index_keys
            )
        return self._output(o, dtype, cos, sin, simulate)

    def step(
        self,
        a: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: LayerState,
        at: StepPositions | None = None,
    ) -> torch.Tensor:
        """One decode token a `[1, D]` at device position `pos` (`[1]` int64; cos/sin `[1, r/2]`
        of it) → `[1, D]`, with every shape fixed by the state's capacities and nothing read
        back to the host: a step a CUDA graph can capture and replay (`engine.decode_graphs`).

        The query sees the whole window ring in slot order (slots past `pos` masked while the
        ring fills) and the compressed rows of the store's capacity, masked past the visible
        count ⌊(pos+1)/m⌋; CSA picks its top-k of them. The same attention as `forward` for one
        token, with float32 sums in another order. The caller reserves the stores (compressed
        entries and index keys of the same capacity, ≥ 1 + ⌊pos/m⌋) and advances their `n`.
        `at`: the step's `StepPositions`, shared by its layers.
        """
        at = at or StepPositions(pos)
        # a store of at most top-k rows is attended whole (as `forward` does): no indexer
        # queries, scores or top-k (the first 4·top-k tokens of a context)
        indexing = self.indexer is not None and state.kv_entries.capacity > self.indexer.topk
        qr, q, kv, inputs, index_q = self._step_project(a, cos, sin, indexing)
        device = a.device
        slot = at.slot(self.window)
        on_gpu = (
            gpu_kernels.applies(q)
            and gpu_kernels.decode_attention_fits(q.shape[-1])
            and gpu_kernels.checked("decode attention", device)
        )
        # the GPU's attention writes the token's row into a plain ring itself, after its reads
        seams = on_gpu and gpu_kernels.FUSED_SEAMS
        ring = state.window.as_stored(kv.dtype) if seams else None
        if ring is None:
            state.window.put(kv, slot)
        entries = visible = picks = None
        if self.compressor is not None:
            projected = (None, None) if inputs is None else (inputs[:2], inputs[2:4])
            steps = [(self.compressor, state.carry, state.kv_entries, projected[0])]
            if self.indexer is not None:
                steps.append((self.indexer.compressor, state.index_carry, state.index_keys,
                              projected[1]))  # fmt: skip
            step_together(steps, a, pos, a.dtype)
            store = state.kv_entries
            visible = at.visible(store.capacity, self.ratio)
            if self.indexer is not None:
                ix = self.indexer
                if indexing:
                    keys = state.index_keys
                    q_ix, w_ix = index_q or ix.queries(qr, a, cos, sin, widen=False)
                    stored = _gpu_index_keys(keys, ix, q_ix, whole=True)
                    if stored is not None:  # one launch, −∞ past the visible rows
                        picked = gpu_kernels.index_scores(
                            q_ix[0], w_ix[0], ix.weight_scale, stored[0], pos, self.ratio,
                            stored[1],
                        )  # fmt: skip
                    else:  # the CPU kernel, or the torch ops (w as weights_proj gives it)
                        qi, wi = ix.widen(q_ix, w_ix.to(a.dtype))
                        scores = host_scores(qi, wi, keys, keys.capacity)
                        if scores is None:
                            scores = ix.scores(qi, wi, keys.rows())
                        picked = scores[0].masked_fill(~visible, float("-inf"))  # [C]
                    # unsorted: the picks are a set to attend, and sorting them was 0.45 ms of
                    # a 43-layer H200 step (torch's radix sort after its selection; run 6)
                    picked = picked.topk(self.indexer.topk, sorted=False).indices
                    if seams and store.as_stored(q.dtype) is not None:  # read where they lie
                        entries, picks = store.rows(), picked
                    else:
                        entries, visible = store.gather(picked), visible[picked]  # [k, d], [k]
            if entries is None:
                entries = store.rows()  # [C, d]
        if on_gpu:  # the ring write and the de-rotation in the attention's last launch
            o = gpu_kernels.decode_attention(
                q, state.window.slots() if ring is None else ring, kv, entries, visible, pos,
                self.sink, self.scale, keep_own=ring is not None,
                rope=(cos, sin, a.dtype) if seams else None, picks=picks,
            )  # fmt: skip
            return self._projected(o, False) if seams else self._output(o, a.dtype, cos, sin, False)
        window = state.window.slots()  # [W, d]
        # the token's own row as computed, as `forward` uses it (a packed ring rounds it)
        keys = window.float().index_copy(0, slot, kv.float())
        qf = q.float()  # [1, H, d]
        written = torch.arange(self.window, device=device) <= pos
        logits = [torch.einsum("qhd,kd->qhk", qf, keys).masked_fill(~written, float("-inf"))]
        values = [keys]
        if entries is not None:
            comp = entries.float()
            logits.append(
                torch.einsum("qhd,td->qht", qf, comp).masked_fill(~visible, float("-inf"))
            )
            values.append(comp)
        return self._output(self._sink_attend(logits, values), a.dtype, cos, sin, False)

    def _step_project(self, a, cos, sin, indexing: bool):
        """A decode step's `_project` → qr (None where not needed), q, kv, the compressors'
        projections (kv and gate of each, then the indexer's head weights where joined) or
        None, and the indexer's queries and head weights where `indexing`, or None. On a GPU
        with FUSED_SEAMS and the fused norms in fewer launches: one projects a for q_a, kv and
        the compressors (and the indexer's weights), `wq_b` (in a CSA layer joined with the
        indexer's) normalizes q_a as it reads it, and one launch ropes q, kv and the index
        queries."""
        joined = self.indexer is None or (self.wq_b_ix is not None and self.csa_inputs is not None)
        if not (
            self.wq_a_wkv is not None
            and joined
            and gpu_kernels.FUSED_SEAMS
            and gpu_kernels.applies(a)
            and gpu_kernels.fusing_norms(a.device)
        ):
            return (*self._project(a, cos, sin, False), None, None)
        if self.step_inputs is not None:
            (qa, kva), inputs = self.step_inputs(a)
        else:
            (qa, kva), inputs = self.wq_a_wkv(a), self.csa_inputs and self.csa_inputs(a)
        norm = (self.q_norm, self.eps)
        ix = self.indexer
        q_ix = None
        if indexing:
            q, q_ix = self.wq_b_ix(qa, norm=norm)
        else:
            q = self.wq_b(qa, norm=norm)
        parts = [(q.view(1, self.n_heads, self.head_dim), None, True), (kva, self.kv_norm, True)]
        if q_ix is not None:
            parts.append((q_ix.view(1, ix.n_heads, ix.head_dim), None, False))
        roped = gpu_kernels.norm_ropes(parts, self.eps, cos, sin)
        index_q = None
        if q_ix is not None:
            w = inputs[4] if len(inputs) > 4 else ix.weights_proj(a)
            index_q = (roped[2], w)
        return None, roped[0], roped[1], inputs, index_q

    def _project(self, a, cos, sin, simulate):
        """a `[S, D]` → low-rank query qr `[S, q_lora]`, roped queries `[S, H, d]`, roped KV `[S, d]`."""
        s = a.shape[0]
        rd = self.rotary.rope_dim
        if self.wq_a_wkv is not None and not simulate:
            qa, kva = self.wq_a_wkv(a)
        else:
            qa, kva = self.wq_a(a, simulate), self.wkv(a, simulate)
        qr = rms_norm(qa, self.q_norm, self.eps)
        q = self.wq_b(qr, simulate).view(s, self.n_heads, self.head_dim)
        q = norm_rope(q, None, self.eps, cos, sin)
        kv = norm_rope(kva, self.kv_norm, self.eps, cos, sin)
        if simulate:
            kv = torch.cat((qsim.fp8_snap(kv[:, :-rd], 64), kv[:, -rd:]), -1)
        return qr, q, kv

    def _output(self, o, dtype, cos, sin, simulate):
        """Attention output `[S, H, d]` float32 → `dtype`, de-rotated, through wo_a and wo_b →
        `[S, D]`."""
        o = apply_rope(o, cos, sin, inverse=True, out_dtype=dtype)
        return self._projected(o, simulate)

    def _projected(self, o: torch.Tensor, simulate: bool) -> torch.Tensor:
        """De-rotated attention output `[S, H, d]` (the model's dtype) through wo_a and wo_b."""
        return self.wo_b(self._grouped_out(o.view(o.shape[0], -1)), simulate)

    def _grouped_out(self, o: torch.Tensor) -> torch.Tensor:
        """`[S, G·H·d/G]` → `[S, G·R]`: group g's slice of o through wo_a[g] (spec §2.4). The
        CPU runtime puts a callable here instead of the tensor (the FP8 kernel, grouped)."""
        if not isinstance(self.wo_a, torch.Tensor):
            return self.wo_a(o)
        return grouped_linear(o, self.wo_a)

    def _attend_block(
        self,
        q: torch.Tensor,  # [b, H, d]
        keys: torch.Tensor,  # [n_prev + S, d]: positions start-n_prev .. start+S-1
        n_prev: int,
        start: int,
        q0: int,
        q1: int,
        entries: _CompressedRows | None,  # T compressed KV rows `[T, d]`
        index_keys: _IndexKeys | None,  # the CSA indexer's queries and keys
    ) -> torch.Tensor:
        """Sink softmax over window + compressed candidates for queries q0..q1-1 of the chunk.

        One query (a decode step) sees every key it is given, so its masks are all true and are
        not built: no mask ops, and no device sync for the visible count (known on the host)."""
        device = q.device
        one = q1 - q0 == 1
        qf = q.float()
        lo = max(0, q0 + n_prev - (self.window - 1))
        kw = keys[lo : q1 + n_prev].float()
        t_max = (start + q1) // self.ratio if entries is not None else 0  # entries complete
        if one and device.type == "cpu":
            return self._attend_one(qf, kw, t_max, entries, index_keys, q0)
        lw = torch.einsum("qhd,kd->qhk", qf, kw)
        if not one:
            qpos = start + torch.arange(q0, q1, device=device)
            kpos = start - n_prev + torch.arange(lo, q1 + n_prev, device=device)
            in_window = (kpos[None, :] <= qpos[:, None]) & (
                kpos[None, :] > qpos[:, None] - self.window
            )
            lw.masked_fill_(~in_window[:, None, :], float("-inf"))
        logits = [lw]
        values = [kw]
        gathered = None
        if t_max > 0:
            allowed = visible = None
            if not one:
                visible = (start + torch.arange(q0, q1, device=device) + 1) // self.ratio
                allowed = torch.arange(t_max, device=device)[None, :] < visible[:, None]  # [b, T]
            if self.indexer is not None and t_max > self.indexer.topk:
                scores = index_keys.scores(q0, q1, t_max)
                if allowed is not None:
                    scores = scores.masked_fill(~allowed, float("-inf"))
                picked = scores.topk(self.indexer.topk, dim=-1).indices  # [b, k]
                valid = None if one else picked < visible[:, None]
                if t_max > DENSE_CSA_FACTOR * self.indexer.topk:
                    gathered = (entries.at(picked).float(), valid)  # [b, k, d], [b, k]
                else:
                    if allowed is None:
                        allowed = torch.zeros((1, t_max), dtype=torch.bool, device=device)
                        allowed.scatter_(-1, picked, True)
                    else:
                        allowed = torch.zeros_like(allowed).scatter_(-1, picked, valid)
            if gathered is None:
                comp = entries.all()[:t_max].float()
                lc = torch.einsum("qhd,td->qht", qf, comp)
                if allowed is not None:
                    lc.masked_fill_(~allowed[:, None, :], float("-inf"))
                logits.append(lc)
                values.append(comp)
            else:
                rows, valid = gathered
                lc = torch.einsum("qhd,qkd->qhk", qf, rows)
                if valid is not None:
                    lc.masked_fill_(~valid[:, None, :], float("-inf"))
                logits.append(lc)
        if gathered is not None:
            values.append(gathered[0])
        return self._sink_attend(logits, values)

    def _attend_one(self, qf, kw, t_max, entries, index_keys, q0: int) -> torch.Tensor:
        """One query on the CPU (a decode step; query q0 of its call): its window rows `kw`
        `[n, d]` and the `t_max` compressed rows it sees — CSA's top-k picks, gathered, else
        every entry as stored, packed FP8 rows included — attended by the C kernel
        (`kernels.sink_attention`: no float32 copy of an HCA layer's context/128 entries, no
        torch threads) → `[1, H, d]`."""
        sets = [kw]
        if t_max > 0:
            if self.indexer is not None and t_max > self.indexer.topk:
                scores = index_keys.scores(q0, q0 + 1, t_max)
                picked = scores.topk(self.indexer.topk, dim=-1).indices  # [1, k]
                sets.append(entries.at(picked)[0])
            else:
                sets.append(entries.stored(t_max))
        sets = [
            r if isinstance(r, tuple)
            else (r if r.dtype in (torch.float32, torch.bfloat16) else r.float()).contiguous()
            for r in sets
        ]  # fmt: skip
        out = kernels.sink_attention(qf[0].contiguous(), self.sink.float().contiguous(), sets,
                                     self.scale)  # fmt: skip
        return out.unsqueeze(0)

    def _sink_attend(self, logits: list, values: list) -> torch.Tensor:
        """Softmax over all candidates and the per-head sink, then Σ prob · value → `[b, H, d]`.
        logits[i] `[b, H, n_i]` float32 (scaled here); values[i] `[n_i, d]` shared by the b
        queries, or `[b, n_i, d]` gathered per query."""
        sink = self.sink.view(1, -1, 1).expand(logits[0].shape[0], -1, 1)
        probs = torch.cat([lg * self.scale for lg in logits] + [sink], dim=-1).softmax(dim=-1)
        out = None
        offset = 0
        for v in values:
            n = v.shape[-2]
            p = probs[..., offset : offset + n]
            part = torch.einsum("qhk,kd->qhd" if v.dim() == 2 else "qhk,qkd->qhd", p, v)
            out = part if out is None else out + part
            offset += n
        return out
