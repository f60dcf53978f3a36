"""The GPU runtime's linears over weights kept in VRAM as stored: FP8 E4M3 with 128×128 E8M0
tile scales (attention, compressors, indexer, shared experts; V4's grouped `wo_a`), and the BF16
LM head, router gates and compressor projections.

Why: widening them once at load doubles their VRAM (V4-Flash: 15.4 GB instead of 7.8 GB, about
two layers of routed experts on a 24 GB card) and the bytes each token reads. A decode step's few
tokens go through `gpu_kernels.linear` (float32 sums over the stored bytes); longer inputs, or a
GPU without Triton, dequantize the weight for the call and use torch's matmul, whose cost is
small beside a prompt chunk's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flashdesk.engine import gpu_kernels, quant
from flashdesk.engine.model import qsim
from flashdesk.engine.model.attention import grouped_linear
from flashdesk.engine.model.common import Linear, rms_norm
from flashdesk.engine.model.moe import swiglu

_HEAD_ROWS = 16384  # rows widened to float32 at a time for inputs of many tokens (the head)


class CudaFp8Linear(Linear):
    """`y = x · Wᵀ` from the stored FP8 weight `[N, K]` and scales `[⌈N/128⌉, ⌈K/128⌉]` in VRAM;
    with `groups` G the rows form G groups, group g seeing x's g-th K slice (`wo_a`)."""

    __slots__ = ("dtype", "fused", "groups", "scale")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, groups=1):
        super().__init__(weight, True)
        self.scale = scale
        self.dtype = dtype
        self.groups = groups
        self.fused = gpu_kernels.available(weight.device)

    def __call__(
        self,
        x: torch.Tensor,
        simulate: bool = False,
        norm: tuple[torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """`norm` (weight, eps): of `rms_norm(x, weight, eps)`, a decode step's few tokens
        normed as the kernel reads them (`gpu_kernels.linear(norm=)`: the norm's launch saved)."""
        n = self.weight.shape[0]
        few = self.fused and x.numel() // x.shape[-1] <= gpu_kernels.MAX_TOKENS
        if norm is not None and (
            simulate or not few or self.groups != 1 or not gpu_kernels.fusing_norms(x.device)
        ):
            x, norm = rms_norm(x, *norm), None
        if simulate:
            x = qsim.act_snap(x)
        x2 = x.reshape(-1, x.shape[-1])
        if few:
            out = gpu_kernels.linear(
                x2, self.weight, self.scale, self.groups, self.dtype, norm=norm
            )
        else:
            w = quant.dequant_fp8(self.weight, self.scale, dtype=self.dtype)
            xs = x2.to(self.dtype)
            if self.groups == 1:
                out = F.linear(xs, w)
            else:
                out = grouped_linear(xs, w.view(self.groups, n // self.groups, -1))
        return out.view(*x.shape[:-1], n)

    def after_swiglu(self, joined: torch.Tensor, limit: float) -> torch.Tensor:
        """`self(swiglu(gate, up, limit))` for joined = gate then up `[..., 2K]` (the shared
        expert's joined w1/w3 output): a decode step's few tokens in one launch, SwiGLU read
        into the product (`gpu_kernels.linear(glu=)`), the same values as the two launches."""
        x2 = joined.reshape(-1, joined.shape[-1])
        n, k = self.weight.shape
        if self.fused and x2.shape[0] <= gpu_kernels.MAX_TOKENS and self.groups == 1:
            out = gpu_kernels.linear(x2, self.weight, self.scale, 1, self.dtype, glu=limit)
            return out.view(*joined.shape[:-1], n)
        return self(swiglu(joined[..., :k], joined[..., k:], limit, joined.dtype))

    def to(self, device):
        raise RuntimeError("a VRAM FP8 linear is built on its device; it does not move")


class CudaBf16Linear:
    """float32 `x · Wᵀ` from a stored BF16 weight in VRAM: each weight widened exactly, x widened
    in the kernel, float32 sums, so the float32 weight's result (up to summation order) at half
    its bytes. The LM head and the reference's FP32-math linears (router gate, compressors'
    wkv/wgate: 1.3 GB as float32 copies for V4-Flash, read every token)."""

    __slots__ = ("fused", "weight")

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.bfloat16).contiguous()
        self.fused = gpu_kernels.available(self.weight.device)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        if self.fused and x.shape[0] <= gpu_kernels.MAX_TOKENS:
            out = gpu_kernels.linear(x, self.weight, out_dtype=torch.float32)
        else:
            x = x.float()
            out = torch.cat(
                [
                    F.linear(x, self.weight[r : r + _HEAD_ROWS].float())
                    for r in range(0, self.weight.shape[0], _HEAD_ROWS)
                ],
                dim=-1,
            )
        return out.view(*h.shape[:-1], self.weight.shape[0])


class JoinedRows:
    """Linears that read the same input, computed in one launch: their weights' rows
    concatenated (`wq_a` and `wkv`, the shared expert's `w1` and `w3`, a compressor's `wkv` and
    `wgate`) → the parts' outputs as views of one `[..., ΣN]` result."""

    __slots__ = ("linear", "sizes")

    def __init__(self, linear: CudaFp8Linear | CudaBf16Linear, sizes: Sequence[int]):
        self.linear, self.sizes = linear, tuple(sizes)

    def __call__(self, x: torch.Tensor, **options) -> tuple[torch.Tensor, ...]:
        """`options`: the joined linear's (`CudaFp8Linear`'s `norm`)."""
        return self.linear(x, **options).split(self.sizes, dim=-1)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side `[..., ΣN]`, not split."""
        return self.linear(x)


def join_rows(
    parts: Sequence[CudaFp8Linear | CudaBf16Linear],
) -> tuple[JoinedRows, list[CudaFp8Linear | CudaBf16Linear]] | None:
    """One linear over the rows of `parts` (same class, K and output dtype; FP8 parts but the
    last in whole 128-row scale tiles) and each part again as a view of its rows: the weights
    held once. None where they cannot be joined."""
    first = parts[0]
    if not isinstance(first, (CudaFp8Linear, CudaBf16Linear)) or any(
        type(p) is not type(first) or p.weight.shape[1] != first.weight.shape[1] for p in parts
    ):
        return None
    sizes = [p.weight.shape[0] for p in parts]
    fp8 = isinstance(first, CudaFp8Linear)
    if fp8 and (
        any(p.groups != 1 or p.dtype != first.dtype for p in parts)
        or any(n % 128 for n in sizes[:-1])
    ):
        return None
    weight = torch.cat([p.weight for p in parts])
    if fp8:
        scale = torch.cat([p.scale for p in parts])

        def rows(a: int, b: int) -> CudaBf16Linear | CudaFp8Linear:
            return CudaFp8Linear(weight[a:b], scale[a // 128 : -(-b // 128)], first.dtype)

    else:

        def rows(a: int, b: int) -> CudaBf16Linear | CudaFp8Linear:
            return CudaBf16Linear(weight[a:b])

    made, start = [rows(0, sum(sizes))], 0
    for n in sizes:
        made.append(rows(start, start + n))
        start += n
    for linear in made:
        linear.fused = first.fused  # as the parts were (the same device)
    return JoinedRows(made[0], sizes), made[1:]


def run_pair(
    first: JoinedRows | CudaFp8Linear | CudaBf16Linear,
    second: JoinedRows | CudaFp8Linear | CudaBf16Linear,
    x: torch.Tensor,
) -> tuple:
    """Two linears (or joined ones) that read the same x `[..., K]` → each one's output (its
    parts, for joined rows), in one launch where the kernel takes them
    (`gpu_kernels.linear_pair`: a decode step's few tokens, weights of different kinds such as
    `wq_a`+`wkv` in FP8 and the compressors' BF16 projections), else one launch each."""
    linears = [j.linear if isinstance(j, JoinedRows) else j for j in (first, second)]
    x2 = x.reshape(-1, x.shape[-1])
    outs = None
    if (
        all(getattr(lin, "fused", False) for lin in linears)
        and x2.shape[0] <= gpu_kernels.MAX_TOKENS
        and gpu_kernels.checked("paired linears", x.device)
    ):
        args = [_kernel_args(lin, x2) for lin in linears]
        if None not in args:
            outs = gpu_kernels.linear_pair(*args)
    if outs is None:
        outs = [lin(x) for lin in linears]
    else:
        outs = [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
    return tuple(
        o.split(j.sizes, dim=-1) if isinstance(j, JoinedRows) else o
        for j, o in zip((first, second), outs, strict=True)
    )


def _kernel_args(linear, x2: torch.Tensor) -> tuple | None:
    """`linear`'s (x, weight, scale, out_dtype) as `gpu_kernels.linear` takes them, or None."""
    if isinstance(linear, CudaFp8Linear) and linear.groups == 1:
        return x2, linear.weight, linear.scale, linear.dtype
    if isinstance(linear, CudaBf16Linear):
        return x2, linear.weight, None, torch.float32
    return None
