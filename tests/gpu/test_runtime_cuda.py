"""The runtime's GPU/CPU split (skipped where there is no CUDA).

Non-expert weights on the GPU, routed experts on CPU threads (pinned / pageable / mmap) beside a
VRAM expert cache, layer-streamed prefill: all equal the plain CPU model; no non-expert weight
crosses PCIe per token (the copies of a decode step are counted with the profiler).
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from flashdesk.engine.checkpoint.writer import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.model.loader import load_model
from flashdesk.engine.runtime import LayerPlacement, Placement, RuntimeLoadError, load_runtime
from flashdesk.offload.plan import DEFAULT_STREAM_MIN_TOKENS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# float32 arithmetic throughout, as the reference model: the C kernels' activations too (the
# runtime hands them bf16 by default, whose roundings a 1e-3 comparison would see)
EXACT = {"dtype": torch.float32, "kernel_activations": torch.float32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = ModelConfig.tiny()
    folder = write_random(tmp_path_factory.mktemp("gpu") / "ckpt", config, seed=7)
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    return folder, config, ids, load_model(folder).forward_full(ids)


def _placements(config):
    n = config.n_routed_experts
    half = tuple(range(0, n, 2))
    rest = tuple(e for e in range(n) if e not in half)
    mixed = []
    for i in range(len(config.main_layers)):
        if i == 0:
            mixed.append(LayerPlacement(device=tuple(range(n))))  # a whole layer in VRAM
        else:
            mixed.append(LayerPlacement(device=half[:i], pinned=rest, mmap=half[i:]))
    zero_copy = LayerPlacement(pinned=tuple(range(n)), zero_copy=half)  # read in place: half
    return {
        "experts on cpu (pinned)": Placement.uniform(config, "pinned", "cuda"),
        "zero-copy": Placement("cuda", tuple(zero_copy for _ in config.main_layers)),
        "experts on cpu (mmap)": Placement.uniform(config, "mmap", "cuda"),
        "all in vram": Placement.uniform(config, "mmap", "cuda", cached=n),
        "mixed": Placement("cuda", tuple(mixed)),
    }


@pytest.mark.parametrize(
    "name",
    ["experts on cpu (pinned)", "experts on cpu (mmap)", "all in vram", "mixed", "zero-copy"],
)
def test_split_equals_cpu_model_fp32(tiny, name, monkeypatch):
    folder, config, ids, want = tiny
    # the plan's in-place share, not the load's timing of it (which a tiny model may turn off)
    monkeypatch.setenv("FLASHDESK_ZERO_COPY", "1")
    with load_runtime(folder, placement=_placements(config)[name], **EXACT) as rt:
        assert rt.device.type == "cuda"
        if name == "zero-copy":  # the GPU's kernels read half of each layer's experts in place
            moes = [b.moe for b in rt.model.blocks]
            assert all(m.zero_copy is not None and m.zero_copy.stacks[0].is_pinned() for m in moes)
            assert all(m.use_zero_copy for m in moes)
        full = rt.forward_full(ids.cuda())
        assert (full.cpu() - want).abs().max().item() <= 1e-3
        state = rt.new_state()
        rows = [rt.prefill(ids[:9], state, chunk_size=4)]
        rows += [rt.decode(int(t), state) for t in ids[9:]]
        assert (torch.stack(rows).cpu() - want[8:]).abs().max().item() <= 1e-3


def test_bf16_split_close_to_cpu_model(tiny):
    folder, config, ids, want = tiny
    # bf16 host activations, not int8 (a random tiny model's near-tied router picks amplify any
    # rounding; tests/test_runtime.py covers the int8 path on the same C kernels)
    with load_runtime(folder, placement=_placements(config)["mixed"], int8_experts=False) as rt:
        assert rt.model.numerics.dtype == torch.bfloat16
        # no plan: prompts of DEFAULT_STREAM_MIN_TOKENS tokens and more stream their experts
        assert {b.moe.stream_min_tokens for b in rt.model.blocks} == {DEFAULT_STREAM_MIN_TOKENS}
        # Triton compiled here (else a note says why VRAM weights take torch's slower path)
        assert not any("dequantize-then-multiply" in note for note in rt.notes), rt.notes
        got = rt.forward_full(ids.cuda()).float().cpu()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() > 0.98
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.6


def test_streamed_prefill_equals_cpu_model(tiny):
    """Prefill chunks at or above stream_min_tokens compute every picked expert on the GPU from
    bytes copied out of host memory for the call."""
    folder, config, ids, want = tiny
    placement = _placements(config)["experts on cpu (pinned)"]
    with load_runtime(folder, placement=placement, stream_min_tokens=8, **EXACT) as rt:
        logits = rt.prefill(ids, rt.new_state())
    assert (logits.cpu() - want[-1]).abs().max().item() <= 1e-3


def test_no_weight_copies_per_token(tiny, tmp_path):
    """A decode step's host→device copies are activations only: far below one weight matrix."""
    from torch.profiler import ProfilerActivity, profile

    folder, config, ids, _ = tiny
    with load_runtime(folder, placement=_placements(config)["mixed"]) as rt:
        for name, t in _device_tensors(rt.model):
            assert t.device.type == "cuda", name
        assert rt.model.embed.device.type == "cpu"  # one row per token; the plan keeps it in RAM
        state = rt.new_state()
        logits = rt.prefill(ids[:8], state)
        logits = rt.decode(int(logits.argmax()), state)  # warm-up (tables, workspaces)
        steps = 4
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                logits = rt.decode(int(logits.argmax()), state)
            torch.cuda.synchronize()
        trace = tmp_path / "trace.json"
        prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    h2d = [e for e in events if "HtoD" in e.get("name", "") or "htod" in e.get("name", "").lower()]
    moved = sum(int(e.get("args", {}).get("bytes", 0)) for e in h2d) / steps
    smallest_weight = config.hidden_size * config.moe_intermediate_size * 2  # one bf16 matrix
    assert h2d, "the profiler recorded no host-to-device copies at all (the token id must move)"
    assert moved < smallest_weight / 4, f"{moved:.0f} bytes/token copied to the GPU"


