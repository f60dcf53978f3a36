"""The forward pass against itself and against the spec's numbers: chunked prefill and decode
with the per-sequence state equal one full pass; state size and reset; input errors; the
quantisation-simulation primitives; RoPE/YaRN and Sinkhorn properties."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import one_thread, our_model, random_official_tensors, tiny_config

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.model import qsim
from flashdesk.engine.model.mhc import sinkhorn
from flashdesk.engine.model.model import ModelInputError
from flashdesk.engine.model.rope import apply_rope, inverse_frequencies

TOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, our_model(config, random_official_tensors(config, 7))


_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _ids(n, vocab, seed=5):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _state_tensors(state):
    out = {}
    for i, layer in enumerate(state.layers):
        out[f"{i}.window"] = layer.window.slots()
        if layer.kv_entries is not None:
            out[f"{i}.entries"] = layer.kv_entries.view()
            n_open = state.position % layer.carry.ratio
            out[f"{i}.carry_kv"] = layer.carry.kv[:n_open]
            out[f"{i}.carry_gate"] = layer.carry.gate[:n_open]
            if layer.carry.overlap:
                out[f"{i}.prev_kv"] = layer.carry.prev_kv
                out[f"{i}.prev_gate"] = layer.carry.prev_gate
        if layer.index_keys is not None:
            out[f"{i}.index_keys"] = layer.index_keys.view()
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 16, 17, 50])
def test_chunked_prefill_equals_one_pass(tiny, chunk):
    config, model = tiny
    ids = _ids(70, config.vocab_size)
    one = model.new_state()
    ref = model.prefill(ids, one)
    chunked = model.new_state()
    got = model.prefill(ids, chunked, chunk_size=chunk)
    assert (got - ref).abs().max().item() <= TOL
    assert chunked.position == one.position == 70
    a, b = _state_tensors(one), _state_tensors(chunked)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        finite = torch.isfinite(a[name])
        assert torch.equal(finite, torch.isfinite(b[name])), name
        assert (a[name][finite] - b[name][finite]).abs().max().item() <= TOL, name


def test_decode_after_prefill_equals_full_forward(tiny):
    config, model = tiny
    ids = _ids(60, config.vocab_size, 6)
    full = model.forward_full(ids)
    state = model.new_state()
    logits = [model.prefill(ids[:13], state)]
    logits += [model.decode(int(t), state) for t in ids[13:]]
    assert (torch.stack(logits) - full[12:]).abs().max().item() <= TOL


def test_states_are_independent_and_reset(tiny):
    config, model = tiny
    a_ids, b_ids = _ids(30, config.vocab_size, 1), _ids(30, config.vocab_size, 2)
    state = model.new_state()
    first = model.prefill(a_ids, state)
    other = model.new_state()
    model.prefill(b_ids, other)  # must not disturb `state`
    nxt = model.decode(3, state)
    fresh = model.new_state()
    model.prefill(a_ids, fresh)
    assert torch.allclose(model.decode(3, fresh), nxt, atol=TOL)
    state.reset()
    assert state.position == 0 and state.layers[1].kv_entries.n == 0
    assert torch.allclose(model.prefill(a_ids, state), first, atol=TOL)


def test_state_bytes_follow_the_cache_formula(tiny):
    config, model = tiny
    n = 67
    state = model.new_state()
    model.prefill(_ids(n, config.vocab_size), state)
    d, di, w = config.head_dim, config.index_head_dim, config.sliding_window
    b = state.breakdown()
    f32 = 4
    assert b["window"] == (config.num_hidden_layers + len(state.mtp)) * w * d * f32
    ratios = [s.compress_ratio for s in config.main_layers]
    assert b["compressed_kv"] == sum(n // r * d * f32 for r in ratios if r)
    assert b["index_keys"] == sum(n // r * di * f32 for r in ratios if r == 4)
    assert state.nbytes == sum(b.values())


def test_fp8_kv_layout_is_close_without_simulation(tiny):
    """Packed FP8 KV rounds the no-rope channels when the model does not simulate the reference's
    quantisation: logits move a little, decode and chunking still agree with themselves."""
    config = tiny_config(head_dim=128, qk_rope_head_dim=64, index_head_dim=64)
    model = our_model(config, random_official_tensors(config, 12))
    ids = _ids(50, config.vocab_size, 12)
    exact = model.prefill(ids, model.new_state())
    packed = model.new_state(kv_format="fp8")
    lossy = model.prefill(ids[:20], packed, chunk_size=6)
    for t in ids[20:]:
        lossy = model.decode(int(t), packed)
    assert (lossy - exact).abs().max().item() > 0
    corr = torch.corrcoef(torch.stack((lossy, exact)))[0, 1].item()
    assert corr > 0.95
    with pytest.raises(ValueError, match="kv_format"):
        model.new_state(kv_format="fp4")
    with pytest.raises(ValueError, match="blocks of 64"):
        tiny[1].new_state(kv_format="fp8")  # 48 no-rope channels


def test_bf16_runs_close_to_fp32():
    config = tiny_config()
    tensors = random_official_tensors(config, 8)
    ids = _ids(40, config.vocab_size, 9)
    ref = our_model(config, tensors).forward_full(ids)
    low = our_model(config, tensors, dtype=torch.bfloat16).forward_full(ids)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    corr = torch.corrcoef(torch.stack((low.flatten(), ref.flatten())))[0, 1].item()
    assert corr > 0.95


@pytest.mark.parametrize("start", range(31, 47))  # every phase of the ratios 4 and 16
def test_a_calls_last_token_drops_out_exactly(tiny, start):
    """A draft token verified and rejected: a 2-token call with its last token dropped leaves
    the state a 1-token call would, whichever windows that token closed."""
    config, model = tiny
    ids = _ids(start + 6, config.vocab_size, 8)
    one, two = model.new_state(), model.new_state()
    model.prefill(ids[:start], one)
    model.prefill(ids[:start], two)
    model.decode(int(ids[start]), one)
    point = two.drop_point(2)
    model.forward_streams(torch.tensor([int(ids[start]), 7]), two)  # 7: the rejected draft
    two.drop_last(point)
    assert two.position == one.position == start + 1
    a, b = _state_tensors(one), _state_tensors(two)
    for name in a:
        if name.endswith(".window"):  # the dropped token's ring slot is rewritten before use
            continue
        assert a[name].shape == b[name].shape, name
        finite = torch.isfinite(a[name])
        assert torch.equal(finite, torch.isfinite(b[name])), name
        assert torch.allclose(a[name][finite], b[name][finite], rtol=0, atol=TOL), name
    for t in ids[start + 1 :]:
        la, lb = model.decode(int(t), one), model.decode(int(t), two)
        assert (la - lb).abs().max().item() <= TOL


def test_drop_last_refuses_what_it_cannot_undo(tiny):
    config, model = tiny
    state = model.new_state()
    model.prefill(_ids(9, config.vocab_size), state)
    with pytest.raises(ValueError, match="smallest compression ratio"):
        state.drop_point(5)
    point = state.drop_point(2)
    model.decode(3, state)  # one token, not the two the point was taken for
    with pytest.raises(RuntimeError, match="must follow the call"):
        state.drop_last(point)


def test_mtp_draft_logits_are_incremental(tiny):
    """The MTP head on the main model's final streams: one pass equals step by step."""
    config, model = tiny
    ids = _ids(40, config.vocab_size, 4)
    state = model.new_state()
    streams = model.forward_streams(ids[:-1], state)
    full = model.mtp_logits(streams, ids[1:], state)
    assert full.shape == (39, config.vocab_size) and torch.isfinite(full).all()
    assert full.std() > 0.3
    step_state = model.new_state()
    rows = []
    for i in range(39):
        s = model.forward_streams(ids[i : i + 1], step_state)
        rows.append(model.mtp_logits(s, ids[i + 1 : i + 2], step_state)[0])
    assert (torch.stack(rows) - full).abs().max().item() <= TOL


