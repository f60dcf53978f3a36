"""FP8 E4M3 / FP4 E2M1 / E8M0: every code against the spec's formulas; encoders round like the
reference quantizer (power-of-two scales, round-to-nearest-even)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flashdesk.engine import quant


def spec_e4m3(code: int) -> float:
    """Spec §4.3: OCP E4M3 "fn" — sign, 4 exponent bits (bias 7), 3 mantissa bits, S.1111.111 NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    if e == 0:
        return sign * (m / 8) * 2.0**-6
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


SPEC_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]  # codes 0..7; 8..15 the negatives (8 = -0)


def test_every_e4m3_code_decodes_to_the_spec_value():
    got = quant.e4m3_to_float(torch.arange(256, dtype=torch.uint8))
    for code in range(256):
        want = spec_e4m3(code)
        if math.isnan(want):
            assert math.isnan(got[code]), code
        else:
            assert got[code].item() == want, code
            assert math.copysign(1, got[code].item()) == math.copysign(1, want), code
    assert got[0x7E] == 448 and got[0x01] == 2.0**-9 and got[0x38] == 1.0
    assert [c for c in range(256) if math.isnan(got[c])] == [0x7F, 0xFF]


def test_every_e2m1_code_and_nibble_order():
    got = quant.e2m1_to_float(torch.arange(16, dtype=torch.uint8)).tolist()
    assert got == SPEC_E2M1 + [-v for v in SPEC_E2M1]
    assert math.copysign(1, got[8]) == -1  # code 8 is -0
    packed = torch.tensor([[0x21, 0xF8]], dtype=torch.uint8)
    assert quant.e2m1_unpack(packed).tolist() == [[1, 2, 8, 15]]
    assert quant.e2m1_packed_to_float(packed.view(torch.int8)).tolist() == [[0.5, 1.0, -0.0, -6.0]]
    every_byte = torch.arange(256, dtype=torch.uint8)
    pairs = quant.e2m1_packed_to_float(every_byte).view(256, 2)
    for b in range(256):
        assert pairs[b].tolist() == [got[b & 15], got[b >> 4]]


def test_e8m0_edge_cases():
    got = quant.e8m0_to_float(torch.arange(256, dtype=torch.uint8))
    assert got[127] == 1.0 and got[128] == 2.0 and got[126] == 0.5
    assert got[0].item() == 2.0**-127 and got[0] > 0  # subnormal in float32, still exact
    assert got[254].item() == 2.0**127
    assert math.isnan(got[255])
    for b in range(255):
        assert got[b].item() == 2.0 ** (b - 127)


def _nearest_even_e4m3(x: float) -> int:
    """Brute force: the finite code nearest to x; on a tie the one with an even mantissa."""
    best = None
    for code in range(256):
        v = spec_e4m3(code)
        if math.isnan(v) or (v == 0 and code == 0x80):
            continue
        key = (abs(v - x), code & 1)
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


def test_e4m3_encoder_rounds_to_nearest_even_and_saturates():
    values = quant.e4m3_to_float(torch.arange(256, dtype=torch.uint8))
    finite = sorted({v for v in values.tolist() if not math.isnan(v) and v >= 0})
    mids = [(a + b) / 2 for a, b in itertools.pairwise(finite)]
    rng = torch.Generator().manual_seed(0)
    samples = mids + (torch.randn(300, generator=rng) * 50).tolist() + [1000.0, -1e6, 448.0]
    codes = quant.float_to_e4m3(torch.tensor(samples + [-m for m in mids]))
    expected = [_nearest_even_e4m3(min(max(x, -448), 448)) for x in samples + [-m for m in mids]]
    for x, got, want in zip(samples, codes.tolist(), expected, strict=False):
        assert spec_e4m3(got) == spec_e4m3(want), x


def test_e2m1_encoder_ties_go_to_even_codes():
    cases = {
        0.25: 0, 0.75: 2, 1.25: 2, 1.75: 4, 2.5: 4, 3.5: 6, 5.0: 6,  # exact ties
        0.26: 1, 0.74: 1, 1.3: 3, 2.6: 5, 4.9: 6, 5.1: 7, 7.0: 7, 100.0: 7, 0.0: 0,
    }  # fmt: skip
    xs = torch.tensor(list(cases))
    assert quant.float_to_e2m1(xs).tolist() == list(cases.values())
    assert quant.float_to_e2m1(-xs).tolist() == [c | 8 for c in cases.values()]
    assert quant.float_to_e2m1(torch.tensor([-0.1, -0.0])).tolist() == [8, 8]
    # every representable value encodes to its own code
    assert quant.float_to_e2m1(torch.tensor(SPEC_E2M1)).tolist() == list(range(8))


def test_fp8_scales_are_reference_powers_of_two():
    w = torch.zeros(256, 384)
    w[0, 0] = 448.0  # amax exactly 448·2^0 -> exponent 0
    w[0, 200] = 449.0  # just above -> exponent 1
    w[130, 0] = 1.0  # 1/448 -> ceil(log2) = -8
    # tile (1, 2) stays zero -> floored at 1e-4 -> ceil(log2(1e-4/448)) = -22
    codes, scales = quant.quantize_fp8(w)
    assert scales.shape == (2, 3)
    assert (scales.int() - 127).tolist() == [[0, 1, -22], [-8, -22, -22]]
    assert quant.dequant_fp8(codes, scales)[0, 0] == 448.0


def test_fp8_round_trip_is_idempotent_and_close():
    rng = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=rng) * torch.logspace(
        -3, 2, 200
    )  # uneven tiles, wide range
    codes, scales = quant.quantize_fp8(w)
    assert codes.shape == (300, 200) and scales.shape == (3, 2)
    dq = quant.dequant_fp8(codes, scales)
    scale_full = quant.e8m0_to_float(scales).repeat_interleave(128, 0)[:300]
    scale_full = scale_full.repeat_interleave(128, 1)[:, :200]
    assert (dq - w).abs().le(w.abs() * 2.0**-4 + scale_full * 2.0**-10).all()
    codes2, scales2 = quant.quantize_fp8(dq)
    assert torch.equal(scales2, scales) and torch.equal(quant.dequant_fp8(codes2, scales2), dq)


def test_fp4_round_trip_and_scales():
    rng = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=rng)
    w[3, :32] = 0.0  # an all-zero group -> floor 6·2^-126 -> scale 2^-126
    w[5, 32:64] = 6.0 * 4  # amax 24 -> exponent 2
    packed, scales = quant.quantize_fp4(w)
    assert packed.shape == (64, 64) and scales.shape == (64, 4)
    assert scales[3, 0] == 1 and scales[5, 1] == 127 + 2
    dq = quant.dequant_fp4(packed, scales)
    assert torch.equal(dq[5, 32:64], torch.full((32,), 24.0))
    s = quant.e8m0_to_float(scales).repeat_interleave(32, 1)
    assert (dq - w).abs().le(s * 1.0 + 1e-30).all()  # at most half the widest step (2) · scale
    packed2, scales2 = quant.quantize_fp4(dq)
    assert torch.equal(quant.dequant_fp4(packed2, scales2), dq)


def test_dequant_rejects_mismatched_scales():
    with pytest.raises(ValueError, match="FP8 scale shape"):
        quant.dequant_fp8(
            torch.zeros(256, 256, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.uint8)
        )
    with pytest.raises(ValueError, match="FP4 scale shape"):
        quant.dequant_fp4(
            torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)
        )
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize_fp8(torch.tensor([[float("nan")]]))
