"""Exact FP8 E4M3 / FP4 E2M1 / E8M0 decoding and the matching reference encoders (spec §4.3–4.4).

Decoding is bit-exact: every code maps to the one value the spec's tables give. Encoding follows
the official quantizer (`inference/kernel.py`): a power-of-two scale per tile or group,
2^ceil(log2(amax / max_code)) with amax floored (1e-4 for FP8, 6·2^-126 for FP4), then
round-to-nearest-even of x / scale clamped to the code range.

Shapes: FP8 weight [out, in] with E8M0 scales [ceil(out/bo), ceil(in/bi)]; FP4 weight packed
[out, in/2] (low nibble = element 2j) with E8M0 scales [out, in/32].
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GROUP = 32
FP8_BLOCK = (128, 128)
_CHUNK = 1 << 16  # bytes decoded per step in dequant_fp4

# E2M1 code -> value (bit 3 is the sign; 8 is -0).
E2M1_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)

_E2M1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)
# byte -> (value of low nibble, value of high nibble): one gather decodes a packed byte.
_E2M1_PAIRS = torch.stack([_E2M1[torch.arange(256) & 15], _E2M1[torch.arange(256) >> 4]], dim=1)
_E2M1_PAIRS_WORDS = _E2M1_PAIRS.contiguous().view(torch.int64).reshape(256)
# E8M0 byte -> 2^(b-127); 255 is NaN. float64 powers are exact and fit float32 (2^-127 is subnormal).
_E8M0 = torch.tensor([2.0 ** (b - 127) for b in range(255)] + [float("nan")], dtype=torch.float32)
# Thresholds between consecutive E2M1 magnitudes, with which way a tie goes (to the even code).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _as_uint8(codes: torch.Tensor) -> torch.Tensor:
    if codes.dtype == torch.uint8:
        return codes
    if codes.element_size() != 1:
        raise TypeError(f"expected one-byte codes, got {codes.dtype}")
    return codes.view(torch.uint8)


# ---------------------------------------------------------------------------- decoders


def e4m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (OCP "fn": bias 7, no infinities, 0x7F/0xFF NaN, max 448) -> float32."""
    return _as_uint8(codes).view(torch.float8_e4m3fn).to(torch.float32)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 scale byte b -> 2^(b-127) as float32; b = 255 is NaN."""
    # Built from the exponent bits (a table gather is slower): b<<23 is 2^(b-127) for 1..254.
    b = _as_uint8(codes).to(torch.int32)
    v = (b << 23).view(torch.float32)
    v = torch.where(b == 0, torch.tensor(2.0**-127), v)
    return torch.where(b == 255, torch.tensor(float("nan")), v)


def e2m1_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] packed bytes -> [..., 2n] uint8 codes; low nibble is the even element."""
    b = _as_uint8(packed)
    return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked E2M1 codes (0..15) -> float32."""
    b = _as_uint8(codes)
    return _E2M1.index_select(0, b.reshape(-1).to(torch.int32)).view(b.shape)


def e2m1_packed_to_float(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] packed bytes -> [..., 2n] float32 values (one table row per byte)."""
    b = _as_uint8(packed)
    # Each table entry holds both float32 values in one 8-byte word: a 1-D gather is far faster.
    pairs = _E2M1_PAIRS_WORDS.index_select(0, b.reshape(-1).to(torch.int32))
    return pairs.view(torch.float32).view(*b.shape[:-1], 2 * b.shape[-1])


