"""Generation sessions: prefill, sampling, streaming text, cancellation and live statistics.

A `Session` owns one sequence's model state. `stream()` is a generator the app's worker thread
iterates; `cancel()` may be called from any other thread and takes effect within one token. The
state survives a cancel, and a new prompt that extends what the state already holds only prefills
the new tokens (prefix reuse), so a multi-turn chat does not re-read its history every turn.

The model is anything with `new_state()`, `prefill(ids, state) -> logits[vocab]` (logits of the
last position) and `decode(token_id, state) -> logits[vocab]`; the tokenizer anything with
`decode(ids) -> str`. Both are duck-typed so tests can drive a session with small fakes. A model
whose `speculative` is true also has `draft(token, state) -> logits[vocab]` (of the token after
`token`), `verify(ids, state) -> logits[len(ids), vocab]` and `reject_last(state)`: a step then
feeds the next token with a draft of the one after it (speculative decoding, `V4Model`'s MTP).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from flashdesk.engine.interrupt import Interrupted
from flashdesk.offload.predict import prefill_pieces

# Special token ids of the V4 tokenizer (spec §5.1).
EOS_ID = 1
THINK_START_ID = 128821
THINK_END_ID = 128822

# Speculative decoding pays only where a draft and a two-token step cost less than the tokens
# they yield: a stream times its first PLAIN_FIRST steps without drafts, then drafts, and stops
# drafting for the rest of the stream where, after DRAFT_TRIAL drafts, its tokens come slower.
PLAIN_FIRST = 4
DRAFT_TRIAL = 16

PREFILL_CHUNK = 512  # tokens per prefill call: bounds activation memory and cancel latency
# States kept to return to (`Session._marks`; V4-Flash ~16 MB of host memory each): the ends of
# prompts first, then the chunk boundaries of long ones.
MAX_MARKS = 8
# (a model may ask for its own: `model.prefill_chunk`, e.g. the GPU runtime, whose every chunk
# copies the experts kept in RAM across PCIe once)


class ContextOverflowError(ValueError):
    """The prompt does not fit the context window; raised before any work is done."""

    def __init__(self, prompt_tokens: int, context_limit: int, reserved: int = 1):
        self.prompt_tokens = prompt_tokens
        self.context_limit = context_limit
        super().__init__(
            f"The prompt is {prompt_tokens:,} tokens but the context window holds "
            f"{context_limit:,} (at least {reserved} must stay free for the answer). "
            "Remove documents or earlier turns, or load the model with a larger context."
        )


class SessionBusyError(RuntimeError):
    """stream() was called while another stream() on the same session is still running."""

    def __init__(self):
        super().__init__("this session is already generating; wait for it or cancel it first")


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow the V4 model card: temperature 1.0, top_p 1.0. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 4096
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Stats:
    """Figures of one `stream()` call so far. Rates are None until they can be measured."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens served from the cached state instead of prefilled
    prefill_done: int = 0  # prompt tokens prefilled so far in this call
    generated_tokens: int = 0
    reasoning_tokens: int = 0
    ttft_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    context_used: int = 0
    context_limit: int = 0
    kv_bytes: int | None = None
    expert_hit_rate: float | None = None
    draft_acceptance: float | None = None  # share of speculative drafts kept (MTP), if any
    stop_reason: str | None = None  # eos | stop_token | max_tokens | cancelled | context_full


@dataclass(frozen=True)
class StreamEvent:
    """One step of a stream: new text (may be empty during prefill), its phase, the stats."""

    text: str
    phase: str  # "reasoning" | "answer"
    stats: Stats
    done: bool = False


class IncrementalDecoder:
    """Turns token ids into text deltas without ever splitting a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
    U+FFFD. Text is released only once the tail decodes cleanly, re-decoding a short window of
    recent ids so merges across token boundaries come out as the full decode would.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this were already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(emitted) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted) :]


# top-p: candidates taken largest first in rounds of this many (×8 a round) until the nucleus
# is inside them, instead of sorting the whole vocabulary (129,280 logits: 11 ms on one core)
NUCLEUS_FIRST = 256


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] -> one token id: greedy at temperature 0, else top-k / top-p sampling.

    Sampling runs on the CPU (one 0.5 MB copy per token), so a seeded CPU generator gives the
    same draws whichever device produced the logits. One pass finds the peak (and any NaN); a
    draw is one uniform number against the kept candidates' cumulative weights (inverse CDF),
    and top-p looks only at the largest logits: V4-Flash's vocabulary took 3.8 ms a token with
    torch.multinomial (15 ms with top_p < 1 and a full sort) on the dev VM's core, now ~0.3."""
    logits, peak, best = _checked(logits)
    if params.temperature == 0:
        return best
    weights, ids = _candidates(logits, peak, params)
    pick = _draw(weights, generator)
    return int(ids[pick]) if ids is not None else pick


