"""The runtime's CPU head options: bf16 (the stored BF16 values) and FP8 (quantized at load with the
official 128×128 tile format, run by the C FP8 kernel) instead of a float32 copy read per token.

`head_dtype="fp32"` is the exact reference path (tests/test_runtime.py checks it to 1e-4)."""

from __future__ import annotations

import pytest
import torch

from flashdesk.engine import quant
from flashdesk.engine.checkpoint import Checkpoint
from flashdesk.engine.checkpoint.writer import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.generate import SamplingParams, Session
from flashdesk.engine.model.loader import load_model
from flashdesk.engine.runtime import (
    DEFAULT_HEAD_DTYPE,
    Fp8Head,
    Placement,
    load_runtime,
)
from flashdesk.engine.runtime_experts import MMAP

# float32 inputs to the C kernels: these tests measure the head alone (the experts' bf16
# rounding, the runtime's default, is tested in test_runtime.py)
FLOAT32_KERNELS = {"kernel_activations": torch.float32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = ModelConfig.tiny()
    folder = write_random(tmp_path_factory.mktemp("head") / "ckpt", config, seed=7)
    ref = load_model(folder)
    ids = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(3))
    return folder, config, ref, ids, ref.forward_full(ids)


class _Chars:
    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _greedy(model, ids) -> list[int]:
    session = Session(model, _Chars(), context_limit=256)
    list(session.stream(ids[:8].tolist(), SamplingParams(temperature=0, max_tokens=12)))
    return list(session.held_ids)


def _stored_head(folder) -> torch.Tensor:
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.info("head.weight").dtype == "BF16"  # as in the official checkpoint
        return ckpt.tensor("head.weight", torch.bfloat16).clone()


def test_cpu_default_is_bf16_and_reads_half_the_bytes(tiny):
    folder, config, ref, ids, want = tiny
    v, d = config.vocab_size, config.hidden_size
    assert DEFAULT_HEAD_DTYPE == "bf16"
    with load_runtime(folder, placement=Placement.uniform(config, MMAP), **FLOAT32_KERNELS) as rt:
        assert rt.head_dtype == "bf16"
        head = rt.model.head
        assert head.dtype == torch.bfloat16 and head.nbytes == v * d * 2
        assert head.nbytes * 2 == ref.head.nbytes  # the float32 reference head
        # the very values stored in the checkpoint, not a rounding of something else
        assert torch.equal(head, _stored_head(folder))
        got = rt.forward_full(ids)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # the C kernel widens each bf16 weight exactly and keeps float32 activations and sums:
        # the float32 head's logits up to summation order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_dtype", ["bf16", "fp8"])
def test_greedy_generation_matches_the_reference(tiny, head_dtype):
    """On the tiny model neither head changes any greedy pick (bf16 is the float32 head up to
    summation order; FP8 rounds, and a near-tie between the top two logits could flip)."""
    folder, config, ref, ids, _ = tiny
    placement = Placement.uniform(config, MMAP)
    with load_runtime(folder, placement=placement, head_dtype=head_dtype, **FLOAT32_KERNELS) as rt:
        assert _greedy(rt, ids) == _greedy(ref, ids)


def test_fp8_head_is_a_quarter_and_bounded(tiny):
    folder, config, ref, ids, want = tiny
    v, d = config.vocab_size, config.hidden_size
    placement = Placement.uniform(config, MMAP)
    with load_runtime(folder, placement=placement, head_dtype="fp8", **FLOAT32_KERNELS) as rt:
        assert rt.head_dtype == "fp8"
        head, scale = rt.model.head, rt.model.head_linear.scale
        assert head.element_size() == 1 and head.nbytes * 4 == ref.head.nbytes
        assert scale.shape == (-(-v // 128), -(-d // 128))
        codes, scales = quant.quantize_fp8(_stored_head(folder).float())
        assert torch.equal(head.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(scale.view(torch.uint8), scales.view(torch.uint8))
        got = rt.forward_full(ids)
        # same logits as the float32 matmul against the dequantized FP8 head
        deq = quant.dequant_fp8(codes, scales)
        exact_fp8 = torch.nn.functional.linear(_normed_hidden(ref, ids), deq)
        torch.testing.assert_close(got, exact_fp8, rtol=1e-4, atol=1e-4)
        # and within E4M3's precision (3 mantissa bits) of the exact logits
        err = (got - want).abs()
        bound = 2.0**-3 * want.abs().amax(-1, keepdim=True)
        assert bool((err <= bound).all()), float((err - bound).max())


def _normed_hidden(model, ids) -> torch.Tensor:
    """The reference's input to the head for every position (hc_head, final norm)."""
    seen = {}
    real = model.head_logits

    def spy(h):
        seen["h"] = h.float()
        return real(h)

    model.head_logits = spy
    try:
        model.forward_full(ids)
    finally:
        del model.head_logits
    return seen["h"]


def test_fp8_head_quantizes_in_tile_aligned_chunks():
    """Rows quantized in chunks give the codes of one whole-matrix quantization (chunk edges on
    the 128-row tile grid, a last partial tile included)."""
    w = torch.randn(8192 + 200, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    head = Fp8Head(w)
    codes, scales = quant.quantize_fp8(w)
    assert torch.equal(head.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(head.scale.view(torch.uint8), scales.view(torch.uint8))
    x = torch.randn(3, 256)
    want = torch.nn.functional.linear(x, quant.dequant_fp8(codes, scales).float())
    torch.testing.assert_close(head(x), want, rtol=1e-4, atol=1e-4)


def test_head_dtype_is_checked(tiny):
    folder = tiny[0]
    with pytest.raises(ValueError, match="head_dtype must be one of"):
        load_runtime(folder, head_dtype="int4")
    if not torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="for the CPU mode"):
        load_runtime(folder, device="cuda", head_dtype="bf16")
