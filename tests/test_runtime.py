"""The runtime on the CPU: every placement the planner can produce gives the plain model's logits.

The reference is `load_model` (every weight dequantized to float32, `DenseExperts`); the runtime
reads routed experts as packed FP4 through the C kernels from pinned / pageable / memory-mapped
host copies or a device-side cache, and FP8 linears through the C FP8 kernel.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _triton import kernels_device

from flashdesk.engine import gpu_kernels, kernels, quant
from flashdesk.engine.checkpoint import Checkpoint
from flashdesk.engine.checkpoint.writer import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.decode_graphs import GraphDecoder
from flashdesk.engine.generate import SamplingParams, Session
from flashdesk.engine.model.loader import load_model
from flashdesk.engine.runtime import (
    Fp8Linear,
    LayerPlacement,
    LoadCancelled,
    Placement,
    RuntimeLoadError,
    load_runtime,
)
from flashdesk.engine.runtime_experts import MMAP, PAGEABLE, PINNED, ExpertCache, fp4_dequant
from flashdesk.offload.figures import ModelFigures
from flashdesk.offload.plan import PlanOptions, make_plan
from flashdesk.offload.probe import HardwareProfile

PROFILES = Path(__file__).parent / "profiles"
TOL = {"rtol": 1e-4, "atol": 1e-4}
# the float32 reference's arithmetic: its head, and float32 activations into the C kernels
EXACT = {"head_dtype": "fp32", "kernel_activations": torch.float32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, config, reference model, prompt ids, reference logits of every position)."""
    config = ModelConfig.tiny()
    folder = write_random(tmp_path_factory.mktemp("rt") / "ckpt", config, seed=5)
    ref = load_model(folder)
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    return folder, config, ref, ids, ref.forward_full(ids)


class _Chars:
    """A tokenizer stand-in: one letter per id."""

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def _mixed(config: ModelConfig) -> Placement:
    """Each layer different: all three host stores and a few device-cached experts."""
    n = config.n_routed_experts
    layers = []
    for i in range(len(config.main_layers)):
        dev = tuple(range(i % 3))
        rest = [e for e in range(n) if e not in dev]
        third = len(rest) // 3
        layers.append(
            LayerPlacement(
                device=dev,
                pinned=tuple(rest[:third]),
                pageable=tuple(rest[third : 2 * third]),
                mmap=tuple(rest[2 * third :]),
            )
        )
    return Placement("cpu", tuple(layers))


PLACEMENTS = {
    "mmap": lambda c: Placement.uniform(c, MMAP),
    "pageable": lambda c: Placement.uniform(c, PAGEABLE),
    "pinned": lambda c: Placement.uniform(c, PINNED),
    "mmap+cache": lambda c: Placement.uniform(c, MMAP, cached=3),
    "pinned+cache": lambda c: Placement.uniform(c, PINNED, cached=[1, 4, 6]),
    "all cached": lambda c: Placement.uniform(c, MMAP, cached=c.n_routed_experts),
    "mixed": _mixed,
}


CASES = [(name, True) for name in sorted(PLACEMENTS)] + [("mixed", False), ("mmap", False)]


