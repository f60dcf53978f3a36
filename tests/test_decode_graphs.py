"""The fixed-shape decode step that CUDA graphs capture (`engine.decode_graphs`), on the CPU.

Its segments run here as plain torch operations: they must give the model's own decode (every
expert placement, across window closes, capacity growth and prompt continuations), and each
segment must dispatch the same operations on the same buffers with the same scalars at every
position of a capacity bucket, reading nothing back to the host: what capture and replay need.
tests/gpu/test_decode_graphs_cuda.py captures and replays them on a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from _graph_safety import GRAPH_CONFIG, graph_placement, record
from _triton import as_on_a_gpu, kernels_device

from flashdesk.engine import decode_graphs, gpu_kernels, runtime
from flashdesk.engine.decode_graphs import GraphDecoder, rows_for
from flashdesk.engine.model.model import V4Model
from flashdesk.engine.runtime import Placement, load_runtime
from flashdesk.engine.runtime_experts import PINNED
from flashdesk.engine.synthetic import SyntheticCheckpoint

CONFIG = GRAPH_CONFIG
TOL = {"rtol": 1e-4, "atol": 1e-4}
PLACEMENTS = ("all cached", "cache", "host", "mixed")
# float32 activations into the host's expert kernels: the step and the model's decode sum in
# different orders, and rounding to bf16 would turn a 1e-7 difference into a 2^-8 one
EXACT = {"kernel_activations": torch.float32}


def _runtime(name: str):
    return load_runtime(
        SyntheticCheckpoint(CONFIG, seed=3), placement=graph_placement(name), **EXACT
    )


def _ids(n: int) -> list[int]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist()


def _twin_states(rt, prompt: list[int]) -> tuple:
    """Two states after the same prompt: one for the model's decode, one for the graph step's."""
    want, got = rt.new_state(), rt.new_state()
    for state in (want, got):
        rt.prefill(prompt, state)
    return want, got


def _counts(state) -> list:
    return [
        (s.kv_entries.n, s.index_keys.n if s.index_keys is not None else None)
        for s in state.layers
        if s.kv_entries is not None
    ]


@pytest.mark.parametrize("name", PLACEMENTS)
def test_step_gives_the_models_decode(name):
    ids = _ids(90)
    with _runtime(name) as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        assert graphs.cuts == [
            i for i, lp in enumerate(graph_placement(name).layers) if len(lp.device) < 8
        ]
        want, got = _twin_states(rt, ids[:5])
        for span in (range(5, 60), range(70, 90)):
            for t in (ids[i] for i in span):
                torch.testing.assert_close(graphs.decode(t, got), rt.model.decode(t, want), **TOL)
            assert got.position == want.position
            assert _counts(got) == _counts(want)
            if span.start == 5:  # a prompt continuation between the decode runs
                got_logits = rt.prefill(ids[60:70], got)
                torch.testing.assert_close(got_logits, rt.prefill(ids[60:70], want), **TOL)
        assert graphs.builds == 1  # one capacity bucket all along
        # the host's time at the host-expert layers is kept for the benchmarks
        assert (graphs.host_expert_s > 0) == bool(graphs.cuts) and graphs.host_wait_s >= 0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(("fused", "name"), [(False, "host"), (True, "mixed")])
def test_step_through_the_gpu_kernels_gives_the_models_decode(fused, name, monkeypatch):
    """The step as a GPU runs it, every chain the kernels cover in one launch (here Triton's
    interpreter): the compressors' window pooling alone, or (`fused`, once its own check
    passed on the GPU) the whole compressor step after its GEMVs; with a device cache
    ("mixed") the cached experts' partial sums added by the hyper-connection update and the
    routing log written by its kernel: the torch decode's logits and routing counts."""
    kernels_device()
    # a 14-token prompt, then steps through position 19: CSA windows close at 15 and 19, the
    # HCA one at 15, each begun by the prompt (a step costs seconds in the interpreter)
    ids, prompt = _ids(20), 14
    steps = len(ids) - prompt
    with _runtime(name) as rt:

        def prompt_then_fuse(state) -> None:
            """The prompt through torch's expert path (12 tokens through the interpreted FP4
            kernels take ~30 s), then the cached experts' decode kernels."""
            if name == "mixed":
                for block in rt.model.blocks:
                    if block.moe.cache is not None:
                        monkeypatch.setattr(block.moe.cache, "fused", False)
            rt.prefill(ids[:prompt], state)
            if name == "mixed":
                _fuse_cached_experts(rt, monkeypatch)

        state = rt.new_state()
        prompt_then_fuse(state)
        want = [rt.model.decode(t, state) for t in ids[prompt:]]
        log = rt.model.blocks[0].moe.log
        want_log = [t.clone() for t in (log.counts, log.device_picks, log.total_picks)]
        calls = Counter()
        step = "compressor_step" if fused else "softmax_pool"
        for kernel_name in (step, "compressor_steps", "record_picks", "hc_post", "swiglu"):
            kernel = getattr(gpu_kernels, kernel_name)
            monkeypatch.setattr(
                gpu_kernels, kernel_name,
                lambda *a, _k=kernel, _n=kernel_name, **kw: calls.update([_n]) or _k(*a, **kw),
            )  # fmt: skip
        route = gpu_kernels.route

        def counted_route(*a, **kw):  # routed and logged in one launch, or routed alone
            calls.update(["route and record" if len(a) > 5 and a[5] is not None else "route"])
            return route(*a, **kw)

        monkeypatch.setattr(gpu_kernels, "route", counted_route)
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: fused)
        graphs = GraphDecoder(rt.model, capture=False)
        state = rt.new_state()
        for t in (log.counts, log.device_picks, log.total_picks):
            t.zero_()
        prompt_then_fuse(state)
        for t, logits in zip(ids[prompt:], want, strict=True):  # CSA and HCA windows close
            torch.testing.assert_close(graphs.decode(t, state), logits, **TOL)
        # 4 compressed layers, 2 of them CSA with an indexer (both compressors in one launch)
        if fused:
            assert calls[step] == steps * 2 and calls["compressor_steps"] == steps * 2
        else:
            assert calls[step] == steps * 6 and not calls["compressor_steps"]
        layers = len(rt.model.blocks)
        assert calls["swiglu"] >= steps * layers  # the shared experts
        assert calls["hc_post"] >= steps * layers
        if fused:  # the routing log's own check passed: its kernel logged the same picks,
            # in the routing's launch (record_picks only where the routing itself fell back)
            assert calls["route and record"] >= steps * layers and not calls["record_picks"]
            got_log = (log.counts, log.device_picks, log.total_picks)
            assert all(torch.equal(a, b) for a, b in zip(got_log, want_log, strict=True))


