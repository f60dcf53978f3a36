"""Where the tests run the Triton expert kernels: compiled on a CUDA GPU, else in Triton's CPU
interpreter (tests/conftest.py turns it on before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

from flashdesk.engine import gpu_kernels


def kernels_device() -> str:
    """ "cuda" where the compiled kernels run, "cpu" under the interpreter; skips otherwise."""
    if gpu_kernels.triton is None:
        pytest.skip("Triton is not installed (`make test` installs it on Linux x86-64)")
    if torch.cuda.is_available() and not gpu_kernels.INTERPRETED:
        return "cuda"
    if not gpu_kernels.INTERPRETED:
        pytest.skip("no GPU, and Triton's interpreter was not on when Triton was imported")
    return "cpu"
