"""The GPU expert kernels (engine/gpu_kernels.py) equal the torch dequantize-then-multiply path.

Run compiled on a CUDA GPU (tests/gpu/ scripts run this file there), else in Triton's CPU
interpreter on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from _triton import kernels_device

from flashdesk.engine import gpu_kernels as ft
from flashdesk.engine import quant
from flashdesk.engine.cache import NativeRows, RowStore
from flashdesk.engine.model.moe import swiglu
from flashdesk.engine.runtime_experts import fp4_dequant_torch as fp4_dequant

# the interpreter computes with numpy, which warns where float32 overflows to ±inf as intended
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def _packed(g, *shape):
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _scales(g, *shape):
    # around 2^0 with some spread, so that the SwiGLU clamp at ±10 is reached by some rows
    return torch.randint(119, 131, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("rows", "k"), [(8, 64), (48, 320), (64, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_equals_the_torch_decoder(rows, k, dtype):
    dev = kernels_device()
    g = torch.Generator().manual_seed(rows + k)
    packed, scale = _packed(g, rows, k // 2), _scales(g, rows, k // 32)
    scale[0, 0], scale[-1, -1] = 2, 254  # extremes (results below float32 normals may flush)
    want = fp4_dequant(packed, scale, torch.float32).to(dtype)
    got = ft.dequant_fp4(packed.to(dev), scale.view(torch.float8_e8m0fnu).to(dev), dtype)
    assert got.dtype == dtype and got.shape == (rows, k)
    assert torch.equal(got.cpu(), want)


def _reference(x, experts, weights, slot_of, stacks, limit):
    """Σ weight · expert(x) over the resident picks, dequantized to float32 with torch."""
    w1, s1, w3, s3, w2, s2 = stacks
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            s = int(slot_of[experts[t, j]])
            if s < 0:
                continue
            xt = x[t].float()
            gate = fp4_dequant(w1[s], s1[s], torch.float32) @ xt
            up = fp4_dequant(w3[s], s3[s], torch.float32) @ xt
            h = swiglu(gate, up, limit) * weights[t, j]
            out[t] += fp4_dequant(w2[s], s2[s], torch.float32) @ h
    return out


def _expert_stacks(g, slots, dim, inter):
    return (
        _packed(g, slots, inter, dim // 2),
        _scales(g, slots, inter, dim // 32),
        _packed(g, slots, inter, dim // 2),
        _scales(g, slots, inter, dim // 32),
        _packed(g, slots, dim, inter // 2),
        _scales(g, slots, dim, inter // 32),
    )


RESIDENTS = (3, 0, 9, 15, 7)  # the experts in stack slots 0..4 of 16


def _decode_case(g, tokens, dim, inter, xdtype, k=6):
    """A few tokens' activations `[T, D]`, picks and weights `[T, k]` of 16 experts (the first
    token's first two resident, others absent), slot map and the 5 resident experts' stacks."""
    stacks = _expert_stacks(g, len(RESIDENTS), dim, inter)
    slot_of = torch.full((16,), -1, dtype=torch.int32)
    for s, e in enumerate(RESIDENTS):
        slot_of[e] = s
    experts = torch.stack([torch.randperm(16, generator=g)[:k] for _ in range(tokens)])
    experts[0, :2] = torch.tensor([3, 15])
    weights = torch.rand((tokens, k), generator=g) + 0.1
    x = (torch.randn((tokens, dim), generator=g) / 4).to(xdtype)
    return x, experts, weights, slot_of, stacks


@pytest.mark.parametrize(
    ("tokens", "dim", "inter", "limit", "xdtype", "mode"),
    [
        (1, 256, 128, 10.0, torch.float32, (0, 0)),
        (3, 512, 256, 10.0, torch.bfloat16, (0, 0)),
        (2, 256, 64, 0.0, torch.float32, (0, 0)),  # no clamp
        (2, 256, 128, 10.0, torch.bfloat16, (0, 1)),  # E2M1 through float16 bits
        (1, 512, 128, 10.0, torch.float32, (1, 0)),  # [rows, blocks, 16] tiles
        (2, 256, 128, 10.0, torch.bfloat16, (1, 1)),
        (3, 256, 128, 10.0, torch.bfloat16, (0, 1, 1)),  # down split per pick
        (2, 256, 128, 10.0, torch.bfloat16, (2, 0)),  # rows read as int32 words
        (2, 256, 128, 10.0, torch.float32, (2, 0, 1)),
        (1, 256, 64, 0.0, torch.float16, (2, 0, 1)),
    ],
)
def test_fused_moe_equals_dequantize_then_multiply(tokens, dim, inter, limit, xdtype, mode):
    dev = kernels_device()
    g = torch.Generator().manual_seed(tokens * dim + inter)
    x, experts, weights, slot_of, stacks = _decode_case(g, tokens, dim, inter, xdtype)
    want = _reference(x, experts, weights, slot_of, stacks, limit)
    got = ft.moe(
        x.to(dev),
        experts.to(dev),
        weights.to(dev),
        slot_of.to(dev),
        tuple(t.to(dev) for t in stacks),
        limit,
        mode=mode,
    )
    assert got.dtype == torch.float32 and got.shape == (tokens, dim)
    assert torch.isfinite(got).all()
    err = (got.cpu() - want).norm() / want.norm()
    assert err < 1e-5, err
    # unsummed: partial sums per pick (split) or per token, for hc_post to add
    on = (x, experts, weights, slot_of)
    stacks_on = tuple(t.to(dev) for t in stacks)
    parts = ft.moe(*(t.to(dev) for t in on), stacks_on, limit, mode=mode, summed=False)
    assert parts.shape == (tokens, 6 if len(mode) > 2 and mode[2] else 1, dim)
    torch.testing.assert_close(parts.sum(dim=1), got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("stages", "mode"), [(2, (0, 1, 1)), (3, (0, 1)), (3, (2, 0, 1))])
def test_the_decode_experts_with_steps_in_flight_equal_the_reference(stages, mode):
    """FP4_STAGES above 1 (the loop's next steps loaded while one is computed) changes no value:
    gate/up of 4 steps a row, down of 2, bytes and words."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(stages)
    x, experts, weights, slot_of, stacks = _decode_case(g, 2, 256, 128, torch.bfloat16)
    want = _reference(x, experts, weights, slot_of, stacks, 10.0)
    on = (t.to(dev) for t in (x, experts, weights, slot_of))
    got = ft.moe(*on, tuple(t.to(dev) for t in stacks), 10.0, tiles=(8, 32, 8, 32), mode=mode,
                 stages=stages)  # fmt: skip
    assert (got.cpu() - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize(
    ("tokens", "dim", "inter", "limit", "xdtype", "mode", "stages"),
    [
        (1, 256, 64, 10.0, torch.bfloat16, (4, 0, 1), 1),
        (3, 512, 128, 10.0, torch.float32, (4, 0, 1), 1),
        (2, 256, 128, 0.0, torch.float16, (4, 0), 1),  # down summed per token; no clamp
        (2, 256, 64, 10.0, torch.bfloat16, (4, 0, 1), 2),  # steps in flight
        (2, 256, 64, 10.0, torch.bfloat16, (4, 1, 1), 1),  # gate and up in one loop
        (1, 256, 128, 0.0, torch.float32, (4, 1, 0), 2),
    ],
)
def test_the_integer_decode_experts_equal_their_int8_reference(
    tokens, dim, inter, limit, xdtype, mode, stages
):
    """MODE 4: x and h as int8 per 32 values, the dots in integers, equal what torch computes
    from the same int8 activations (`moe_q8_reference`), gate/up and down over several steps;
    and within int8's rounding of the float reference."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(40 + tokens + inter)
    x, experts, weights, slot_of, stacks = _decode_case(g, tokens, dim, inter, xdtype)
    on = (x, experts, weights, slot_of)
    stacks_on = tuple(t.to(dev) for t in stacks)
    got = ft.moe(*(t.to(dev) for t in on), stacks_on, limit, tiles=(32, 64, 32, 32), mode=mode,
                 stages=stages)  # fmt: skip
    want = ft.moe_q8_reference(*on, stacks, limit)
    assert got.shape == (tokens, dim) and torch.isfinite(got).all()
    # the interpreter rounds h as torch does here; a GPU's other summing order may move an h
    # across a tie between two codes (a step of its block), never more
    close = 1e-5 if dev == "cpu" else 1e-2
    assert (got.cpu() - want).norm() / want.norm() < close
    exact = _reference(x, experts, weights, slot_of, stacks, limit)
    # int8's rounding, no more (random codes give heavy-tailed h: 2.4 % here; a wrong layout
    # or scale would be off by the whole output)
    assert 1e-5 < (got.cpu() - exact).norm() / exact.norm() < 5e-2
    parts = ft.moe(*(t.to(dev) for t in on), stacks_on, limit, tiles=(32, 64, 32, 32),
                   mode=mode, stages=stages, summed=False)  # fmt: skip
    assert parts.shape == (tokens, 6 if len(mode) > 2 and mode[2] else 1, dim)
    torch.testing.assert_close(parts.sum(dim=1), got, rtol=1e-6, atol=1e-6)


def test_the_int8_reference_is_the_cpu_kernels_int8_path():
    """`moe_q8_reference` (what MODE 4 must give) equals the C kernels' int8 experts (the
    scalar variant) on float32 activations: the GPU's and the CPU's experts round alike."""
    from flashdesk.engine import kernels

    g = torch.Generator().manual_seed(3)
    x, experts, weights, slot_of, stacks = _decode_case(g, 2, 256, 64, torch.float32)
    table = kernels.ExpertTable([kernels.ExpertWeights(*(t[s] for t in stacks))
                                 for s in range(len(RESIDENTS))])  # fmt: skip
    slots = slot_of[experts]
    cpu = kernels.expert_ffn(x, table, weights, ids=slots.to(torch.int32), int8=True,
                             isa="scalar", threads=1)  # fmt: skip
    want = ft.moe_q8_reference(x, experts, weights, slot_of, stacks, 10.0)
    assert (cpu - want).norm() / want.norm() < 1e-5


def _run_ptx(text: str, args: dict[str, int]) -> int:
    """Run the integer PTX of `gpu_kernels._FP4_DOT8_PTX` (and, shr, or, prmt in its generic
    mode, dp4a) on Python ints as the PTX ISA defines them → the value of $0."""
    regs = dict(args)

    def val(tok: str) -> int:
        return int(tok, 16) if tok.startswith("0x") else regs[tok] if tok in regs else int(tok)

    def sbyte(v: int, i: int) -> int:
        b = (v >> (8 * i)) & 0xFF
        return b - 256 if b & 0x80 else b

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in src]
        if op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":  # bytes of (b:a) chosen by c's nibbles; a nibble's bit 3: sign
            pool, r = (a[1] << 32) | a[0], 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0xF
                byte = (pool >> (8 * (sel & 7))) & 0xFF
                if sel & 8:
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        elif op == "dp4a.s32.s32":
            r = a[2] + sum(sbyte(a[0], i) * sbyte(a[1], i) for i in range(4))
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[d] = r & 0xFFFFFFFF if op != "dp4a.s32.s32" else r
    return regs["$0"]


def test_the_integer_dots_ptx_computes_twice_e2m1_times_int8():
    """The PTX of the FP4 × int8 dot (its byte permutes can only run on a GPU) emulated as the
    PTX ISA defines its instructions: for words with every code in every position and random
    int8 activations it gives Σ 2·E2M1(code i) · x_i, what the interpreter's path computes."""
    text = ft._FP4_DOT8_PTX.value if hasattr(ft._FP4_DOT8_PTX, "value") else ft._FP4_DOT8_PTX
    twice = [round(2 * v) for v in quant.E2M1_VALUES]
    g = torch.Generator().manual_seed(0)
    words = [int("".join(f"{(c + i) % 16:x}" for i in range(8)), 16) for c in range(16)]
    words += torch.randint(0, 1 << 32, (64,), generator=g, dtype=torch.int64).tolist()
    for n, q in enumerate(words):
        xs = torch.randint(-127, 128, (8,), generator=g).tolist()
        xs[n % 8] = -128 if n % 3 == 0 else xs[n % 8]  # the extreme byte too
        xa = sum((v & 0xFF) << (8 * i) for i, v in enumerate(xs[:4]))
        xb = sum((v & 0xFF) << (8 * i) for i, v in enumerate(xs[4:]))
        want = sum(twice[(q >> (4 * i)) & 15] * xs[i] for i in range(8))
        assert _run_ptx(text, {"$1": q, "$2": xa, "$3": xb}) == want, hex(q)


def test_a_failed_integer_dots_check_keeps_the_byte_wise_decode(monkeypatch):
    """FP4_MODE MODE 4 (with its own recorded shape) on a GPU whose check of it fails, or
    where float activations are asked for: `moe` takes the built-in float decode, its shape
    too (the integer dots' 32 × 512 tiles would make the float loop spill)."""
    monkeypatch.setattr(ft, "FP4_MODE", (4, 0, 1))
    monkeypatch.setattr(ft, "TILES", (32, 512, 32, 512))
    monkeypatch.setattr(ft, "INTERPRETED", False)
    monkeypatch.setattr(ft, "checked", lambda name, dev: name != "FP4 int8 dots")
    assert ft.decode_shape("cuda") == ft.FLOAT_FP4 == ((8, 256, 8, 256), 4, (0, 1, 1))
    monkeypatch.setattr(ft, "checked", lambda name, dev: True)
    assert ft.decode_shape("cuda") == ((32, 512, 32, 512), 4, (4, 0, 1))
    assert ft.decode_shape("cuda", floats=True) == ft.FLOAT_FP4
    monkeypatch.setattr(ft, "FP4_MODE", (2, 0, 1))  # a float mode recorded: kept either way
    assert ft.decode_shape("cuda", floats=True) == ((32, 512, 32, 512), 4, (2, 0, 1))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Inf · 0
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # 127 / 0, unused
def test_int8_activations_round_as_the_reference():
    """`_q8_kernel`: int8 codes and steps per 32 values as `quant.quantize_q8`, ties to even,
    an all-zero block step 0, a block with Inf step NaN."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 128, generator=g) * 3
    x[0, :32] = 0.0
    x[0, 32:64] = torch.arange(32) - 15.5  # ties: with amax 127 (below) a value is its code
    x[0, 32] = -127.0
    x[1, 96] = float("inf")
    q = torch.empty(2, 128, dtype=torch.int8, device=dev)
    d = torch.empty(2, 4, dtype=torch.float32, device=dev)
    ft._q8_kernel[(2, 2)](x.to(dev), q, d, K=128, BK=64)
    want_q, want_d = quant.quantize_q8(x)
    assert torch.equal(q.cpu(), want_q)
    torch.testing.assert_close(d.cpu(), want_d, equal_nan=True)
    assert want_d[0, 0] == 0 and torch.isnan(want_d[1, 3])
    assert want_q[0, 33:37].tolist() == [-14, -14, -12, -12]  # -14.5 -13.5 -12.5 -11.5


@pytest.mark.parametrize(
    ("tokens", "dim", "inter", "limit", "xdtype", "block_m"),
    [
        (40, 256, 128, 10.0, torch.float32, 16),  # several blocks per expert
        (23, 512, 256, 10.0, torch.bfloat16, 32),
        (9, 256, 64, 0.0, torch.float32, 64),  # no clamp; one mostly empty block per expert
    ],
)
def test_grouped_moe_equals_dequantize_then_multiply(tokens, dim, inter, limit, xdtype, block_m):
    """Prompt tokens' picks sorted by slot, in blocks: every resident pick's row of `out` is its
    weight · expert(x); the other picks' rows are left alone."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(tokens + dim + inter)
    x, experts, weights, slot_of, stacks = _decode_case(g, tokens, dim, inter, xdtype)
    residents, k = RESIDENTS, experts.shape[1]

    flat_slots = slot_of[experts.reshape(-1)].long()
    order = torch.argsort(flat_slots, stable=True)
    counts = torch.bincount(flat_slots + 1, minlength=len(residents) + 1).tolist()
    blocks = ft.expert_blocks(counts[1:], range(len(residents)), counts[0], block_m)
    assert sum(end - start for _, start, end in blocks) == tokens * k - counts[0]
    assert max(end - start for _, start, end in blocks) <= block_m
    out = torch.full((tokens * k, dim), 7.0)  # rows of picks not resident stay as they are
    dev_out = out.to(dev)
    ft.moe_grouped(
        x.to(dev),
        order.to(dev),
        torch.tensor(blocks, dtype=torch.int32).to(dev),
        weights.reshape(-1).to(dev),
        tuple(t.to(dev) for t in stacks),
        limit,
        dev_out,
        tiles=(block_m, 32, 32),
    )
    got = dev_out.cpu().view(tokens, k, dim)
    resident = (slot_of[experts] >= 0)[..., None]
    assert torch.equal(
        got[~resident.expand_as(got)], torch.full_like(got, 7.0)[~resident.expand_as(got)]
    )
    want = _reference(x, experts, weights, slot_of, stacks, limit)
    summed = torch.where(resident, got, 0.0).sum(dim=1)
    err = (summed - want).norm() / want.norm()
    assert err < (1e-5 if xdtype == torch.float32 else 1e-2), err


def test_grouped_moe_runs_a_slice_of_its_blocks():
    """`first_block`/`n_blocks`: the runtime launches the experts staged from host memory one
    by one, each from its own one-expert stack, against one block table."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(5)
    tokens, dim, inter, k = 6, 256, 64, 2
    one = _expert_stacks(g, 1, dim, inter)
    x = torch.randn((tokens, dim), generator=g) / 4
    experts = torch.zeros((tokens, k), dtype=torch.long)
    experts[:, 1] = 1  # every token: expert 0, then expert 1
    weights = torch.rand((tokens, k), generator=g) + 0.1
    order = torch.argsort(experts.reshape(-1), stable=True)
    blocks = torch.tensor(ft.expert_blocks([tokens, tokens], [0, 0], 0, 16), dtype=torch.int32)
    out = torch.zeros((tokens * k, dim), device=dev)
    ft.moe_grouped(
        x.to(dev), order.to(dev), blocks.to(dev), weights.reshape(-1).to(dev),
        tuple(t.to(dev) for t in one), 10.0, out, first_block=1, n_blocks=1, tiles=(16, 32, 32),
    )  # fmt: skip
    got = out.cpu().view(tokens, k, dim)
    assert torch.equal(got[:, 0], torch.zeros(tokens, dim))  # block 0 (expert 0) not run
    slot0 = torch.tensor([0, -1], dtype=torch.int32)  # expert 1's bytes were in slot 0
    want = _reference(x, experts[:, 1:].clone().fill_(0), weights[:, 1:], slot0, one, 10.0)
    assert (got[:, 1] - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize(
    ("tokens", "xdtype", "limit"), [(1, torch.float32, 10.0), (3, torch.bfloat16, 0.0)]
)
def test_moe_by_pick_equals_dequantize_then_multiply(tokens, xdtype, limit):
    """A decode step's experts through the grouped kernels, every pick its own block."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(tokens)
    x, experts, weights, slot_of, stacks = _decode_case(g, tokens, 256, 128, xdtype)
    want = _reference(x, experts, weights, slot_of, stacks, limit)
    on = (x, experts, weights, slot_of)
    got = ft.moe_by_pick(*(t.to(dev) for t in on), tuple(t.to(dev) for t in stacks), limit)
    assert got.dtype == torch.float32 and got.shape == (tokens, 256)
    err = (got.cpu() - want).norm() / want.norm()
    assert err < (1e-5 if xdtype == torch.float32 else 1e-2), err
    parts = ft.moe_by_pick(
        *(t.to(dev) for t in on), tuple(t.to(dev) for t in stacks), limit, summed=False
    )
    assert parts.shape == (tokens, experts.shape[1], 256)
    torch.testing.assert_close(parts.sum(dim=1), got)


def test_fused_moe_rejects_mismatched_shapes():
    dev = kernels_device()
    stacks = tuple(torch.zeros((1, 64, 8), dtype=torch.uint8) for _ in range(6))
    with pytest.raises(ValueError, match="do not fit"):
        ft.moe(
            torch.zeros((1, 256), device=dev),
            torch.zeros((1, 2), dtype=torch.long, device=dev),
            torch.ones((1, 2), device=dev),
            torch.zeros(4, dtype=torch.int32, device=dev),
            tuple(t.to(dev) for t in stacks),
            10.0,
        )


def test_the_runtime_uses_them_only_on_a_gpu_where_they_work(monkeypatch):
    assert not ft.available("cpu")  # CPU tensors take the C kernels, interpreter or not
    assert "CUDA" in ft.unavailable_reason("cpu")
    # the first use on a GPU compiles and checks one kernel; a failure keeps torch's path
    if torch.cuda.is_available() and not ft.INTERPRETED:
        assert ft._probe(torch.device("cuda")) is None and ft.available("cuda")
    elif ft.triton is not None:
        assert "could not compile or run" in ft._probe(torch.device("cuda"))  # no GPU here
    if ft.INTERPRETED:  # the probe's own check, on the interpreter's CPU tensors
        assert ft._probe(torch.device("cpu")) is None
        # each elementwise kernel is checked too: a wrong one keeps torch's path everywhere
        hc_post = ft.hc_post
        monkeypatch.setattr(ft, "hc_post", lambda *a, **k: hc_post(*a, **k) * 1.01)
        assert "hyper-connection update kernel gave wrong values" in ft._probe(torch.device("cpu"))
        monkeypatch.setattr(ft, "hc_post", hc_post)
    monkeypatch.setattr(ft, "INTERPRETED", False)
    monkeypatch.setattr(ft, "_PROBED", {})
    monkeypatch.setattr(ft, "_probe", lambda dev: "no C compiler")
    if ft.triton is not None:
        assert not ft.available("cuda") and ft.unavailable_reason("cuda:0") == "no C compiler"
    monkeypatch.setenv("FLASHDESK_TRITON", "0")
    assert not ft.available("cuda")
    assert "FLASHDESK_TRITON=0" in ft.unavailable_reason("cuda") or ft.triton is None


def test_the_tensor_core_kernels_are_checked_on_their_own(monkeypatch):
    """The grouped expert kernels and the "dot" linear are checked apart from the others: where
    they fail, prompts' experts keep torch's path and decode the other kernels."""
    dev = kernels_device()
    assert ft._probe_tensor_cores(torch.device(dev)) is None
    grouped = ft.moe_grouped
    monkeypatch.setattr(ft, "moe_grouped", lambda *a, **kw: grouped(*a, **kw) or a[6].mul_(1.1))
    assert "wrong values" in ft._probe_tensor_cores(torch.device(dev))
    monkeypatch.setattr(ft, "moe_grouped", grouped)
    monkeypatch.setattr(ft, "linear", lambda *a, **kw: 1 / 0)
    assert "could not compile or run (ZeroDivisionError" in ft._probe_tensor_cores(dev)
    # on a GPU where the probe fails: decode and linears fall back, prompts take torch's path
    monkeypatch.setattr(ft, "INTERPRETED", False)
    monkeypatch.setattr(ft, "_PROBED", {})
    monkeypatch.setattr(ft, "TENSOR_CORES", {})
    monkeypatch.setattr(ft, "_probe", lambda dev: None)
    monkeypatch.setattr(ft, "_apply_tuning", lambda dev: None)
    monkeypatch.setattr(ft, "DECODE_MOE", "by pick")
    monkeypatch.setattr(ft, "LINEAR_KIND", "dot")
    if ft.triton is not None:
        assert ft.available("cuda:0") and not ft.tensor_cores("cuda:0")
        assert (ft.DECODE_MOE, ft.LINEAR_KIND) == ("rows", "rows")


_LINEAR_CASES = [
    (1, 256, 512, 1, "fp8"),
    (3, 384, 256, 1, "fp8"),  # rows not a power of two
    (2, 512, 128, 2, "fp8"),  # V4's grouped wo_a
    (1, 256, 512, 1, "bf16"),  # the head: BF16 weights, no scales
]


@pytest.mark.parametrize(
    ("tokens", "n", "k", "groups", "wdtype", "kind"),
    [(*case, "rows") for case in _LINEAR_CASES]
    + [(1, 200, 64, 1, "bf16", "rows")]  # rows in no multiple of 16: only "rows" takes them
    + [(*case, "dot") for case in _LINEAR_CASES],
)
def test_linear_equals_dequantize_then_multiply(tokens, n, k, groups, wdtype, kind):
    _check_linear(tokens, n, k, groups, wdtype, kind=kind)


@pytest.mark.parametrize(
    ("tokens", "n", "k", "split"),
    [
        (1, 256, 2048, None),  # few row blocks: K split 4 ways (512 each), summed after
        (17, 384, 256, None),  # more tokens than a program takes: two token blocks
        (1, 128, 1024, 2),
    ],
)
def test_the_tensor_core_linear_splits_k_and_blocks_tokens(tokens, n, k, split):
    _check_linear(tokens, n, k, 1, "fp8", kind="dot", split=split)


@pytest.mark.parametrize(
    ("tokens", "n", "k", "groups", "wdtype", "block_k", "split"),
    [
        (1, 256, 2048, 1, "fp8", 512, None),  # 4 scale tiles per step
        (2, 256, 1024, 2, "fp8", 256, 2),  # grouped, K split
        (1, 64, 512, 1, "bf16", 256, 2),
    ],
)
def test_the_rows_linear_takes_wide_steps_and_splits_k(
    tokens, n, k, groups, wdtype, block_k, split
):
    _check_linear(tokens, n, k, groups, wdtype, kind="rows", block_k=block_k, split=split)


@pytest.mark.parametrize(
    ("block_n", "block_k", "unroll", "xdtype"),
    [
        (256, 64, None, torch.float32),  # rows past one scale tile asked for: 128 taken
        (16, 128, 8, torch.bfloat16),  # BF16 x scaled by the tiles' powers of two, exactly
        (8, 256, 2, torch.float16),
    ],
)
def test_the_rows_linear_unrolls_steps(block_n, block_k, unroll, xdtype):
    _check_linear(
        2, 512, 2048, 1, "fp8", xdtype=xdtype, kind="rows", block_n=block_n, block_k=block_k,
        unroll=unroll,
    )  # fmt: skip


@pytest.mark.parametrize(("unroll", "stages"), [(1, 3), (2, 2)])
def test_the_rows_linear_with_steps_in_flight(unroll, stages):
    """LINEAR_ROWS_STAGES above 1 (Triton's pipeliner keeps the next steps' loads in flight)
    changes no value, alone or with unrolled steps, split or not."""
    for split in (1, 2):
        _check_linear(
            2, 512, 2048, 1, "fp8", xdtype=torch.bfloat16, kind="rows", block_n=16,
            block_k=128, unroll=unroll, num_stages=stages, split=split,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["rows", "dot"])
def test_fp8_weights_read_as_code_bytes_where_triton_lacks_the_type(kind, monkeypatch):
    """GPUs before Ada (RTX 30, A100) have no fp8e4nv type in Triton: the linears read the E4M3
    code bytes and decode them through float16 bits. Every finite code (subnormals, ±0, ±448)
    as the torch decoding, in a wide step and a split one."""
    monkeypatch.setattr(ft, "FP8_AS_BYTES", True)
    dev = kernels_device()
    codes = torch.arange(256, dtype=torch.uint8).repeat(2 * 128, 2)  # [256, 512], rows shifted
    codes = torch.stack([codes[r].roll(r) for r in range(256)])
    codes[(codes & 0x7F) == 0x7F] = 0x3F  # no NaN codes (the encoders never write them)
    scale = torch.randint(120, 130, (2, 4), dtype=torch.uint8)
    x = torch.randn((2, 512), generator=torch.Generator().manual_seed(5))
    from flashdesk.engine import quant

    want = x.double() @ quant.dequant_fp8(codes, scale).double().T
    got = ft.linear(
        x.to(dev), codes.view(torch.float8_e4m3fn).to(dev), scale.to(dev),
        out_dtype=torch.float32, kind=kind, split=2, **({"block_k": 128} if kind == "rows" else {}),
    )  # fmt: skip
    assert ((got.cpu().double() - want).norm() / want.norm()).item() < 1e-6
    assert not ft.native_fp8("cpu")


def test_k_is_split_until_a_launch_has_enough_programs(monkeypatch):
    assert ft._split_k(256, 8192, 128, 1024) == 4  # wo_b: 256 row blocks → 4 × 2048 columns
    assert ft._split_k(2048, 1024, 128, 1024) == 1  # wq_b: enough already
    assert ft._split_k(8, 1024, 128, 1024) == 2  # no share below 512 columns
    assert ft._split_k(8, 2048, 1024, 1024) == 2  # nor below one step
    assert ft._split_k(256, 8192, 128, 0) == 1  # 0: never


def _check_linear(tokens, n, k, groups, wdtype, xdtype=torch.float32, **options):
    dev = kernels_device()
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn((n, k), generator=g) * torch.exp2(torch.randint(-3, 4, (n, 1), generator=g))
    if wdtype == "fp8":
        codes, scale = quant.quantize_fp8(w)
        weight, want_w = codes.view(torch.float8_e4m3fn), quant.dequant_fp8(codes, scale)
        scale = scale.view(torch.float8_e8m0fnu)
    else:
        weight, scale = w.to(torch.bfloat16), None
        want_w = weight.float()
    x = torch.randn((tokens, groups * k), generator=g).to(xdtype)
    xs = x.view(tokens, groups, k).double()
    want = torch.einsum("tgk,grk->tgr", xs, want_w.double().view(groups, n // groups, k)).reshape(
        tokens, n
    )
    got = ft.linear(
        x.to(dev), weight.to(dev), None if scale is None else scale.to(dev), groups,
        out_dtype=torch.float32, **options,
    )  # fmt: skip
    assert got.shape == (tokens, n) and got.dtype == torch.float32
    err = ((got.cpu().double() - want).norm() / want.norm()).item()
    assert err < 1e-6, err


def test_linear_rejects_what_it_cannot_compute():
    dev = kernels_device()
    w8 = torch.zeros((128, 128), dtype=torch.float8_e4m3fn, device=dev)
    s = torch.zeros((1, 1), dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match="does not fit"):
        ft.linear(torch.zeros((1, 64), device=dev), w8, s)
    with pytest.raises(ValueError, match="tile scales"):
        ft.linear(torch.zeros((1, 128), device=dev), w8)
    with pytest.raises(ValueError, match="tile scales"):
        ft.linear(torch.zeros((1, 128), device=dev), w8.float(), s)


def test_sinkhorn_in_one_launch_equals_the_ops():
    from flashdesk.engine.model.mhc import sinkhorn_ops

    dev = kernels_device()
    g = torch.Generator().manual_seed(3)
    for shape, iters in (((1, 4, 4), 20), ((5, 4, 4), 20), ((2, 3, 8, 8), 3), ((1, 4, 4), 1)):
        comb = torch.randn(shape, generator=g) * 3
        got = ft.sinkhorn(comb.to(dev), iters, 1e-6).cpu()
        torch.testing.assert_close(got, sinkhorn_ops(comb, iters, 1e-6), rtol=1e-5, atol=1e-6)
    strided = torch.randn(4, 4, 2, generator=g)[..., 0]  # not contiguous
    torch.testing.assert_close(
        ft.sinkhorn(strided.to(dev), 5, 1e-6).cpu(), sinkhorn_ops(strided, 5, 1e-6)
    )
    with pytest.raises(ValueError, match="power of two"):
        ft.sinkhorn(torch.zeros(1, 3, 3, device=dev), 20, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_chains_in_one_launch_equal_the_torch_ops(dtype, monkeypatch):
    """rms_norm, apply_rope (forward and inverse, 2-D and per head), and the hyper-connections'
    pre (mixes → u, post, Sinkhorn comb) and post: one kernel each, the torch definitions' values."""
    from flashdesk.engine.model import mhc
    from flashdesk.engine.model.common import rms_norm
    from flashdesk.engine.model.rope import Rotary, apply_rope, inverse_frequencies

    dev = kernels_device()
    g = torch.Generator().manual_seed(5)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}

    def same(got, want, tol=tol):  # want: the torch definition's, or the unfused kernels'
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want.cpu(), **tol)

    exact = {"rtol": 0, "atol": 0}  # a fused kernel against the same kernels one by one
    monkeypatch.setattr(ft, "checked", lambda name, device: True)  # the fused norms' check passed
    assert ft.fusing_norms(torch.device(dev))

    x = torch.randn(3, 256, generator=g).to(dtype)
    w = torch.rand(256, generator=g) + 0.5
    same(ft.rms_norm(x.to(dev), w.to(dev), 1e-6), rms_norm(x, w, 1e-6))
    heads = torch.randn(3, 4, 64, generator=g).to(dtype)
    same(ft.rms_norm(heads.to(dev), None, 1e-6), rms_norm(heads, None, 1e-6))

    cos, sin = Rotary(16, inverse_frequencies(16, 10000.0)).cos_sin(torch.tensor([0, 7, 300]))
    for t in (heads, torch.randn(3, 64, generator=g).to(dtype), torch.randn(3, 16).to(dtype)):
        for inverse in (False, True):
            got = ft.apply_rope(t.to(dev), cos.to(dev), sin.to(dev), inverse)
            same(got, apply_rope(t, cos, sin, inverse))
    # the attention output: float32 in, narrowed to the activations' dtype without its own launch
    o = torch.randn(3, 4, 64, generator=g)
    got = ft.apply_rope(o.to(dev), cos.to(dev), sin.to(dev), True, out_dtype=dtype)
    same(got, apply_rope(o.to(dtype), cos, sin, True))
    same(got, apply_rope(o, cos, sin, True, out_dtype=dtype))
    # a norm and its rope in one launch (a decode step's q per head, its kv with a weight)
    for t, weight in ((heads, None), (torch.randn(3, 64, generator=g).to(dtype), w[:64])):
        on = (t.to(dev), None if weight is None else weight.to(dev))
        got = ft.norm_rope(*on, 1e-6, cos.to(dev), sin.to(dev))
        same(got, apply_rope(rms_norm(t, weight, 1e-6), cos, sin))
        same(got, ft.apply_rope(ft.rms_norm(*on, 1e-6), cos.to(dev), sin.to(dev)), exact)
        with pytest.MonkeyPatch.context() as mp:  # the switch `bench --synthetic` flips
            mp.setattr(ft, "FUSED_NORMS", False)
            same(ft.norm_rope(*on, 1e-6, cos.to(dev), sin.to(dev)), got, exact)

    hc, dim = 4, 256
    streams = torch.randn(3, hc, dim, generator=g).to(dtype)
    fn = torch.randn((2 + hc) * hc, hc * dim, generator=g) * 0.02
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + hc) * hc, generator=g)
    mixes = mhc._mixes(streams, fn, 1e-6)
    torch.testing.assert_close(ft.hc_mixes(streams.to(dev), fn.to(dev), 1e-6).cpu(), mixes)
    args = (scale, base, 20, 1e-6)
    got = ft.hc_pre_tail(mixes.to(dev), streams.to(dev), *(a.to(dev) for a in args[:2]), *args[2:])
    want = mhc.hc_pre(streams, fn, *args, 1e-6)
    for a, b in zip(got, want, strict=True):
        same(a, b)
    # the block's input norm in the same launch; a dim not a power of two takes its own launch
    for d in (dim, 96):
        on = [t.to(dev) for t in (streams[..., :d], scale, base, w[:d])]
        mixes = mhc._mixes(streams[..., :d], fn[:, : hc * d], 1e-6)
        got = ft.hc_pre_tail(mixes.to(dev), *on[:3], 20, 1e-6, on[3], 1e-6)
        want = mhc.hc_pre(streams[..., :d], fn[:, : hc * d], scale, base, 20, 1e-6, 1e-6, w[:d])
        for a, b in zip(got, want, strict=True):
            same(a, b)
        unfused = ft.hc_pre_tail(mixes.to(dev), *on[:3], 20, 1e-6)[0]
        same(got[0], ft.rms_norm(unfused, on[3], 1e-6))  # its sum of squares in another order
    f = torch.randn(3, dim, generator=g).to(dtype)
    post, comb = want[1], want[2]
    on = (streams.to(dev), post.to(dev), comb.to(dev))
    same(ft.hc_post(f.to(dev), *on), mhc.hc_post(f, streams, post, comb))
    # a decode step's block output: the shared expert and the experts' partial sums, float32,
    # added and rounded to the streams' dtype inside the kernel
    # (Triton's interpreter narrows to bf16 by truncation, not rounding: f can differ by one of
    # its bf16 steps, up to 0.0625 at these magnitudes, times post ≤ 2)
    rounded = tol if dtype == torch.float32 or dev == "cuda" else {"rtol": 1e-2, "atol": 0.15}
    shared = torch.randn(3, dim, generator=g)
    for parts in (torch.randn(3, dim, generator=g), torch.randn(3, 6, dim, generator=g)):
        got = ft.hc_post(shared.to(dev), *on, add=parts.to(dev))
        sums = parts.sum(1) if parts.dim() == 3 else parts
        same(got, mhc.hc_post((shared + sums).to(dtype), streams, post, comb), rounded)
        same(got, mhc.hc_post(shared, streams, post, comb, add=parts), rounded)  # torch path
    # two tensors of them (the VRAM cache's picks and the in-place reads'), no cat before
    cached, read = torch.randn(3, 6, dim, generator=g), torch.randn(3, 2, dim, generator=g)
    got = ft.hc_post(shared.to(dev), *on, add=(cached.to(dev), read.to(dev)))
    same(got, mhc.hc_post(shared, streams, post, comb, add=torch.cat((cached, read), 1)), rounded)
    same(got, mhc.hc_post(shared, streams, post, comb, add=(cached, read)), rounded)  # cat there

    from flashdesk.engine.model.moe import swiglu

    gate, up = (torch.randn(3, 300, generator=g).mul(8).to(dtype) for _ in range(2))
    for limit in (0.0, 7.0):
        for out in (torch.float32, dtype):
            same(ft.swiglu(gate.to(dev), up.to(dev), limit, out), swiglu(gate, up, limit, out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_steps_ropes_and_head_collapse_in_one_launch_each(dtype, monkeypatch):
    """`norm_ropes`: q per head (normed), kv (normed · w) and the index queries (roped only) in
    one launch, each what its own launch gives; `hc_head_tail`: the head's collapse and the
    final norm in one launch, from its mixes or from the last update's partial sums, the
    torch definitions' values."""
    from flashdesk.engine.model import mhc
    from flashdesk.engine.model.common import rms_norm
    from flashdesk.engine.model.rope import Rotary, inverse_frequencies

    dev = kernels_device()
    g = torch.Generator().manual_seed(15)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    monkeypatch.setattr(ft, "checked", lambda name, device: True)
    cos, sin = (
        t.to(dev) for t in Rotary(16, inverse_frequencies(16, 1e4)).cos_sin(torch.tensor([9]))
    )
    q = torch.randn(1, 4, 64, generator=g).to(dtype).to(dev)
    kv = torch.randn(1, 64, generator=g).to(dtype).to(dev)
    ix = torch.randn(1, 8, 32, generator=g).to(dtype).to(dev)
    w = (torch.rand(64, generator=g) + 0.5).to(dev)
    parts = [(q, None, True), (kv, w, True), (ix, None, False)]
    alone = [ft.norm_rope(q, None, 1e-6, cos, sin), ft.norm_rope(kv, w, 1e-6, cos, sin),
             ft.apply_rope(ix, cos, sin)]  # fmt: skip
    for n in (3, 2):
        got = ft.norm_ropes(parts[:n], 1e-6, cos, sin)
        assert len(got) == n
        for a, b in zip(got, alone, strict=False):
            assert a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    monkeypatch.setattr(ft, "FUSED_NORMS", False)  # each its own launch (norm, then rope)
    for a, b in zip(ft.norm_ropes(parts, 1e-6, cos, sin), alone, strict=True):
        torch.testing.assert_close(a.cpu(), b.cpu(), **tol)
    monkeypatch.setattr(ft, "FUSED_NORMS", True)
    with pytest.raises(ValueError, match="1 to 3"):
        ft.norm_ropes(parts + parts[:1], 1e-6, cos, sin)

    hc, dim = 4, 256
    streams = torch.randn(2, hc, dim, generator=g).to(dtype)
    fn = torch.randn(hc, hc * dim, generator=g) * 0.02
    scale, base = torch.rand(1, generator=g) + 0.5, torch.randn(hc, generator=g)
    norm = torch.rand(dim, generator=g) + 0.5
    want = rms_norm(mhc.hc_head(streams, fn, scale, base, 1e-6, 1e-6), norm, 1e-6)
    on = [t.to(dev) for t in (streams, scale, base)]
    mixes = mhc._mixes(streams, fn, 1e-6).to(dev)
    got = ft.hc_head_tail(mixes, on[0], *on[1:], 1e-6, norm.to(dev), 1e-6)
    torch.testing.assert_close(got.cpu(), want, **tol)
    # the mixes as the last update's partial sums (`hc_post(then=)`), finished in the launch
    f = torch.randn(2, dim, generator=g).to(dtype)
    post, comb = torch.rand(2, hc, generator=g), torch.rand(2, hc, hc, generator=g)
    new, sums = ft.hc_post(f.to(dev), on[0], post.to(dev), comb.to(dev), then=fn.to(dev))
    want = rms_norm(mhc.hc_head(new.cpu(), fn, scale, base, 1e-6, 1e-6), norm, 1e-6)
    monkeypatch.setattr(ft, "applies", lambda t: True)  # mhc's dispatch to the kernels
    launches = []
    tail = ft.hc_head_tail
    monkeypatch.setattr(ft, "hc_head_tail", lambda *a: launches.append(a[0].dim()) or tail(*a))
    got = mhc.hc_head(new, fn.to(dev), *on[1:], 1e-6, 1e-6, norm.to(dev), sums)
    torch.testing.assert_close(got.cpu(), want, **tol)
    assert launches == [3]  # the partial sums went into the one launch
    with pytest.raises(ValueError, match="power of two"):
        ft.hc_head_tail(mixes, on[0][..., :96], *on[1:], 1e-6, norm[:96].to(dev), 1e-6)


def test_the_probe_checks_the_elementwise_kernels():
    """What a GPU's first use runs before the kernels replace torch: every chain agrees here."""
    assert ft._elementwise_mismatch(torch.device(kernels_device())) is None


def test_routing_log_in_one_launch_equals_the_torch_ops():
    """A layer's picks counted per expert (repeats across tokens: the atomic adds), totals, the
    device cache's hits (or not, for a streamed prompt) and the host's share (−1 if resident)."""
    from flashdesk.engine.runtime_experts import RoutingLog

    dev = kernels_device()
    g = torch.Generator().manual_seed(3)
    experts = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(5)])
    resident = torch.rand(16, generator=g) < 0.5
    for cache, hits in ((None, True), (resident, True), (resident, False)):
        want, got = RoutingLog(3, 16, torch.device("cpu")), RoutingLog(3, 16, torch.device(dev))
        for _ in range(2):
            on = cache[experts] if cache is not None else None
            want.record(2, experts, on if hits else None)
            host = ft.record_picks(
                experts.to(dev), cache.to(dev) if cache is not None else None, got.counts[2],
                got.device_picks, got.total_picks, hits=hits,
            )  # fmt: skip
        assert torch.equal(host.cpu(), experts.masked_fill(on, -1) if on is not None else experts)
        assert torch.equal(got.counts.cpu(), want.counts)
        assert int(got.total_picks) == int(want.total_picks) == 40
        assert int(got.device_picks) == int(want.device_picks)
    # experts the device reads in place (zero-copy) leave the host's share too, not hits
    in_place = torch.zeros(16, dtype=torch.bool)
    in_place[experts[0, :2]] = True
    for cache in (None, resident):
        got = RoutingLog(3, 16, torch.device(dev))
        host = ft.record_picks(
            experts.to(dev), cache.to(dev) if cache is not None else None, got.counts[2],
            got.device_picks, got.total_picks, in_place=in_place.to(dev),
        )  # fmt: skip
        mine = experts if cache is None else experts.masked_fill(cache[experts], -1)
        assert torch.equal(host.cpu(), mine.masked_fill(in_place[experts], -1))
        hits = 0 if cache is None else int(cache[experts].sum())
        assert int(got.device_picks) == hits and int(got.total_picks) == 20
    with pytest.raises(ValueError, match="int64"):
        ft.record_picks(experts.int().to(dev), None, got.counts[0], got.device_picks,
                        got.total_picks)  # fmt: skip