def test_rows_for_doubles_from_the_floor():
    assert [rows_for(p, 4, 8) for p in (0, 31, 32, 63, 64, 127, 128)] == [8, 8, 16, 16, 32, 32, 64]
    assert rows_for(10**6, 128, 64) == 8192


def test_stores_grow_in_powers_of_two_and_the_step_is_rebuilt(monkeypatch):
    monkeypatch.setattr(decode_graphs, "MIN_ROWS", 4)
    ids = _ids(80)
    with _runtime("host") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        want, got = _twin_states(rt, ids[:3])
        capacities = set()
        for t in ids[3:80]:
            torch.testing.assert_close(graphs.decode(t, got), rt.model.decode(t, want), **TOL)
            capacities.add(tuple(s.kv_entries.capacity for s in got.layers if s.kv_entries))
        # CSA (ratio 4) rows 4 → 8 → 16 → 32 at positions 16, 32, 64; HCA (16) 4 → 8 at 64
        assert sorted(capacities) == [(4, 4, 4, 4), (8, 4, 8, 4), (16, 4, 16, 4), (32, 8, 32, 8)]
        assert graphs.builds == len(capacities)
        assert _counts(got) == _counts(want)


def test_the_key_is_read_again_only_where_a_buffer_may_have_moved(monkeypatch):
    """A step whose stores have room and whose state allocated nothing since reuses the capture
    key without walking the state's ~300 buffers (a V4-Flash step's host time); a grown store,
    a reset state or another state is keyed afresh, and the step rebuilt where addresses moved."""
    monkeypatch.setattr(decode_graphs, "MIN_ROWS", 4)
    walks = []
    walk = decode_graphs._state_tensors
    monkeypatch.setattr(decode_graphs, "_state_tensors", lambda st: walks.append(1) or walk(st))
    ids = _ids(20)
    with _runtime("host") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        want, got = _twin_states(rt, ids[:3])
        # the model's logits first: its own appends allocate, which keys any state again
        expected = [rt.model.decode(t, want) for t in ids[3:]]

        def steps(first: int, last: int, state) -> None:
            for i in range(first, last):
                torch.testing.assert_close(graphs.decode(ids[i], state), expected[i - 3], **TOL)

        steps(3, 10, got)  # positions 3..9: the CSA stores' 4 rows hold them
        assert (len(walks), graphs.builds) == (1, 1)
        steps(10, 20, got)  # position 16 needs a fifth CSA row: those stores move
        assert (len(walks), graphs.builds) == (2, 2)
        got.reset()
        rt.prefill(ids[:3], got)
        steps(3, 6, got)  # the reset state's new buffers: keyed again, rebuilt
        assert (len(walks), graphs.builds) == (3, 3)
        other = rt.new_state()
        rt.prefill(ids[:3], other)
        steps(3, 4, other)
        assert (len(walks), graphs.builds) == (4, 4)