@pytest.mark.parametrize(
    ("name", "fp8"), CASES, ids=[f"{n}-{'fp8' if f else 'deq'}" for n, f in CASES]
)
def test_every_placement_gives_the_models_logits(tiny, name, fp8):
    folder, config, _, ids, want = tiny
    placement = PLACEMENTS[name](config)
    with load_runtime(
        folder,
        placement=placement,
        fp8_linears=fp8,
        **EXACT,
    ) as rt:
        assert (rt.fp8_linears > 0) == fp8
        torch.testing.assert_close(rt.forward_full(ids), want, **TOL)
        # chunked prefill + token-by-token decode through the cache
        state = rt.new_state()
        rows = [rt.prefill(ids[:7], state, chunk_size=4)]
        rows += [rt.decode(int(t), state) for t in ids[7:]]
        torch.testing.assert_close(torch.stack(rows), want[6:], **TOL)
        cached = sum(len(lp.device) for lp in placement.layers)
        assert (rt.expert_hit_rate is None) == (cached == 0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_cached_experts_through_the_fused_kernels(tiny, monkeypatch):
    """Short prefills and decode steps run the VRAM cache's picks by `gpu_kernels.moe` (here in
    Triton's interpreter on the CPU; tests/gpu/ covers the GPU): the model's logits."""
    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: tests/gpu/test_runtime_cuda.py runs them there")
    folder, config, _, ids, want = tiny
    calls = []
    moe = gpu_kernels.moe
    monkeypatch.setattr(gpu_kernels, "available", lambda device: True)
    monkeypatch.setattr(gpu_kernels, "moe", lambda *a, **k: calls.append(1) or moe(*a, **k))
    placement = PLACEMENTS["pinned+cache"](config)
    with load_runtime(folder, placement=placement, **EXACT) as rt:
        state = rt.new_state()
        rows = [rt.prefill(ids[:7], state, chunk_size=4)]
        rows += [rt.decode(int(t), state) for t in ids[7:10]]
        torch.testing.assert_close(torch.stack(rows), want[6:10], **TOL)
    assert len(calls) == 5 * len(config.main_layers)  # two prefill chunks, three steps


def test_zero_copy_picks_are_read_by_the_device_beside_the_cpus(tiny, monkeypatch):
    """Pinned experts the GPU reads in place (`LayerPlacement.zero_copy`): a decode step's picks
    of them go to `gpu_kernels.moe` over their stacks (here in Triton's interpreter, the stacks
    on the CPU; on a GPU they are pinned pages read across PCIe), the C kernels get the other
    host picks, and the logits are the model's; longer calls give them back to the CPU."""
    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: tests/gpu/test_runtime_cuda.py runs them there")
    folder, config, _, ids, want = tiny
    monkeypatch.setattr(gpu_kernels, "available", lambda device: True)
    reads, host_ids = [], []
    moe_kernel, ffn = gpu_kernels.moe, kernels.expert_ffn
    monkeypatch.setattr(gpu_kernels, "moe", lambda *a, **k: reads.append(1) or moe_kernel(*a, **k))

    def seen_by_cpu(x, table, w, out=None, ids=None, **kw):
        host_ids.append((x.shape[0], ids.clone()))
        return ffn(x, table, w, out, ids=ids, **kw)

    monkeypatch.setattr(kernels, "expert_ffn", seen_by_cpu)
    n = config.n_routed_experts
    zc = tuple(range(0, n, 2))
    with load_runtime(folder, placement=PLACEMENTS["pinned"](config), **EXACT) as rt:
        _read_in_place(rt, zc)
        cache = ExpertCache(rt.model.blocks[0].moe.host, (1,), rt.device, n)
        cache.keep_out = zc  # as HybridMoE sets it: a VRAM cache never takes a zero-copy expert
        counts = torch.zeros(n)
        counts[0], counts[3] = 100.0, 50.0  # expert 0 is read in place: 3 comes in instead
        assert cache.refresh(counts) == 1 and cache.ids == [3]
        in_place = len(zc) * len(config.main_layers)
        assert f"the GPU reads {in_place} pinned ones in place" in rt.describe()
        state = rt.new_state()
        rows = [rt.prefill(ids[:17], state)]  # 17 tokens: above MAX_TOKENS, all on the CPU
        rows += [rt.decode(int(t), state) for t in ids[17:20]]
        torch.testing.assert_close(torch.stack(rows), want[16:20], **TOL)
        layers = len(config.main_layers)
        assert len(reads) == 3 * layers  # the three steps' zero-copy picks, on the device
        prompt = [i for t, i in host_ids if t == 17]
        steps = [i for t, i in host_ids if t == 1]
        assert len(prompt) == layers and any(int(e) in zc for i in prompt for e in i.flatten())
        assert len(steps) == 3 * layers
        assert not any(int(e) in zc for i in steps for e in i.flatten())
        # the fixed-shape step a CUDA graph captures: the same split, the same logits
        graphs, state = GraphDecoder(rt.model, capture=False), rt.new_state()
        rt.prefill(ids[:17], state)
        got = torch.stack([graphs.decode(int(t), state) for t in ids[17:20]])
        torch.testing.assert_close(got, want[17:20], **TOL)
        assert len(reads) == 6 * layers


@pytest.mark.parametrize(
    ("int8_experts", "activations", "int8"),
    [(None, torch.bfloat16, True), (None, torch.float32, False)],
)
def test_device_experts_take_int8_activations_where_asked_and_chosen(
    tiny, monkeypatch, int8_experts, activations, int8
):
    """With the integer dots chosen (FP4_MODE MODE 4, a sweep's choice), the device's cached
    experts take int8 activations unless int8_experts is False or the model computes in
    float32: those keep the float decode (`int8_experts=False` decides as float32 does: one
    expression). The decode step runs either way (the interpreter's MODE 4 included) and its
    logits stay close to the model's."""
    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: tests/gpu/test_runtime_cuda.py runs the runtime there")
    folder, config, _, ids, want = tiny
    monkeypatch.setattr(gpu_kernels, "available", lambda device: True)
    monkeypatch.setattr(gpu_kernels, "FP4_MODE", (4, 0, 1))
    floats, moe_kernel = [], gpu_kernels.moe

    def recorded(*args, **kw):
        floats.append(kw.get("floats", False))
        return moe_kernel(*args, **kw)

    monkeypatch.setattr(gpu_kernels, "moe", recorded)
    placement = PLACEMENTS["all cached"](config)
    with load_runtime(folder, placement=placement, head_dtype="fp32",
                      kernel_activations=activations, int8_experts=int8_experts) as rt:  # fmt: skip
        assert {b.moe.cache.int8 for b in rt.model.blocks} == {int8}
        state = rt.new_state()
        rt.prefill(ids[:2], state)
        logits = rt.decode(int(ids[2]), state)
    assert floats and set(floats) == {not int8}
    cos = torch.nn.functional.cosine_similarity(logits.float(), want[2], dim=0)
    assert cos > 0.99, cos


def _read_in_place(rt, zc: tuple[int, ...]) -> None:
    """Every layer's experts `zc` read in place by the device, as load_runtime builds them on a
    GPU (pinned stacks)."""
    n = rt.config.n_routed_experts
    for block in rt.model.blocks:
        moe = block.moe
        stacks = tuple(torch.stack([moe.host.parts[e][j] for e in zc]) for j in range(6))
        moe.zero_copy = ExpertCache(moe.host, zc, rt.device, n, stacks=stacks)
        assert moe.zero_copy.in_place and moe.zero_copy.refresh(torch.ones(n)) == 0


@pytest.mark.parametrize(("with_ms", "without_ms", "kept"), [(10.0, 8.0, False), (10.0, 9.9, True)])
def test_the_load_keeps_the_in_place_reads_only_where_they_time_faster(
    tiny, monkeypatch, with_ms, without_ms, kept
):
    """`measured_zero_copy` times scratch decode steps with and without the GPU's in-place
    reads: they go where the CPU alone is faster by more than the margin (with a note saying
    so, and graphs built without them), else stay. The steps' times are faked; one real
    `step_seconds` runs too and leaves the routing record as it was."""
    from flashdesk.engine.runtime import measured_zero_copy

    if kernels_device() != "cpu":
        pytest.skip("a GPU machine: the bench --synthetic run times both sides there")
    folder, config, *_ = tiny
    monkeypatch.setattr(gpu_kernels, "available", lambda device: True)
    with load_runtime(folder, placement=PLACEMENTS["pinned"](config), **EXACT) as rt:
        _read_in_place(rt, (0, 2))
        moes = [b.moe for b in rt.model.blocks]
        graphs = GraphDecoder(rt.model, capture=False)
        log = moes[0].log
        before = log.counts.clone()
        assert graphs.step_seconds(prompt=4, steps=3) > 0
        assert torch.equal(log.counts, before)
        timed = {True: with_ms / 1e3, False: without_ms / 1e3}
        monkeypatch.setattr(GraphDecoder, "step_seconds", lambda g: timed[moes[0].use_zero_copy])
        chosen, placement = measured_zero_copy(rt.model, graphs, rt.placement)
        assert all(m.use_zero_copy == kept for m in moes)
        assert (chosen is graphs) == kept
        notes = [n for n in placement.notes if "the CPU computes the picks" in n]
        if kept:
            assert placement is rt.placement and not notes
        else:
            in_place = 2 * len(config.main_layers)
            assert notes == [
                f"the CPU computes the picks of all host experts: a decode step took 8.0 ms that "
                f"way against 10.0 ms with the GPU reading {in_place} pinned experts in place, "
                "as planned (FLASHDESK_ZERO_COPY=1 keeps the plan's share)"
            ]
            assert "in place" not in rt.describe()


def test_zero_copy_experts_are_a_share_of_the_pinned_ones():
    """The planner's share of a layer's pinned picks: by count, or by routing counts (coldest
    first, up to the share of the picks); the placement refuses zero-copy experts not pinned."""
    from flashdesk.engine.runtime import _zero_copy_ids

    pinned = [7, 3, 9, 1]
    assert _zero_copy_ids(pinned, 0.0) == () and _zero_copy_ids([], 0.5) == ()
    assert _zero_copy_ids(pinned, 0.5) == (3, 7)
    counts = {1: 10.0, 3: 50.0, 7: 20.0, 9: 20.0}  # 100 picks: the coldest up to 30 of them
    assert _zero_copy_ids(pinned, 0.3, counts) == (1, 7)
    config = ModelConfig.tiny()
    bad = Placement.uniform(config, PINNED)
    bad = Placement("cpu", (LayerPlacement(mmap=tuple(range(config.n_routed_experts)),
                                           zero_copy=(0,)), *bad.layers[1:]))  # fmt: skip
    with pytest.raises(RuntimeLoadError, match="zero-copy experts must be pinned"):
        bad.validate(config)


def test_decode_pages_in_the_hash_layers_experts_first(tiny, monkeypatch):
    """Hash-routed layers know a token's experts from its id: before the step, their memory-mapped
    bytes are handed to the OS to read in (madvise WILLNEED); the logits do not change."""
    import sys

    from flashdesk.engine import kernels

    folder, config, _, ids, want = tiny
    seen, real = [], kernels.prefetch
    monkeypatch.setattr(
        kernels, "prefetch", lambda parts: seen.append([p.data_ptr() for p in parts]) or real(parts)
    )
    with load_runtime(
        folder,
        placement=Placement.uniform(config, MMAP),
        **EXACT,
    ) as rt:
        state = rt.new_state()
        rows = [rt.prefill(ids[:7], state)]
        assert seen == []  # a prompt's hash experts are read by the kernels themselves
        token = int(ids[7])
        rows.append(rt.decode(token, state))
        hashed = [b for b in rt.model.blocks if b.moe.router.tid2eid is not None]
        assert hashed
        assert seen == [
            [p.data_ptr() for p in rt.hosts[b.spec.index].parts[e]]
            for b in hashed
            for e in b.moe.router.tid2eid[token].tolist()
        ]
        if sys.platform.startswith("linux"):  # the step read them: nothing left to ask for
            assert rt._prefetch_hash_experts(token) == 0
        torch.testing.assert_close(torch.stack(rows), want[6:8], **TOL)
    with load_runtime(folder, placement=Placement.uniform(config, PAGEABLE)) as rt:
        assert rt._prefetch_hash_experts(token) == 0  # nothing on disk to read in


def test_experts_are_not_copied_twice(tiny):
    """mmap experts are views of the mapped file; pinned/pageable ones one owned buffer each."""
    folder, config, _, ids, _ = tiny
    with load_runtime(folder, placement=_mixed(config), **EXACT) as rt:
        for i, (lp, host) in enumerate(zip(rt.placement.layers, rt.hosts, strict=True)):
            prefix = f"{config.main_layers[i].prefix}ffn.experts."
            for e in range(config.n_routed_experts):
                stored = rt.checkpoint.raw(f"{prefix}{e}.w1.weight")
                same = host.parts[e][0].data_ptr() == stored.data_ptr()
                assert same == (e in lp.mmap or e in lp.device), (i, e)
                assert torch.equal(host.parts[e][0].view(torch.uint8), stored.view(torch.uint8))
        assert "mmap" in rt.describe() and "pageable" in rt.describe()
        if not torch.cuda.is_available():  # pinning needs a CUDA driver: pageable, and said so
            assert any("pinned RAM are in pageable RAM" in note for note in rt.notes)
    with pytest.raises(RuntimeError, match="closed"):
        rt.forward_full(ids)


def _greedy(model, ids):
    """12 greedy tokens after the first 9 prompt ids → (the tokens held, the last stats)."""
    session = Session(model, _Chars(), context_limit=256)
    events = list(session.stream(ids[:9].tolist(), SamplingParams(temperature=0, max_tokens=12)))
    return session.held_ids, events[-1].stats


def test_greedy_generation_is_identical(tiny):
    folder, config, ref, ids, _ = tiny
    want, _ = _greedy(ref, ids)
    with load_runtime(folder, placement=_mixed(config), **EXACT) as rt:
        got, stats = _greedy(rt, ids)
    assert got == want
    assert stats.expert_hit_rate is not None and 0 < stats.expert_hit_rate < 1


def test_speculative_runtime_gives_the_same_greedy_tokens(tiny):
    """CPU mode with the MTP block drafting: the tokens are the plain runtime's, each step feeds
    a token and a draft, and the block runs from its own experts."""
    folder, config, _, ids, _ = tiny
    with load_runtime(folder, placement=_mixed(config), **EXACT) as rt:
        want, plain = _greedy(rt, ids)
        assert not rt.speculative and "MTP" not in rt.describe()
    with load_runtime(folder, placement=_mixed(config), speculative=True, **EXACT) as rt:
        got, stats = _greedy(rt, ids)
        assert rt.speculative and "MTP block drafts" in rt.describe()
        mtp_moe = rt.model.mtp[0].block.moe
        assert int(mtp_moe.log.counts.sum()) > 0  # its picks, recorded apart from the layers'
    assert got == want
    assert plain.draft_acceptance is None and stats.draft_acceptance is not None


def test_speculation_is_refused_where_it_cannot_run(tiny, tmp_path):
    from flashdesk.engine.runtime import _check_speculation

    folder, config, *_ = tiny
    with Checkpoint.open(folder) as ckpt, pytest.raises(RuntimeLoadError, match="CPU mode only"):
        _check_speculation(ckpt, folder, torch.device("cuda"))
    no_mtp = write_random(tmp_path / "no_mtp", config.replace(num_nextn_predict_layers=0), seed=2)
    with pytest.raises(RuntimeLoadError, match="no MTP block"):
        load_runtime(no_mtp, device="cpu", speculative=True)


def test_host_experts_take_bf16_activations_by_default(tiny, monkeypatch):
    """The default rounds what the host's expert kernels read to bf16 (the reference's activation
    dtype; the kernels' fast path for prompts): every call gets bf16 rows and the logits stay
    within bf16 rounding of the float32 model's, so every position whose top two logits lie
    further apart than that picks the same token (a random tiny model has near-ties)."""
    folder, config, _, ids, want = tiny
    seen = set()
    ffn = kernels.expert_ffn
    monkeypatch.setattr(
        kernels, "expert_ffn", lambda x, *a, **k: seen.add(x.dtype) or ffn(x, *a, **k)
    )
    with load_runtime(
        folder, placement=_mixed(config), head_dtype="fp32", int8_experts=False
    ) as rt:
        got = rt.forward_full(ids)
        state = rt.new_state()
        steps = [rt.prefill(ids[:7], state)] + [rt.decode(int(t), state) for t in ids[7:]]
    assert seen == {torch.bfloat16}
    assert not torch.allclose(got, want, **TOL)  # the rounding is there …
    err = float((got - want).abs().max())
    assert err < 0.02 * float(want.abs().max())  # … and small
    torch.testing.assert_close(torch.stack(steps), want[6:], rtol=0, atol=2 * err)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert clear.sum() >= len(ids) // 2
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    with pytest.raises(ValueError, match="kernel_activations"):
        load_runtime(folder, kernel_activations=torch.float16)


def test_host_experts_take_int8_activations_where_faster(tiny, monkeypatch):
    """int8_experts: every host expert call quantizes its bf16 activations to int8 (the kernels'
    integer dots); a prompt and the same tokens decoded one by one agree as closely as on the bf16
    path (each token's rows are quantized alone, whatever the batch, so the two agree exactly until
    a value near a rounding tie or a near-tied router pick goes the other way: here up to 4e-2 of
    logits up to 4, the bf16 path up to 2e-2); the default follows `kernels.int8_experts()` and
    FLASHDESK_INT8=0; float32 kernel activations never take it."""
    folder, config, _, ids, want = tiny
    calls = []
    ffn = kernels.expert_ffn
    monkeypatch.setattr(
        kernels,
        "expert_ffn",
        lambda x, *a, **k: calls.append((x.dtype, k.get("int8"))) or ffn(x, *a, **k),
    )
    with load_runtime(folder, placement=_mixed(config), head_dtype="fp32", int8_experts=True) as rt:
        assert "host experts take int8 activations" in rt.describe()
        got = rt.forward_full(ids)
        state = rt.new_state()
        steps = [rt.prefill(ids[:7], state)] + [rt.decode(int(t), state) for t in ids[7:]]
    assert calls and set(calls) == {(torch.bfloat16, True)}
    scale = float(want.abs().max())
    torch.testing.assert_close(torch.stack(steps), got[6:], rtol=0, atol=0.02 * scale)
    with load_runtime(
        folder, placement=_mixed(config), head_dtype="fp32", int8_experts=False
    ) as rt:
        bf16 = rt.forward_full(ids)
    assert not torch.allclose(got, bf16, rtol=0, atol=1e-4 * scale)  # a different rounding
    calls.clear()
    with load_runtime(folder, int8_experts=True, **EXACT) as rt:
        assert "int8" not in rt.describe()
        rt.forward_full(ids[:4])
    assert set(calls) == {(torch.float32, False)}
    monkeypatch.setenv("FLASHDESK_INT8", "0")
    assert not kernels.int8_experts()
    calls.clear()
    with load_runtime(folder, head_dtype="fp32") as rt:
        rt.forward_full(ids[:4])
    assert set(calls) == {(torch.bfloat16, False)}


def _tiny_figures(folder, config) -> ModelFigures:
    with Checkpoint.open(folder) as ckpt:
        return ModelFigures.from_inventory(ckpt.inventory(), config, "tiny")


def test_planner_placements_apply_and_match(tiny):
    """Plans with experts on the GPU, in RAM and on disk map onto the runtime exactly (counts per
    layer as planned), and the model computes the same logits (the GPU share cached on the CPU)."""
    folder, config, _, ids, want = tiny
    figures = _tiny_figures(folder, config)
    profile = HardwareProfile.load(PROFILES / "gpu8gb_192gb.json")
    cap = profile.gpu.usable_vram_bytes
    ram = profile.usable_ram_bytes()
    options = PlanOptions(
        context=4096,
        gpu_workspace_bytes=0,
        vram_reserve_bytes=cap - 400_000,
        ram_reserve_bytes=ram - 3_500_000,  # a few experts in RAM, most on disk
    )
    plan = make_plan(figures, profile, options)
    placement = Placement.from_plan(plan, config, device="cuda")  # data only: no GPU needed
    for lp, planned in zip(placement.layers, plan.layers, strict=True):
        assert len(lp.device) == planned.experts_gpu
        assert len(lp.pinned) + len(lp.pageable) == planned.experts_ram
        assert len(lp.mmap) == planned.experts_disk
    assert any(len(lp.device) for lp in placement.layers)
    assert any(len(lp.mmap) for lp in placement.layers)
    on_cpu = dataclasses.replace(placement, device="cpu")
    with load_runtime(folder, placement=on_cpu, **EXACT) as rt:
        torch.testing.assert_close(rt.forward_full(ids), want, **TOL)
    # Without a device, the plan's GPU experts fall back to host memory.
    cpu = Placement.from_plan(plan, config, device="cpu")
    assert all(not lp.device for lp in cpu.layers)
    with load_runtime(folder, plan=plan, device="cpu", **EXACT) as rt:
        # the plan's KV cache is BF16 (the reference's): the plain model storing the same rows
        assert rt.kv_format == plan.kv_dtype == "bf16"
        ref = tiny[2]
        bf16_kv = ref.logits_from_streams(ref.forward_streams(ids, ref.new_state("bf16")))
        # A KV value within fp32 rounding of a bf16 tie rounds either way in the two models (the
        # C kernels and torch sum in different orders, which differ by CPU): one flipped element
        # moves later logits by up to ~1e-3 (6.6e-4 seen on an Intel Xeon host, from the 12th
        # row on; rows before agree to 5e-6).
        torch.testing.assert_close(rt.forward_full(ids), bf16_kv, rtol=0, atol=2e-3)


def test_the_plans_kv_cache_is_the_runtimes_at_the_bytes_it_counted(tmp_path):
    """A plan's KV choice is how the runtime's sequences store their cache (BF16 rows on a
    float32 CPU model; the packed FP8 layout), each entry and index key at the bytes the planner
    counted for it, and the same logits as the plain model storing the same rows."""
    config = ModelConfig.tiny(head_dim=128, qk_rope_head_dim=64, index_head_dim=64)
    folder = write_random(tmp_path / "ckpt", config, seed=3)
    figures = _tiny_figures(folder, config)
    profile = HardwareProfile.load(PROFILES / "cpu_only_256gb.json")
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    ref = load_model(folder)
    logits = {}
    for kv in ("bf16", "fp8"):
        plan = make_plan(figures, profile, PlanOptions(context=4096, kv_dtype=kv))
        plan.prefill_chunk = 2048  # as `plan_and_predict` may choose: a GPU runtime's call size
        with load_runtime(folder, plan=plan, device="cpu", **EXACT) as rt:
            assert rt.gpu_prefill_chunk == 2048 and rt.prefill_chunk is None  # CPU: the Session's
            assert rt.kv_format == kv and f"KV cache {kv}" in rt.describe()
            state = rt.new_state()
            logits[kv] = rt.prefill(ids.tolist()[:30], state)
            for t in ids.tolist()[30:]:
                logits[kv] = rt.decode(t, state)
        plain = ref.new_state(kv)
        ref.prefill(ids[:30], plain)
        for t in ids.tolist()[30:]:
            want = ref.decode(t, plain)
        # rows stored rounded (BF16, FP8): a value within float32 rounding of a tie may round
        # the other way in the two models (different summation orders), ~1e-4 on later logits
        torch.testing.assert_close(logits[kv], want, rtol=0, atol=2e-3)
        assert state.nbytes == plain.nbytes
        e_kv, e_key = figures.kv_entry_bytes(kv)
        held = state.breakdown()
        rows = sum(len(ids) // s.compress_ratio for s in config.main_layers if s.compress_ratio)
        # the planner pads FP8 entries to 8 bytes (vLLM's pages); the state holds 583 of 584
        assert rows * (e_kv - 7) <= held["compressed_kv"] <= rows * e_kv
        keys = sum(len(ids) // 4 for s in config.main_layers if s.has_indexer)
        assert held["index_keys"] == keys * e_key
    assert (logits["fp8"] - logits["bf16"]).abs().max() > 0  # FP8 rounds the no-rope channels
    corr = torch.corrcoef(torch.stack((logits["fp8"], logits["bf16"])))[0, 1].item()
    assert corr > 0.95
    with pytest.raises(ValueError, match="kv_dtype"):
        load_runtime(folder, device="cpu", kv_dtype="fp4")


def test_routing_counts_feed_the_planner_and_the_cache(tiny, tmp_path):
    folder, config, _, ids, want = tiny
    placement = Placement.uniform(config, MMAP, cached=[0, 1])
    with load_runtime(
        folder,
        placement=placement,
        refresh_every=None,
        **EXACT,
    ) as rt:
        rt.forward_full(ids)
        counts = rt.routing_counts()
        k = config.num_experts_per_tok
        assert [sum(row) for row in counts] == [len(ids) * k] * len(config.main_layers)
        path = tmp_path / "routing.json"
        rt.save_routing_counts(path)
        saved = json.loads(path.read_text())["counts"]
        assert saved == counts
        # the hot cache moves to the most-picked experts and results do not change
        rt.refresh_caches()
        for layer, cache in enumerate(rt.caches):
            row = torch.tensor(counts[layer])
            top = sorted(row.tolist(), reverse=True)[:2]
            assert sorted((int(row[e]) for e in cache.ids), reverse=True) == top
        torch.testing.assert_close(rt.forward_full(ids), want, **TOL)
    figures = _tiny_figures(folder, config)
    profile = HardwareProfile.load(PROFILES / "gpu8gb_192gb.json")
    plan = make_plan(figures, profile, PlanOptions(context=4096, expert_frequency=saved))
    assert plan.verdict != "does_not_fit"


def test_fp8_linear_and_fp4_dequant_match_the_decoders(tiny):
    folder = tiny[0]
    with Checkpoint.open(folder) as ckpt:
        name = "layers.1.attn.wq_b.weight"
        w, s = ckpt.raw(name), ckpt.raw(ckpt.scale_of(name))
        x = torch.randn(3, w.shape[1])
        got = Fp8Linear(w, s, torch.float32)(x)
        torch.testing.assert_close(got, x @ ckpt.tensor(name).T, rtol=1e-5, atol=1e-5)
        e = "layers.2.ffn.experts.3.w2."
        packed, scale = ckpt.raw(e + "weight"), ckpt.raw(e + "scale")
        assert torch.equal(
            fp4_dequant(packed, scale, torch.float32), quant.dequant_fp4(packed, scale)
        )


def test_clear_errors(tiny):
    folder, config, *_ = tiny
    short = Placement("cpu", Placement.uniform(config).layers[:2])
    with pytest.raises(RuntimeLoadError, match="covers 2 layers"):
        load_runtime(folder, placement=short, **EXACT)
    n = config.n_routed_experts
    holes = Placement(
        "cpu", tuple(LayerPlacement(mmap=tuple(range(1, n))) for _ in config.main_layers)
    )
    with pytest.raises(RuntimeLoadError, match="placed nowhere"):
        load_runtime(folder, placement=holes, **EXACT)
    with pytest.raises(LoadCancelled):
        load_runtime(folder, cancel=lambda: True, **EXACT)
    with pytest.raises(RuntimeLoadError, match=r"48 no-rope channels.*bf16 KV"):
        load_runtime(folder, kv_dtype="fp8", **EXACT)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeLoadError, match="sees none"):
            load_runtime(folder, device="cuda", **EXACT)
    other = ModelConfig.tiny(num_hidden_layers=2)
    figures = ModelFigures.from_inventory(
        Checkpoint.open(write_random(folder.parent / "other", other, seed=1)).inventory(),
        other,
        "other",
    )
    profile = HardwareProfile.load(PROFILES / "cpu_only_256gb.json")
    plan = make_plan(figures, profile, PlanOptions(context=4096))
    with pytest.raises(RuntimeLoadError, match="another model"):
        load_runtime(folder, plan=plan, device="cpu", **EXACT)


def test_session_reports_busy_and_live_hit_rate(tiny):
    folder, config, _, ids, _ = tiny
    with load_runtime(
        folder, placement=Placement.uniform(config, MMAP, cached=2), head_dtype="fp32"
    ) as rt:
        session = Session(rt, _Chars(), context_limit=256)
        assert not session.busy
        stream = session.stream(ids[:5].tolist(), SamplingParams(seed=0, max_tokens=4))
        first = next(stream)
        assert session.busy
        events = [first, *stream]
        assert not session.busy
        rates = [e.stats.expert_hit_rate for e in events]
        assert all(r is not None and 0 <= r <= 1 for r in rates)


def test_cpu_decode_and_short_prefill_run_torch_on_one_thread(tiny, monkeypatch):
    """torch's own ops run single-threaded in a CPU decode step and a short prefill (its OpenMP
    team would contend with the kernels' pool); long prefills keep its threads; restored after."""
    folder, config = tiny[0], tiny[1]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    with load_runtime(folder, placement=Placement.uniform(config, MMAP)) as rt:
        state = rt.new_state()
        long = 80  # > SINGLE_THREAD_TOKENS: torch keeps its threads
        rt.prefill(list(range(long)), state)
        assert calls == []
        logits = rt.decode(1, state)
        assert calls == [1, 2] and torch.isfinite(logits).all()
        calls.clear()
        rt.prefill(list(range(5)), state)
        assert calls == [1, 2]
        assert state.position == long + 1 + 5


def test_planned_gpu_bytes_are_what_the_gpu_runtime_holds():
    """The planner sizes VRAM by `TensorSpec.gpu_bytes`: FP8 weights (kept FP8 in VRAM), the BF16
    head, FP32-math linears and experts as stored, other BF16 tensors as wide as the model asks
    for them."""
    from flashdesk.engine.inventory import ROUTED_EXPERTS, inventory
    from flashdesk.engine.model.common import Numerics
    from flashdesk.engine.model.model import V4Model
    from flashdesk.engine.runtime import _bf16_kernel_names, _fp8_linear_names

    flash = ModelConfig.v4_flash().replace(num_nextn_predict_layers=0)
    fp8 = {
        t.name
        for t in inventory(flash).tensors
        if t.dtype == "F8_E4M3" and t.component != ROUTED_EXPERTS
    }
    assert set(_fp8_linear_names(flash)) == fp8  # every FP8 weight stays FP8 in VRAM

    config = ModelConfig.tiny()
    specs = inventory(config).by_name
    kept = set(_fp8_linear_names(config)) | set(_bf16_kernel_names(config))
    asked = {}

    def fetch(name, want):
        asked[name] = want
        return torch.zeros(specs[name].shape, dtype=want)

    V4Model(config, fetch, numerics=Numerics(dtype=torch.bfloat16), make_experts=lambda s: None)
    for name, want in asked.items():
        spec = specs[name]
        if name in kept or name == "head.weight":  # stored bytes (the default bf16 head)
            assert spec.dtype in ("F8_E4M3", "BF16"), name
            assert spec.gpu_bytes == spec.nbytes, name
        else:
            assert spec.gpu_bytes == spec.numel * want.itemsize, name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("grouped", [False, True])
def test_streamed_experts_equal_the_host_kernels(tiny, grouped, monkeypatch):
    """Prefill's streaming path (every picked expert on the compute device, host experts staged
    through a ring of three slots, here on the CPU) sums what the host kernels and the cache do:
    each expert dequantized for torch, or (`grouped`, as on a GPU with Triton; its interpreter
    here) the cached experts in one grouped launch pair and each staged one in its own."""
    if grouped:
        kernels_device()  # skips where neither a GPU nor the interpreter runs the kernels
        monkeypatch.setattr(gpu_kernels, "available", lambda device: True)
    folder, config, *_ = tiny
    with load_runtime(
        folder,
        placement=PLACEMENTS["mixed"](config),
        **EXACT,
    ) as rt:
        g = torch.Generator().manual_seed(4)
        x = torch.randn(40, config.hidden_size, generator=g)
        ids = torch.randint(0, config.vocab_size, (40,), generator=g)
        for block in rt.model.blocks:
            moe = block.moe
            experts, weights = moe.router(x, ids)
            y = moe.shared(x)
            moe._stream_all(x, experts, weights, y)
            torch.testing.assert_close(y.to(x.dtype), moe.forward(x, ids), **TOL)
        rings = rt.model.blocks[0].moe.staging
        assert rings is rt.model.blocks[-1].moe.staging and len(rings) == 1  # shared by layers
        if grouped:  # a prompt too short to stream: the cached picks run grouped too
            cached = [b.moe for b in rt.model.blocks if b.moe.cache and b.moe.cache.capacity]
            assert cached
            for moe in cached:
                want = moe.forward(x, ids)
                monkeypatch.setattr(moe.cache, "fused", True)
                torch.testing.assert_close(moe.forward(x, ids), want, **TOL)
        assert next(iter(rings.values())).size == 3 < config.n_routed_experts


def test_a_prefill_call_shrinks_to_the_gpu_memory_free_now():
    """Another program may take VRAM after the plan was made: a prefill call then runs in the
    largest halving of its chunk whose workspace (the planner's model) fits what is free, never
    below MIN_FITTING_CHUNK tokens (a call that does not fit even then reports the OOM)."""
    from flashdesk.engine.runtime import MIN_FITTING_CHUNK, fitting_chunk
    from flashdesk.offload.figures import PREFILL_BASE_BYTES, prefill_activation_bytes

    per_token, per_context = prefill_activation_bytes(4096, 64, 512, 6, 64, 128, 4)

    def need(chunk, position):
        return PREFILL_BASE_BYTES + chunk * per_token + (position + chunk) * per_context

    assert fitting_chunk(8192, 0, need(8192, 0), per_token, per_context) == 8192
    assert fitting_chunk(8192, 0, need(8192, 0) - 1, per_token, per_context) == 4096
    assert fitting_chunk(8192, 0, need(2048, 0), per_token, per_context) == 2048
    # deep in a long context the indexer's scores take their share too
    late = 900_000
    assert fitting_chunk(8192, late, need(8192, 0), per_token, per_context) < 8192
    assert fitting_chunk(8192, 0, 0, per_token, per_context) == MIN_FITTING_CHUNK
    assert fitting_chunk(100, 0, 0, per_token, per_context) == 100


def test_a_prefill_piece_that_runs_out_of_gpu_memory_is_undone_and_run_in_halves(tmp_path):
    """A chunk that runs out of GPU memory halfway has written its first layers' KV rows,
    window slots and compressor carries: `SequenceState.rewind` undoes them, the piece runs
    again in halves, and the result equals an uninterrupted prefill in those pieces (every KV
    format; packed FP8 rows round what later pieces read, so the pieces must match)."""
    from flashdesk.engine import runtime as rt_mod
    from flashdesk.engine.runtime import prefill_in_pieces

    config = ModelConfig.tiny(head_dim=128, qk_rope_head_dim=64, index_head_dim=64)  # FP8 rows fit
    model = load_model(write_random(tmp_path / "ckpt", config, seed=3))
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(4))
    ids = ids.tolist()
    for kv in ("native", "fp8"):
        want_state = model.new_state(kv)
        model.prefill(ids[:5], want_state)
        want = model.prefill(ids[5:], want_state, chunk_size=16)

        calls = []

        def flaky(piece, state, calls=calls):
            calls.append(len(piece))
            if len(piece) > 16:  # runs out after writing part of its share, as an OOM leaves it
                model.forward_streams(piece[:3], state)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return model.prefill(piece, state)

        state = model.new_state(kv)
        model.prefill(ids[:5], state)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rt_mod, "MIN_FITTING_CHUNK", 4)
            got, smaller = prefill_in_pieces(flaky, ids[5:], state, 32)
        assert calls[0] == 32 and smaller == 16 and max(calls[1:]) == 16 and sum(calls[1:]) == 35
        assert state.position == len(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(3, state), model.decode(3, want_state))
        with pytest.MonkeyPatch.context() as mp:  # at the smallest size the error stands
            mp.setattr(rt_mod, "MIN_FITTING_CHUNK", 32)
            with pytest.raises(torch.OutOfMemoryError):
                prefill_in_pieces(flaky, ids[5:], model.new_state(kv), 32)
