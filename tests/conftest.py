"""Shared test setup: Qt offscreen, no network, deterministic seeds."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Without a GPU the Triton kernels (engine/gpu_kernels.py) are tested in Triton's CPU interpreter,
# which must be on before Triton is first imported.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (tests/_*.py) import by name; --import-mode=importlib does not put tests/ on
# sys.path by itself.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
