"""The GPU runtime's linears over stored weights (`engine.gpu_linears`), run here through Triton's
interpreter: the same values as the float32 weights they stand for, on both of their paths (the
kernel for a decode step's few tokens, widening per call for a prompt)."""

from __future__ import annotations

import pytest
import torch
from _triton import as_on_a_gpu, kernels_device

from flashdesk.engine import gpu_kernels, quant, runtime
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.gpu_linears import CudaBf16Linear, CudaFp8Linear, JoinedRows, run_pair
from flashdesk.engine.model.common import rms_norm
from flashdesk.engine.runtime import load_runtime
from flashdesk.engine.synthetic import SyntheticCheckpoint


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, gpu_kernels.MAX_TOKENS + 1])
def test_bf16_linear_gives_the_float32_weights_product(x_dtype, tokens):
    """Router gates, compressor projections and the head keep BF16 in VRAM and widen in the
    kernel: x (widened if bf16) · W.float()ᵀ in float32, whatever x's dtype."""
    device = kernels_device()
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 256, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(2, tokens, 256, generator=g).to(x_dtype)
    lin = CudaBf16Linear(w.to(device))
    lin.fused = True  # as on a GPU with Triton
    got = lin(x.to(device))
    assert got.dtype == torch.float32 and got.shape == (2, tokens, 48)
    want = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_linears_of_one_input_join_into_one_launch():
    """On a GPU `wq_a`+`wkv`, the shared expert's `w1`+`w3` and each compressor's `wkv`+`wgate`
    become one launch each (their weights held once; the separate linears stay as views of
    the rows): the same prefill and decode logits as the separate launches."""
    kernels_device()
    # a window layer and a CSA one (its compressor and its indexer's): every joined kind
    config = ModelConfig.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    ids = torch.randint(0, config.vocab_size, (7,), generator=torch.Generator().manual_seed(4))
    prompt = 4
    with load_runtime(SyntheticCheckpoint(config, seed=5), kernel_activations=torch.float32) as rt:
        as_on_a_gpu(rt.model)

        def run():
            state = rt.new_state()
            rows = [rt.prefill(ids[:prompt].tolist(), state)]
            return torch.stack(rows + [rt.model.decode(int(t), state) for t in ids[prompt:]])

        want = run()
        runtime.join_gpu_linears(rt.model)
        launches = []
        linear = gpu_kernels.linear
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gpu_kernels, "linear", lambda *a, **k: launches.append(1) or linear(*a, **k))
            torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-5)
        blocks = rt.model.blocks
        compressors = [b.attn.compressor for b in blocks if b.attn.compressor is not None]
        compressors += [b.attn.indexer.compressor for b in blocks if b.attn.indexer is not None]
        assert all(b.attn.wq_a_wkv is not None and b.moe.shared.w13 is not None for b in blocks)
        assert compressors and all(c.wkv_wgate is not None for c in compressors)
        # per call and layer: wq_a+wkv, wq_b, wo_a, wo_b, w1+w3, w2, the router; wkv+wgate of
        # each compressor; the indexer's wq_b (the head is the C kernel's here)
        per_layer = [
            7 + (b.attn.compressor is not None) + 2 * (b.attn.indexer is not None) for b in blocks
        ]
        calls = 1 + len(ids) - prompt  # the prompt's, then a decode step's per token
        assert len(launches) == calls * sum(per_layer)  # 6 per call fewer than separately
        a = blocks[0].attn
        joined = a.wq_a_wkv.linear.weight
        assert a.wkv.weight.data_ptr() == joined.data_ptr() + a.wq_a.weight.nbytes


@pytest.mark.parametrize(("tokens", "limit", "kind"), [(1, 10.0, None), (3, 0.0, None),
                                                      (2, 10.0, "dot")])  # fmt: skip
def test_swiglu_read_into_the_fp8_product_equals_its_own_launch(tokens, limit, kind):
    """The shared expert's w2 taking the joined w1/w3 output (`linear(glu=)`, `after_swiglu`):
    the values of SwiGLU's own launch and then the product, bf16 hidden rounded alike; the
    tensor-core kind gets SwiGLU's launch first; a shape that is not [T, 2K] is refused."""
    device = kernels_device()
    g = torch.Generator().manual_seed(tokens)
    codes, tiles = quant.quantize_fp8(torch.randn(256, 128, generator=g) * 0.1)
    w = codes.view(torch.float8_e4m3fn).to(device)
    joined = (torch.randn(tokens, 256, generator=g) * 4).to(torch.bfloat16).to(device)
    h = gpu_kernels.swiglu(joined[:, :128], joined[:, 128:], limit, torch.bfloat16)
    want = gpu_kernels.linear(h, w, tiles.to(device), kind=kind)
    got = gpu_kernels.linear(joined, w, tiles.to(device), kind=kind, glu=limit)
    assert torch.equal(got.cpu(), want.cpu())
    lin = CudaFp8Linear(w, tiles.to(device), torch.bfloat16)
    lin.fused = True
    assert torch.equal(lin.after_swiglu(joined, limit).cpu(), lin(h).cpu())
    with pytest.raises(ValueError, match="2K"):
        gpu_kernels.linear(joined[:, :192], w, tiles.to(device), glu=limit)


