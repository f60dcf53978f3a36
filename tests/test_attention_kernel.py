"""A decode query's sink attention on the CPU (`kernels.sink_attention`): every variant this CPU
runs equals float64 over float32 and bfloat16 row sets; the result does not depend on the thread
count; and the model's CPU decode through it gives the torch ops' logits."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from _gil import python_ticks_during

from flashdesk.engine import kernels
from flashdesk.engine.cache import Fp8Rows
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.model import attention
from flashdesk.engine.runtime import load_runtime
from flashdesk.engine.synthetic import SyntheticCheckpoint, fill_context

ISAS = kernels.available_isas()


def _float64(q, sink, sets, scale) -> torch.Tensor:
    """The torch definition (`Attention._sink_attend`) in float64."""
    rows = [s.double() for s in sets]
    logits = [torch.einsum("hd,td->ht", q.double(), r) * scale for r in rows]
    probs = torch.cat([*logits, sink.double()[:, None]], -1).softmax(-1)
    out, at = 0, 0
    for r in rows:
        out = out + probs[:, at : at + r.shape[0]] @ r
        at += r.shape[0]
    return out


def _inputs(h, d, counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h, d, generator=g) * 0.2
    sink = torch.randn(h, generator=g)
    return q, sink, [torch.randn(n, d, generator=g) for n in counts]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("h", "d", "counts"), [(64, 512, (128, 700)), (5, 40, (3, 70)), (8, 64, (0, 33)), (3, 16, (1,))]
)
@pytest.mark.parametrize("bf16", [False, True])
def test_equals_float64(isa, h, d, counts, bf16):
    """Any head count and row width, sets of any size (empty ones too, partial tiles), the
    compressed rows in bfloat16 as a store keeps them: float64's result within fp32 rounding."""
    q, sink, sets = _inputs(h, d, counts)
    if bf16:
        sets = [sets[0], *(s.bfloat16() for s in sets[1:])]
    got = kernels.sink_attention(q, sink, sets, d**-0.5, isa=isa)
    want = _float64(q, sink, [s.float() for s in sets], d**-0.5)
    assert got.dtype == torch.float32 and got.shape == (h, d)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


def _packed(rows: torch.Tensor, rope: int) -> tuple:
    """Rows in the packed FP8 KV layout (`cache.Fp8Rows`) and their decoded float32 values."""
    codec = Fp8Rows(rows.shape[1], rope, torch.float32)
    parts = codec.encode(rows)
    return parts, codec.decode(parts)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("d", "rope"), [(576, 64), (128, 0)])
def test_packed_fp8_rows_are_read_as_stored(isa, d, rope):
    """An HCA layer's entries in the packed FP8 KV format (E4M3 codes, an E8M0 exponent per 64,
    the rope channels in BF16) are read from their bytes: float64 over the decoded rows."""
    q, sink, (window, entries) = _inputs(8, d, (5, 300), seed=3)
    parts, decoded = _packed(entries * 4.0, rope)
    got = kernels.sink_attention(q, sink, [window, parts], d**-0.5, isa=isa)
    want = _float64(q, sink, [window, decoded], d**-0.5)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="packed rows must be"):
        kernels.sink_attention(q, sink, [window, (parts[0], parts[1][:, :1], parts[2])], 0.1)
    with pytest.raises(ValueError, match=r"\(codes, exponents, rope\)"):
        kernels.sink_attention(q, sink, [window, parts[:2]], 0.1)


@pytest.mark.parametrize("isa", ISAS)
def test_the_result_does_not_depend_on_the_threads(isa):
    q, sink, sets = _inputs(16, 128, (64, 1000), seed=1)
    one = kernels.sink_attention(q, sink, sets, 0.1, isa=isa, threads=1)
    assert torch.equal(kernels.sink_attention(q, sink, sets, 0.1, isa=isa, threads=2), one)
    out = torch.full((16, 128), float("nan"))
    assert kernels.sink_attention(q, sink, sets, 0.1, out=out, isa=isa) is out
    assert torch.equal(out, one)


def test_numpy_inputs_and_errors():
    q, sink, sets = _inputs(4, 32, (5, 9))
    got = kernels.sink_attention(q.numpy(), sink.numpy(), [s.numpy() for s in sets], 0.2)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, kernels.sink_attention(q, sink, sets, 0.2).numpy())
    with pytest.raises(TypeError, match="q must be float32"):
        kernels.sink_attention(q.double(), sink, sets, 0.2)
    with pytest.raises(ValueError, match=r"sink has shape \(3,\), expected \(4,\)"):
        kernels.sink_attention(q, sink[:3], sets, 0.2)
    with pytest.raises(ValueError, match=r"set 1 must be \[n, 32\]"):
        kernels.sink_attention(q, sink, [sets[0], sets[1][:, :8].contiguous()], 0.2)
    with pytest.raises(ValueError, match="1 to 4 row sets"):
        kernels.sink_attention(q, sink, sets * 3, 0.2)
    with pytest.raises(ValueError, match="no rows"):
        kernels.sink_attention(q, sink, [sets[0][:0]], 0.2)
    with pytest.raises(ValueError, match="out must be float32"):
        kernels.sink_attention(q, sink, sets, 0.2, out=torch.zeros(4, 31))


def test_releases_the_gil():
    q, sink, sets = _inputs(64, 512, (128, 20000), seed=2)
    assert python_ticks_during(lambda: kernels.sink_attention(q, sink, sets, 0.04)) > 0


def _torch_sink_attention(q, sink, sets, scale, out=None, **_):
    def rows(s):
        if not isinstance(s, tuple):
            return s.float()
        codes, _, rope = s
        return Fp8Rows(codes.shape[1] + rope.shape[1], rope.shape[1], torch.float32).decode(s)

    return _float64(q, sink, [rows(s) for s in sets], scale).float()


@pytest.mark.parametrize("kv_format", ["native", "bf16", "fp8"])
def test_cpu_decode_through_it_gives_the_torch_ops_logits(kv_format, monkeypatch):
    """Window, CSA (its top-k picks gathered) and HCA layers (every entry as stored), decode
    steps from a state filled deep enough that CSA gathers: each call of the kernel equals the
    torch ops on its inputs, and the logits are those of the same steps with the torch ops.

    The logits are compared at a tolerance of a few bf16 steps: a last-bit difference in one
    layer's attention can flip the rounding of a row stored as bf16 or FP8, or of the bf16
    activations the next linear takes, and the steps after it carry that on."""
    config = ModelConfig.tiny(
        num_hidden_layers=3, num_nextn_predict_layers=0, compress_ratios=(0, 4, 16), head_dim=80
    )
    errors = []
    real = kernels.sink_attention

    def checked(*args, **kwargs):
        got = real(*args, **kwargs)
        want = _torch_sink_attention(*args, **kwargs)
        errors.append(float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
        return got

    counted = types.SimpleNamespace(sink_attention=checked)
    with load_runtime(SyntheticCheckpoint(config, seed=7)) as rt:

        def run():
            state = rt.new_state(kv_format)
            fill_context(state, config, 400)
            first = rt.prefill(list(range(3, 20)), state)
            return torch.stack([first] + [rt.decode(t, state) for t in (5, 9, 11, 2)])

        monkeypatch.setattr(attention, "kernels", counted)
        got = run()
        assert len(errors) >= 4 * 3  # every decode step's layers (and a prompt's last query)
        assert max(errors) < 1e-5
        monkeypatch.setattr(
            attention, "kernels", types.SimpleNamespace(sink_attention=_torch_sink_attention)
        )
        want = run()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