def _fuse_cached_experts(rt, monkeypatch) -> None:
    """Run the cached picks by `gpu_kernels.moe` (Triton's interpreter here), as on a GPU."""
    kernels_device()  # skips where neither a GPU nor the interpreter runs the kernels
    for block in rt.model.blocks:
        if block.moe.cache is not None:
            monkeypatch.setattr(block.moe.cache, "fused", True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    ("name", "decode_moe"), [("host", "rows"), ("mixed", "rows"), ("mixed", "by pick")]
)
def test_segments_are_capture_safe(name, decode_moe, monkeypatch):
    """At positions 9..17 (every phase of both compressors; CSA and HCA windows close) each
    segment dispatches one list of operations on one set of buffers, and reads nothing back
    (with the cached experts through either decode kernel)."""
    ids = _ids(20)
    monkeypatch.setattr(gpu_kernels, "DECODE_MOE", decode_moe)
    with _runtime(name) as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        state = rt.new_state()
        rt.prefill(ids[:9], state)  # through torch's expert path: the steps are under test
        if name == "mixed":
            _fuse_cached_experts(rt, monkeypatch)
        logs: dict[int, list] = {}
        run = decode_graphs._Segment.run

        def recorded(segment):
            rec = record(lambda: run(segment))
            logs.setdefault(id(segment), []).append(rec)

        monkeypatch.setattr(decode_graphs._Segment, "run", recorded)
        for t in ids[9:18]:
            graphs.decode(t, state)
        assert graphs.builds == 1
        assert len(logs) == 1 + 2 * len(graphs.cuts)
        for recs in logs.values():
            assert len(recs) == 9
            assert all(not r.host_reads for r in recs), recs[0].host_reads
            first = recs[0].ops
            for r in recs[1:]:
                assert len(r.ops) == len(first)
                diff = next(
                    (i for i, (a, b) in enumerate(zip(first, r.ops, strict=True)) if a != b), None
                )
                assert diff is None, (first[diff], r.ops[diff])


def test_routing_record_matches(monkeypatch):
    ids = _ids(30)
    with _runtime("cache") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        state = rt.new_state()
        rt.prefill(ids[:5], state)
        before = rt.log.counts.clone()
        for t in ids[5:30]:
            graphs.decode(t, state)
        picks = rt.log.counts - before
        assert int(picks.sum()) == 25 * len(CONFIG.main_layers) * CONFIG.num_experts_per_tok
        assert rt.expert_hit_rate is not None


def test_a_plain_model_is_refused():
    ckpt = SyntheticCheckpoint(CONFIG)
    with pytest.raises(ValueError, match="runtime"):
        GraphDecoder(V4Model(CONFIG, ckpt.tensor))


