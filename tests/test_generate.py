"""Session streaming, stop reasons, cancellation, prefix reuse and UTF-8 safety, on small fakes.

The fakes follow the model/tokenizer contracts of engine/generate.py: a scripted model whose
logits pick the next token of a script, and a byte tokenizer (id = byte + 2) so that multi-byte
characters are split across tokens exactly as byte-level BPE can split them.
"""

from __future__ import annotations

import threading

import pytest
import torch

from flashdesk.engine.generate import (
    EOS_ID,
    THINK_END_ID,
    THINK_START_ID,
    ContextOverflowError,
    IncrementalDecoder,
    SamplingParams,
    Session,
    SessionBusyError,
    sample,
)

VOCAB = 128830
GREEDY = SamplingParams(temperature=0.0)


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode("utf-8", errors="replace")


class ScriptedState:
    def __init__(self):
        self.fed: list[int] = []
        self.step = 0

    def nbytes(self) -> int:
        return 8 * len(self.fed)


class ScriptedModel:
    """Emits `script` after every prefill, then EOS (or repeats forever when `endless`)."""

    def __init__(self, script: list[int], endless: bool = False):
        self.script = script
        self.endless = endless
        self.prefill_calls: list[list[int]] = []
        self.decode_calls = 0

    def new_state(self) -> ScriptedState:
        return ScriptedState()

    def _logits(self, state: ScriptedState) -> torch.Tensor:
        if state.step < len(self.script):
            token = self.script[state.step]
        else:
            token = self.script[state.step % len(self.script)] if self.endless else EOS_ID
        out = torch.zeros(VOCAB)
        out[token] = 10.0
        return out

    def prefill(self, ids, state: ScriptedState) -> torch.Tensor:
        self.prefill_calls.append(list(ids))
        state.fed.extend(ids)
        state.step = 0
        return self._logits(state)

    def decode(self, token_id: int, state: ScriptedState) -> torch.Tensor:
        self.decode_calls += 1
        state.fed.append(token_id)
        state.step += 1
        return self._logits(state)


TOK = ByteTokenizer()


def run(session: Session, prompt, params=GREEDY):
    events = list(session.stream(prompt, params))
    assert events[-1].done and all(not e.done for e in events[:-1])
    return events


def test_multibyte_characters_never_split():
    text = "naïve €5 — 😀 ok"
    events = run(Session(ScriptedModel(TOK.encode(text)), TOK), TOK.encode("hi"))
    deltas = [e.text for e in events if e.text]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert events[-1].stats.stop_reason == "eos"
    assert events[-1].stats.generated_tokens == len(TOK.encode(text)) + 1  # + EOS


def test_v4_tokenizer_streams_through_its_own_decoder(monkeypatch):
    """With the V4 tokenizer the Session uses its byte-level stream decoder (constant work per
    token): characters split over tokens still arrive whole, and reasoning/answer phases split."""
    from flashdesk.engine.tokenizer import load_tokenizer

    tok = load_tokenizer()
    made = []
    real = tok.stream_decoder

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tok, "stream_decoder", counting)
    thought, answer = "思考 🧠", "naïve €5 — 😀 ok"
    script = [*tok.encode(thought), THINK_END_ID, *tok.encode(answer)]
    events = run(Session(ScriptedModel(script), tok), [*tok.encode("hi"), THINK_START_ID])
    deltas = [e for e in events if e.text]
    assert all("\ufffd" not in e.text for e in deltas)
    assert "".join(e.text for e in deltas if e.phase == "reasoning") == thought
    assert "".join(e.text for e in deltas if e.phase == "answer") == answer
    assert len(made) == 2  # one per phase


def test_incremental_decoder_flushes_an_incomplete_tail():
    decoder = IncrementalDecoder(TOK.decode)
    euro = TOK.encode("€")
    assert decoder.push(euro[0]) == ""
    assert decoder.push(euro[1]) == ""
    assert decoder.flush() == "\ufffd"  # a cut character is shown as such, not dropped


def test_reasoning_then_answer_phases():
    script = [*TOK.encode("think"), THINK_END_ID, *TOK.encode("answer")]
    events = run(Session(ScriptedModel(script), TOK), [*TOK.encode("q"), THINK_START_ID])
    reasoning = "".join(e.text for e in events if e.phase == "reasoning")
    answer = "".join(e.text for e in events if e.phase == "answer")
    assert (reasoning, answer) == ("think", "answer")
    stats = events[-1].stats
    assert stats.reasoning_tokens == len("think") + 1  # the </think> token closes the reasoning
    assert stats.generated_tokens == len(script) + 1