def _device_tensors(model):
    """(name, tensor) of every non-expert weight the model holds on its device."""
    yield "head", model.head
    for i, block in enumerate(model.blocks):
        for owner_name in ("attn", "moe"):
            stack = [(f"{i}.{owner_name}", getattr(block, owner_name))]
            while stack:
                name, obj = stack.pop()
                for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
                    if key in ("host", "cache", "log", "pool", "experts", "rotary"):
                        continue
                    if isinstance(value, torch.Tensor):
                        yield f"{name}.{key}", value
                    elif hasattr(value, "weight") and isinstance(value.weight, torch.Tensor):
                        yield f"{name}.{key}", value.weight
                    elif hasattr(value, "__dict__") and not isinstance(value, types.ModuleType):
                        stack.append((f"{name}.{key}", value))


def test_cache_refresh_and_hit_rate_on_gpu(tiny):
    folder, config, ids, want = tiny
    placement = Placement.uniform(config, "pinned", "cuda", cached=[0, 1])
    with load_runtime(folder, placement=placement, **EXACT) as rt:
        rt.forward_full(ids.cuda())
        assert 0 <= rt.expert_hit_rate <= 1
        rt.refresh_caches()
        assert (rt.forward_full(ids.cuda()).cpu() - want).abs().max().item() <= 1e-3


def test_plan_that_no_longer_fits_is_refused():
    free, _ = torch.cuda.mem_get_info()
    stale = types.SimpleNamespace(memory={"gpu": {"used": free * 2}})
    from flashdesk.engine.runtime import _check_vram

    with pytest.raises(RuntimeLoadError, match="free now"):
        _check_vram(stale, torch.device("cuda"))


def test_a_prefill_chunk_fits_the_planners_workspace():
    """The planner keeps `ModelFigures.prefill_workspace(chunk, context)` of VRAM free for a
    prefill call and may choose chunks of up to 16K tokens by it (`predict.plan_and_predict`):
    the peak a chunk allocates beside the weights, at V4-Flash's attention and expert dims with
    the host experts streamed, must stay inside it."""
    from flashdesk.engine.inventory import inventory
    from flashdesk.engine.synthetic import SyntheticCheckpoint
    from flashdesk.offload.figures import ModelFigures

    config = ModelConfig.v4_flash().replace(
        num_hidden_layers=2,
        compress_ratios=(0, 4),
        num_nextn_predict_layers=0,
        n_routed_experts=16,
        num_hash_layers=1,
        vocab_size=8192,
    )
    figures = ModelFigures.from_inventory(inventory(config), config)
    ckpt = SyntheticCheckpoint(config, expert_pool=4)
    ids = torch.randint(0, config.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    placement = Placement.uniform(config, "pinned", "cuda")
    with load_runtime(ckpt, placement=placement, stream_min_tokens=256) as rt:
        rt.prefill(ids[:512], rt.new_state())  # kernels compiled, staging ring made
        seen = {}
        for chunk in (1024, 4096):
            state = rt.new_state()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            rt.prefill(ids[:chunk], state)
            torch.cuda.synchronize()
            seen[chunk] = torch.cuda.max_memory_allocated() - held
        for chunk, peak in seen.items():
            planned = figures.prefill_workspace(chunk, chunk)
            assert peak <= planned, f"{chunk} tokens: peak {peak / 2**20:.0f} MiB > {planned}"
        per_token = (seen[4096] - seen[1024]) / 3072
        assert per_token <= figures.prefill_token_bytes, f"{per_token / 1024:.0f} KiB per token"


def test_integer_decode_experts_in_the_split_runtime(tiny, monkeypatch):
    """The VRAM experts' integer dots (FP4_MODE MODE 4, as a sweep may record it), with bf16
    numerics and the decode steps replayed from CUDA graphs: the GPU's check passes, the step
    takes them (the caches' int8), and the logits stay those of the float decode within int8's
    rounding of the expert activations."""
    from flashdesk.engine import gpu_kernels

    folder, config, ids, _ = tiny
    placement = _placements(config)["all in vram"]
    logits = {}
    plain = gpu_kernels.FLOAT_FP4[2]
    for mode in (plain, (4, 0, 1), (4, 1, 1)):
        monkeypatch.setattr(gpu_kernels, "FP4_MODE", mode)
        with load_runtime(folder, placement=placement, int8_experts=None) as rt:
            assert all(b.moe.cache.int8 for b in rt.model.blocks)
            assert not [n for n in rt.notes if "integer dots" in n], rt.notes
            state = rt.new_state()
            rt.prefill(ids[:8], state)
            logits[mode] = torch.stack([rt.decode(int(t), state) for t in ids[8:14]]).float()
    assert gpu_kernels.checked("FP4 int8 dots", "cuda")
    want = logits[plain]
    for mode in ((4, 0, 1), (4, 1, 1)):
        cos = torch.nn.functional.cosine_similarity(logits[mode], want, dim=-1)
        assert cos.min().item() > 0.99, (mode, cos)
