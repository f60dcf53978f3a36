"""The GPU runtime's linears over stored weights (`engine.gpu_linears`), run here through Triton's
interpreter: the same values as the float32 weights they stand for, on both of their paths (the
kernel for a decode step's few tokens, widening per call for a prompt)."""

from __future__ import annotations

import pytest
import torch
from _triton import kernels_device

from flashdesk.engine import gpu_kernels
from flashdesk.engine.gpu_linears import CudaBf16Linear


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, gpu_kernels.MAX_TOKENS + 1])
def test_bf16_linear_gives_the_float32_weights_product(x_dtype, tokens):
    """Router gates, compressor projections and the head keep BF16 in VRAM and widen in the
    kernel: x (widened if bf16) · W.float()ᵀ in float32, whatever x's dtype."""
    device = kernels_device()
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 256, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, tokens, 256, generator=g).to(x_dtype)
    lin = CudaBf16Linear(w.to(device))
    lin.fused = True  # as on a GPU with Triton
    got = lin(x.to(device))
    assert got.dtype == torch.float32 and got.shape == (2, tokens, 48)
    want = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
