"""Where the tests run the Triton expert kernels: compiled on a CUDA GPU, else in Triton's CPU
interpreter (tests/conftest.py turns it on before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

from flashdesk.engine import fp4_triton


def kernels_device() -> str:
    """ "cuda" where the compiled kernels run, "cpu" under the interpreter; skips otherwise."""
    if fp4_triton.triton is None:
        pytest.skip("Triton is not installed (`make test` installs it on Linux x86-64)")
    if torch.cuda.is_available() and not fp4_triton.INTERPRETED:
        return "cuda"
    if not fp4_triton.INTERPRETED:
        pytest.skip("no GPU, and Triton's interpreter was not on when Triton was imported")
    return "cpu"