def _checked(logits: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """logits → (float32 `[V]` on the CPU, the peak, its token), refused when not finite."""
    logits = logits.detach().float().reshape(-1).cpu()
    peak, best = torch.max(logits, 0)  # a NaN anywhere makes the peak NaN
    peak = float(peak)
    if not math.isfinite(peak):  # NaN, all −∞, or an infinite logit no probability can follow
        what = "NaN logits" if math.isnan(peak) else "no finite logits"
        raise FloatingPointError(
            f"the model produced {what}: the weights or the numerics are broken "
            "(try float32 instead of bfloat16, or re-download the checkpoint and verify it)"
        )
    return logits, peak, int(best)


def _candidates(logits: torch.Tensor, peak: float, params: SamplingParams):
    """The tokens top-k and top-p keep → (their unnormalized probabilities, their ids or None
    for all of them)."""
    # in place on one new buffer: a few fresh 0.5-1 MB temporaries a token cost more (page
    # faults) than the arithmetic
    weights = torch.sub(logits, peak)  # ≤ 0, the peak at 0
    if params.temperature != 1.0:
        weights.div_(params.temperature)
    ids = None  # the candidates' token ids where fewer than all are kept
    if params.top_k and params.top_k < weights.numel():
        weights, ids = torch.topk(weights, params.top_k)  # largest first
    weights.exp_()  # unnormalized probabilities, the peak's 1
    if params.top_p < 1.0:
        weights, kept = _nucleus(weights, params.top_p)
        ids = kept if ids is None else ids[kept]
    return weights, ids


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One position drawn in proportion to `weights` (unnormalized, ≥ 0): one uniform number
    against their cumulative sums."""
    cumulative = torch.cumsum(weights, 0)
    u = torch.rand((1,), generator=generator, dtype=cumulative.dtype) * cumulative[-1]
    return min(int(torch.searchsorted(cumulative, u, right=True)), weights.numel() - 1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0), `[V]` float64 summing to 1:
    zero outside what top-k / top-p keep. Speculative decoding compares the main model's with
    the draft's."""
    logits, peak, _ = _checked(logits)
    weights, ids = _candidates(logits, peak, params)
    weights = weights.double()
    weights /= weights.sum()
    if ids is None:
        return weights
    return torch.zeros(logits.numel(), dtype=torch.float64).index_copy_(0, ids, weights)


def verify_draft(
    logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> int | None:
    """Speculative sampling of the token a draft stands for: None keeps the draft, else the token
    to take instead. The draft was drawn (or, greedy, picked) from `draft_logits`; it is kept
    with probability min(1, p/q) and otherwise replaced by a draw from max(p − q, 0), so the
    token follows the main model's `logits` exactly as `sample` would draw it (greedy: the
    argmax, kept when the draft is it)."""
    if params.temperature == 0:
        best = sample(logits, params, None)
        return None if best == draft else best
    p, q = probabilities(logits, params), probabilities(draft_logits, params)
    u = float(torch.rand((1,), generator=generator, dtype=torch.float64))
    if u * float(q[draft]) < float(p[draft]):
        return None
    residual = (p - q).clamp_min_(0.0)
    return _draw(residual if float(residual.sum()) > 0 else p, generator)


def _nucleus(weights: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of the largest `weights` (unnormalized probabilities) whose share
    before the last one is below `top_p` → (their weights, their positions), largest first:
    the sorted-cumsum nucleus, from the largest few hundred where it lies inside them."""
    total = float(weights.sum(dtype=torch.float64))
    n = weights.numel()
    k = min(NUCLEUS_FIRST, n)
    while True:
        top, where = torch.topk(weights, k)  # largest first
        before = torch.cumsum(top, 0) - top
        cut = before >= top_p * total
        cut[0] = False  # the likeliest token always stays (a top_p below float64's range is 0)
        if bool(cut.any()) or k == n:
            keep = ~cut
            return top[keep], where[keep]
        k = min(8 * k, n)


@dataclass
class _Timing:
    start: float = 0.0
    prefill_s: float = 0.0
    plain_s: float = 0.0  # time of the decode steps without a draft, and of those with one
    plain_steps: int = 0
    draft_s: float = 0.0
    drafts: int = 0  # speculative decoding: drafts verified, and kept
    kept: int = 0

    @property
    def decode_s(self) -> float:
        return self.plain_s + self.draft_s

    @property
    def decode_steps(self) -> int:
        """Tokens the decode calls fed: one a plain step, one or two (a kept draft) a draft's."""
        return self.plain_steps + self.drafts + self.kept

    def drafts_pay(self) -> bool:
        """Whether drafting still looks faster: before its trial is over, or where its tokens
        per second beat the plain steps'."""
        if self.drafts < DRAFT_TRIAL or not self.plain_steps or self.draft_s <= 0:
            return True
        return (self.drafts + self.kept) / self.draft_s >= self.plain_steps / self.plain_s


@dataclass
class _Run:
    """Mutable bookkeeping of one stream() call."""

    stats: Stats
    phase: str
    timing: _Timing = field(default_factory=_Timing)
    decoder: object = None  # the phase's text decoder


class Session:
    """One conversation's state on one model; not thread-safe except for `cancel()`."""

    def __init__(
        self,
        model,
        tokenizer,
        context_limit: int | None = None,
        prefill_chunk: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.context_limit = int(context_limit or getattr(model, "context_limit", 0) or 1 << 20)
        self.prefill_chunk = int(
            prefill_chunk or getattr(model, "prefill_chunk", None) or PREFILL_CHUNK
        )
        self._state = None
        self._ids: list[int] = []  # tokens the state holds, in order
        # (tokens held, `SequenceState.mark`, the logits there or None, a chunk boundary) at the
        # ends of earlier prompts and between the chunks of long ones, by position: where a new
        # prompt that diverges from the held tokens can resume (models whose states mark)
        self._marks: list[tuple[int, object, torch.Tensor | None, bool]] = []
        self._resume_logits: torch.Tensor | None = None  # a mark's, for a prompt it ends
        self._cancel = threading.Event()
        self._busy = threading.Lock()

    @property
    def context_used(self) -> int:
        return len(self._ids)

    @property
    def held_ids(self) -> tuple[int, ...]:
        """The tokens the cached state holds; a prompt that extends them reuses the state."""
        return tuple(self._ids)

    @property
    def busy(self) -> bool:
        """True while a stream() is running on this session (from any thread)."""
        return self._busy.locked()

    def reset(self) -> None:
        """Forget the cached state (a new chat)."""
        self._state = None
        self._ids = []
        self._marks = []

    def cancel(self) -> None:
        """Stop the running stream after the current token; safe from any thread."""
        self._cancel.set()

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[StreamEvent]:
        """Prefill `prompt_ids` (reusing the cached prefix) and generate; yields StreamEvents.

        Raises ContextOverflowError before any work when the prompt leaves no room to answer.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: nothing to generate from")
        if len(prompt) >= self.context_limit:
            raise ContextOverflowError(len(prompt), self.context_limit)
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError()
        interrupt = getattr(self.model, "set_interrupt", None)
        try:
            self._cancel.clear()
            if interrupt is not None:  # a cancel stops a long prompt chunk between layers
                interrupt(self._cancel.is_set)
            yield from self._stream(prompt, params)
        except GeneratorExit:  # the caller stopped reading at an event: the state is whole
            raise
        except BaseException:
            self._recover()
            raise
        finally:
            if interrupt is not None:
                interrupt(None)
            self._busy.release()

    def _recover(self) -> None:
        """After a failure inside a model call (out of memory, a CUDA error, an interrupt) the
        state may hold part of that call's writes: return it to the last mark, or drop it (the
        next prompt is then prefilled whole), never continue from a half-written state."""
        if self._state is not None and self._marks:
            at, mark = self._marks[-1][:2]
            if at <= len(self._ids) and self._rewind(at, mark):
                return
        self.reset()

    def _rewind(self, at: int, mark) -> bool:
        """The state back to a mark that holds `at` tokens (the marks past it dropped: their
        rows get written again) → False where the model's cache cannot return there."""
        try:
            self._state.rewind(mark)
        except RuntimeError:
            return False
        del self._ids[at:]
        self._marks = [m for m in self._marks if m[0] <= at]
        return True

    def _stream(self, prompt: list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        reused = self._reusable_prefix(prompt)
        if reused == 0 or self._state is None:
            self._state, self._ids, reused = self.model.new_state(), [], 0
            self._marks = []
        phase = "reasoning" if prompt[-1] == THINK_START_ID else "answer"
        run = _Run(
            stats=Stats(
                prompt_tokens=len(prompt),
                reused_tokens=reused,
                context_used=len(self._ids),
                context_limit=self.context_limit,
            ),
            phase=phase,
        )
        run.timing.start = time.perf_counter()
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)

        # Prefill the new part of the prompt in chunks of equal size (`prefill_pieces`: no short
        # tail), reporting progress between chunks. The state is marked where the next prompt
        # may diverge: after the whole prompt, or, for a Think prompt, before its closing
        # <think>, which the next turn renders as </think> (earlier reasoning is dropped); that
        # last token then goes in as a decode step.
        todo = prompt[reused:]
        markable = callable(getattr(self._state, "mark", None))
        split = markable and bool(todo) and prompt[-1] == THINK_START_ID
        pieces = prefill_pieces(len(todo) - split, self.prefill_chunk) + [1] * split
        logits, self._resume_logits = self._resume_logits, None  # the whole prompt was held
        done = 0
        for i, size in enumerate(pieces):
            if self._cancel.is_set():
                yield self._finish(run, "cancelled")
                return
            chunk = todo[done : done + size]
            last_of_split = split and i == len(pieces) - 1
            if last_of_split:
                self._remember(None)
            t0 = time.perf_counter()
            if last_of_split:
                logits = self.model.decode(chunk[0], self._state)
            else:
                before = self._state.mark() if markable else None  # a cancel may stop it
                try:
                    logits = self.model.prefill(chunk, self._state)
                except Interrupted:  # cancelled inside the chunk: the state as before it
                    if before is not None:
                        self._state.rewind(before)
                    else:
                        self.reset()
                    yield self._finish(run, "cancelled")
                    return
            run.timing.prefill_s += time.perf_counter() - t0
            self._ids.extend(chunk)
            done += len(chunk)
            run.stats = replace(
                run.stats,
                prefill_done=done,
                prefill_tok_s=done / run.timing.prefill_s if run.timing.prefill_s > 0 else None,
                context_used=len(self._ids),
                kv_bytes=self._kv_bytes(),
                expert_hit_rate=getattr(self.model, "expert_hit_rate", None),
            )
            if done < len(todo):
                if markable and not (split and i == len(pieces) - 2):
                    # between chunks of a long prompt: an edited later message resumes here
                    self._remember(None, boundary=True)
                yield StreamEvent("", run.phase, run.stats)
        if markable and not split:
            self._remember(logits)

        run.decoder = self._text_decoder()
        stop_ids = {EOS_ID, *params.stop_ids}
        speculate = bool(getattr(self.model, "speculative", False))
        token = sample(logits, params, generator)
        while True:
            # The sampled token is not fed to the state until the next step; a stop leaves it
            # unfed, and the next turn's prompt (which contains it) prefills it.
            reason = yield from self._emit(run, token, params, stop_ids)
            if reason is not None:
                yield self._finish(run, reason, tail=run.decoder.flush())
                return
            t0 = time.perf_counter()
            timing = run.timing
            speculate = speculate and timing.drafts_pay()
            if (
                speculate
                and timing.plain_steps >= PLAIN_FIRST
                and len(self._ids) + 2 <= self.context_limit
            ):
                # The MTP block drafts the token after this one; one call feeds both, and the
                # draft is kept where speculative sampling accepts it (the tokens follow the
                # main model's distribution exactly as without a draft).
                draft_logits = self.model.draft(token, self._state)
                draft = sample(draft_logits, params, generator)
                out = self.model.verify([token, draft], self._state)
                self._ids.append(token)
                instead = verify_draft(out[0], draft_logits, draft, params, generator)
                timing.drafts += 1
                timing.kept += instead is None
                timing.draft_s += time.perf_counter() - t0
                self._decoded(run)
                if instead is None:
                    reason = yield from self._emit(run, draft, params, stop_ids)
                    if reason is not None:  # the last token shown stays unfed, as above
                        self.model.reject_last(self._state)
                        yield self._finish(run, reason, tail=run.decoder.flush())
                        return
                    self._ids.append(draft)
                    token = sample(out[1], params, generator)
                else:
                    self.model.reject_last(self._state)
                    token = instead
                continue
            logits = self.model.decode(token, self._state)
            self._ids.append(token)
            timing.plain_steps += 1
            timing.plain_s += time.perf_counter() - t0
            self._decoded(run)
            token = sample(logits, params, generator)

    def _emit(self, run: _Run, token: int, params: SamplingParams, stop_ids: set[int]):
        """Count and show one generated token (yields its text, if any) → why to stop after it,
        or None."""
        if run.stats.ttft_s is None:
            run.stats = replace(run.stats, ttft_s=time.perf_counter() - run.timing.start)
        run.stats = replace(
            run.stats,
            generated_tokens=run.stats.generated_tokens + 1,
            reasoning_tokens=run.stats.reasoning_tokens + (run.phase == "reasoning"),
        )
        reason = None
        if token in stop_ids:
            reason = "eos" if token == EOS_ID else "stop_token"
        elif token == THINK_END_ID and run.phase == "reasoning":
            tail = run.decoder.flush()
            if tail:
                yield StreamEvent(tail, run.phase, run.stats)
            run.phase = "answer"
            run.decoder = self._text_decoder()
        elif token != THINK_START_ID:
            text = run.decoder.push(token)
            if text:
                yield StreamEvent(text, run.phase, run.stats)
        if reason is None and run.stats.generated_tokens >= params.max_tokens:
            reason = "max_tokens"
        elif reason is None and len(self._ids) >= self.context_limit:
            reason = "context_full"
        elif reason is None and self._cancel.is_set():
            reason = "cancelled"
        return reason

    def _decoded(self, run: _Run) -> None:
        """The stats after a decode step (its time and tokens already in `run.timing`)."""
        timing = run.timing
        run.stats = replace(
            run.stats,
            decode_tok_s=timing.decode_steps / timing.decode_s if timing.decode_s > 0 else None,
            draft_acceptance=timing.kept / timing.drafts if timing.drafts else None,
            context_used=len(self._ids),
            kv_bytes=self._kv_bytes(),
            expert_hit_rate=getattr(self.model, "expert_hit_rate", None),
        )

    def _finish(self, run: _Run, reason: str, tail: str = "") -> StreamEvent:
        """The final event, carrying any held-back text and the stop reason."""
        run.stats = replace(
            run.stats,
            stop_reason=reason,
            context_used=len(self._ids),
            kv_bytes=self._kv_bytes(),
            expert_hit_rate=getattr(self.model, "expert_hit_rate", None),
        )
        return StreamEvent(tail, run.phase, run.stats, done=True)

    def _reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading prompt tokens the cached state holds for this prompt: all of them
        if the prompt extends them, else those up to the last mark within the common prefix
        (the state is rewound there: a Think turn's follow-up, a regenerated or edited last
        message, a re-tokenized answer), else none."""
        n = len(self._ids)
        if n and n < len(prompt) and prompt[:n] == self._ids:
            return n
        limit = min(n, len(prompt))
        common = next((i for i in range(limit) if prompt[i] != self._ids[i]), limit)
        # a mark inside the common prefix; one at the prompt's very end only with its logits
        usable = [
            m for m in self._marks
            if 0 < m[0] <= common and (m[0] < len(prompt) or m[2] is not None)
        ]  # fmt: skip
        if not usable or self._state is None:
            return 0
        at, mark, logits = usable[-1][:3]
        if not self._rewind(at, mark):  # a model whose cache cannot be cut there: afresh
            return 0
        self._resume_logits = logits if at == len(prompt) else None
        return at

    def _remember(self, logits: torch.Tensor | None, boundary: bool = False) -> None:
        """Mark the state as it holds `_ids` now, with the logits there if known (host memory).
        Beyond MAX_MARKS the oldest chunk boundary goes first, then the oldest prompt end."""
        at = len(self._ids)
        if any(m[0] == at for m in self._marks):
            return
        kept = None if logits is None else logits.detach().to("cpu", copy=True)
        self._marks.append((at, self._state.mark("cpu"), kept, boundary))
        while len(self._marks) > MAX_MARKS:
            oldest = next((i for i, m in enumerate(self._marks) if m[3]), 0)
            del self._marks[oldest]

    def _text_decoder(self):
        """A per-stream detokenizer: the tokenizer's own byte-level one where it has one (V4's:
        constant work per token), else `IncrementalDecoder` over its `decode`."""
        make = getattr(self.tokenizer, "stream_decoder", None)
        return make() if callable(make) else IncrementalDecoder(self.tokenizer.decode)

    def _kv_bytes(self) -> int | None:
        nbytes = getattr(self._state, "nbytes", None)
        return int(nbytes() if callable(nbytes) else nbytes) if nbytes is not None else None