def test_the_check_sees_what_a_graph_cannot_replay():
    buf, pos = torch.zeros(4), torch.tensor([1])
    baked = [record(lambda p=p: buf.add_(p)).ops for p in (1, 2)]  # a host number baked in
    assert baked[0] != baked[1]
    sized = [record(lambda n=n: torch.zeros(n)).ops for n in (3, 4)]  # a host-sized allocation
    assert sized[0] != sized[1]
    moved = [record(lambda b=b: b.add_(pos)).ops for b in (buf, torch.zeros(4))]  # other buffer
    assert moved[0] != moved[1]
    assert record(lambda: int(pos)).host_reads  # a read back to the host
    assert record(lambda: buf[buf > 0]).host_reads
    same = [record(lambda: buf.add_(pos)).ops for _ in range(2)]
    assert same[0] == same[1]


def _pretend_capture(graphs, monkeypatch, corrupt: bool = False) -> list[str]:
    """Stand in for CUDA capture/replay on the CPU: the capture step runs eagerly, later steps
    'replay' the same functions (optionally with their logits corrupted)."""
    events = []

    def run(segment, capturing):
        events.append("capture" if capturing else "replay")
        segment.fn()
        if corrupt and not capturing:
            graphs.logits.mul_(1.5)

    monkeypatch.setattr(graphs, "capture", True)
    monkeypatch.setattr(graphs, "_run", run)
    return events


def test_self_check_passes_and_leaves_no_trace(monkeypatch):
    with _runtime("mixed") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        events = _pretend_capture(graphs, monkeypatch)
        counts = rt.log.counts.clone()
        assert graphs.self_check(prompt=8, steps=4) is None
        assert graphs.usable
        assert "capture" in events and "replay" in events
        assert torch.equal(rt.log.counts, counts)  # scratch picks are not the user's routing
        assert int(rt.log.total_picks) == 0
        assert graphs._key is None  # the next real step captures afresh


def test_self_check_turns_graphs_off_when_replay_disagrees(monkeypatch):
    with _runtime("host") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        _pretend_capture(graphs, monkeypatch, corrupt=True)
        reason = graphs.self_check(prompt=8, steps=4)
        assert reason is not None and "other logits" in reason
        rt.graphs = graphs
        assert any("without CUDA graphs" in n for n in rt.notes)
        assert "CUDA graphs" not in rt.describe()
        builds = graphs.builds
        state = rt.new_state()  # the runtime decodes the plain way
        rt.prefill([1, 2, 3], state)
        rt.decode(4, state)
        assert graphs.builds == builds and state.position == 4  # not through the decoder


def test_a_failed_capture_finishes_the_step_and_stops_capturing(monkeypatch):
    with _runtime("host") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        want, got = rt.new_state(), rt.new_state()
        for state in (want, got):
            rt.prefill([1, 2, 3], state)
        monkeypatch.setattr(graphs, "capture", True)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: _NoStream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: _NoStream())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device: _NoStream())
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

        def refuse(*args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)
        torch.testing.assert_close(graphs.decode(4, got), rt.model.decode(4, want), **TOL)
        assert not graphs.usable and "capture failed" in graphs.reason
        assert "not permitted" in graphs.reason


class _NoStream:
    def wait_stream(self, other):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_step_with_the_packed_fp8_kv_layout():
    """kv_format="fp8" rounds the rows it stores; the step must still attend to the token's own
    KV as computed, as the model's decode does."""
    config = CONFIG.replace(head_dim=80)  # no-rope channels in whole 64-blocks
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    placement = Placement.uniform(config, PINNED)
    with load_runtime(SyntheticCheckpoint(config), placement=placement, **EXACT) as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        want, got = rt.new_state("fp8"), rt.new_state("fp8")
        for state in (want, got):
            rt.prefill(ids[:5].tolist(), state)
        for t in ids[5:].tolist():
            torch.testing.assert_close(graphs.decode(t, got), rt.model.decode(t, want), **TOL)


