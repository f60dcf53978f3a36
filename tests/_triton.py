"""Where the tests run the Triton expert kernels: compiled on a CUDA GPU, else in Triton's CPU
interpreter (tests/conftest.py turns it on before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

from flashdesk.engine import gpu_kernels, runtime
from flashdesk.engine.gpu_linears import CudaBf16Linear, CudaFp8Linear


def kernels_device() -> str:
    """ "cuda" where the compiled kernels run, "cpu" under the interpreter; skips otherwise."""
    if gpu_kernels.triton is None:
        pytest.skip("Triton is not installed (`make test` installs it on Linux x86-64)")
    if torch.cuda.is_available() and not gpu_kernels.INTERPRETED:
        return "cuda"
    if not gpu_kernels.INTERPRETED:
        pytest.skip("no GPU, and Triton's interpreter was not on when Triton was imported")
    return "cpu"


def as_on_a_gpu(model) -> None:
    """The CPU runtime's C-kernel linears swapped for the ones `load_runtime` builds on a GPU
    (their Triton kernels here in the interpreter)."""
    for owner, attr, _ in runtime._fp8_linear_slots(model):
        lin = getattr(owner, attr)
        setattr(owner, attr, CudaFp8Linear(lin.weight, lin.scale, lin.dtype))
    for block in model.blocks:
        lin = block.attn.wo_a
        block.attn.wo_a = CudaFp8Linear(lin.weight, lin.scale, lin.dtype, groups=lin.groups)
    for owner, attr, _ in runtime._bf16_kernel_slots(model):
        setattr(owner, attr, CudaBf16Linear(getattr(owner, attr).weight))
    for owner, attr, _ in [*runtime._fp8_linear_slots(model), *runtime._bf16_kernel_slots(model)]:
        getattr(owner, attr).fused = True
    for block in model.blocks:
        block.attn.wo_a.fused = True
