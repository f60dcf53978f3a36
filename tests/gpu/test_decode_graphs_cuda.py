"""Decode steps captured and replayed as CUDA graphs (skipped where there is no CUDA).

tests/test_decode_graphs.py checks on the CPU that the fixed-shape step equals the model's decode
and is capture-safe; here it is captured for real: replays equal the same segments run directly,
across window closes and capacity growth (re-captures), with every expert placement; the runtime
turns graphs on by default after its load-time check; a replayed step launches one graph per
segment and almost no single kernels.
"""

from __future__ import annotations

import pytest
import torch
from _graph_safety import GRAPH_CONFIG, graph_placement

from flashdesk.engine import decode_graphs
from flashdesk.engine.decode_graphs import GraphDecoder
from flashdesk.engine.generate import SamplingParams, Session
from flashdesk.engine.runtime import load_runtime
from flashdesk.engine.synthetic import SyntheticCheckpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = GRAPH_CONFIG
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _runtime(name: str, **kw):
    kw.setdefault("dtype", torch.float32)
    if kw["dtype"] == torch.float32:  # the C kernels' activations too (bf16 by default)
        kw.setdefault("kernel_activations", torch.float32)
    placement = graph_placement(name, "cuda")
    return load_runtime(SyntheticCheckpoint(CONFIG, seed=3), placement=placement, **kw)


def _ids(n: int) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", ["host", "mixed", "all cached", "zero-copy"])
def test_replays_equal_the_step_run_directly(name, monkeypatch):
    monkeypatch.setattr(decode_graphs, "MIN_ROWS", 4)  # re-captures within the run
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = _ids(90)
    with _runtime(name, cuda_graphs=False) as rt:
        graphs, direct = GraphDecoder(rt.model), GraphDecoder(rt.model, capture=False)
        got, want, plain = rt.new_state(), rt.new_state(), rt.new_state()
        for state in (got, want, plain):
            # 3 tokens: no compressed row yet, so the prompt leaves the stores empty and the
            # decoder reserves every bucket itself (a 5-token prompt's first CSA row grows its
            # store to 16 rows at once)
            rt.prefill(ids[:3], state)
        capacities = set()
        for t in ids[3:90]:
            seen = graphs.decode(t, got)
            assert graphs.usable, graphs.reason
            torch.testing.assert_close(seen, direct.decode(t, want), **TOL)
            torch.testing.assert_close(seen, rt.model.decode(t, plain), rtol=1e-3, atol=1e-3)
            capacities.add(tuple(s.kv_entries.capacity for s in got.layers if s.kv_entries))
        # CSA rows 4 → 8 → 16 → 32, HCA 4 → 8: four buckets, each one captured
        assert len(capacities) == 4 and graphs.builds == len(capacities)
        assert all(
            (item if kind == "body" else item[1]).graph is not None for kind, item in graphs._plan
        )


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="programmatic dependent launch needs compute capability 9.0",
)
@pytest.mark.parametrize("name", ["mixed", "zero-copy"])
def test_dependent_launches_replay_the_same_steps(name, monkeypatch):
    """gpu_kernels.PDL: every Triton kernel, in the prompt and in the captured steps, launches
    while its predecessor finishes and waits for it at its start; the steps' logits are those
    of the same steps launched one after another."""
    from flashdesk.engine import gpu_kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = _ids(40)
    with _runtime(name, cuda_graphs=False) as rt:
        want_state = rt.new_state()
        rt.prefill(ids[:3], want_state)
        direct = GraphDecoder(rt.model, capture=False)
        want = [direct.decode(t, want_state) for t in ids[3:]]
        monkeypatch.setattr(gpu_kernels, "PDL", 1)
        got_state = rt.new_state()
        rt.prefill(ids[:3], got_state)
        graphs = GraphDecoder(rt.model)
        for t, logits in zip(ids[3:], want, strict=True):
            seen = graphs.decode(t, got_state)
            assert graphs.usable, graphs.reason
            torch.testing.assert_close(seen, logits, **TOL)


