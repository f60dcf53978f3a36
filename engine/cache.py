"""Per-sequence state of the V4 forward pass (spec §3): what decode needs from earlier tokens.

Per layer: a ring of the last `sliding_window` KV vectors; for compressed layers the compressed KV
entries emitted so far and the compressor's carry-over (projections of the tokens of the window
still open, and for the overlapping CSA compressor the A halves of the last closed window); for
CSA layers also the indexer's keys and its compressor carry. Everything is reset per sequence
(the reference relies on prefill overwriting its buffers; we do not).

KV rows (window and compressed entries) are stored in the model's dtype ("native"), in BF16
("bf16": the reference cache, half the bytes of a float32 model's rows) or packed ("fp8": E4M3
no-rope channels + E8M0 scale per 64 + rope channels, spec §3.2; index keys then E4M3 with one
float32 scale per key, or FP4 where that is exact). `nbytes` and `breakdown()` report what a
sequence holds; a plan's `kv_dtype` names the same formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashdesk.engine import gpu_kernels
from flashdesk.engine.model.qsim import FP4_MAX, FP4_VALUES, FP8_MAX, fp4_round, pow2_ceil

KV_FORMATS = ("native", "bf16", "fp8")

# Buffers (re)allocated by any state part so far: a captured decode step's buffer addresses can
# only have moved where this count has (`decode_graphs` compares it instead of ~300 pointers).
_allocations = 0


def allocations() -> int:
    return _allocations


def _allocated() -> None:
    global _allocations
    _allocations += 1


def _new_parts(codec, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`codec.empty(n, device)`, counted in `allocations()`: every store and ring allocates here."""
    _allocated()
    return codec.empty(n, device)


class _Codec:
    """How rows are stored: `empty`, `encode` rows `[n, width]` → parts, `decode` parts → rows.
    The row-indexed reads and writes below are what a decode step uses (device indices, fixed
    shapes); a codec may run them as fused kernels."""

    def write_rows(self, parts, rows: torch.Tensor, index: torch.Tensor) -> None:
        """rows `[n, width]` encoded into parts at rows `index` `[n]` int64 (on their device)."""
        for buf, enc in zip(parts, self.encode(rows), strict=True):
            buf.index_copy_(0, index, enc)

    def as_stored(self, parts, dtype: torch.dtype) -> torch.Tensor | None:
        """The buffer rows of `dtype` are kept in unchanged, where there is one (NativeRows of
        that dtype): a kernel may write rows there itself. None: rows go through `write_rows`."""
        return None

    def read_rows(self, parts, index: torch.Tensor | None = None) -> torch.Tensor:
        """The rows at `index` `[n]` int64 (None: every row) decoded → `[n, width]`."""
        return self.decode(
            parts if index is None else tuple(p.index_select(0, index) for p in parts)
        )


class NativeRows(_Codec):
    """Rows kept as they are computed (the model's dtype): one buffer."""

    def __init__(self, width: int, dtype: torch.dtype):
        self.width, self.dtype = width, dtype

    def empty(self, n: int, device) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(n, self.width, dtype=self.dtype, device=device),)

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (rows.to(self.dtype),)

    def as_stored(self, parts, dtype: torch.dtype) -> torch.Tensor | None:
        return parts[0] if dtype == self.dtype else None

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return parts[0]


