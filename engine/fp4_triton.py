"""GPU kernels (Triton) for routed experts held in VRAM in their stored FP4 form.

Why: the torch path dequantizes each picked expert into a float32 then bf16 copy per use, about
35 times the expert's 13.4 MB of stored bytes in memory traffic, plus a host sync per layer to
list the picked experts. On a GPU that holds most experts (an H200 holds ~40 of V4-Flash's 43
expert layers) that, not the bytes, set the decode speed. Here:

* `moe(...)`: the experts a few tokens picked, read straight from the packed E2M1 bytes and E8M0
  scales (spec §4.4) of a stacked slot store, in two launches (gate/up with the clamped SwiGLU and
  the routing weight; then down, summed over the token's picks in a fixed order), with the pick →
  slot map read on the device: no host sync, experts not in VRAM (slot −1) skipped;
* `dequant(...)`: one pass from packed FP4 to bf16/fp16/fp32 (for long prompts, where experts
  are multiplied as dense matrices).

Triton is optional: torch's Linux CUDA wheels bring it; where it is missing (Windows, CPU-only)
`available()` is False and the runtime keeps its torch path. Without a GPU the tests run these
kernels in Triton's CPU interpreter.
"""

from __future__ import annotations

import importlib
import os

import torch

try:  # imported by name so that PyInstaller's import graph does not pull Triton into the app
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# (rows, bytes per step) of the gate/up launch, then of the down launch: not yet tuned on a GPU
TILES = (16, 256, 16, 256)
MAX_TOKENS = 16  # above this many tokens a call re-reads experts too often; dequantize instead