@pytest.mark.parametrize("rows", [4, 128])
def test_softmax_pool_equals_the_torch_ops(rows):
    """The compressor's window pooling: one piece (HCA), or two (CSA: the previous half-window,
    then the right half of the current one, a strided view), with rows not yet written (−∞)."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(rows)
    c = 256
    kv, gate = torch.randn(rows, 2 * c, generator=g), torch.randn(rows, 2 * c, generator=g)
    gate[rows // 2 :] = float("-inf")
    prev_kv, prev_gate = torch.randn(rows, c, generator=g), torch.randn(rows, c, generator=g)
    on = [t.to(dev) for t in (kv, gate, prev_kv, prev_gate)]
    got = ft.softmax_pool((on[0][:, :c], on[1][:, :c]), None)
    want = (kv[:, :c] * gate[:, :c].softmax(dim=0)).sum(dim=0, keepdim=True)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    got = ft.softmax_pool((on[2], on[3]), (on[0][:, c:], on[1][:, c:]))
    slots_kv, slots_gate = torch.cat((prev_kv, kv[:, c:])), torch.cat((prev_gate, gate[:, c:]))
    want = (slots_kv * slots_gate.softmax(dim=0)).sum(dim=0, keepdim=True)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        ft.softmax_pool((on[0].half(), on[1]), None)


@pytest.mark.parametrize("ratio", [4, 16])
def test_the_compressor_step_pools_only_at_a_windows_last_token(ratio):
    """Row ⌊pos/m⌋ is scratch until its window closes: the fused step writes zeros there before
    (no pooling of a partial window each token) and the torch step's entry at the window's
    last token, with the carry the torch step leaves at every position."""
    from flashdesk.engine.cache import CompressorCarry
    from flashdesk.engine.model.compressor import Compressor
    from flashdesk.engine.model.rope import Rotary, inverse_frequencies

    dev = kernels_device()
    g = torch.Generator().manual_seed(ratio)
    dim, c = 64, 32
    comp = Compressor(**ft.compressor_parts(g, ratio, dim, c), ratio=ratio, rotary=Rotary(16, inverse_frequencies(16, 1e4)),
                      eps=1e-6, for_indexer=False)  # fmt: skip
    want = CompressorCarry(ratio, c, ratio == 4, "cpu")
    got = CompressorCarry(ratio, c, ratio == 4, dev)
    rows = RowStore(NativeRows(c, torch.float32), "cpu")
    rows.reserve(4)
    for pos in range(3 * ratio):
        a = torch.randn(1, dim, generator=g)
        with torch.inference_mode():
            comp.step(a, torch.tensor([pos]), want, rows, torch.float32)
        out, index = ft.compressor_step(
            (a @ comp.wkv.T).to(dev), (a @ comp.wgate.T).to(dev), comp.ape.to(dev), got,
            torch.tensor([pos], device=dev), comp.norm.to(dev), comp.rotary.inv_freq.to(dev),
            comp.eps, torch.float32,
        )  # fmt: skip
        assert int(index) == pos // ratio
        if pos % ratio == ratio - 1:
            torch.testing.assert_close(out.cpu()[0], rows.rows()[pos // ratio], **CLOSE)
        else:
            assert not out.cpu().any()
        for t, u in zip(got.tensors(), want.tensors(), strict=True):
            torch.testing.assert_close(t.cpu(), u, **CLOSE)


@pytest.mark.parametrize("hashed", [False, True])
def test_routing_in_one_launch_equals_the_router(hashed, monkeypatch):
    """Top-k routing (scores + bias, the 6 largest of 256) and hash routing (given experts):
    the same experts in the same order and the same weights as the torch router."""
    from flashdesk.engine.model.moe import Router

    dev = kernels_device()
    g = torch.Generator().manual_seed(11)
    tokens, dim, n, k = 5, 64, 256, 6
    x = torch.randn(tokens, dim, generator=g)
    ids = torch.randint(0, 100, (tokens,), generator=g)
    parts = {"weight": torch.randn(n, dim, generator=g) * 0.5, "top_k": k, "scale": 1.5}
    if hashed:
        parts |= {"bias": None, "tid2eid": torch.randint(0, n, (100, k), generator=g)}
    else:
        parts |= {"bias": torch.randn(n, generator=g) * 0.1, "tid2eid": None}
    logits = x @ parts["weight"].T
    logits[0, :3] = 25.0  # softplus' linear branch
    logits[1, 7] = logits[1, 9] = 40.0  # a tie: the lower index first, as torch's top-k
    # the torch router on the same logits (its gate GEMV made the identity)
    monkeypatch.setattr("flashdesk.engine.model.moe.float_linear", lambda x, w: x)
    want_e, want_w = Router(**parts)(logits, ids)
    bias = parts["bias"].to(dev) if parts["bias"] is not None else None
    picked = parts["tid2eid"][ids].to(dev) if hashed else None
    got_e, got_w = ft.route(logits.to(dev), bias, picked, k, 1.5)
    assert torch.equal(got_e.cpu(), want_e)
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="either a bias or hash picks"):
        ft.route(logits.to(dev), None, None, k, 1.5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_kernel_with_its_own_check_falls_back_alone(monkeypatch):
    """The fused compressor step is checked against the torch step once per device; where it
    fails (here: a deliberately wrong one) only it falls back, with the reason kept."""
    dev = kernels_device()
    for name, check in ft.CHECKS.items():  # compressor step (CSA, HCA), mixes, routing
        assert check(torch.device(dev)) is None, name
    step = ft.compressor_step

    def wrong(*args, **kwargs):  # the entries it returns (not those written into a store) off
        got = step(*args, **kwargs)
        return None if got is None else (got[0] * 1.01, got[1])

    monkeypatch.setattr(ft, "compressor_step", wrong)
    assert "other values" in ft._check_compressor_step(torch.device(dev))
    monkeypatch.setattr(ft, "available", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ft, "FAILED_CHECKS", {})
    assert not ft.checked("compressor step", dev)
    assert "other values" in ft.FAILED_CHECKS[("compressor step", dev)]
    monkeypatch.setattr(ft, "compressor_step", step)
    assert not ft.checked("compressor step", dev)  # checked once per device
    monkeypatch.setattr(ft, "FAILED_CHECKS", {})
    assert ft.checked("compressor step", dev)
    monkeypatch.setattr(ft, "FAILED_CHECKS", {})
    monkeypatch.setitem(ft.CHECKS, "compressor step", lambda dev: 1 / 0)
    assert not ft.checked("compressor step", dev)
    assert "ZeroDivisionError" in ft.FAILED_CHECKS[("compressor step", dev)]
    # the runtime's notes say which kernel fell back and why
    (note,) = ft.fallback_notes(dev)
    assert note.startswith("the compressor step runs as separate kernels") and "Zero" in note
    monkeypatch.setitem(ft.TENSOR_CORES, dev, "Triton's tensor-core kernels gave wrong values")
    assert "prompts' experts run through torch" in ft.fallback_notes(dev)[0]


def test_fused_norms_that_fail_their_check_give_each_norm_its_own_launch(monkeypatch):
    """The RMSNorms inside RoPE and the hyper-connection collapse have their own check: where it
    fails, the norms run as their own kernels (the same values) and the notes say so; every
    other kernel stays."""
    from flashdesk.engine.model import mhc

    dev = kernels_device()
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(2, 4, 128, generator=g).to(torch.bfloat16), torch.rand(128) + 0.5
    cos, sin = torch.rand(2, 16, generator=g), torch.rand(2, 16, generator=g)
    fn, scale, base = torch.randn(24, 512, generator=g) * 0.05, torch.rand(3) + 0.5, torch.randn(24)
    mixes = mhc._mixes(x, fn, 1e-6)
    on = [t.to(dev) for t in (x, w, cos, sin, mixes, scale, base)]
    xd, wd, cosd, sind, mixd, scd, based = on
    monkeypatch.setattr(ft, "available", lambda device: True)  # as on a GPU
    monkeypatch.setattr(ft, "FAILED_CHECKS", {})
    assert ft.fusing_norms(torch.device(dev))  # the check passes here
    fused = ft.norm_rope(xd, wd, 1e-6, cosd, sind), ft.hc_pre_tail(mixd, xd, scd, based, 20,
                                                                    1e-6, wd, 1e-6)[0]  # fmt: skip
    monkeypatch.setattr(ft, "FAILED_CHECKS", {})
    monkeypatch.setitem(ft.CHECKS, "RMSNorm fusion", lambda device: "wrong values")
    alone = ft.apply_rope(ft.rms_norm(xd, wd, 1e-6), cosd, sind)
    assert torch.equal(ft.norm_rope(xd, wd, 1e-6, cosd, sind), alone)
    u = ft.hc_pre_tail(mixd, xd, scd, based, 20, 1e-6)[0]
    got = ft.hc_pre_tail(mixd, xd, scd, based, 20, 1e-6, wd, 1e-6)[0]
    assert torch.equal(got, ft.rms_norm(u, wd, 1e-6))
    torch.testing.assert_close(got.cpu(), fused[1].cpu(), rtol=1e-2, atol=1e-2)
    assert torch.equal(alone, fused[0])  # the fused kernel's values, to the bit
    (note,) = ft.fallback_notes(dev)
    assert note.startswith("the RMSNorm fusion runs as separate kernels") and "wrong" in note
    assert ft.checked("hyper-connection mixes", dev)


def test_head_groups_that_fail_their_check_give_way_to_the_per_head_kernel(monkeypatch):
    """DECODE_ATTENTION "heads" (tensor cores) failing the per-GPU check: the one-head-per-
    program kernel is checked and kept instead of torch's ops; a "head" failure stays one."""
    dev = torch.device(kernels_device())
    monkeypatch.setattr(ft, "DECODE_ATTENTION", "heads")
    real = ft._check_decode_attention
    tried = []

    def heads_fail(device):
        tried.append(ft.DECODE_ATTENTION)
        if ft.DECODE_ATTENTION == "heads":
            raise RuntimeError("no bf16 dot on this GPU")
        return real(device)

    monkeypatch.setattr(ft, "_check_decode_attention", heads_fail)
    assert ft.CHECKS["decode attention"](dev) is None
    assert tried == ["heads", "head"] and ft.DECODE_ATTENTION == "head"
    monkeypatch.setattr(ft, "_check_decode_attention", lambda device: "wrong values")
    assert ft.CHECKS["decode attention"](dev) == "wrong values"


