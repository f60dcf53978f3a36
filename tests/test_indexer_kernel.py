"""The lightning indexer's scores on the CPU (`kernels.index_scores`, `indexer.host_scores`):
every variant this CPU runs equals the scalar reference and float64, from float32, bfloat16 and
FP8 keys as stored; a key's score does not depend on the call (threads, how many keys); and the
model gives the same logits with it as with the torch ops it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gil import python_ticks_during

from flashdesk.engine import kernels
from flashdesk.engine.cache import Fp4Rows, Fp8KeyRows, NativeRows, RowStore
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.model import attention
from flashdesk.engine.model.indexer import Indexer, host_scores
from flashdesk.engine.runtime import load_runtime
from flashdesk.engine.synthetic import SyntheticCheckpoint

ISAS = kernels.available_isas()


def _inputs(s, h, d, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, h, d, generator=g)
    w = torch.rand(s, h, generator=g) * 0.1
    keys = torch.randn(t, d, generator=g)
    return q, w, keys


def _float64(q, w, keys) -> torch.Tensor:
    """Σ_h w · ReLU(q_h · k) in float64, and the Σ|w||q||k| bound of its rounding."""
    q, w, keys = q.double(), w.double(), keys.double()
    dots = torch.einsum("shd,td->sht", q, keys)
    bound = torch.einsum("sht,sh->st", torch.einsum("shd,td->sht", q.abs(), keys.abs()), w.abs())
    return torch.einsum("sht,sh->st", dots.relu(), w), bound


def _fp8_keys(keys):
    scale = keys.abs().amax(-1, keepdim=True) / 448.0
    codes = (keys / scale).to(torch.float8_e4m3fn)
    return codes, scale, codes.float() * scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("s", "h", "d", "t"), [(1, 64, 128, 1000), (3, 5, 40, 37), (16, 9, 128, 70)]
)
@pytest.mark.parametrize("stored", ["f32", "bf16", "fp8"])
def test_scores_equal_float64(isa, s, h, d, t, stored):
    """Any head count (groups of 8/4/2 and the rest), key width and count (tiles of 32 and a
    partial one), several queries: float64's scores within fp32 rounding of the sums."""
    q, w, keys = _inputs(s, h, d, t)
    scale = None
    if stored == "bf16":
        keys = keys.bfloat16()
        exact = keys.float()
    elif stored == "fp8":
        keys, scale, exact = _fp8_keys(keys)
    else:
        exact = keys
    got = kernels.index_scores(q, w, keys, scale, isa=isa)
    want, bound = _float64(q, w, exact)
    assert got.dtype == torch.float32 and got.shape == (s, t)
    assert float(((got.double() - want).abs() / (bound + 1e-30)).max()) < 1e-5
    ref = kernels.index_scores(q, w, keys, scale, isa="scalar")
    assert float(((got.double() - ref.double()).abs() / (bound + 1e-30)).max()) < 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_a_keys_score_does_not_depend_on_the_call(isa):
    """The same bits whatever the thread count and however many keys follow (a decode step
    scores a store's whole capacity, a prompt call its visible rows): the top-k picks agree."""
    q, w, keys = _inputs(2, 64, 128, 1500, seed=1)
    keys = keys.bfloat16()
    whole = kernels.index_scores(q, w, keys, isa=isa, threads=2)
    assert torch.equal(kernels.index_scores(q, w, keys, isa=isa, threads=1), whole)
    for t in (1, 31, 33, 700):
        assert torch.equal(kernels.index_scores(q, w, keys[:t], isa=isa), whole[:, :t])
    out = torch.full((2, 1500), float("nan"))
    assert kernels.index_scores(q, w, keys, out=out, isa=isa) is out and torch.equal(out, whole)


