"""The reference's quantisation-aware simulation: values snapped to FP8/FP4 grids in place.

The official inference code quantises and immediately dequantises some activations (spec §2.1):
window/compressed KV no-rope channels to FP8 E4M3 in blocks of 64, indexer queries and keys to
FP4 E2M1 in blocks of 32 after a Hadamard rotation, and every input of an FP8/FP4 linear to FP8 in
blocks of 128. Scales are powers of two (`scale_fmt = ue8m0`). Reproducing it makes outputs closer
to the official implementation and makes the KV cache exactly representable in FP8.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
# E2M1 magnitudes and the decision boundaries between neighbours. Ties round to the even code:
# the boundaries at odd positions (0.75, 1.75, 3.5) round up, the others down.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for positive float32 x, exact (via frexp, not log2)."""
    mantissa, exponent = torch.frexp(x)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the quantisation block {block}")
    return x.float().unflatten(-1, (n // block, block))


def fp8_snap(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise-dequantise to FP8 E4M3 with one power-of-two scale per `block` along the last dim."""
    xb = _blocks(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = pow2_ceil(amax / FP8_MAX)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def fp4_round(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values in [-6, 6] to the nearest E2M1 value (ties to even code)."""
    mag = v.abs()
    bounds = torch.tensor(_FP4_BOUNDS, dtype=v.dtype, device=v.device)
    values = torch.tensor(FP4_VALUES, dtype=v.dtype, device=v.device)
    idx = torch.bucketize(mag, bounds, right=False)
    at_bound = bounds[idx.clamp(max=len(_FP4_BOUNDS) - 1)] == mag
    idx = torch.where(at_bound & (idx % 2 == 1), idx + 1, idx)
    return torch.copysign(values[idx], v)


def fp4_snap(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantise-dequantise to FP4 E2M1 with one power-of-two scale per `block` along the last dim."""
    xb = _blocks(x, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0**-126)
    scale = pow2_ceil(amax / FP4_MAX)
    q = fp4_round((xb / scale).clamp(-FP4_MAX, FP4_MAX))
    return (q * scale).flatten(-2).to(x.dtype)


@lru_cache(maxsize=8)
def _hadamard_matrix(n: int, device: str) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard transform of the last dim (scale 1/sqrt(n)), float32 math."""
    h = _hadamard_matrix(x.shape[-1], str(x.device))
    return (x.float() @ h).to(x.dtype)


def act_snap(x: torch.Tensor) -> torch.Tensor:
    """The reference's FP8 activation quantisation before FP8/FP4 linears (1×128 blocks)."""
    return fp8_snap(x, 128)