@contextlib.contextmanager
def _fp8_twins(config, ids: torch.Tensor, prompt: int):
    """A runtime (every expert pinned) and two packed-FP8 states after the same prompt → (the
    runtime, the second state, the model's decode logits of the rest of `ids` on the first)."""
    placement = Placement.uniform(config, PINNED)
    with load_runtime(SyntheticCheckpoint(config), placement=placement, **EXACT) as rt:
        want, got = rt.new_state("fp8"), rt.new_state("fp8")
        for state in (want, got):
            rt.prefill(ids[:prompt].tolist(), state)
        yield rt, got, [rt.model.decode(t, want) for t in ids[prompt:].tolist()]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_the_gpu_step_with_the_packed_fp8_kv_layout_keeps_its_own_writes(monkeypatch):
    """Through the GPU kernels with FUSED_SEAMS on, packed FP8 rows cannot be written or read
    where they lie as they are: the ring's and the stores' rows go through their codec (a CSA
    layer's two compressors, stepped in one launch, return their rows for it), the CSA picks
    are gathered and decoded, and the merge still de-rotates. The model's decode logits."""
    kernels_device()
    # power-of-two heads whose no-rope channels are whole 64-blocks (the FP8 layout's)
    config = CONFIG.replace(head_dim=128, qk_rope_head_dim=64, index_head_dim=128)
    # positions 8..11: a CSA window closes
    ids = torch.randint(0, config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with _fp8_twins(config, ids, 8) as (rt, got, logits):
        assert got.layers[0].window.as_stored(torch.float32) is None  # packed
        as_on_a_gpu(rt.model)  # and the GPU runtime's linears, joined: every fold of the step
        runtime.join_gpu_linears(rt.model)
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: True)
        graphs = GraphDecoder(rt.model, capture=False)
        for t, expected in zip(ids[8:].tolist(), logits, strict=True):
            torch.testing.assert_close(graphs.decode(t, got), expected, **TOL)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_the_step_scores_fp8_index_keys_as_stored(monkeypatch):
    """With the packed KV format a GPU step's indexer reads the FP8 index keys and their scales
    from the store (`gpu_kernels.index_scores` with `key_scale`; here in the interpreter), not
    a float32 copy of them: the model's decode."""
    kernels_device()
    config = CONFIG.replace(head_dim=80)  # no-rope channels in whole 64-blocks
    ids = torch.randint(0, config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    with _fp8_twins(config, ids, 20) as (rt, got, expected):
        scored = []
        real = gpu_kernels.index_scores
        monkeypatch.setattr(
            gpu_kernels, "index_scores",
            lambda *a: scored.append(a[-1] is not None and a[3].dtype == torch.uint8) or real(*a),
        )  # fmt: skip
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: what == "indexer scores")
        graphs = GraphDecoder(rt.model, capture=False)
        # Steps agree to ~2e-6 until an index score within rounding of the top-k cut picks the
        # other entry on one side (the interpreter's numpy and the C kernel sum in different
        # orders): then ~2e-4 of logits ~3 (seen on an Intel Xeon host, the 9th step). Every
        # other key's scale 1.5x too large moves them by 0.6.
        near = {"rtol": 1e-3, "atol": 1e-3}
        for t, logits in zip(ids[20:].tolist(), expected, strict=True):
            torch.testing.assert_close(graphs.decode(t, got), logits, **near)
        assert scored and all(scored)  # every CSA layer's step, from the codes and scales


def test_a_layer_step_without_the_shared_positions_makes_its_own(monkeypatch):
    """`Attention.step` called alone (no `StepPositions` from the step's body) derives its
    window slot and visible rows itself: the same logits."""
    monkeypatch.setattr(decode_graphs, "StepPositions", lambda pos, made: None)
    ids = _ids(24)
    with _runtime("host") as rt:
        graphs = GraphDecoder(rt.model, capture=False)
        want, got = _twin_states(rt, ids[:3])
        for t in ids[3:]:  # a CSA and an HCA window close
            torch.testing.assert_close(graphs.decode(t, got), rt.model.decode(t, want), **TOL)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("kv_format", ["native", "fp8"])