def test_numpy_inputs_and_empty_calls():
    q, w, keys = _inputs(1, 4, 32, 50)
    got = kernels.index_scores(q.numpy(), w.numpy(), keys.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (1, 50)
    np.testing.assert_allclose(got, kernels.index_scores(q, w, keys).numpy(), rtol=0, atol=0)
    assert kernels.index_scores(q, w, keys[:0]).shape == (1, 0)
    assert kernels.index_scores(q[:0], w[:0], keys).shape == (0, 50)


def test_errors_are_clear():
    q, w, keys = _inputs(1, 4, 32, 50)
    with pytest.raises(TypeError, match="q must be float32"):
        kernels.index_scores(q.bfloat16(), w, keys)
    with pytest.raises(ValueError, match=r"w has shape \(4,\), expected \(1, 4\)"):
        kernels.index_scores(q, w[0], keys)
    with pytest.raises(ValueError, match=r"keys must be \[T, 32\]"):
        kernels.index_scores(q, w, keys[:, :16].contiguous())
    with pytest.raises(ValueError, match="float32 scale per key"):
        kernels.index_scores(q, w, _fp8_keys(keys)[0])
    with pytest.raises(ValueError, match="out must be float32"):
        kernels.index_scores(q, w, keys, out=torch.zeros(1, 49))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.index_scores(q, w, keys.t().contiguous().t())


def test_releases_the_gil():
    q, w, keys = _inputs(4, 64, 128, 60000, seed=2)
    assert python_ticks_during(lambda: kernels.index_scores(q, w, keys)) > 0


# ------------------------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "codec", [NativeRows(128, torch.float32), NativeRows(128, torch.bfloat16), Fp8KeyRows(128)]
)
def test_host_scores_read_each_stored_format(codec):
    """From the store's own buffers, rows past its count left alone: `Indexer.scores` of the
    decoded keys (what the torch path computes), within fp32 summation order."""
    q, w, keys = _inputs(3, 64, 128, 300, seed=3)
    store = RowStore(codec, "cpu")
    store.append(keys)
    store.reserve(1000)  # capacity past the rows: scratch the call must not read
    got = host_scores(q, w, store, 200)
    want = Indexer.scores(q, w, store.view().float()[:200])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_host_scores_leave_what_they_cannot_read_to_the_torch_path():
    q, w, keys = _inputs(1, 4, 32, 40)
    fp4 = RowStore(Fp4Rows(32, torch.float32), "cpu")
    fp4.append(keys)
    assert host_scores(q, w, fp4, 40) is None  # FP4 keys (a model that simulates)
    native = RowStore(NativeRows(32, torch.float32), "cpu")
    native.append(keys)
    assert host_scores(q.bfloat16(), w, native, 40) is None
    assert host_scores(q, w, native, 41) is None  # past the capacity
    assert host_scores(q, w, native, 40) is not None


@pytest.mark.parametrize("kv_format", ["native", "bf16", "fp8"])
def test_the_model_gives_the_torch_paths_logits(kv_format, monkeypatch):
    """Prefill past the point where CSA gathers its top-k rows per query, then decode: the
    same logits with the kernel as with `Indexer.scores` (same picks; tiny top-k of 4)."""
    config = ModelConfig.tiny(
        num_hidden_layers=3, num_nextn_predict_layers=0, compress_ratios=(0, 4, 4), head_dim=80
    )  # no-rope channels in whole 64-blocks, as the FP8 KV rows need
    ids = torch.randint(0, config.vocab_size, (80,), generator=torch.Generator().manual_seed(6))
    calls = []
    real = attention.host_scores

    def counted(*args):
        got = real(*args)
        calls.append(got is not None)
        return got

    with load_runtime(SyntheticCheckpoint(config, seed=7)) as rt:

        def run():
            state = rt.new_state(kv_format)
            rows = [rt.prefill(ids[:60].tolist(), state)]
            return torch.stack(rows + [rt.decode(int(t), state) for t in ids[60:]])

        monkeypatch.setattr(attention, "host_scores", counted)
        got = run()
        assert calls and all(calls)  # the kernel scored every block and step
        monkeypatch.setattr(attention, "host_scores", lambda *args: None)
        torch.testing.assert_close(got, run(), rtol=1e-5, atol=1e-5)