def test_non_think_prompt_starts_in_answer_phase():
    events = run(Session(ScriptedModel(TOK.encode("x")), TOK), [*TOK.encode("q"), THINK_END_ID])
    assert {e.phase for e in events} == {"answer"}


def test_max_tokens_and_stop_ids():
    model = ScriptedModel(TOK.encode("abcdef"))
    events = run(Session(model, TOK), TOK.encode("q"), SamplingParams(temperature=0, max_tokens=3))
    assert "".join(e.text for e in events) == "abc"
    assert events[-1].stats.stop_reason == "max_tokens"
    stop = TOK.encode("d")[0]
    events = run(
        Session(ScriptedModel(TOK.encode("abcdef")), TOK),
        TOK.encode("q"),
        SamplingParams(temperature=0, stop_ids=(stop,)),
    )
    assert "".join(e.text for e in events) == "abc"
    assert events[-1].stats.stop_reason == "stop_token"


def test_stats_are_filled():
    events = run(Session(ScriptedModel(TOK.encode("hello")), TOK, context_limit=100), [5, 6, 7])
    stats = events[-1].stats
    assert stats.prompt_tokens == 3
    assert stats.ttft_s is not None and stats.ttft_s >= 0
    assert stats.prefill_tok_s and stats.prefill_tok_s > 0
    assert stats.decode_tok_s and stats.decode_tok_s > 0
    assert stats.context_limit == 100
    assert stats.context_used == 3 + 5  # the final EOS is sampled but not fed
    assert stats.kv_bytes == 8 * stats.context_used


def test_prompt_over_the_context_is_refused_before_any_work():
    model = ScriptedModel(TOK.encode("x"))
    session = Session(model, TOK, context_limit=10)
    with pytest.raises(ContextOverflowError, match=r"10 tokens.*holds 10"):
        list(session.stream(list(range(2, 12)), GREEDY))
    assert model.prefill_calls == []


def test_generation_stops_when_the_context_is_full():
    model = ScriptedModel(TOK.encode("abcdefghij"), endless=True)
    events = run(Session(model, TOK, context_limit=8), TOK.encode("qqq"))
    assert events[-1].stats.stop_reason == "context_full"
    assert events[-1].stats.context_used == 8


def test_cancel_from_another_thread_stops_within_one_token():
    model = ScriptedModel(TOK.encode("abc"), endless=True)
    session = Session(model, TOK)
    events = []
    cancelled_at = None
    for event in session.stream(TOK.encode("q"), GREEDY):
        events.append(event)
        if len(events) == 5:
            worker = threading.Thread(target=session.cancel)
            worker.start()
            worker.join()
            cancelled_at = event.stats.generated_tokens
    assert events[-1].stats.stop_reason == "cancelled"
    assert events[-1].stats.generated_tokens - cancelled_at <= 1
    # The state is still usable: a follow-up prompt that extends it only prefills the new part.
    held = list(session.held_ids)
    assert len(held) == session.context_used > 1
    calls = len(model.prefill_calls)
    events = run(session, [*held, *TOK.encode("!")])
    assert events[-1].stats.reused_tokens == len(held)
    assert model.prefill_calls[calls:] == [TOK.encode("!")]


def test_prefix_reuse_prefills_only_new_tokens():
    model = ScriptedModel(TOK.encode("ok"))
    session = Session(model, TOK)
    first = TOK.encode("hello")
    run(session, first)
    transcript = [*first, *TOK.encode("ok")]  # what the state holds (EOS not fed)
    assert session.context_used == len(transcript)
    second = [*transcript, EOS_ID, *TOK.encode("more")]
    events = run(session, second)
    assert model.prefill_calls[-1] == [EOS_ID, *TOK.encode("more")]
    assert events[-1].stats.reused_tokens == len(transcript)
    # A prompt that does not extend the state starts afresh.
    run(session, TOK.encode("other"))
    assert model.prefill_calls[-1] == TOK.encode("other")