class Fp8Rows(_Codec):
    """The packed KV layout of spec §3.2: the no-rope channels as E4M3 codes with one E8M0
    (power-of-two) scale per 64, the rope channels in BF16 — 583 bytes per 512-d entry instead of
    1024. Lossless against the reference's BF16 cache for rows its FP8 simulation produced
    (`simulate_quant=True`); otherwise the no-rope channels are rounded to FP8. Rows decode to
    `dtype` (the compute dtype)."""

    BLOCK = 64

    @classmethod
    def unfit_reason(cls, width: int, rope_dim: int) -> str | None:
        """Why rows of `width` channels (the last `rope_dim` roped) cannot take this layout."""
        nope = width - rope_dim
        if nope % cls.BLOCK:
            return (
                f"the FP8 KV layout needs no-rope channels in blocks of {cls.BLOCK}; this model's "
                f"KV rows have {nope} no-rope channels"
            )
        return None

    def __init__(self, width: int, rope_dim: int, dtype: torch.dtype):
        reason = self.unfit_reason(width, rope_dim)
        if reason:
            raise ValueError(f"{reason}. Use kv_format='native'.")
        self.nope = width - rope_dim
        self.width, self.rope_dim, self.dtype = width, rope_dim, dtype
        self.fusable = gpu_kernels.fp8_rows_fits(self.nope, rope_dim)

    def _fused(self, t: torch.Tensor) -> bool:
        """A decode step's row reads and writes on a GPU as one launch each (~25 kernels per
        layer and token fewer), bit for bit the torch encode/decode (checked once per GPU)."""
        return (
            self.fusable and gpu_kernels.applies(t) and gpu_kernels.checked("FP8 KV rows", t.device)
        )

    def write_rows(self, parts, rows: torch.Tensor, index: torch.Tensor) -> None:
        if self._fused(rows):
            gpu_kernels.fp8_rows_put(parts, rows, index)
        else:
            super().write_rows(parts, rows, index)

    def read_rows(self, parts, index: torch.Tensor | None = None) -> torch.Tensor:
        if self._fused(parts[0]):
            return gpu_kernels.fp8_rows_read(parts, index, self.dtype)
        return super().read_rows(parts, index)

    def empty(self, n: int, device) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(n, self.nope, dtype=torch.uint8, device=device),
            torch.full((n, self.nope // self.BLOCK), 127, dtype=torch.uint8, device=device),
            torch.zeros(n, self.rope_dim, dtype=torch.bfloat16, device=device),
        )

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nope = rows[:, : self.nope].float().unflatten(-1, (-1, self.BLOCK))
        amax = nope.abs().amax(-1, keepdim=True).clamp_min(1e-4)
        scale = pow2_ceil(amax / FP8_MAX)
        codes = (nope / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        exponent = torch.frexp(scale)[1] - 1 + 127  # scale = 2^(exponent - 127)
        return (
            codes.view(torch.uint8).flatten(-2),
            exponent.squeeze(-1).to(torch.uint8),
            rows[:, self.nope :].to(torch.bfloat16),
        )

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        codes, exponent, rope = parts
        values = codes.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, self.BLOCK))
        scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.int() - 127)
        nope = (values * scale[..., None]).flatten(-2)
        return torch.cat((nope, rope.float()), -1).to(self.dtype)


class Fp8KeyRows(_Codec):
    """Index keys as E4M3 codes with one float32 scale per key (vLLM's `fp8_ds_mla` layout, spec
    §3.2): 132 bytes per 128-d key instead of 256 in BF16. The keys only rank compressed entries
    for the top-k pick, and FP8 keeps more of them than the reference's own FP4 snapping. Decoded
    to float32, which the scores take as they are."""

    def __init__(self, width: int):
        self.width, self.dtype = width, torch.float32

    def empty(self, n: int, device) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(n, self.width, dtype=torch.uint8, device=device),
            torch.ones(n, 1, dtype=torch.float32, device=device),
        )

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = rows.float()
        scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / FP8_MAX
        codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes.view(torch.uint8), scale

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        codes, scale = parts
        return codes.view(torch.float8_e4m3fn).float() * scale