def test_speculation_keeps_main_and_draft_logits_exact(tiny):
    """Prefill, then draft / verify steps whose drafts are kept or rejected in turn: every main
    logit and every draft equals one full pass over the tokens kept (the MTP block stays in
    step through rejections, which it never sees)."""
    config, model = tiny
    ids = _ids(48, config.vocab_size, 9)
    full = model.forward_full(ids)  # row i: the token after position i
    ref_state = model.new_state()
    mtp_full = model.mtp_logits(model.forward_streams(ids[:-1], ref_state), ids[1:], ref_state)
    model.enable_speculation()
    try:
        state = model.new_state()
        logits = model.prefill(ids[:21], state, chunk_size=8)
        assert (logits - full[20]).abs().max().item() <= TOL
        i, kept = 21, 0
        while i + 1 < ids.numel():
            token = int(ids[i])
            q = model.draft(token, state)
            assert (q - mtp_full[i - 1]).abs().max().item() <= TOL, i  # the token after next
            keep = (i // 2) % 2 == 0
            d = int(ids[i + 1]) if keep else (int(ids[i + 1]) + 1) % config.vocab_size
            out = model.verify([token, d], state)
            assert (out[0] - full[i]).abs().max().item() <= TOL
            if keep:
                assert (out[1] - full[i + 1]).abs().max().item() <= TOL
                i, kept = i + 2, kept + 1
            else:
                model.reject_last(state)
                i += 1
            assert state.position == i == state.mtp_position + state.mtp_pending.shape[0]
        assert kept >= 4
    finally:
        model.enable_speculation(False)


def test_speculation_needs_the_mtp_block_and_a_verify(tiny):
    config, model = tiny
    tensors = {k: v for k, v in random_official_tensors(config, 7).items() if "mtp." not in k}
    plain = our_model(config, tensors)
    with pytest.raises(RuntimeError, match="MTP block"):
        plain.enable_speculation()
    state = model.new_state()
    model.prefill(_ids(5, config.vocab_size), state)
    with pytest.raises(RuntimeError, match="reject_last must follow verify"):
        model.reject_last(state)
    with pytest.raises(RuntimeError, match="speculation on"):
        model.draft(3, state)


@pytest.mark.parametrize(
    ("ids", "match"),
    [([], "at least one token"), ([1, 512], "outside the vocabulary"), ([[1, 2]], "1-D")],
)
def test_bad_token_ids_are_refused_clearly(tiny, ids, match):
    _, model = tiny
    with pytest.raises(ModelInputError, match=match):
        model.prefill(ids, model.new_state())


def test_chunk_size_must_be_positive(tiny):
    _, model = tiny
    with pytest.raises(ModelInputError, match="chunk_size"):
        model.prefill([1, 2], model.new_state(), chunk_size=0)


# ---------------------------------------------------------------- numerics primitives


def test_yarn_correction_range_of_v4_flash():
    """Spec §2.5: pairs 0..15 keep ω, pairs 25..31 are divided by 16, 16..24 blend."""
    c = ModelConfig.v4_flash()
    plain = inverse_frequencies(64, c.compress_rope_theta)
    yarn = inverse_frequencies(
        64, c.compress_rope_theta, c.rope_factor, c.rope_original_max_position, 32, 1
    )
    assert torch.equal(yarn[:16], plain[:16])
    assert torch.allclose(yarn[25:], plain[25:] / 16)
    assert ((yarn[16:25] < plain[16:25]) & (yarn[16:25] > plain[16:25] / 16)).all()
    main = inverse_frequencies(64, 10000.0)
    assert torch.allclose(main, 10000.0 ** (-torch.arange(0, 64, 2) / 64))


def test_rope_rotates_only_the_tail_pairs_and_inverts():
    x = torch.randn(5, 3, 40)
    pos = torch.arange(10, 15)
    inv = inverse_frequencies(16, 10000.0)
    ang = pos[:, None].float() * inv
    y = apply_rope(x, ang.cos(), ang.sin())
    assert torch.equal(y[..., :24], x[..., :24])
    pair = (
        torch.complex(x[..., 24::2], x[..., 25::2])
        * torch.polar(torch.ones_like(ang), ang)[:, None]
    )
    assert torch.allclose(y[..., 24::2], pair.real, atol=1e-6)
    assert torch.allclose(y[..., 25::2], pair.imag, atol=1e-6)
    assert torch.allclose(apply_rope(y, ang.cos(), ang.sin(), inverse=True), x, atol=1e-6)


def test_sinkhorn_c_kernel_equals_the_torch_ops():
    """On the CPU one C call replaces the ~120 torch ops of the definition (same order)."""
    from flashdesk.engine.model.mhc import sinkhorn_ops

    for shape in ((1, 4, 4), (37, 4, 4), (2, 3, 4, 4), (6, 3, 3)):
        comb = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3
        got, want = sinkhorn(comb, 20, 1e-6), sinkhorn_ops(comb, 20, 1e-6)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        assert got.data_ptr() != comb.data_ptr()  # the input is left as it was
    strided = torch.randn(4, 4, 8)[..., ::2].transpose(-1, -2)  # not contiguous
    torch.testing.assert_close(sinkhorn(strided, 5, 1e-6), sinkhorn_ops(strided, 5, 1e-6))
    half = torch.randn(2, 4, 4).bfloat16()  # other dtypes: the ops
    assert sinkhorn(half, 3, 1e-6).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "hc"), [(1, 4), (3, 4), (2, 3)])