def test_a_prompt_call_scores_its_index_queries_in_launches(kv_format, monkeypatch):
    """On a GPU a prompt call's CSA indexer scores each block of queries in one launch of
    `gpu_kernels.index_scores` (here in the interpreter), each query with its own visible
    count, from the keys as stored: no `[b, H, T]` float32 temporary (1 GB per block at 1M
    tokens) and no float32 copy of the keys. The logits of the torch ops."""
    from flashdesk.engine.synthetic import fill_context

    kernels_device()
    config = CONFIG.replace(head_dim=80)  # no-rope channels in whole 64-blocks
    ids = torch.randint(0, config.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    placement = Placement.uniform(config, PINNED)
    with load_runtime(SyntheticCheckpoint(config), placement=placement, **EXACT) as rt:

        def run():
            state = rt.new_state(kv_format)
            fill_context(state, config, 256)  # CSA gathers its top-k per query from here
            return rt.prefill(ids.tolist(), state)

        want = run()
        blocks = []
        real = gpu_kernels.index_scores
        monkeypatch.setattr(
            gpu_kernels, "index_scores", lambda *a: blocks.append(a[0].shape) or real(*a)
        )
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: what == "indexer scores")
        torch.testing.assert_close(run(), want, **TOL)
        heads, dim = config.index_n_heads, config.index_head_dim
        assert (16, heads, dim) in blocks and (5, heads, dim) in blocks  # 21 = 16 + 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_host_layers_input_crosses_in_one_copy(dtype):
    """The MoE input, host picks and weights a host layer's CPU share reads lie in one byte
    buffer (`_mailbox`), so one copy brings all three across, each value as written."""
    from flashdesk.engine.decode_graphs import _mailbox

    box, xn, ids, w = _mailbox(256, 6, dtype, "cpu")
    h_box, h_xn, h_ids, h_w = _mailbox(256, 6, dtype, "cpu")
    assert box.dtype == torch.uint8 and box.numel() == 256 * dtype.itemsize + 6 * 12
    for view in (xn, ids, w):
        assert view.untyped_storage().data_ptr() == box.untyped_storage().data_ptr()
    xn.copy_(torch.linspace(-3, 3, 256).view(1, -1))
    ids.copy_(torch.tensor([[5, -1, 7, 0, 255, -1]]))
    w.copy_(torch.rand(1, 6))
    h_box.copy_(box)
    assert torch.equal(h_xn, xn) and torch.equal(h_ids, ids) and torch.equal(h_w, w)