class Fp4Rows(_Codec):
    """The packed index-key layout of spec §3.2: E2M1 codes two per byte (low nibble = even
    element) with one E8M0 scale per 32 — 68 bytes per 128-d key. Exact for keys the reference's
    simulation produced (Hadamard + FP4 snapping), so it is used only when the model simulates."""

    BLOCK = 32

    def __init__(self, width: int, dtype: torch.dtype):
        if width % self.BLOCK:
            raise ValueError(f"FP4 index keys need a width in blocks of {self.BLOCK}, got {width}")
        self.width, self.dtype = width, dtype

    def empty(self, n: int, device) -> tuple[torch.Tensor, ...]:
        return (
            torch.zeros(n, self.width // 2, dtype=torch.uint8, device=device),
            torch.full((n, self.width // self.BLOCK), 127, dtype=torch.uint8, device=device),
        )

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = rows.float().unflatten(-1, (-1, self.BLOCK))
        amax = x.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
        scale = pow2_ceil(amax / FP4_MAX)
        q = fp4_round((x / scale).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
        table = torch.tensor(FP4_VALUES, device=rows.device)
        codes = torch.searchsorted(table, q.abs()).to(torch.uint8) | ((q < 0).to(torch.uint8) << 3)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        exponent = torch.frexp(scale)[1] - 1 + 127
        return packed, exponent.squeeze(-1).to(torch.uint8)

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        packed, exponent = parts
        table = torch.tensor(FP4_VALUES, device=packed.device)
        table = torch.cat((table, -table))
        codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2).long()
        values = table[codes].unflatten(-1, (-1, self.BLOCK))
        scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.int() - 127)
        return (values * scale[..., None]).flatten(-2).to(self.dtype)


def _parts_nbytes(parts) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


class RowStore:
    """Rows appended over time, `[n, width]`, in buffers that grow by doubling."""

    def __init__(self, codec, device: torch.device | str):
        self.codec = codec
        self.width = codec.width
        self.device = torch.device(device)
        self._parts = _new_parts(codec, 0, self.device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self.capacity:
            self.reserve(max(need, 2 * self.capacity, 16))
        for buf, enc in zip(self._parts, self.codec.encode(rows), strict=True):
            buf[self.n : need] = enc
        self.n = need

    def view(self) -> torch.Tensor:
        """All rows, decoded to the compute dtype, `[n, width]`."""
        return self.codec.read_rows(tuple(p[: self.n] for p in self._parts))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at `index` (int64 of any shape, < capacity), decoded → `[*index.shape, width]`:
        a CSA pick decodes its top-k rows, not the whole store (a packed store at 1M tokens holds
        262,144 rows per layer)."""
        rows = self.codec.read_rows(self._parts, index.reshape(-1))
        return rows.view(*index.shape, self.width)

    # -- fixed-shape access for a decode step replayed from a CUDA graph (`engine.decode_graphs`):
    # the row index is a device tensor and every shape depends only on the capacity.
    @property
    def capacity(self) -> int:
        return self._parts[0].shape[0]

    def reserve(self, rows: int) -> None:
        """Room for at least `rows` rows (the buffers move if they grow)."""
        if rows > self.capacity:
            grown = _new_parts(self.codec, rows, self.device)
            for new, old in zip(grown, self._parts, strict=True):
                new[: self.n] = old[: self.n]
            self._parts = grown

    def put(self, row: torch.Tensor, index: torch.Tensor) -> None:
        """row `[1, width]` written at row `index` (`[1]` int64 on the device, < capacity). `n`
        is the caller's to advance: rows at or past `n` are scratch."""
        self.codec.write_rows(self._parts, row, index)

    def rows(self) -> torch.Tensor:
        """Every row of the capacity decoded, `[capacity, width]` (those past `n` are scratch)."""
        return self.codec.read_rows(self._parts)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self._parts

    def as_stored(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`[capacity, width]`: where rows of `dtype` can be written as they are (`_Codec`)."""
        return self.codec.as_stored(self._parts, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (the allocation may be up to 2× larger while growing)."""
        return _parts_nbytes(p[: self.n] for p in self._parts)

    @property
    def allocated_bytes(self) -> int:
        return _parts_nbytes(self._parts)

    def reset(self) -> None:
        self._parts = _new_parts(self.codec, 0, self.device)
        self.n = 0

    def mark(self, device=None) -> int:
        return self.n  # rows below n are never written again: the count is the whole state

    def rewind(self, mark: int) -> None:
        self.n = mark


class WindowRing:
    """The KV vectors of the last `size` positions; position p lives in slot p mod size."""

    def __init__(self, size: int, codec, device: torch.device | str):
        self.size = size
        self.codec = codec
        self.device = torch.device(device)
        self._parts = _new_parts(codec, size, self.device)

    def write(self, kv: torch.Tensor, start_pos: int) -> None:
        """kv `[S, width]` holds positions start_pos .. start_pos+S-1; keep the last `size`."""
        s = kv.shape[0]
        keep = min(s, self.size)
        slots = torch.arange(start_pos + s - keep, start_pos + s, device=self.device) % self.size
        for buf, enc in zip(self._parts, self.codec.encode(kv[s - keep :]), strict=True):
            buf[slots] = enc

    def recent(self, end_pos: int, n: int) -> torch.Tensor:
        """Rows of positions end_pos-n .. end_pos-1 in order, `[n, width]` (n ≤ size)."""
        slots = torch.arange(end_pos - n, end_pos, device=self.device) % self.size
        return self.codec.read_rows(self._parts, slots)

    def slots(self) -> torch.Tensor:
        """Every slot decoded, in slot order, `[size, width]`."""
        return self.codec.read_rows(self._parts)

    def put(self, kv: torch.Tensor, slot: torch.Tensor) -> None:
        """kv `[1, width]` into `slot` (`[1]` int64 on the device): one token's write with no
        host-side index (a decode step replayed from a CUDA graph)."""
        self.codec.write_rows(self._parts, kv, slot)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self._parts

    def as_stored(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`[size, width]`: where rows of `dtype` can be written as they are (`_Codec`)."""
        return self.codec.as_stored(self._parts, dtype)

    @property
    def nbytes(self) -> int:
        return _parts_nbytes(self._parts)

    def reset(self) -> None:
        self._parts = _new_parts(self.codec, self.size, self.device)

    def mark(self, device=None) -> tuple[torch.Tensor, ...]:
        return tuple(p.to(device or p.device, copy=True) for p in self._parts)

    def rewind(self, mark: tuple[torch.Tensor, ...]) -> None:
        for p, saved in zip(self._parts, mark, strict=True):
            p.copy_(saved)


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
        _allocated()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.kv, self.gate, self.prev_kv, self.prev_gate) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        self.kv.zero_()
        self.gate.fill_(float("-inf"))
        if self.overlap:
            self.prev_kv.zero_()
            self.prev_gate.fill_(float("-inf"))

    def mark(self, device=None) -> list[torch.Tensor]:
        return [t.to(device or t.device, copy=True) for t in self.tensors()]

    def rewind(self, mark: list[torch.Tensor]) -> None:
        for t, saved in zip(self.tensors(), mark, strict=True):
            t.copy_(saved)


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
    # Speculative decoding (`V4Model.draft`): the main model's final streams `[n, hc, D]` of the
    # positions mtp_position.. that the MTP block has not taken yet (their next tokens were not
    # all known), and the known next tokens of all but the last of them; a dropped call's point.
    mtp_pending: torch.Tensor | None = None
    mtp_pending_ids: tuple[int, ...] = ()
    verify_point: tuple | None = None

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
        self.mtp_pending, self.mtp_pending_ids, self.verify_point = None, (), None

    def mark(self, device=None) -> tuple:
        """What `rewind` needs to undo the calls after this one: the window rings and compressor
        carries copied (V4-Flash: ~16 MB, to `device` if given, e.g. host memory for a mark that
        is kept), the stores' row counts and positions. A mark stays valid until the state is
        rewound to an earlier one (rows past that are then written again): a prefill chunk that
        runs out of GPU memory halfway is undone, a chat turn returns to where a new prompt
        diverges from the old (`generate.Session`)."""
        layers = [[(p, p.mark(device)) for p in layer.parts()] for layer in self.layers + self.mtp]
        pending = None if self.mtp_pending is None else self.mtp_pending.to(device, copy=True)
        return layers, self.position, self.mtp_position, pending, self.mtp_pending_ids

    def drop_point(self, tokens: int) -> tuple:
        """Taken before a call of `tokens` tokens (a draft token's verification) → what
        `drop_last` needs to take that call's last token back out. Cheap, unlike `mark`: the
        window rings, the compressors' open windows and the stores are positional (a token's
        rows are written again by the token that replaces it), so only the compressors whose
        window the last token closes need anything, and of those only the overlapping ones'
        A halves of the window before (a few KB each) are copied."""
        ratios = [
            carry.ratio
            for layer in self.layers
            for carry in (layer.carry, layer.index_carry)
            if carry is not None
        ]
        if tokens < 1 or (ratios and tokens > min(ratios)):
            raise ValueError(
                f"a dropped call holds 1..{min(ratios, default=tokens)} tokens "
                f"(the smallest compression ratio), got {tokens}"
            )
        last = self.position + tokens - 1
        closing = []
        for layer in self.layers:
            for carry, store in (
                (layer.carry, layer.kv_entries),
                (layer.index_carry, layer.index_keys),
            ):
                if carry is not None and (last + 1) % carry.ratio == 0:
                    prev = (
                        (carry.prev_kv.clone(), carry.prev_gate.clone()) if carry.overlap else None
                    )
                    closing.append((carry, store, prev))
        return self.position + tokens, closing

    def drop_last(self, point: tuple) -> None:
        """Take back out the last token of the call `point` (`drop_point`) was taken before:
        the state is then exactly as if the call had held one token fewer."""
        end, closing = point
        if self.position != end:
            raise RuntimeError(
                f"drop_last must follow the call its point was taken for (the state is at "
                f"{self.position} tokens, that call ended at {end})"
            )
        for carry, store, prev in closing:
            store.n -= 1  # the entry the dropped token closed
            if prev is not None:
                carry.prev_kv.copy_(prev[0])
                carry.prev_gate.copy_(prev[1])
        self.position = end - 1

    def rewind(self, mark: tuple) -> None:
        """Back to the state at `mark` (taken from this state; rows written since are dropped)."""
        layers, self.position, self.mtp_position, pending, self.mtp_pending_ids = mark
        device = self.layers[0].window.device if self.layers else None
        self.mtp_pending = None if pending is None else pending.to(device, copy=True)
        self.verify_point = None
        for saved in layers:
            for part, value in saved:
                part.rewind(value)


def new_layer_state(
    *,
    window: int,
    head_dim: int,
    rope_dim: int,
    ratio: int,
    index_head_dim: int,
    kv_dtype: torch.dtype,
    device: torch.device | str,
    kv_format: str = "native",
    pack_index_keys: bool = False,
) -> LayerState:
    """State of one layer: ratio 0 (window only), 4 (CSA: overlap + indexer) or other (HCA).

    kv_format "native" keeps KV rows and index keys in `kv_dtype` (the model's); "bf16" in BF16;
    "fp8" packs window and compressed KV rows in the layout of spec §3.2 and index keys as E4M3
    with a per-key scale, or as FP4 with `pack_index_keys` (only exact when the model simulates
    the reference's quantisation).
    """
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
    if kv_format == "bf16":
        kv_dtype = torch.bfloat16
    if kv_format == "fp8":
        kv_codec = Fp8Rows(head_dim, rope_dim, kv_dtype)
    else:
        kv_codec = NativeRows(head_dim, kv_dtype)
    state = LayerState(window=WindowRing(window, kv_codec, device))
    if ratio:
        overlap = ratio == 4
        state.kv_entries = RowStore(kv_codec, device)
        state.carry = CompressorCarry(ratio, head_dim, overlap, device)
        if overlap:
            if pack_index_keys:
                keys = Fp4Rows(index_head_dim, kv_dtype)
            elif kv_format == "fp8":
                keys = Fp8KeyRows(index_head_dim)
            else:
                keys = NativeRows(index_head_dim, kv_dtype)
            state.index_keys = RowStore(keys, device)
            state.index_carry = CompressorCarry(ratio, index_head_dim, True, device)
    return state