# Triton's CPU interpreter (TRITON_INTERPRET=1 before Triton is imported; tests/conftest.py sets
# it where there is no GPU): the kernels then take CPU tensors, slowly. Never for the product.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """The runtime may use these kernels for tensors on `device` (FLASHDESK_TRITON=0: never)."""
    if triton is None or INTERPRETED or os.environ.get("FLASHDESK_TRITON", "1") == "0":
        return False
    return torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _e2m1(code):
        """int32 codes 0..15 → their E2M1 values as float32 (bits built directly)."""
        mag = code & 7
        e = mag >> 1
        m = mag & 1
        bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
        bits = bits | ((code & 8) << 28)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _e8m0(byte):
        """E8M0 scale bytes → 2^(b−127) as float32 (byte 0 reads as 0: below float32's normals)."""
        return (byte.to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_rows_dot(w_ptr, s_ptr, x_ptr, rows, K: tl.constexpr, BKB: tl.constexpr):
        """Σ_k W[rows, k] · x[k] for packed rows `[BN, K/2]` bytes, scales `[BN, K/32]`."""
        acc = tl.zeros((rows.shape[0],), dtype=tl.float32)
        for kb in range(0, K // 2, BKB):
            cols = kb + tl.arange(0, BKB)
            b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :]).to(tl.int32)
            xe = tl.load(x_ptr + 2 * cols).to(tl.float32)
            xo = tl.load(x_ptr + 2 * cols + 1).to(tl.float32)
            part = _e2m1(b & 15) * xe[None, :] + _e2m1(b >> 4) * xo[None, :]
            blocks = tl.sum(tl.reshape(part, (rows.shape[0], BKB // 16, 16)), axis=2)
            sb = kb // 16 + tl.arange(0, BKB // 16)
            scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + sb[None, :]))
            acc += tl.sum(blocks * scale, axis=1)
        return acc

    @triton.jit
    def _gate_up_kernel(
        x_ptr, experts_ptr, weights_ptr, slot_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr,
        limit, TOPK: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
        BN: tl.constexpr, BKB: tl.constexpr,
    ):  # fmt: skip
        pair = tl.program_id(0)  # token · TOPK + pick
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        slot = tl.load(slot_ptr + tl.load(experts_ptr + pair)).to(tl.int64)
        if slot >= 0:
            x_row = x_ptr + (pair // TOPK) * D
            w_off = slot * (INTER * (D // 2))
            s_off = slot * (INTER * (D // 32))
            g = _fp4_rows_dot(w1_ptr + w_off, s1_ptr + s_off, x_row, rows, D, BKB)
            u = _fp4_rows_dot(w3_ptr + w_off, s3_ptr + s_off, x_row, rows, D, BKB)
            if limit > 0:
                g = tl.minimum(g, limit)
                u = tl.minimum(tl.maximum(u, -limit), limit)
            h = g * tl.sigmoid(g) * u * tl.load(weights_ptr + pair)
            tl.store(h_ptr + pair * INTER + rows, h)

    @triton.jit
    def _down_kernel(
        h_ptr, experts_ptr, slot_ptr, w2_ptr, s2_ptr, out_ptr,
        TOPK: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
        BN: tl.constexpr, BKB: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            pair = token * TOPK + j
            slot = tl.load(slot_ptr + tl.load(experts_ptr + pair)).to(tl.int64)
            if slot >= 0:
                acc += _fp4_rows_dot(
                    w2_ptr + slot * (D * (INTER // 2)),
                    s2_ptr + slot * (D * (INTER // 32)),
                    h_ptr + pair * INTER,
                    rows,
                    INTER,
                    BKB,
                )
        tl.store(out_ptr + token * D + rows, acc)

    @triton.jit
    def _dequant_kernel(
        w_ptr, s_ptr, out_ptr, K: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr
    ):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BKB + tl.arange(0, BKB)
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + cols[None, :]).to(tl.int32)
        scale = _e8m0(tl.load(s_ptr + rows[:, None] * (K // 32) + cols[None, :] // 16))
        lo = _e2m1(b & 15) * scale
        hi = _e2m1(b >> 4) * scale
        vals = tl.reshape(tl.join(lo, hi), (BN, 2 * BKB))  # element 2j = low nibble of byte j
        out_cols = tl.program_id(1) * 2 * BKB + tl.arange(0, 2 * BKB)
        ptrs = out_ptr + rows[:, None] * K + out_cols[None, :]
        tl.store(ptrs, vals.to(out_ptr.dtype.element_ty))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _block(n: int, want: int) -> int:
    """The largest power of two ≤ want dividing n (V4 dims are powers of two; tiny test dims too)."""
    b = want
    while b > 1 and n % b:
        b //= 2
    return b


def moe(
    x: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    slot_of: torch.Tensor,
    stacks: tuple[torch.Tensor, ...],
    limit: float,
    tiles: tuple[int, int, int, int] = TILES,
    num_warps: int = 4,
) -> torch.Tensor:
    """Σ over each token's picks held in the slot store of weight · expert(x).

    x `[T, D]` (any float dtype), experts `[T, k]` int, weights `[T, k]`, slot_of `[E]` int32
    (slot of each expert, −1 when not in the store), stacks = (w1 `[S, I, D/2]`, s1 `[S, I, D/32]`,
    w3, s3, w2 `[S, D, I/2]`, s2 `[S, D, I/32]`) packed bytes → `[T, D]` float32; picks with
    slot −1 add nothing (their part comes from elsewhere). `tiles` = (rows, bytes per step) of
    the gate/up and of the down launch (benchmarks sweep them).
    """
    w1, s1, w3, s3, w2, s2 = (_bytes(t) for t in stacks)
    tokens, dim = x.shape
    topk = experts.shape[1]
    inter = w1.shape[1]
    if w1.shape[2] * 2 != dim or w2.shape[1:] != (dim, inter // 2) or dim % 32 or inter % 32:
        raise ValueError(f"expert stacks {w1.shape}/{w2.shape} do not fit activations {x.shape}")
    x = x.contiguous()
    experts = experts.contiguous()
    weights = weights.to(torch.float32).contiguous()
    h = torch.zeros((tokens * topk, inter), dtype=torch.float32, device=x.device)
    out = torch.empty((tokens, dim), dtype=torch.float32, device=x.device)
    bn_up, bkb_up = _block(inter, tiles[0]), _block(dim // 2, tiles[1])
    bn_down, bkb_down = _block(dim, tiles[2]), _block(inter // 2, tiles[3])
    _gate_up_kernel[(tokens * topk, inter // bn_up)](
        x, experts, weights, slot_of, w1, s1, w3, s3, h, float(limit),
        TOPK=topk, D=dim, INTER=inter, BN=bn_up, BKB=bkb_up, num_warps=num_warps,
    )  # fmt: skip
    _down_kernel[(tokens, dim // bn_down)](
        h, experts, slot_of, w2, s2, out,
        TOPK=topk, D=dim, INTER=inter, BN=bn_down, BKB=bkb_down, num_warps=num_warps,
    )  # fmt: skip
    return out


def dequant(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """packed `[O, K/2]` E2M1 bytes (low nibble first), scale `[O, K/32]` E8M0 → `[O, K]` dtype,
    in one pass (the same values as `runtime_experts.fp4_dequant`, except scale byte 0 → 0)."""
    b, s = _bytes(packed).contiguous(), _bytes(scale).contiguous()
    rows, half = b.shape
    out = torch.empty((rows, 2 * half), dtype=dtype, device=b.device)
    bn, bkb = _block(rows, 16), _block(half, 64)
    if bkb < 16:
        raise ValueError(f"FP4 rows of {2 * half} values are not whole 32-value blocks")
    _dequant_kernel[(rows // bn, half // bkb)](b, s, out, K=2 * half, BN=bn, BKB=bkb)
    return out
