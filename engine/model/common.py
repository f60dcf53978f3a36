"""Small pieces shared by the mechanisms: RMSNorm, the linear with optional activation snapping,
and the numerics options of a model instance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashdesk.engine import _kernels, gpu_kernels
from flashdesk.engine.model import qsim

# fetch(name, dtype) -> tensor: the dequantized weight under its official checkpoint name.
Fetch = Callable[[str, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Numerics:
    """How a model instance computes.

    dtype: activation and weight dtype of the big linears (float32 or bfloat16). Norms, mHC,
      router, compressor pooling and attention softmax are float32 regardless, as in the reference.
    simulate_quant: reproduce the reference's quantise-dequantise steps (spec §2.1): FP8 snapping
      of KV no-rope channels and of FP8/FP4 linear inputs, Hadamard + FP4 snapping in the indexer.
    query_block: queries per attention block in prefill (bounds the logits buffer).
    kv_format: how a new sequence state stores its KV rows (`cache.KV_FORMATS`: "native" in
      `dtype`, "bf16", or the packed "fp8"); the runtime takes it from the plan's KV choice.
    """

    dtype: torch.dtype = torch.float32
    simulate_quant: bool = False
    query_block: int = 128
    kv_format: str = "native"


def float_linear(x: torch.Tensor, w) -> torch.Tensor:
    """x · wᵀ in float32, for the reference's FP32-math linears (router gate, compressor wkv /
    wgate). w is a float32 tensor, or a callable that computes the same from the stored BF16
    values and x in any float dtype (the runtime's kernels, which read half the bytes)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x.float(), w)
    return w(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 (weight float32 or None), result in x's dtype. On a
    GPU with Triton one launch (`gpu_kernels.rms_norm`) instead of six; a few rows on the CPU
    one C call (`_kernels.rms_norm`)."""
    if gpu_kernels.applies(x):
        return gpu_kernels.rms_norm(x, weight, eps)
    if _cpu_call(x, weight):
        out = torch.empty_like(x)
        n = x.shape[-1]
        _kernels.rms_norm(
            x.data_ptr(), x.dtype is torch.bfloat16, x.numel() // n, n,
            0 if weight is None else weight.data_ptr(), float(eps), out.data_ptr(),
        )  # fmt: skip
        return out
    return rms_norm_ops(x, weight, eps)


# A CPU call of at most this many values is one C call (a decode step's rows); a prompt's
# many rows: the torch ops, on torch's threads
CPU_CALL_VALUES = 1 << 17
# The same for the hyper-connection and rotary steps, by tokens (x's first dimension)
CPU_CALL_TOKENS = 16


def few_cpu_tokens(x: torch.Tensor, *float32: torch.Tensor) -> bool:
    """Whether a decode call's step can take its C kernel: 1..CPU_CALL_TOKENS contiguous tokens
    of float32/bf16 on the CPU, its other tensors float32, contiguous, on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and 0 < x.shape[0] <= CPU_CALL_TOKENS
        and x.is_contiguous()
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in float32
        )
    )


def _cpu_call(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm` can take the C path: a few contiguous float32/bf16 rows on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() >= 1
        and 0 < x.numel() <= CPU_CALL_VALUES
        and x.is_contiguous()
        and (
            weight is None
            or (weight.dtype == torch.float32 and weight.is_contiguous()
                and tuple(weight.shape) == (x.shape[-1],) and weight.device.type == "cpu")
        )
    )  # fmt: skip


def rms_norm_ops(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`rms_norm` as torch operations (the definition)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype)


class Linear:
    """`y = x · Wᵀ` with W kept dequantized; `quantized` marks an FP8/FP4 weight of the checkpoint,
    whose input the reference snaps to FP8 (1×128 blocks) when quantisation is simulated."""

    __slots__ = ("quantized", "weight")

    def __init__(self, weight: torch.Tensor, quantized: bool):
        self.weight = weight
        self.quantized = quantized

    def __call__(self, x: torch.Tensor, simulate: bool = False) -> torch.Tensor:
        if simulate and self.quantized:
            x = qsim.act_snap(x)
        return F.linear(x.to(self.weight.dtype), self.weight)

    def to(self, device: torch.device | str) -> Linear:
        return Linear(self.weight.to(device), self.quantized)


def into(out: tuple | None, got: tuple) -> tuple:
    """`got`, or `out` holding it (a captured step's fixed buffers): each tensor copied there
    unless the path that made it already wrote in place."""
    if out is None:
        return got
    for dst, src in zip(out, got, strict=True):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    return out
