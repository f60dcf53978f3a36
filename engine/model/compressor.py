"""KV compressor: gated pooling of every `ratio` tokens into one entry (spec §2.6.1).

Ratio 4 (CSA) overlaps windows: each token's projection has an A half (pooled into the *next*
entry) and a B half (pooled into its own window's entry), so entry i pools 8 slots with stride 4.
Other ratios (HCA, 128) pool non-overlapping windows. Pooling is a per-channel softmax of the gates
over the slots (float32), then RMSNorm, RoPE at position ratio·i, and, when simulating the
reference's quantisation, FP8 snapping of the no-rope channels (main compressor) or Hadamard +
FP4 snapping (the indexer's compressor).

Any chunking of the tokens gives the same entries: the tokens of an open window and the A halves
of the last closed one are carried in `CompressorCarry` between calls. `step` is one decode token
with fixed shapes (for a CUDA graph): it pools the open window on every token into the row of the
entry being formed, which becomes visible when its window closes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flashdesk.engine import gpu_kernels
from flashdesk.engine.cache import CompressorCarry, RowStore
from flashdesk.engine.model import qsim
from flashdesk.engine.model.common import float_linear, rms_norm
from flashdesk.engine.model.rope import Rotary, apply_rope


class Compressor:
    def __init__(
        self,
        *,
        wkv: torch.Tensor,  # [(1+ov)·c, D] float32
        wgate: torch.Tensor,  # [(1+ov)·c, D] float32
        ape: torch.Tensor,  # [ratio, (1+ov)·c] float32
        norm: torch.Tensor,  # [c] float32
        ratio: int,
        rotary: Rotary,
        eps: float,
        for_indexer: bool,
    ):
        self.ratio = ratio
        self.overlap = ratio == 4
        self.head = norm.shape[0]
        self.wkv, self.wgate, self.ape, self.norm = wkv, wgate, ape, norm
        # the GPU runtime's wkv and wgate in one launch (`gpu_linears.JoinedRows`), or None
        self.wkv_wgate: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self.rotary = rotary
        self.eps = eps
        self.for_indexer = for_indexer

    def _projections(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a `[S, D]` (any float dtype: widened by the linears) → kv, gate `[S, (1+ov)·c]`
        float32, the gate before its positional bias; one launch where joined on a GPU."""
        if self.wkv_wgate is not None:
            kv, gate = self.wkv_wgate(a)
            return kv, gate
        return float_linear(a, self.wkv), float_linear(a, self.wgate)

    def _kernel_part(self, kv, gate, carry, store, out_dtype) -> dict | None:
        """`gpu_kernels.compressor_step`'s arguments but pos for this step, where it applies
        (a GPU whose kernel passed its check, a power-of-two head), else None."""
        c = self.head
        if not (gpu_kernels.applies(kv) and not c & (c - 1)):
            return None
        if not gpu_kernels.checked("compressor step", kv.device):
            return None
        into = store.as_stored(out_dtype) if gpu_kernels.FUSED_SEAMS else None
        return {"kv_new": kv, "gate_new": gate, "ape": self.ape, "carry": carry,
                "norm": self.norm, "inv_freq": self.rotary.inv_freq, "eps": self.eps,
                "out_dtype": out_dtype, "into": into}  # fmt: skip

    def update(
        self,
        a: torch.Tensor,
        start: int,
        carry: CompressorCarry,
        out_dtype: torch.dtype,
        simulate: bool = False,
    ) -> torch.Tensor:
        """Feed tokens start..start+S-1 (a `[S, D]`); return the entries they close, `[E, c]`.

        The returned entries have ids (start - start % ratio) / ratio + 0..E-1, i.e. they follow
        the entries already emitted for this sequence.
        """
        m, c = self.ratio, self.head
        s = a.shape[0]
        kv, gate = self._projections(a)  # [S, (1+ov)·c] float32 each
        n_open = start % m
        if n_open + s < m:  # no window closes (most decode steps): only the carry grows
            gate = gate + self.ape[n_open : n_open + s]
            carry.kv[n_open : n_open + s] = kv
            carry.gate[n_open : n_open + s] = gate
            return torch.empty(0, c, dtype=out_dtype, device=a.device)
        positions = torch.arange(start, start + s, device=a.device)
        gate = gate + self.ape[positions % m]
        # the open window's new tokens also go into their carry slots, though it closes here:
        # then the call's last token can be taken back out (`SequenceState.drop_last`) and the
        # window closed again by another one
        first = m - n_open
        carry.kv[n_open:] = kv[:first]
        carry.gate[n_open:] = gate[:first]
        if n_open:
            kv = torch.cat((carry.kv[:n_open], kv))
            gate = torch.cat((carry.gate[:n_open], gate))
        n_windows = kv.shape[0] // m
        used = n_windows * m
        rest = kv.shape[0] - used
        first = (start - n_open) // m
        if n_windows == 0:
            carry.kv[:rest] = kv
            carry.gate[:rest] = gate
            return torch.empty(0, c, dtype=out_dtype, device=a.device)
        win_kv = kv[:used].view(n_windows, m, -1)
        win_gate = gate[:used].view(n_windows, m, -1)
        if self.overlap:
            prev_kv = torch.cat((carry.prev_kv[None], win_kv[:-1, :, :c]))
            prev_gate = torch.cat((carry.prev_gate[None], win_gate[:-1, :, :c]))
            slots_kv = torch.cat((prev_kv, win_kv[:, :, c:]), dim=1)  # [n, 2m, c]
            slots_gate = torch.cat((prev_gate, win_gate[:, :, c:]), dim=1)
            carry.prev_kv.copy_(win_kv[-1, :, :c])
            carry.prev_gate.copy_(win_gate[-1, :, :c])
        else:
            slots_kv, slots_gate = win_kv, win_gate
        carry.kv[:rest] = kv[used:]
        carry.gate[:rest] = gate[used:]
        pooled = (slots_kv * slots_gate.softmax(dim=1)).sum(dim=1)  # [n, c] float32
        entries = rms_norm(pooled.to(out_dtype), self.norm, self.eps)
        entry_pos = (torch.arange(first, first + n_windows, device=a.device)) * m
        cos, sin = self.rotary.cos_sin(entry_pos)
        entries = apply_rope(entries, cos, sin)
        if simulate:
            if self.for_indexer:
                entries = qsim.fp4_snap(qsim.hadamard(entries), 32)
            else:
                rd = self.rotary.rope_dim
                entries = torch.cat((qsim.fp8_snap(entries[:, :-rd], 64), entries[:, -rd:]), -1)
        return entries

    def step(
        self,
        a: torch.Tensor,
        pos: torch.Tensor,
        carry: CompressorCarry,
        store: RowStore,
        out_dtype: torch.dtype,
        projected: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """One token a `[1, D]` at device position `pos` (`[1]` int64): its projection goes into
        carry slot pos mod m, and the window pooled so far into `store` row ⌊pos/m⌋ (scratch
        until the window closes: the caller's visible count is ⌊(pos+1)/m⌋). Every shape is fixed
        and nothing is read back to the host, so the step can be captured in a CUDA graph; at a
        closing token it writes the entry `update` would return (float32 sums in another order).
        `projected`: kv and gate as `_projections(a)` gives them, made already (a CSA layer's
        joined launch, `Attention.csa_inputs`).
        """
        m, c = self.ratio, self.head
        kv, gate = projected if projected is not None else self._projections(a)
        part = self._kernel_part(kv, gate, carry, store, out_dtype)
        if part is not None:  # after the GEMVs, one launch
            entry = gpu_kernels.compressor_step(pos=pos, **part)
            if entry is not None:  # a store that encodes its rows (FP8)
                store.put(*entry)
            return
        slot = pos % m
        carry.kv.index_copy_(0, slot, kv)
        carry.gate.index_copy_(0, slot, gate + self.ape.index_select(0, slot))
        if gpu_kernels.applies(a):  # the pooling alone in one launch, no concatenation
            second = (carry.kv[:, c:], carry.gate[:, c:]) if self.overlap else None
            first = (carry.prev_kv, carry.prev_gate) if self.overlap else (carry.kv, carry.gate)
            pooled = gpu_kernels.softmax_pool(first, second)
        else:
            if self.overlap:
                slots_kv = torch.cat((carry.prev_kv, carry.kv[:, c:]))  # [2m, c]
                slots_gate = torch.cat((carry.prev_gate, carry.gate[:, c:]))
            else:
                slots_kv, slots_gate = carry.kv, carry.gate
            pooled = (slots_kv * slots_gate.softmax(dim=0)).sum(dim=0, keepdim=True)  # [1, c]
        entry = rms_norm(pooled.to(out_dtype), self.norm, self.eps)
        index = pos // m
        cos, sin = self.rotary.cos_sin(index * m)
        store.put(apply_rope(entry, cos, sin), index)
        if self.overlap:  # a closing window's A halves pool into the next entry
            closing = slot == m - 1
            carry.prev_kv.copy_(torch.where(closing, carry.kv[:, :c], carry.prev_kv))
            carry.prev_gate.copy_(torch.where(closing, carry.gate[:, :c], carry.prev_gate))


def step_together(
    steps: Sequence[tuple[Compressor, CompressorCarry, RowStore, Sequence[torch.Tensor] | None]],
    a: torch.Tensor,
    pos: torch.Tensor,
    out_dtype: torch.dtype,
) -> None:
    """`Compressor.step` of a layer's two compressors for one token (a CSA layer's and its
    indexer's: (compressor, carry, store, projected)): on a GPU with FUSED_SEAMS one launch of
    a program each (`gpu_kernels.compressor_steps`), else one after the other."""
    projected = [p if p is not None else comp._projections(a) for comp, _, _, p in steps]
    parts = [comp._kernel_part(*kv_gate, carry, store, out_dtype)
             for (comp, carry, store, _), kv_gate in zip(steps, projected, strict=True)]  # fmt: skip
    if len(steps) == 2 and gpu_kernels.FUSED_SEAMS and all(p is not None for p in parts):
        for (_, _, store, _), entry in zip(steps, gpu_kernels.compressor_steps(parts, pos),
                                           strict=True):  # fmt: skip
            if entry is not None:  # a store that encodes its rows (FP8)
                store.put(*entry)
        return
    for (comp, carry, store, _), kv_gate in zip(steps, projected, strict=True):
        comp.step(a, pos, carry, store, out_dtype, kv_gate)
