"""`load_model`: a V4 checkpoint folder (official layout, FP8/FP4 + E8M0) → a ready `V4Model`.

Weights are dequantized tensor by tensor as the model is built (float32 or bfloat16). This is the
simple all-in-device-memory placement; the memory-lean GPU/RAM split is the runtime's job.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flashdesk.engine.checkpoint import Checkpoint, CheckpointError
from flashdesk.engine.model.common import Numerics
from flashdesk.engine.model.model import V4Model

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    simulate_quant: bool = False,
    with_mtp: bool = False,
) -> V4Model:
    """Open the checkpoint at `path` and build the model on `device` in `dtype`.

    simulate_quant: reproduce the reference's FP8/FP4 activation and KV snapping (closer to the
    official implementation's numbers; off by default, see `Numerics`).
    with_mtp: also load the MTP draft block (`mtp.0.*`).
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported; use torch.float32 (exact) or torch.bfloat16 (half "
            "the memory)"
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' was requested but this torch build sees no CUDA GPU; use device='cpu' "
            "or install a CUDA build of torch"
        )
    with Checkpoint.open(path) as ckpt:
        return _build(ckpt, path, device, dtype, simulate_quant, with_mtp)


def _build(ckpt, path, device, dtype, simulate_quant, with_mtp) -> V4Model:
    config = ckpt.config
    if config is None:
        raise CheckpointError(
            f"{path} has no config.json next to its weights; FlashDesk needs it to know the "
            "model's shape. Download config.json from the model's page into that folder."
        )
    if with_mtp and not ckpt.has_mtp:
        raise CheckpointError(f"{path} holds no MTP block (mtp.0.*); load it with with_mtp=False")

    def fetch(name: str, want: torch.dtype) -> torch.Tensor:
        t = ckpt.tensor(name, want)
        if t.data_ptr() == ckpt.raw(name).data_ptr():
            t = t.clone()  # own the values: the mapped file can be closed after loading
        return t

    return V4Model(
        config,
        fetch,
        device=device,
        numerics=Numerics(dtype=dtype, simulate_quant=simulate_quant),
        with_mtp=with_mtp,
    )
