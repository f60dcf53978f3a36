"""The V4 forward pass on a CUDA GPU equals the CPU one (skipped where there is no CUDA).

Also runnable as a plain script (`python tests/gpu/test_model_cuda.py`) on a machine without
pytest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from _model_helpers import our_model, random_official_tensors, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cuda_model(config, tensors, **numerics):
    from flashdesk.engine.model.common import Numerics
    from flashdesk.engine.model.model import V4Model

    def fetch(name, dtype):
        t = tensors[name]
        return t if t.dtype == torch.int64 else t.to(dtype)

    return V4Model(config, fetch, device="cuda", numerics=Numerics(**numerics), with_mtp=True)


def test_cuda_full_and_decode_match_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    config = tiny_config()
    tensors = random_official_tensors(config, 21)
    ids = torch.randint(0, config.vocab_size, (140,), generator=torch.Generator().manual_seed(21))
    ref = our_model(config, tensors).forward_full(ids)
    gpu = _cuda_model(config, tensors)
    full = gpu.forward_full(ids.cuda())
    assert full.device.type == "cuda"
    assert (full.cpu() - ref).abs().max().item() <= 1e-4
    state = gpu.new_state()
    rows = [gpu.prefill(ids[:37], state, chunk_size=16)]
    rows += [gpu.decode(int(t), state) for t in ids[37:]]
    assert (torch.stack(rows).cpu() - ref[36:]).abs().max().item() <= 1e-4


def test_cuda_bf16_quant_simulation_and_fp8_cache_run():
    config = tiny_config(head_dim=128, qk_rope_head_dim=64, index_head_dim=128)
    tensors = random_official_tensors(config, 22)
    ids = torch.randint(0, config.vocab_size, (90,), generator=torch.Generator().manual_seed(22))
    cpu = our_model(config, tensors, dtype=torch.bfloat16, simulate_quant=True)
    gpu = _cuda_model(config, tensors, dtype=torch.bfloat16, simulate_quant=True)
    packed = gpu.new_state(kv_format="fp8")
    out = gpu.prefill(ids, packed)
    assert torch.equal(out, gpu.prefill(ids, gpu.new_state()))
    ref = cpu.prefill(ids, cpu.new_state())
    corr = torch.corrcoef(torch.stack((out.cpu(), ref)))[0, 1].item()
    assert torch.isfinite(out).all() and corr > 0.95


if __name__ == "__main__":
    torch.set_num_threads(4)
    for test in (
        test_cuda_full_and_decode_match_cpu,
        test_cuda_bf16_quant_simulation_and_fp8_cache_run,
    ):
        test()
        print("ok", test.__name__)


def test_sinkhorn_is_one_triton_launch():
    """With Triton the Sinkhorn is one kernel (tests/test_gpu_kernels.py checks its values)."""
    from torch.profiler import ProfilerActivity, profile

    from flashdesk.engine import gpu_kernels
    from flashdesk.engine.model import mhc

    if not gpu_kernels.available("cuda"):
        pytest.skip(gpu_kernels.unavailable_reason("cuda"))
    comb = torch.randn(1, 4, 4, device="cuda")
    mhc.sinkhorn(comb, 20, 1e-6)  # compiled
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mhc.sinkhorn(comb, 20, 1e-6)
        torch.cuda.synchronize()
    launches = sum(
        e.count for e in prof.key_averages() if e.key in ("cuLaunchKernel", "cudaLaunchKernel")
    )
    assert launches <= 2  # the kernel (and at most the output's allocation fill)


def test_graphed_sinkhorn_equals_the_ops_and_is_reused(monkeypatch):
    """Without Triton a decode step's Sinkhorn replays a captured CUDA graph (one replay instead
    of ~120 launches): same values as the ops, one capture per shape, inputs not aliased."""
    from flashdesk.engine.model import mhc

    monkeypatch.setenv("FLASHDESK_TRITON", "0")
    mhc._GRAPHS.clear()
    for seed in range(3):
        comb = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed)).cuda()
        got = mhc.sinkhorn(comb, 20, 1e-6)
        want = mhc.sinkhorn_ops(comb, 20, 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert len(mhc._GRAPHS) == 1 and next(iter(mhc._GRAPHS.values())) is not None
    first = mhc.sinkhorn(torch.zeros(1, 4, 4, device="cuda"), 20, 1e-6)
    second = mhc.sinkhorn(torch.ones(1, 4, 4, device="cuda") * 3, 20, 1e-6)
    torch.testing.assert_close(first, second)  # constant rows: the same doubly-stochastic matrix
    assert first.data_ptr() != second.data_ptr()  # each call returns its own tensor
    # prefill shapes (S > 1) run the ops
    many = torch.randn(5, 4, 4, device="cuda")
    torch.testing.assert_close(mhc.sinkhorn(many, 20, 1e-6), mhc.sinkhorn_ops(many, 20, 1e-6))
