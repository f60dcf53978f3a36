"""Per-sequence state of the V4 forward pass (spec §3): what decode needs from earlier tokens.

Per layer: a ring of the last `sliding_window` KV vectors; for compressed layers the compressed KV
entries emitted so far and the compressor's carry-over (projections of the tokens of the window
still open, and for the overlapping CSA compressor the A halves of the last closed window); for
CSA layers also the indexer's keys and its compressor carry. Everything is reset per sequence
(the reference relies on prefill overwriting its buffers; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class RowStore:
    """Rows appended over time, `[n, width]`, in a buffer that grows by doubling."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str):
        self.width = width
        self.dtype = dtype
        self.device = torch.device(device)
        self._buf = torch.empty(0, width, dtype=dtype, device=self.device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            grown = torch.empty(
                max(need, 2 * self._buf.shape[0], 16),
                self.width,
                dtype=self.dtype,
                device=self.device,
            )
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = rows.to(self.dtype)
        self.n = need

    def view(self) -> torch.Tensor:
        return self._buf[: self.n]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (the allocation may be up to 2× larger while growing)."""
        return self.n * self.width * self._buf.element_size()

    @property
    def allocated_bytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    def reset(self) -> None:
        self._buf = torch.empty(0, self.width, dtype=self.dtype, device=self.device)
        self.n = 0


class WindowRing:
    """The KV vectors of the last `size` positions; position p lives in slot p mod size."""

    def __init__(self, size: int, width: int, dtype: torch.dtype, device: torch.device | str):
        self.size = size
        self.buf = torch.zeros(size, width, dtype=dtype, device=device)

    def write(self, kv: torch.Tensor, start_pos: int) -> None:
        """kv `[S, width]` holds positions start_pos .. start_pos+S-1; keep the last `size`."""
        s = kv.shape[0]
        keep = min(s, self.size)
        positions = torch.arange(start_pos + s - keep, start_pos + s, device=self.buf.device)
        self.buf[positions % self.size] = kv[s - keep :].to(self.buf.dtype)

    def recent(self, end_pos: int, n: int) -> torch.Tensor:
        """Rows of positions end_pos-n .. end_pos-1 in order, `[n, width]` (n ≤ size)."""
        positions = torch.arange(end_pos - n, end_pos, device=self.buf.device)
        return self.buf[positions % self.size]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def reset(self) -> None:
        self.buf.zero_()


class CompressorCarry:
    """Compressor state between calls (float32): projections and gates (`ape` already added) of
    the tokens of the still-open window, in slots 0..(pos mod ratio)-1; for the overlapping
    compressor also the A halves of the last closed window (gates −∞ while there is none)."""

    def __init__(self, ratio: int, head: int, overlap: bool, device: torch.device | str):
        width = (2 if overlap else 1) * head
        self.ratio = ratio
        self.overlap = overlap
        self.kv = torch.zeros(ratio, width, device=device)
        self.gate = torch.full((ratio, width), float("-inf"), device=device)
        self.prev_kv = torch.zeros(ratio, head, device=device) if overlap else None
        self.prev_gate = (
            torch.full((ratio, head), float("-inf"), device=device) if overlap else None
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.kv, self.gate, self.prev_kv, self.prev_gate]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        self.kv.zero_()
        self.gate.fill_(float("-inf"))
        if self.overlap:
            self.prev_kv.zero_()
            self.prev_gate.fill_(float("-inf"))


@dataclass
class LayerState:
    window: WindowRing
    kv_entries: RowStore | None = None  # compressed KV entries, `[⌊N/m⌋, head_dim]`
    carry: CompressorCarry | None = None
    index_keys: RowStore | None = None  # CSA indexer keys, `[⌊N/4⌋, index_head_dim]`
    index_carry: CompressorCarry | None = None

    def parts(self) -> list:
        return [
            p
            for p in (self.window, self.kv_entries, self.carry, self.index_keys, self.index_carry)
            if p is not None
        ]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts())

    def reset(self) -> None:
        for p in self.parts():
            p.reset()


@dataclass
class SequenceState:
    """Everything one sequence needs to continue: per-layer caches and the next position."""

    layers: list[LayerState]
    mtp: list[LayerState] = field(default_factory=list)
    position: int = 0  # number of tokens already processed
    mtp_position: int = 0  # tokens processed by the MTP block(s)

    @property
    def nbytes(self) -> int:
        """Bytes held for this sequence (KV rows in use, rings, compressor state)."""
        return sum(layer.nbytes for layer in self.layers + self.mtp)

    def breakdown(self) -> dict[str, int]:
        """Bytes by kind: window rings, compressed KV, indexer keys, compressor state."""
        out = {"window": 0, "compressed_kv": 0, "index_keys": 0, "compressor_state": 0}
        for layer in self.layers + self.mtp:
            out["window"] += layer.window.nbytes
            if layer.kv_entries is not None:
                out["compressed_kv"] += layer.kv_entries.nbytes
            if layer.index_keys is not None:
                out["index_keys"] += layer.index_keys.nbytes
            for carry in (layer.carry, layer.index_carry):
                if carry is not None:
                    out["compressor_state"] += carry.nbytes
        return out

    def reset(self) -> None:
        for layer in self.layers + self.mtp:
            layer.reset()
        self.position = 0
        self.mtp_position = 0


def new_layer_state(
    *,
    window: int,
    head_dim: int,
    ratio: int,
    index_head_dim: int,
    kv_dtype: torch.dtype,
    device: torch.device | str,
) -> LayerState:
    """State of one layer: ratio 0 (window only), 4 (CSA: overlap + indexer) or other (HCA)."""
    state = LayerState(window=WindowRing(window, head_dim, kv_dtype, device))
    if ratio:
        overlap = ratio == 4
        state.kv_entries = RowStore(head_dim, kv_dtype, device)
        state.carry = CompressorCarry(ratio, head_dim, overlap, device)
        if overlap:
            state.index_keys = RowStore(index_head_dim, kv_dtype, device)
            state.index_carry = CompressorCarry(ratio, index_head_dim, True, device)
    return state