def test_long_prompt_is_prefilled_in_chunks_with_progress():
    model = ScriptedModel(TOK.encode("z"))
    session = Session(model, TOK, prefill_chunk=4)
    prompt = TOK.encode("0123456789")
    events = run(session, prompt)
    # as few calls as chunks of 4 allow, of equal size: no short tail (`prefill_pieces`)
    assert [len(c) for c in model.prefill_calls] == [4, 3, 3]
    progress = [e.stats.prefill_done for e in events if not e.text and not e.done]
    assert progress == [4, 7]


def test_the_model_may_choose_its_prefill_chunk():
    """The GPU runtime asks for longer chunks (each one streams the RAM experts over PCIe once),
    the same size the planner predicts prefill with (its plan's, else the default); a Session's
    own argument still wins."""
    from flashdesk.engine import generate, runtime
    from flashdesk.offload import plan, predict

    model = ScriptedModel(TOK.encode("z"))
    model.prefill_chunk = 3
    run(Session(model, TOK), TOK.encode("0123456"))
    assert [len(c) for c in model.prefill_calls] == [3, 2, 2]
    assert Session(model, TOK, prefill_chunk=5).prefill_chunk == 5
    assert Session(ScriptedModel(TOK.encode("z")), TOK).prefill_chunk == generate.PREFILL_CHUNK
    assert runtime.GPU_PREFILL_CHUNK == plan.DEFAULT_PREFILL_CHUNK == plan.Plan.prefill_chunk
    assert generate.PREFILL_CHUNK == predict.CPU_PREFILL_CHUNK