@pytest.mark.parametrize(("tokens", "dtype", "kind"), [(1, torch.bfloat16, None),
                                                      (3, torch.float32, None),
                                                      (2, torch.bfloat16, "dot")])  # fmt: skip
def test_an_rms_norm_read_into_the_fp8_product_equals_its_own_launch(
    tokens, dtype, kind, monkeypatch
):
    """`wq_b` reading the q_a norm (`linear(norm=)`, `CudaFp8Linear(norm=)`): the values of the
    norm's own launch and then the product (the tensor-core kind gets the norm's launch
    first, as does the linear where the fused norms are off); a grouped weight is refused."""
    device = kernels_device()
    monkeypatch.setattr(gpu_kernels, "checked", lambda name, device: True)
    g = torch.Generator().manual_seed(tokens)
    codes, tiles = quant.quantize_fp8(torch.randn(256, 128, generator=g) * 0.1)
    w, tiles = codes.view(torch.float8_e4m3fn).to(device), tiles.to(device)
    x = (torch.randn(tokens, 128, generator=g) * 3).to(dtype).to(device)
    norm = ((torch.rand(128, generator=g) + 0.5).to(device), 1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    normed = gpu_kernels.rms_norm(x, *norm)
    want = gpu_kernels.linear(normed, w, tiles, kind=kind)
    got = gpu_kernels.linear(x, w, tiles, kind=kind, norm=norm)
    # the row's sum of squares may be summed in another order on a GPU: one rounding apart
    torch.testing.assert_close(got.cpu(), want.cpu(), **tol)
    lin = CudaFp8Linear(w, tiles, dtype)
    lin.fused = True
    torch.testing.assert_close(lin(x, norm=norm).cpu(), lin(normed).cpu(), **tol)
    monkeypatch.setattr(gpu_kernels, "FUSED_NORMS", False)
    own = lin(rms_norm(x, *norm))  # the norm's own launch (the model's, on any device)
    assert torch.equal(lin(x, norm=norm).cpu(), own.cpu())
    with pytest.raises(ValueError, match="one group"):
        gpu_kernels.linear(x, w, tiles, groups=2, norm=(norm[0][:64], 1e-6))


def test_two_linears_of_different_kinds_share_one_launch(monkeypatch):
    """`linear_pair` (an FP8 linear with tile scales and a BF16 one reading the same x, as a
    compressed layer's `wq_a`+`wkv` and its compressors' projections) gives each alone's values;
    shapes whose options differ in warps take separate launches (None, as where K would be
    split), and `run_pair` then launches each; joined rows come back as their parts."""
    device = kernels_device()
    monkeypatch.setattr(gpu_kernels, "checked", lambda name, device: True)
    g = torch.Generator().manual_seed(6)
    codes, tiles = quant.quantize_fp8(torch.randn(384, 256, generator=g) * 0.1)
    fp8 = CudaFp8Linear(codes.view(torch.float8_e4m3fn).to(device), tiles.to(device),
                        torch.bfloat16)  # fmt: skip
    bf16 = CudaBf16Linear((torch.randn(96, 256, generator=g) * 0.1).to(device))
    for lin in (fp8, bf16):
        lin.fused = True
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16).to(device)
    pair = gpu_kernels.linear_pair((x, fp8.weight, fp8.scale, torch.bfloat16),
                                   (x, bf16.weight, None, torch.float32))  # fmt: skip
    assert pair is not None
    for got, want in zip(pair, (fp8(x), bf16(x)), strict=True):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want.cpu())
    joined = JoinedRows(fp8, (256, 128))
    (qa, kv), comp = run_pair(joined, bf16, x)
    assert torch.equal(qa.cpu(), fp8(x)[:, :256].cpu()) and torch.equal(
        kv.cpu(), fp8(x)[:, 256:].cpu()
    )
    assert torch.equal(comp.cpu(), bf16(x).cpu())
    launched = []
    real = gpu_kernels.linear
    monkeypatch.setattr(gpu_kernels, "linear", lambda *a, **k: launched.append(1) or real(*a, **k))
    shape = (96, 256, 1, 2)
    for warps in (8, 2):  # other warps than the FP8 shape's (the defaults', 4)
        monkeypatch.setitem(gpu_kernels.LINEAR_ROWS_BY_SHAPE, shape, (4, warps, 256, 0))
        assert gpu_kernels.linear_pair((x, fp8.weight, fp8.scale, torch.bfloat16),
                                       (x, bf16.weight, None, torch.float32)) is None  # fmt: skip
        launched.clear()
        (qa, kv), comp = run_pair(joined, bf16, x)
        assert len(launched) == 2 and torch.allclose(comp.cpu(), bf16(x).cpu(), 1e-5, 1e-5)