def _out_buffer(
    out: torch.Tensor | None, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    return out


def dequant_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W[o,i] = e4m3(Wq[o,i]) · 2^(S[o//bo, i//bi] − 127). weight [O, I], scale [⌈O/bo⌉, ⌈I/bi⌉].

    `out` (float32 [O, I]) reuses a buffer: fresh large allocations cost page faults that can
    exceed the decoding itself."""
    out_f, in_f = weight.shape
    bo, bi = block
    expected = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"FP8 scale shape {tuple(scale.shape)} != {expected} for weight {tuple(weight.shape)}"
        )
    w = _out_buffer(out, (out_f, in_f), weight.device)
    w.copy_(_as_uint8(weight).view(torch.float8_e4m3fn))
    s = e8m0_to_float(scale)
    if out_f % bo == 0 and in_f % bi == 0:
        w.view(expected[0], bo, expected[1], bi).mul_(s[:, None, :, None])
    else:
        w.mul_(s.repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f])
    return w if dtype == torch.float32 else w.to(dtype)


def dequant_fp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group: int = FP4_GROUP,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W[o,i] = e2m1(code[o,i]) · 2^(S[o, i//32] − 127). packed [O, I/2], scale [O, I/32] -> [O, I].

    `out` (float32 [O, I]) reuses a buffer, as for `dequant_fp8`."""
    out_f, half = packed.shape
    in_f = 2 * half
    if tuple(scale.shape) != (out_f, in_f // group) or in_f % group:
        raise ValueError(
            f"FP4 scale shape {tuple(scale.shape)} != {(out_f, in_f // group)} for packed weight "
            f"{tuple(packed.shape)}"
        )
    w = _out_buffer(out, (out_f, in_f), packed.device)
    codes = _as_uint8(packed).reshape(-1)
    words = w.view(torch.int64).view(-1)
    # In chunks: a small reused index buffer instead of one the size of the matrix.
    index = torch.empty(min(_CHUNK, codes.numel()), dtype=torch.int32)
    for a in range(0, codes.numel(), _CHUNK):
        n = min(_CHUNK, codes.numel() - a)
        index[:n].copy_(codes[a : a + n])
        torch.index_select(_E2M1_PAIRS_WORDS, 0, index[:n], out=words[a : a + n])
    w.view(out_f, in_f // group, group).mul_(e8m0_to_float(scale)[:, :, None])
    return w if dtype == torch.float32 else w.to(dtype)


# ---------------------------------------------------------------------------- encoders


def pow2_scale_exponent(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """ceil(log2(amax / max_code)) computed like the reference (float32 bits, exact)."""
    t = (amax.to(torch.float32) * torch.tensor(1.0 / max_code, dtype=torch.float32)).contiguous()
    bits = t.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    return exponent - 127 + (mantissa != 0).to(torch.int32)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-126, 127], built from the exponent bits (exact)."""
    e = exponent.to(torch.int32)
    if e.numel() and (int(e.min()) < -126 or int(e.max()) > 127):
        raise ValueError("power-of-two scale out of the float32 normal range")
    return ((e + 127) << 23).view(torch.float32)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} has NaN or infinite values; they cannot be quantized")


def float_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> E4M3 codes (uint8), round-to-nearest-even, saturating at ±448."""
    return x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float -> E2M1 codes (uint8 0..15), round-to-nearest-even, saturating at ±6; −0 -> 8."""
    x = x.to(torch.float32)
    a = x.abs().clamp(max=FP4_MAX)
    code = torch.zeros(x.shape, dtype=torch.uint8)
    for k, t in enumerate(_E2M1_MIDPOINTS):
        # A tie goes to the even code: up across odd-numbered midpoints, down across even ones.
        code += (a >= t) if k % 2 else (a > t)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] uint8 bytes, element 2j in the low nibble."""
    c = _as_uint8(codes)
    pairs = c.view(*c.shape[:-1], c.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def quantize_fp8(
    w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] float -> (E4M3 codes uint8 [O, I], E8M0 scales uint8 [⌈O/bo⌉, ⌈I/bi⌉])."""
    w = w.to(torch.float32)
    _check_finite(w, "weight")
    out_f, in_f = w.shape
    bo, bi = block
    to, ti = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(to * bo, ti * bi, dtype=torch.float32)
    padded[:out_f, :in_f] = w
    tiles = padded.view(to, bo, ti, bi)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    exp = pow2_scale_exponent(amax, FP8_MAX)  # [to, ti]
    inv = pow2(-exp)
    codes = float_to_e4m3(tiles * inv[:, None, :, None]).view(to * bo, ti * bi)[:out_f, :in_f]
    return codes.contiguous(), (exp + 127).to(torch.uint8)


def quantize_fp4(w: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] float -> (packed E2M1 uint8 [O, I/2], E8M0 scales uint8 [O, I/32])."""
    w = w.to(torch.float32)
    _check_finite(w, "weight")
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"FP4 rows must be a multiple of {group} long, got {in_f}")
    g = w.view(out_f, in_f // group, group)
    amax = g.abs().amax(dim=2).clamp(min=FP4_MAX * 2.0**-126)
    exp = pow2_scale_exponent(amax, FP4_MAX)
    inv = pow2(-exp)
    codes = float_to_e2m1(g * inv[:, :, None]).view(out_f, in_f)
    return e2m1_pack(codes), (exp + 127).to(torch.uint8)


# ---------------------------------------------------------------------------- int8 activations

Q8_GROUP = 32


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations `[..., K]` (K a multiple of 32) → (int8 `[..., K]`, steps float32 `[..., K/32]`)
    per 32-element block: step = amax / 127, q = x · (127 / amax) rounded to nearest even. The
    C kernels' `fd_q8_quantize` and the GPU's int8 expert dots (`gpu_kernels.moe` MODE 4) quantize
    so; an all-zero block has step 0, one holding Inf or NaN step NaN (its dots are NaN)."""
    if x.shape[-1] % Q8_GROUP:
        raise ValueError(f"int8 activations need a multiple of {Q8_GROUP} values, got {x.shape}")
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], -1, Q8_GROUP)
    finite = torch.isfinite(blocks).all(dim=-1, keepdim=True)
    amax = torch.where(finite, blocks.abs(), 0.0).amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, 0.0)
    q = torch.where(finite, blocks * inv, 0.0).round().clamp(-127, 127).to(torch.int8)
    step = torch.where(finite, amax / 127.0, float("nan"))
    return q.reshape(x.shape), step.reshape(*x.shape[:-1], -1)