def test_hyper_connection_c_calls_equal_the_torch_ops(dtype, tokens, hc):
    """A decode step's hyper-connection pre and post steps on the CPU are one C call each; they
    equal the torch ops (the definition) to float32 rounding, with the streams in float32 or
    bf16, with and without the routed experts' partial sums; prompts keep the ops."""
    from flashdesk.engine.model import common, mhc

    g = torch.Generator().manual_seed(tokens * 10 + hc)
    D, n_mix = 96, hc * (2 + hc)
    x = torch.randn(tokens, hc, D, generator=g).to(dtype)
    fn = torch.randn(n_mix, hc * D, generator=g) * 0.05
    scale, base = torch.rand(3, generator=g), torch.randn(n_mix, generator=g)
    got = mhc.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    want = mhc.hc_pre_ops(x, fn, scale, base, 20, 1e-6, 1e-6)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    _, post, comb = want
    f = torch.randn(tokens, D, generator=g).to(dtype)
    for add in (None, torch.randn(tokens, D, generator=g), torch.randn(tokens, 3, D, generator=g)):
        a, b = mhc.hc_post(f, x, post, comb, add), mhc.hc_post_ops(f, x, post, comb, add)
        assert a.dtype == b.dtype == dtype
        # bf16 streams: f + add rounded to bf16 before use, the outputs rounded once more; a
        # value within float32 rounding of a bf16 tie may land on either side
        tol = (
            {"rtol": 8e-3, "atol": 8e-3}
            if dtype == torch.bfloat16
            else {"rtol": 1e-5, "atol": 1e-6}
        )
        torch.testing.assert_close(a, b, **tol)
    calls = []
    real = mhc._kernels.hc_pre
    mhc._kernels.hc_pre = lambda *a: calls.append(a) or real(*a)
    try:
        many = torch.randn(common.CPU_CALL_TOKENS + 1, hc, D, generator=g).to(dtype)
        mhc.hc_pre(many, fn, scale, base, 20, 1e-6, 1e-6)  # a prompt's tokens: the torch ops
        assert not calls
        mhc.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
        assert len(calls) == 1
    finally:
        mhc._kernels.hc_pre = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_rms_norm_c_calls_equal_the_torch_ops(dtype):
    """A decode step's rotary embeddings and RMSNorms on the CPU are one C call each: RoPE is
    bit-identical to the ops (same float32 operations, output dtypes and the inverse rotation
    included); RMSNorm equals them to float32 rounding (its sum of squares in another order);
    prompts' many rows keep the ops."""
    from flashdesk.engine.model import common, rope

    g = torch.Generator().manual_seed(5)
    for shape in ((1, 64, 96), (3, 96), (2, 4, 40)):
        ang = torch.rand(shape[0], 16, generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
        x = torch.randn(shape, generator=g).to(dtype)
        for out_dtype in (None, torch.float32, torch.bfloat16):
            for inverse in (False, True):
                got = rope.apply_rope(x, cos, sin, inverse, out_dtype)
                want = rope.apply_rope_ops(x, cos, sin, inverse, out_dtype)
                assert got.dtype == want.dtype and torch.equal(got, want)
        for weight in (None, torch.rand(shape[-1], generator=g) + 0.5):
            got, want = common.rms_norm(x, weight, 1e-6), common.rms_norm_ops(x, weight, 1e-6)
            assert got.dtype == want.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:  # one bf16 step where float32 rounding lands next to a tie
                torch.testing.assert_close(got, want, rtol=8e-3, atol=8e-3)
    calls = []
    real = rope._kernels.rope
    rope._kernels.rope = lambda *a: calls.append(a) or real(*a)
    try:
        many = torch.randn(common.CPU_CALL_TOKENS + 1, 96, generator=g).to(dtype)
        ang = torch.rand(many.shape[0], 16, generator=g)
        rope.apply_rope(many, ang.cos(), ang.sin())  # a prompt: the ops
        assert not calls
    finally:
        rope._kernels.rope = real


def test_sinkhorn_gives_unit_columns_and_near_unit_rows():
    comb = sinkhorn(torch.randn(10, 4, 4), 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(10, 4), atol=1e-5)  # last pass: columns
    assert torch.allclose(comb.sum(-1), torch.ones(10, 4), atol=2e-2)  # rows: nearly converged
    assert (comb > 0).all()


def test_pow2_ceil_is_exact():
    x = torch.tensor([1.0, 1.0000001, 0.75, 2.0**-20, 3.0 * 2.0**-9, 448.0])
    assert qsim.pow2_ceil(x).tolist() == [1.0, 2.0, 1.0, 2.0**-20, 2.0**-7, 512.0]


def test_fp8_snap_blocks_scales_and_idempotence():
    x = torch.randn(6, 128) * torch.logspace(-3, 2, 6)[:, None]
    y = qsim.fp8_snap(x, 64)
    assert torch.equal(qsim.fp8_snap(y, 64), y)
    for row_x, row_y in zip(x.view(-1, 64), y.view(-1, 64), strict=True):
        scale = qsim.pow2_ceil(row_x.abs().max() / 448)
        q = row_y / scale
        assert torch.equal(q, q.to(torch.float8_e4m3fn).float())  # on the E4M3 grid
        assert (row_y - row_x).abs().max() <= scale * 16  # within half an E4M3 step at 448
    assert qsim.fp8_snap(torch.zeros(1, 64), 64).abs().sum() == 0


def test_fp4_round_ties_to_even_and_snap():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 0.3, 5.5, 6.0])
    assert qsim.fp4_round(v).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 0.5, 6.0, 6.0]
    x = torch.randn(4, 64)
    y = qsim.fp4_snap(x, 32)
    assert torch.equal(qsim.fp4_snap(y, 32), y)
    assert (
        len(
            torch.unique(
                (
                    y.view(-1, 32) / qsim.pow2_ceil(x.view(-1, 32).abs().amax(-1, keepdim=True) / 6)
                ).abs()
            )
        )
        <= 8
    )