def test_runtime_uses_graphs_after_its_check_and_generates_the_same():
    ids = _ids(12)
    params = SamplingParams(temperature=0.0, max_tokens=24)

    class Chars:
        def decode(self, ids):
            return "".join(chr(97 + int(i) % 26) for i in ids)

    held = []
    for graphs in (True, False):
        with _runtime("mixed", cuda_graphs=graphs) as rt:
            assert (rt.graphs is not None) == graphs
            if graphs:
                assert rt.graphs.usable, rt.graphs.reason
                assert not any("CUDA graphs" in n for n in rt.notes)
                assert "CUDA graphs" in rt.describe()
            session = Session(rt, Chars(), context_limit=rt.context_limit)
            list(session.stream(ids, params))
            held.append(session.held_ids)
    assert held[0] == held[1]


def test_a_replayed_step_launches_graphs_not_kernels():
    from torch.profiler import ProfilerActivity, profile

    ids = _ids(20)
    with _runtime("all cached", dtype=torch.bfloat16) as rt:
        state = rt.new_state()
        logits = rt.prefill(ids[:8], state)
        for _ in range(2):  # capture, then one replay
            logits = rt.decode(int(logits.argmax()), state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rt.decode(int(logits.argmax()), state)
            torch.cuda.synchronize()
        counts = {e.key: e.count for e in prof.key_averages()}
        assert counts.get("cudaGraphLaunch", 0) == 1  # the whole model in VRAM: one segment
        assert counts.get("cudaLaunchKernel", 0) + counts.get("cuLaunchKernel", 0) <= 8


@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_the_kv_formats_replay_from_graphs(kv, monkeypatch):
    """A plan's KV format is encoded, and a CSA layer's picks gathered and decoded, inside the
    captured step: the runtime's load-time check passes with that format and replays equal the
    same segments run directly across re-captures."""
    monkeypatch.setattr(decode_graphs, "MIN_ROWS", 4)
    # no-rope channels in whole 64-blocks, heads of a power-of-two width (the kernels')
    config = CONFIG.replace(head_dim=128, qk_rope_head_dim=64, index_head_dim=128)
    ids = _ids(60)
    placement = graph_placement("mixed", "cuda")
    ckpt = SyntheticCheckpoint(config, seed=3)
    with load_runtime(ckpt, placement=placement, dtype=torch.bfloat16, kv_dtype=kv) as rt:
        assert rt.kv_format == kv and rt.graphs.usable, rt.graphs.reason
        graphs, direct = GraphDecoder(rt.model), GraphDecoder(rt.model, capture=False)
        got, want = rt.new_state(), rt.new_state()
        for state in (got, want):
            rt.prefill(ids[:3], state)
        for t in ids[3:]:
            seen = graphs.decode(t, got)
            assert graphs.usable, graphs.reason
            torch.testing.assert_close(seen, direct.decode(t, want), rtol=1e-2, atol=1e-2)
        assert graphs.builds > 1 and got.nbytes == want.nbytes


def test_the_load_times_the_in_place_reads_and_keeps_the_faster():
    """load_runtime with graphs on a zero-copy placement times scratch steps both ways
    (`measured_zero_copy`): the in-place reads stay, or go with a note and graphs built
    without them; either way the runtime decodes with usable graphs."""
    ids = _ids(8)
    with _runtime("zero-copy") as rt:
        assert rt.graphs is not None and rt.graphs.usable, rt.graphs.reason
        kept = {b.moe.use_zero_copy for b in rt.model.blocks if b.moe.zero_copy is not None}
        assert len(kept) == 1
        dropped = [n for n in rt.notes if "the CPU computes the picks of all host experts" in n]
        assert bool(dropped) != kept.pop()
        state = rt.new_state()
        rt.prefill(ids[:4], state)
        assert all(torch.isfinite(rt.decode(t, state)).all() for t in ids[4:])
