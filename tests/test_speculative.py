"""Speculative decoding with the MTP block: the tokens follow the main model exactly (greedy: the
same tokens; sampling: the same distribution), whatever share of the drafts is kept."""

from __future__ import annotations

import time

import pytest
import torch

from flashdesk.engine import generate
from flashdesk.engine.generate import EOS_ID, SamplingParams, Session, probabilities, verify_draft

GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
    ],
)
def test_speculative_sampling_follows_the_main_distribution(params):
    g = torch.Generator().manual_seed(3)
    main, draft_logits = torch.randn(8, generator=g) * 2, torch.randn(8, generator=g) * 2
    p, q = probabilities(main, params), probabilities(draft_logits, params)
    n, counts, kept = 20000, torch.zeros(8, dtype=torch.float64), 0
    for _ in range(n):
        d = int(torch.multinomial(q.float(), 1, generator=g))
        instead = verify_draft(main, draft_logits, d, params, g)
        kept += instead is None
        counts[d if instead is None else instead] += 1
    assert (counts / n - p).abs().max() < 0.012  # ~3.5 standard errors
    assert kept / n == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)


def test_greedy_keeps_the_draft_only_when_it_is_the_argmax():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert verify_draft(logits, torch.zeros(3), 1, GREEDY, None) is None
    assert verify_draft(logits, torch.zeros(3), 2, GREEDY, None) == 1


class _State:
    def __init__(self):
        self.fed: list[int] = []

    def nbytes(self) -> int:
        return 0


class CountingModel:
    """The token after n fed tokens is `script[n]`; the draft of the token after next is right
    except every third call, so drafts are kept and rejected in turn."""

    speculative = True

    def __init__(self, script, vocab=300):
        self.script, self.vocab, self.drafts = script, vocab, 0

    def new_state(self):
        return _State()

    def _logits(self, n: int) -> torch.Tensor:
        out = torch.zeros(self.vocab)
        out[self.script[min(n, len(self.script) - 1)]] = 9.0
        return out

    def prefill(self, ids, state):
        state.fed += [int(t) for t in ids]
        return self._logits(len(state.fed))

    def decode(self, token, state):
        return self.prefill([token], state)

    def draft(self, token, state):
        self.drafts += 1
        right = self._logits(len(state.fed) + 1)  # after `token`, which is not fed yet
        return right if self.drafts % 3 else right.roll(1)

    def verify(self, ids, state):
        state.fed += list(ids)
        n = len(state.fed)
        return torch.stack((self._logits(n - 1), self._logits(n)))

    def reject_last(self, state):
        state.fed.pop()


class Letters:
    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if 65 <= i < 91)


def test_session_tokens_are_the_same_with_and_without_drafts():
    script = [0] * 3 + [65 + (i * 7) % 26 for i in range(40)] + [EOS_ID]
    plain = CountingModel(script)
    plain.speculative = False
    want = "".join(e.text for e in Session(plain, Letters()).stream([5, 6, 7], GREEDY))
    model = CountingModel(script)
    session = Session(model, Letters())
    events = list(session.stream([5, 6, 7], GREEDY))
    assert "".join(e.text for e in events) == want and len(want) == 40
    stats = events[-1].stats
    assert stats.stop_reason == "eos" and stats.generated_tokens == 41
    assert 0.5 < stats.draft_acceptance < 0.8
    # the last token shown (EOS, a kept draft or not) is not in the state, as without drafts
    assert list(session.held_ids) == [5, 6, 7, *script[3:-1]] == model_state(session)


def model_state(session):
    return session._state.fed


@pytest.mark.parametrize("limit", [1, 2, 5, 6])
def test_max_tokens_counts_kept_drafts(limit, monkeypatch):
    monkeypatch.setattr(generate, "PLAIN_FIRST", 0)  # draft from the first step
    script = [0] * 2 + list(range(65, 91))
    session = Session(CountingModel(script), Letters())
    events = list(session.stream([5, 6], SamplingParams(temperature=0.0, max_tokens=limit)))
    assert "".join(e.text for e in events) == "".join(map(chr, script[2 : 2 + limit]))
    assert events[-1].stats.stop_reason == "max_tokens"
    assert list(session.held_ids) == model_state(session) == [5, 6, *script[2 : 1 + limit]]


class TimedModel(CountingModel):
    """A plain step takes 10 ms, a draft 2 and a two-token verify 12: drafting pays where more
    than 40 % of the drafts are kept."""

    def __init__(self, script, right_every: int):
        super().__init__(script)
        self.right_every = right_every

    def decode(self, token, state):
        time.sleep(0.010)
        return super().decode(token, state)

    def draft(self, token, state):
        time.sleep(0.002)
        self.drafts += 1
        right = self._logits(len(state.fed) + 1)
        return right if self.drafts % self.right_every == 0 else right.roll(1)

    def verify(self, ids, state):
        time.sleep(0.012)
        return super().verify(ids, state)


@pytest.mark.parametrize(("right_every", "drafting"), [(1, True), (10, False)])
def test_drafting_stops_where_it_does_not_pay(right_every, drafting):
    """Every draft right: 2 tokens per 14 ms beat 1 per 10 ms, drafting goes on. One in ten:
    1.1 tokens per 14 ms lose, and the stream drafts no more after its trial."""
    script = [0] * 2 + [65 + i % 26 for i in range(80)] + [EOS_ID]
    model = TimedModel(script, right_every)
    events = list(Session(model, Letters()).stream([5, 6], GREEDY))
    assert "".join(e.text for e in events) == "".join(map(chr, script[2:-1]))
    if drafting:
        assert model.drafts > 30
    else:
        assert generate.DRAFT_TRIAL <= model.drafts <= generate.DRAFT_TRIAL + 1
        assert events[-1].stats.draft_acceptance == pytest.approx(0.1, abs=0.07)


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory):
    from flashdesk.engine.checkpoint.writer import write_random
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.model.loader import load_model

    config = ModelConfig.tiny()
    folder = write_random(tmp_path_factory.mktemp("mtp") / "ckpt", config, seed=11)
    return load_model(folder, with_mtp=True)


def test_the_v4_model_greedy_answer_is_the_same_with_its_mtp_drafts(tiny_mtp):
    prompt = list(range(40, 64))
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = [t for e in Session(tiny_mtp, Letters()).stream(prompt, params) for t in e.text]
    tiny_mtp.enable_speculation()
    try:
        session = Session(tiny_mtp, Letters())
        events = list(session.stream(prompt, params))
        second = list(session.stream([*session.held_ids, 70, 71], params))  # prefix reuse
    finally:
        tiny_mtp.enable_speculation(False)
    assert [t for e in events for t in e.text] == plain
    assert events[-1].stats.draft_acceptance is not None
    assert second[-1].stats.reused_tokens == len(prompt) + 23
    state = session._state
    assert state.mtp_position + state.mtp_pending.shape[0] == state.position