def test_the_model_runs_through_the_elementwise_kernels(monkeypatch):
    """The model's RMSNorms, rotations and hyper-connections routed to the kernels (as on a GPU
    with Triton; here in the interpreter): prefill and decode give the torch path's logits."""
    from collections import Counter

    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.model.model import V4Model
    from flashdesk.engine.synthetic import SyntheticCheckpoint

    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: tests/gpu runs the model on CUDA")
    config = ModelConfig.tiny(num_nextn_predict_layers=0)
    model = V4Model(config, SyntheticCheckpoint(config, seed=2).tensor)
    ids = torch.randint(0, config.vocab_size, (12,), generator=torch.Generator().manual_seed(0))

    def run():
        state = model.new_state()
        rows = [model.prefill(ids[:9], state)]
        return torch.stack(rows + [model.decode(int(t), state) for t in ids[9:]])

    want = run()
    calls = Counter()
    names = ("rms_norm", "apply_rope", "norm_rope", "hc_mixes", "hc_pre_tail", "hc_post", "route")
    names += ("swiglu",)
    for name in names:
        kernel = getattr(ft, name)
        monkeypatch.setattr(
            ft, name, lambda *a, _k=kernel, _n=name, **kw: calls.update([_n]) or _k(*a, **kw)
        )
    monkeypatch.setattr(ft, "applies", lambda t: True)
    monkeypatch.setattr(ft, "checked", lambda name, device: True)  # their own checks passed
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-4)
    assert set(calls) == set(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kv_rows_in_one_launch_equal_the_torch_codec(dtype):
    """Rows of every magnitude (FP8 subnormals, zeros, −0, large) written at scattered rows and
    read back whole and gathered: the packed parts and the rows bit for bit as `cache.Fp8Rows`'
    torch encode / decode."""
    from flashdesk.engine.cache import Fp8Rows

    dev = kernels_device()
    g = torch.Generator().manual_seed(12)
    codec = Fp8Rows(512, 64, dtype)
    magnitude = torch.tensor([1e-6, 1e-3, 1.0, 30.0, 1e5, 0.0, 1.0, 1.0])[:, None]
    rows = torch.randn(8, 512, generator=g) * magnitude
    rows[6, :64], rows[7, 5] = 0.0, -0.0
    rows = rows.to(dtype)
    index = torch.randperm(16, generator=g)[:8]
    want = codec.empty(16, "cpu")
    codec.write_rows(want, rows, index)  # the torch path (not a GPU tensor)
    got = codec.empty(16, dev)
    ft.fp8_rows_put(got, rows.to(dev), index.to(dev))
    for part, ref in zip(got, want, strict=True):
        assert torch.equal(part.cpu(), ref)
    for sel in (None, torch.tensor([index[3], index[0], index[0], 15])):
        read = ft.fp8_rows_read(got, None if sel is None else sel.to(dev), dtype)
        assert read.dtype == dtype and torch.equal(read.cpu(), codec.read_rows(want, sel))
    assert ft.fp8_rows_read(got, torch.empty(0, dtype=torch.long, device=dev), dtype).shape == (
        0,
        512,
    )
    assert not ft.fp8_rows_fits(48, 16) and not ft.fp8_rows_fits(64, 24)


def test_a_decode_step_reads_and_writes_fp8_kv_rows_in_single_launches(monkeypatch):
    """The runtime's decode step with the packed FP8 KV cache, its row writes (window ring,
    compressed entries) and reads (ring, CSA picks, HCA rows) through the row kernels: the
    same logits as the torch codec, bit for bit."""
    from collections import Counter

    from _graph_safety import GRAPH_CONFIG, graph_placement

    from flashdesk.engine.cache import Fp8Rows
    from flashdesk.engine.decode_graphs import GraphDecoder
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.engine.synthetic import SyntheticCheckpoint

    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: tests/gpu runs the captured step on CUDA")
    config = GRAPH_CONFIG.replace(head_dim=80)  # 64 no-rope channels, 16 rope
    ids = torch.randint(0, config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    placement = graph_placement("host")
    with load_runtime(
        SyntheticCheckpoint(config, seed=3), placement=placement, kv_dtype="fp8"
    ) as rt:

        def run():
            graphs, state = GraphDecoder(rt.model, capture=False), rt.new_state()
            rt.prefill(ids[:20].tolist(), state)
            return torch.stack([graphs.decode(t, state) for t in ids[20:].tolist()])

        want = run()
        calls = Counter()
        for name in ("fp8_rows_put", "fp8_rows_read"):
            kernel = getattr(ft, name)
            monkeypatch.setattr(
                ft, name, lambda *a, _k=kernel, _n=name: calls.update([_n]) or _k(*a)
            )
        monkeypatch.setattr(Fp8Rows, "_fused", lambda self, t: self.fusable)
        assert torch.equal(run(), want)
    # per step: 5 ring writes + 4 entry writes; reads of 5 rings + 4 stores (+ the prompt's)
    assert calls["fp8_rows_put"] == 10 * 9 and calls["fp8_rows_read"] >= 10 * 9


@pytest.mark.parametrize(
    ("split", "heads", "kind", "dtype"),
    [
        (None, 3, "head", torch.float32),
        (16, 3, "head", torch.float32),
        (48, 3, "head", torch.float32),
        # head groups on the tensor cores (16 heads a program), BF16 as the runtime's rows
        (None, 32, "heads", torch.float32),
        (48, 32, "heads", torch.bfloat16),
        (16, 3, "heads", torch.float32),  # 3 heads make no group: one head per program
    ],
)
def test_decode_attention_split_across_programs_equals_one_softmax(split, heads, kind, dtype):
    """The rows of a decode step's sink attention split across programs and merged per head
    (the default: 128 rows per split) give the one softmax over all rows: a full window ring, a
    CSA layer's 200 picks with some invisible, a split holding no visible row."""
    dev = kernels_device()
    g = torch.Generator().manual_seed(12)
    dim, w, c = 64, 32, 200

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).float()

    q, own = randn(1, heads, dim), randn(1, dim)
    window, comp = randn(w, dim), randn(c, dim)
    visible = torch.rand(c, generator=g) < 0.5
    visible[48:96] = False  # whole splits of 16 / 48 rows with nothing to attend
    sink, scale, pos = torch.randn(heads, generator=g), dim**-0.5, 77
    keys = window.index_copy(0, torch.tensor([pos % w]), own)
    logits = scale * torch.cat(
        [torch.einsum("qhd,kd->qhk", q, keys),
         torch.einsum("qhd,td->qht", q, comp).masked_fill(~visible, float("-inf"))], dim=-1,
    )  # fmt: skip
    top = torch.maximum(logits.amax(-1), sink[None])  # the sink: a logit with no value
    p = (logits - top[..., None]).exp()
    want = p @ torch.cat([keys, comp]) / (p.sum(-1) + (sink[None] - top).exp())[..., None]
    on = [t.to(dev, dtype) for t in (q, window, own, comp)] + [visible.to(dev), sink.to(dev)]
    got = ft.decode_attention(
        on[0], on[1], on[2], on[3], on[4], torch.tensor([pos], device=dev), on[5], scale,
        rows_per_split=split, kind=kind, group=16,
    )  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_head_groups_split_a_layer_s_rows_by_their_count():
    """DECODE_HEAD_ROWS_PER_SPLIT 0 (the default): about 20 splits of 16-128 rows, the size the
    H200's sweeps found fastest at each count, at most DECODE_MAX_SPLITS of them; a size given
    is taken as it is, and the per-head kind keeps its own default."""
    split = ft.decode_attention_split
    assert ft.DECODE_HEAD_ROWS_PER_SPLIT == 0
    assert split(128, 512, 512, grouped=True) == (16, 32, 4, 20)  # a CSA layer's picks
    assert split(128, 1024, 512, grouped=True)[1] == 64
    assert split(128, 8192, 512, grouped=True) == (16, 144, 1, 58)  # an HCA layer at 1M
    assert split(128, 16, 512, grouped=True) == (16, 16, 8, 9)  # an HCA layer at 2K
    assert split(128, 512, 512, 0, grouped=True) == split(128, 512, 512, grouped=True)
    assert split(128, 512, 512, 64, grouped=True)[1] == 64
    assert split(128, 512, 512)[1] == ft.DECODE_ROWS_PER_SPLIT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_scores_in_one_launch_equal_the_indexer(dtype):
    """A CSA layer's decode-step indexer at V4-Flash's 64 heads × 128: Σ_h w_h · ReLU(q_h · K_t)
    over a store of 200 keys (several programs, the last one partial), −∞ past the visible
    count; the keys read as stored, not widened first."""
    from flashdesk.engine.model.indexer import Indexer

    dev = kernels_device()
    g = torch.Generator().manual_seed(12)
    q = torch.randn(64, 128, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    keys = torch.randn(200, 128, generator=g).to(dtype)
    scale = 128**-0.5 * 64**-0.5
    for pos in (3, 517, 10_000):
        want = Indexer.scores(q.float()[None], (w.float() * scale)[None], keys)[0]
        want[torch.arange(200) >= (pos + 1) // 4] = float("-inf")
        at = torch.tensor([pos], device=dev)
        got = ft.index_scores(q.to(dev), w.to(dev), scale, keys.to(dev), at, 4)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    # float32 head weights (a joined launch's sums) are read as rounded to q's dtype, as
    # weights_proj gives them (Triton's interpreter narrows by truncation: one bf16 step apart)
    wide = w.float() + torch.randn(64, generator=g) * 1e-3
    got = ft.index_scores(q.to(dev), wide.to(dev), scale, keys.to(dev), at, 4)
    want = ft.index_scores(q.to(dev), wide.to(dtype).to(dev), scale, keys.to(dev), at, 4)
    close = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.cpu(), want.cpu(), **close)
    with pytest.raises(ValueError, match="do not fit"):
        ft.index_scores(q.to(dev), w.to(dev), scale, keys.half().to(dev), at, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_scores_read_fp8_keys_as_stored(dtype):
    """The packed KV format's index keys (`cache.Fp8KeyRows`: E4M3 codes, a float32 scale per
    key) scored from their bytes, not decoded to a float32 copy each step: the torch ops' scores
    of the decoded keys, the NaN-free code range's extremes and subnormals included."""
    from flashdesk.engine.cache import Fp8KeyRows
    from flashdesk.engine.model.indexer import Indexer

    dev = kernels_device()
    g = torch.Generator().manual_seed(13)
    q = torch.randn(64, 128, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    keys = torch.randn(200, 128, generator=g) * torch.logspace(-4, 2, 200)[:, None]
    keys[7, :3] = torch.tensor([448.0, -448.0, 2.0**-9])  # max, min, a subnormal code
    codes, key_scale = Fp8KeyRows(128).encode(keys)
    decoded = Fp8KeyRows(128).decode((codes, key_scale))
    scale = 128**-0.5 * 64**-0.5
    pos = 517
    want = Indexer.scores(q.float()[None], (w.float() * scale)[None], decoded)[0]
    want[torch.arange(200) >= (pos + 1) // 4] = float("-inf")
    at = torch.tensor([pos], device=dev)
    for stored in (codes, codes.view(torch.float8_e4m3fn)):
        got = ft.index_scores(q.to(dev), w.to(dev), scale, stored.to(dev), at, 4, key_scale.to(dev))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scale per key"):
        ft.index_scores(q.to(dev), w.to(dev), scale, codes.to(dev), at, 4, key_scale[:5].to(dev))


def test_dependent_launch_only_where_the_gpu_has_it(monkeypatch):
    """gpu_kernels.PDL asks for programmatic dependent launch; the launches take it only on a
    GPU of compute capability 9.0 or later with compiled kernels (not the interpreter, not the
    CPU), and never while PDL is off."""
    monkeypatch.setattr(ft, "INTERPRETED", False)
    cuda = torch.device("cuda", 0)
    capability = {"cap": (9, 0)}
    monkeypatch.setattr(ft, "_capability", lambda device: capability["cap"])
    monkeypatch.setattr(ft, "PDL", 0)
    assert ft._pdl(cuda) == {}
    monkeypatch.setattr(ft, "PDL", 1)
    assert ft._pdl(cuda) == {"PDL": True, "launch_pdl": True}
    assert ft._pdl(torch.device("cpu")) == {}
    capability["cap"] = (8, 9)  # Ada: no griddepcontrol
    assert ft._pdl(cuda) == {} and not ft.pdl_possible(cuda)
    monkeypatch.setattr(ft, "INTERPRETED", True)
    capability["cap"] = (9, 0)
    assert ft._pdl(cuda) == {}


def test_a_failed_integer_dots_check_says_what_runs_instead(monkeypatch):
    """The notes name the float decode where MODE 4's check failed, not 'separate kernels'."""
    monkeypatch.setattr(ft, "FAILED_CHECKS", {("FP4 int8 dots", "cuda:0"): "wrong values"})
    monkeypatch.setattr(ft, "TENSOR_CORES", {})
    assert ft.fallback_notes("cuda:0") == [
        "the VRAM experts take the float decode, not integer dots, slower per token: wrong values"
    ]


def test_routing_and_its_log_in_one_launch_equal_the_two():
    """`route(record=)`: a program per token logs its picks with atomics; the counts, totals,
    cache hits and host ids equal route then record_picks, hash and top-k routing."""
    assert ft._route_and_record_mismatch(torch.device(kernels_device())) is None
    dev = kernels_device()
    from flashdesk.engine.runtime_experts import RoutingLog

    g = torch.Generator().manual_seed(12)
    logits, bias = torch.randn(5, 32, generator=g), torch.randn(32, generator=g) * 0.1
    resident = torch.rand(32, generator=g) < 0.5
    for hits in (True, False):
        one, two = RoutingLog(1, 32, torch.device(dev)), RoutingLog(1, 32, torch.device(dev))
        record = ft.RoutingRecord(one.counts[0], one.device_picks, one.total_picks,
                                  resident.to(dev), None, hits)  # fmt: skip
        e, w, host = ft.route(logits.to(dev), bias.to(dev), None, 4, 2.0, record)
        e2, w2 = ft.route(logits.to(dev), bias.to(dev), None, 4, 2.0)
        host2 = ft.record_picks(e2, resident.to(dev), two.counts[0], two.device_picks,
                                two.total_picks, hits=hits)  # fmt: skip
        for a, b in ((e, e2), (w, w2), (host, host2), (one.counts, two.counts)):
            assert torch.equal(a.cpu(), b.cpu())
        assert int(one.total_picks) == int(two.total_picks) == 20
        assert (
            int(one.device_picks)
            == int(two.device_picks)
            == (int(resident[e2.cpu()].sum()) if hits else 0)
        )


def test_routing_writes_into_given_buffers():
    """`route(out=)`: a captured step's fixed buffers get the experts, weights and host ids
    directly (no copies after), the same values as fresh ones."""
    dev = kernels_device()
    from flashdesk.engine.runtime_experts import RoutingLog

    g = torch.Generator().manual_seed(13)
    logits, bias = torch.randn(1, 32, generator=g).to(dev), (torch.randn(32, generator=g) * 0.1)
    resident = (torch.rand(32, generator=g) < 0.5).to(dev)
    got = []
    for out in (None, tuple(torch.full((1, 4), 9, dtype=t, device=dev)
                            for t in (torch.int64, torch.float32, torch.int64))):  # fmt: skip
        log = RoutingLog(1, 32, torch.device(dev))
        record = ft.RoutingRecord(log.counts[0], log.device_picks, log.total_picks, resident)
        got.append(ft.route(logits, bias.to(dev), None, 4, 2.0, record, out))
        if out is not None:
            assert all(a is b for a, b in zip(got[-1], out, strict=True))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a.cpu(), b.cpu())
