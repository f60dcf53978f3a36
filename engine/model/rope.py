"""Partial, interleaved rotary embedding on the last `rope_dim` channels (spec §2.5).

Two tables exist per model: plain θ=10000 for window-only layers and θ=160000 with YaRN frequency
interpolation for compressed layers. No YaRN magnitude (mscale) factor is applied anywhere.
"""

from __future__ import annotations

import math

import torch

from flashdesk.engine import _kernels, gpu_kernels
from flashdesk.engine.model.common import few_cpu_tokens, rms_norm


def inverse_frequencies(
    rope_dim: int,
    base: float,
    yarn_factor: float = 1.0,
    original_max_position: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """ω_i for the `rope_dim // 2` rotated pairs, float32 `[rope_dim // 2]`.

    YaRN (used when `original_max_position > 0`, as in the reference): pairs below the correction
    range keep ω_i, pairs above it get ω_i / factor, a linear ramp blends in between.
    """
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if original_max_position > 0:

        def correction_dim(rotations: float) -> float:
            return (
                rope_dim
                * math.log(original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(base))
            )

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        freqs = freqs / yarn_factor * (1 - keep) + freqs * keep
    return freqs


class Rotary:
    """One frequency table; cos/sin are computed per call from absolute positions."""

    def __init__(self, rope_dim: int, inv_freq: torch.Tensor):
        self.rope_dim = rope_dim
        self.inv_freq = inv_freq
        self._last: tuple | None = None  # (start, count, device, cos, sin) of the last span

    def to(self, device: torch.device | str) -> Rotary:
        return Rotary(self.rope_dim, self.inv_freq.to(device))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[S]` (int) → cos, sin `[S, rope_dim // 2]` float32."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        return angles.cos(), angles.sin()

    def cos_sin_span(
        self, start: int, count: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos_sin` of positions start..start+count-1, kept for the next caller: every layer
        sharing this table rotates the same positions in a step (43 recomputations → 1)."""
        last = self._last
        if last is not None and last[:3] == (start, count, device):
            return last[3], last[4]
        cos, sin = self.cos_sin(torch.arange(start, start + count, device=device))
        self._last = (start, count, device, cos, sin)
        return cos, sin


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rotate consecutive pairs of the last `2 * cos.shape[-1]` channels of `x`.

    x `[S, d]` or `[S, H, d]`; cos/sin `[S, r/2]`. Math in float32, result in x's dtype (a new
    tensor), or that of `x.to(out_dtype)` rotated. `inverse=True` rotates by the negative angle
    (the de-rotation of the attention output). On a GPU with Triton one launch
    (`gpu_kernels.apply_rope`) instead of about ten.
    """
    if gpu_kernels.applies(x):
        return gpu_kernels.apply_rope(x, cos, sin, inverse, out_dtype)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if _cpu_call(x, cos, sin, out_dtype):
        S, d = x.shape[0], x.shape[-1]
        out = torch.empty(x.shape, dtype=out_dtype)
        _kernels.rope(
            x.data_ptr(), x.dtype is torch.bfloat16, S, x.numel() // (S * d) if S else 1, d,
            2 * cos.shape[-1], cos.data_ptr(), sin.data_ptr(), inverse, out.data_ptr(),
            out_dtype is torch.bfloat16,
        )  # fmt: skip
        return out
    return apply_rope_ops(x, cos, sin, inverse, out_dtype)


def norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """`apply_rope(rms_norm(x, weight, eps), cos, sin)`: on a GPU with Triton one launch for
    both (`gpu_kernels.norm_rope`), two fewer in each decode layer (its q and kv)."""
    if gpu_kernels.applies(x):
        return gpu_kernels.norm_rope(x, weight, eps, cos, sin)
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def _cpu_call(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype) -> bool:
    """Whether `apply_rope` can take the C path: a decode call's tokens, the tables [S, half]."""
    return (
        out_dtype in (torch.float32, torch.bfloat16)
        and x.dim() in (2, 3)
        and few_cpu_tokens(x, cos, sin)
        and tuple(cos.shape) == tuple(sin.shape) == (x.shape[0], cos.shape[-1])
        and 2 * cos.shape[-1] <= x.shape[-1]
    )


def apply_rope_ops(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`apply_rope` as torch operations (the definition)."""
    if out_dtype is not None:
        x = x.to(out_dtype)
    half = cos.shape[-1]
    rope_dim = 2 * half
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    rot = x[..., -rope_dim:].float().unflatten(-1, (half, 2))
    a, b = rot[..., 0], rot[..., 1]
    if inverse:
        sin = -sin
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-rope_dim], out.to(x.dtype)), dim=-1)