def test_hadamard_is_orthonormal():
    x = torch.randn(3, 128)
    h = qsim.hadamard(x)
    assert torch.allclose(qsim.hadamard(h), x, atol=1e-5)
    assert torch.allclose(h.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
    assert math.isclose(float(qsim.hadamard(torch.eye(4))[0, 0]), 0.5)


def test_fp8_rows_are_583_bytes_and_lossless_for_snapped_bf16_rows():
    """Spec §3.2 at V4 dims: 448 E4M3 codes + 7 E8M0 scales + 64 BF16 rope channels."""
    from flashdesk.engine.cache import Fp8Rows, RowStore

    rows = torch.randn(10, 512) * torch.logspace(-4, 3, 10)[:, None]
    rows = torch.cat((qsim.fp8_snap(rows[:, :448], 64), rows[:, 448:]), -1).to(torch.bfloat16)
    store = RowStore(Fp8Rows(512, 64, torch.bfloat16), "cpu")
    store.append(rows[:3])
    store.append(rows[3:])
    assert store.nbytes == 10 * 583
    assert torch.equal(store.view(), rows)


def test_fp4_index_keys_are_68_bytes_and_lossless_for_snapped_rows():
    from flashdesk.engine.cache import Fp4Rows, RowStore

    rows = qsim.fp4_snap(qsim.hadamard(torch.randn(9, 128) * torch.logspace(-3, 2, 9)[:, None]))
    rows[0, :32] = 0.0  # an all-zero block
    store = RowStore(Fp4Rows(128, torch.float32), "cpu")
    store.append(rows[:4])
    store.append(rows[4:])
    assert store.nbytes == 9 * 68
    assert torch.equal(store.view(), rows)