def _step_launches(rt, graphs, token: int, state) -> Counter:
    """The kernels one graph decode step launches, by name: Triton's (here interpreted) and
    the torch operations that launch one on a GPU (views and no-op conversions left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    free = {"view", "_unsafe_view", "reshape", "select", "slice", "as_strided", "expand", "t",
            "transpose", "permute", "unsqueeze", "squeeze", "detach", "alias", "split",
            "unbind", "_reshape_alias", "unflatten", "empty", "empty_strided", "new_empty",
            "empty_like", "to", "contiguous", "resolve_conj", "resolve_neg", "lift_fresh",
            "split_with_sizes"}  # fmt: skip
    launches, inside = Counter(), [0]

    class Torch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and name not in free:
                launches[name] += 1
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def triton_run(fn, *a, **k):  # what the kernel does inside is one launch
        launches[fn.fn.__name__] += 1
        inside[0] += 1
        try:
            return run(fn, *a, **k)
        finally:
            inside[0] -= 1

    with pytest.MonkeyPatch.context() as mp, Torch():
        mp.setattr(InterpretedFunction, "run", triton_run)
        graphs.decode(token, state)
    return launches


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_the_gpu_step_with_joined_linears_gives_the_models_decode(monkeypatch):
    """With the GPU runtime's linears (joined as on a GPU) the step's folds: the q_a norm read
    by `wq_b`, a CSA layer's two `wq_b` and its compressors' and indexer's projections in one
    launch each, q's, kv's and the index queries' RoPE in one, and the head's collapse with
    the final norm read from the last update's partial sums (the census test counts them).
    The model's decode logits, its norms, RoPE and head as torch ops, its linears the CPU's
    (the same weights); the step cut at every layer (every expert on the host)."""
    kernels_device()
    ids = _ids(12)
    with _runtime("host") as rt:
        want, got = _twin_states(rt, ids[:8])
        expected = [rt.model.decode(t, want) for t in ids[8:]]  # the CPU's linears: faster
        as_on_a_gpu(rt.model)
        runtime.join_gpu_linears(rt.model)
        assert all(b.attn.csa_inputs is not None for b in rt.model.blocks if b.attn.indexer)
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: True)
        graphs = GraphDecoder(rt.model, capture=False)
        for t, logits in zip(ids[8:], expected, strict=True):
            torch.testing.assert_close(graphs.decode(t, got), logits, **TOL)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_decode_step_folds_its_seams_into_neighbouring_launches(monkeypatch):
    """A GPU decode step's census (the GPU runtime's linears; the step cut at every layer: each
    a host-expert layer): the window ring's and the compressed rows' writes, the output's
    de-rotation, the mixes of every site after the first (the head's too), the CSA picks'
    gather, the q_a norm, q's, kv's and the index queries' separate RoPE launches, a CSA
    layer's separate projections and compressor steps, and a compressed layer's linears of
    its attention input happen inside neighbouring launches; the position tables are
    made once a step however many segments it has, and what a cut hands on is written in
    place. FUSED_SEAMS off gives those folds their own launches again."""
    kernels_device()
    ids = _ids(12)
    with _runtime("host") as rt:
        state = rt.new_state()
        rt.prefill(ids[:8], state)  # through the CPU's linears: the step is under test
        as_on_a_gpu(rt.model)
        runtime.join_gpu_linears(rt.model)
        monkeypatch.setattr(gpu_kernels, "applies", lambda t: True)
        monkeypatch.setattr(gpu_kernels, "checked", lambda what, device: True)
        graphs = GraphDecoder(rt.model, capture=False)
        layers, csa = len(rt.model.blocks), 2  # ratios (0, 4, 16, 4, 16)
        assert graphs.cuts == list(range(layers))
        graphs.decode(ids[8], state)  # builds the segments
        fused = _step_launches(rt, graphs, ids[9], state)
        monkeypatch.setattr(gpu_kernels, "FUSED_SEAMS", False)
        apart = _step_launches(rt, graphs, ids[10], state)
    assert fused["index_copy_"] == 0 and apart["index_copy_"] == layers + 2 * csa + 2
    assert fused["_hc_mixes_kernel"] == 1  # the first site's
    assert apart["_hc_mixes_kernel"] == 2 * layers + 1
    # q, kv and a CSA layer's index queries roped in one launch, the output de-rotated in the
    # attention's merge; apart, each its own launch
    assert fused["_rope_kernel"] == 0 and fused["_ropes_kernel"] == layers
    assert apart["_rope_kernel"] == 3 * layers + csa and apart["_ropes_kernel"] == 0
    # the q_a norm read by wq_b (the final norm is the head collapse's, either way)
    assert fused["_rms_norm_kernel"] == 0 and apart["_rms_norm_kernel"] == layers
    # a CSA layer's two wq_b in one launch, and both compressors' projections with the
    # indexer's head weights (torch's linear apart) in one; a compressed layer's wq_a+wkv
    # and its compressors' projections (FP8 and BF16 weights) in one
    compressed = layers - 1
    assert fused["_linear_pair_kernel"] == compressed and apart["_linear_pair_kernel"] == 0
    assert fused["_linear_kernel"] == apart["_linear_kernel"] - 2 * csa - 2 * compressed
    assert fused["linear"] == 0 and apart["linear"] == csa
    # and its two compressors' steps in one launch
    assert fused["_compressor_steps_kernel"] == csa and apart["_compressor_steps_kernel"] == 0
    assert fused["_compressor_step_kernel"] == layers - 1 - csa  # the HCA layers'
    assert apart["_compressor_step_kernel"] == layers - 1 + csa
    # a CSA layer's picked rows and their mask read where they lie, not gathered first
    assert fused["index_select"] == 0 and apart["index_select"] == csa
    # made once a step: both tables' angles, the window slot, a mask per store size and ratio
    assert fused["cos"] == 2 and fused["remainder"] == 1 and fused["le"] == 2
    # the cuts' streams, MoE input, post, comb and device share are written where the next
    # segment reads them: the copies left are each host layer's input and output across PCIe,
    # the embedding row, the position's widening and the logits
    assert fused["copy_"] == 2 * layers + 3 and fused["_sum_parts_kernel"] == layers
    # nothing else changed: the row writes, mixes, RoPE launches, q_a norms, CSA projections
    # and compressor steps, paired linears and gathers, 54 launches of 5 layers
    saved = sum(apart.values()) - sum(fused.values())
    ropes = 3 * layers + csa - layers
    folds = (layers + 2 * csa + 2) + 2 * layers + ropes + layers + 4 * csa + compressed
    assert saved == folds + 2 * csa