def test_cancel_during_prefill():
    model = ScriptedModel(TOK.encode("z"))
    session = Session(model, TOK, prefill_chunk=2)
    stream = session.stream(TOK.encode("0123456789"), GREEDY)
    first = next(stream)
    assert first.stats.prefill_done == 2
    session.cancel()
    rest = list(stream)
    assert rest[-1].stats.stop_reason == "cancelled"
    assert len(model.prefill_calls) == 1


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert sample(logits, GREEDY, None) == 1
    assert sample(logits, SamplingParams(top_k=1), None) == 1
    assert sample(logits, SamplingParams(top_p=0.01), None) == 1
    # a top_p float32 cannot hold (the API server's fuzzing sent 5e-324): still the likeliest
    assert sample(logits, SamplingParams(top_p=5e-324), None) == 1
    draws = [
        sample(logits, SamplingParams(seed=None), torch.Generator().manual_seed(7))
        for _ in range(3)
    ]
    assert len(set(draws)) == 1  # same seed, same draw
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[sample(logits, SamplingParams(), gen)] += 1
    expected = torch.softmax(logits, 0) * 2000
    assert torch.allclose(counts, expected, atol=80)
    top2 = {sample(logits, SamplingParams(top_k=2), gen) for _ in range(200)}
    assert top2 == {1, 3}


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])
def test_top_p_keeps_the_sorted_nucleus_from_the_largest_logits(spread):
    """`_nucleus` looks at the largest few hundred logits first (growing ×8) instead of sorting
    the vocabulary: the same tokens as the sorted-cumsum nucleus, for flat and peaked
    distributions; draws land only inside it, in proportion."""
    from flashdesk.engine.generate import NUCLEUS_FIRST, _nucleus

    g = torch.Generator().manual_seed(int(spread * 10))
    logits = torch.randn(129280, generator=g) * spread
    weights = torch.exp(logits - logits.max())
    for top_p in (0.5, 0.9, 0.99):
        probs = weights / weights.sum()
        order = torch.argsort(probs, descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        want = set(order[before < top_p].tolist())
        kept_w, kept = _nucleus(weights, top_p)
        assert set(kept.tolist()) == want
        assert torch.equal(kept_w, weights[kept])
    assert len(want) > NUCLEUS_FIRST or spread > 1  # the flat case needed more than one round
    small = torch.tensor([0.0, 3.0, 1.0, 2.5, -9.0])
    counts = torch.zeros(5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3000):
        counts[sample(small, SamplingParams(top_p=0.9), gen)] += 1
    # 3.0 and 2.5 hold 0.896 of the mass, under 0.9: 1.0 joins them, 0.0 does not
    probs = torch.softmax(small[[1, 3, 2]], 0)
    assert counts[[0, 4]].sum() == 0
    assert torch.allclose(counts[[1, 3, 2]], probs * 3000, atol=90)


def test_bad_sampling_params_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_a_second_stream_on_a_busy_session_is_refused():
    session = Session(ScriptedModel(TOK.encode("abc"), endless=True), TOK)
    first = session.stream(TOK.encode("q"), GREEDY)
    next(first)
    assert session.busy
    with pytest.raises(SessionBusyError, match="already generating"):
        next(session.stream(TOK.encode("q"), GREEDY))
    session.cancel()
    list(first)
    assert not session.busy


def test_nan_logits_give_a_clear_error():
    with pytest.raises(FloatingPointError, match="NaN"):
        sample(torch.tensor([0.0, float("nan")]), SamplingParams(), None)
    with pytest.raises(FloatingPointError, match="finite"):
        sample(torch.full((4,), float("-inf")), GREEDY, None)


# ------------------------------------------------------------- returning to a marked state


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from flashdesk.engine.checkpoint.writer import write_random
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.model.loader import load_model

    config = ModelConfig.tiny()
    folder = write_random(tmp_path_factory.mktemp("marks") / "ckpt", config, seed=5)
    return load_model(folder), config


THINK_OPEN, THINK_CLOSE = 300, 301  # stand-ins for <think> / </think> in the tiny vocabulary


def _turn(session, prompt):
    events = run(session, prompt, SamplingParams(temperature=0.0, max_tokens=6))
    return events[-1].stats, list(session.held_ids)


def test_a_think_follow_up_resumes_where_the_prompts_diverge(tiny_model, monkeypatch):
    """A Think prompt ends with <think>; the next turn renders that turn with </think> (the
    reasoning dropped), so the held tokens were all-or-nothing useless and a long document was
    prefilled again every turn. The state is marked before the <think> and rewound there: the
    follow-up prefills only what is new, and continues exactly as a fresh session would."""
    from flashdesk.engine import generate

    monkeypatch.setattr(generate, "THINK_START_ID", THINK_OPEN)
    model, config = tiny_model
    g = torch.Generator().manual_seed(1)
    document = torch.randint(2, 256, (48,), generator=g).tolist()
    first = [*document, THINK_OPEN]
    session = Session(model, TOK, context_limit=config.max_position_embeddings)
    _, held = _turn(session, first)
    answer = held[len(first) :]
    follow = [*first[:-1], THINK_CLOSE, *answer, EOS_ID, 7, 8, 9, THINK_OPEN]
    stats, held = _turn(session, follow)
    assert stats.reused_tokens == len(first) - 1  # all but the diverging <think>

    fresh = Session(model, TOK, context_limit=config.max_position_embeddings)
    fresh_stats, fresh_held = _turn(fresh, follow)
    assert fresh_stats.reused_tokens == 0 and held == fresh_held
    torch.testing.assert_close(
        model.decode(held[-1], session._state), model.decode(held[-1], fresh._state)
    )

    # regenerating the same answer: everything but the final <think> is reused
    stats, again = _turn(session, follow)
    assert stats.reused_tokens == len(follow) - 1 and again == held
    assert len(session._marks) <= generate.MAX_MARKS


def test_a_non_think_prompt_is_marked_at_its_end(tiny_model):
    """Non-think: the next prompt repeats this one, then the answer as re-tokenized, which may
    differ from the sampled tokens: the state returns to the end of the prompt, not to zero."""
    model, config = tiny_model
    prompt = [*range(10, 40), THINK_END_ID % config.vocab_size]
    session = Session(model, TOK, context_limit=config.max_position_embeddings)
    _, held = _turn(session, prompt)
    assert len(held) > len(prompt)
    other = [t + 1 for t in held[len(prompt) :]]  # another tokenization of the answer
    stats, _ = _turn(session, [*prompt, *other, 5])
    assert stats.reused_tokens == len(prompt)
    stats, _ = _turn(session, [3, *prompt])  # nothing in common: a new state
    assert stats.reused_tokens == 0 and len(session._marks) == 1


def test_regenerating_a_non_think_answer_prefills_nothing(tiny_model):
    """The same prompt again (regenerate): the mark at its end carries its logits, so the
    state returns there and sampling starts at once, as from the first prefill."""
    model, config = tiny_model
    prompt = [*range(50, 90), THINK_END_ID % config.vocab_size]
    session = Session(model, TOK, context_limit=config.max_position_embeddings)
    _, first = _turn(session, prompt)
    calls = []
    original = model.prefill
    try:
        model.prefill = lambda ids, state, *a, **k: (
            calls.append(len(ids)) or original(ids, state, *a, **k)
        )
        stats, again = _turn(session, prompt)
    finally:
        del model.prefill
    assert stats.reused_tokens == len(prompt) and again == first
    assert set(calls) == {1}  # only the answer's decode steps (the plain model's are 1-token calls)


def test_a_failed_model_call_never_leaves_a_half_written_state(tiny_model):
    """A prefill that fails halfway (here after writing part of its chunk) leaves the state at
    the last mark, or drops it: the next turn answers as a fresh session would."""
    model, config = tiny_model
    first = [*range(20, 60), THINK_END_ID % config.vocab_size]
    session = Session(model, TOK, context_limit=config.max_position_embeddings)
    _turn(session, first)
    follow = [*first, 61, 62, 63, 64, 65, 66, 67]

    def failing(ids, state, *a, **k):
        model.forward_streams(ids[:3], state)  # part of the chunk written, then:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.prefill = failing
    try:
        with pytest.raises(RuntimeError, match="CUDA error"):
            _turn(session, follow)
    finally:
        del model.prefill
    assert list(session.held_ids) == first  # back at the first prompt's mark
    stats, held = _turn(session, follow)
    assert stats.reused_tokens == len(first)
    fresh = Session(model, TOK, context_limit=config.max_position_embeddings)
    assert _turn(fresh, follow)[1] == held

    # a model whose states cannot be marked: the state is dropped
    scripted = ScriptedModel(TOK.encode("ok"))
    session = Session(scripted, TOK)
    run(session, TOK.encode("hello"))
    scripted.prefill = lambda ids, state: state.fed.extend(ids) or 1 / 0
    with pytest.raises(ZeroDivisionError):
        run(session, TOK.encode("hello there"))
    assert session.held_ids == ()


def test_a_cancel_stops_a_prompt_chunk_between_layers(tiny_model):
    """A long prompt chunk (8K tokens on a 24 GB card, seconds) stops within a layer of a
    cancel: the chunk's partial writes are undone, the chunks before it stay, and the next
    turn continues from them as a fresh session would."""
    model, config = tiny_model
    prompt = torch.randint(2, 256, (60,), generator=torch.Generator().manual_seed(9)).tolist()
    session = Session(model, TOK, context_limit=config.max_position_embeddings, prefill_chunk=20)
    real = model.blocks[1].forward
    seen = []

    def cancelling(x, *a, **k):  # the second chunk's second layer asks to stop
        seen.append(x.shape[0])
        if len(seen) == 2:
            session.cancel()
        return real(x, *a, **k)

    model.blocks[1].forward = cancelling
    try:
        events = run(session, prompt, SamplingParams(temperature=0.0, max_tokens=4))
    finally:
        del model.blocks[1].forward
    assert events[-1].stats.stop_reason == "cancelled"
    assert events[-1].stats.prefill_done == 20 and list(session.held_ids) == prompt[:20]
    assert model._interrupt is None  # the hook is the stream's only
    stats, held = _turn(session, prompt)
    assert stats.reused_tokens == 20
    fresh = Session(model, TOK, context_limit=config.max_position_embeddings, prefill_chunk=20)
    assert _turn(fresh, prompt)[1] == held


def test_a_long_prompt_is_marked_between_its_chunks(tiny_model, monkeypatch):
    """An edited message inside a long prompt (an API client editing history) resumes at the
    last chunk boundary before the edit, not at zero; beyond MAX_MARKS the chunk boundaries go
    before the ends of prompts."""
    from flashdesk.engine import generate

    model, config = tiny_model
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(2, 256, (60,), generator=g).tolist()
    session = Session(model, TOK, context_limit=config.max_position_embeddings, prefill_chunk=20)
    _turn(session, prompt)
    assert [m[0] for m in session._marks] == [20, 40, 60]
    edited = [*prompt[:45], 7, 7, 7]
    stats, held = _turn(session, edited)
    assert stats.reused_tokens == 40
    fresh = Session(model, TOK, context_limit=config.max_position_embeddings, prefill_chunk=20)
    assert _turn(fresh, edited)[1] == held

    monkeypatch.setattr(generate, "MAX_MARKS", 3)
    session = Session(model, TOK, context_limit=config.max_position_embeddings, prefill_chunk=20)
    _, held = _turn(session, prompt)
    _turn(session, [*held, 5, 6])  # extends: a new prompt end at len(held) + 2
    kinds = [(at, boundary) for at, _, _, boundary in session._marks]
    assert kinds == [(40, True), (60, False), (len(held) + 2, False)]
