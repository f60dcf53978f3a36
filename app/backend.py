"""The small interface the window talks to, and its two implementations.

`Backend` is what the UI needs from a model: load it (with progress and cancel), encode a chat into
prompt ids, count tokens, stream one turn, cancel it, report memory. `EngineBackend` drives our
engine (`flashdesk.engine`: checkpoint, model, chat encoding, `generate.Session`); `ScriptedBackend`
is a deterministic stand-in used by the UI tests and by nothing else, so the window, the history
and the meters can be tested without torch work.

Every method may be slow and runs on a worker thread (see `workers.py`), except `cancel()`,
which the GUI thread calls while `stream()` runs elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from flashdesk.app.settings import MODES, THINK_MAX_MIN_CONTEXT

log = logging.getLogger("flashdesk.app.backend")

TEST_MODEL_LABEL = "test model — random weights"
Progress = Callable[[float, str], None]  # fraction 0..1, what is happening


class BackendError(Exception):
    """A failure to show the user: `message` says what happened and what to do next."""

    kind = "error"

    def __init__(self, message: str, *, kind: str | None = None):
        super().__init__(message)
        self.message = message
        if kind:
            self.kind = kind


class LoadCancelled(BackendError):
    kind = "cancelled"

    def __init__(self):
        super().__init__("Loading was cancelled. Load the model again from the Model menu.")


class PromptTooLong(BackendError):
    kind = "overflow"

    def __init__(self, prompt_tokens: int, context_limit: int):
        self.prompt_tokens = prompt_tokens
        self.context_limit = context_limit
        super().__init__(
            f"This prompt is {prompt_tokens:,} tokens, but the context window holds "
            f"{context_limit:,}. Remove a document or start a new chat, or raise the context "
            "in the hardware-fit wizard (Model ▸ Hardware fit…)."
        )


@dataclass
class ModelInfo:
    name: str
    context_limit: int
    test_model: bool = False
    plan_summary: str = ""
    device: str = "cpu"
    note: str = ""  # what kind of model this is, when it is not the real V4 weights

    @property
    def label(self) -> str:
        note = self.note or (TEST_MODEL_LABEL if self.test_model else "")
        return f"{self.name} ({note})" if note else self.name

    @property
    def think_max_allowed(self) -> bool:
        return self.context_limit >= THINK_MAX_MIN_CONTEXT


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 512


@dataclass
class Prompt:
    ids: list[int]
    text: str
    mode: str

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class TurnStats:
    """What the stats line and the meters show; mirrors `flashdesk.engine.generate.Stats`."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt, already in the model's state (not prefilled again)
    generated_tokens: int = 0
    reasoning_tokens: int = 0
    ttft_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    context_used: int = 0
    context_limit: int = 0
    kv_bytes: int | None = None
    draft_acceptance: float | None = None  # share of the MTP block's drafts kept, if it drafts
    stop_reason: str | None = None
    elapsed_s: float = 0.0
    reasoning_s: float | None = None  # wall time from the start to the end of reasoning

    @classmethod
    def from_any(cls, stats: Any) -> TurnStats:
        names = {f.name for f in fields(cls)}
        if isinstance(stats, dict):
            return cls(**{k: v for k, v in stats.items() if k in names})
        return cls(**{n: getattr(stats, n) for n in names if hasattr(stats, n)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TurnEvent:
    text: str
    phase: str  # "reasoning" | "answer"
    stats: TurnStats = field(default_factory=TurnStats)
    done: bool = False


class Backend(ABC):
    info: ModelInfo | None = None

    @abstractmethod
    def load(self, progress: Progress, is_cancelled: Callable[[], bool]) -> ModelInfo: ...

    @abstractmethod
    def encode(self, messages: Sequence[dict], mode: str) -> Prompt:
        """messages: [{'role': 'system'|'user'|'assistant', 'content', 'reasoning'?}]."""

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[TurnEvent]:
        """Raises PromptTooLong before any work when the prompt does not fit."""

    @abstractmethod
    def cancel(self) -> None: ...

    @abstractmethod
    def configure(
        self, model_path: str, context_limit: int, plan_summary: str, plan: dict | None = None
    ) -> None:
        """Settings changed (the fit wizard saved a plan, `plan`: its choices such as the KV
        format); takes effect at the next load()."""

    def document_tokenizer(self):
        """The tokenizer documents are counted with; None: the bundled V4 tokenizer."""
        return None

    def memory_in_use(self) -> dict[str, int | None]:
        """Bytes in use now: {'ram': process RSS, 'vram': GPU memory allocated or None}."""
        ram = None
        try:
            import psutil

            ram = psutil.Process().memory_info().rss
        except Exception:  # psutil missing or process info unavailable: show nothing
            pass
        vram = None
        torch = _torch_if_loaded() if self.info is not None else None  # never mid-import
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available():
            vram = int(cuda.memory_allocated())
        return {"ram": ram, "vram": vram}


def _torch_if_loaded():
    import sys

    return sys.modules.get("torch")


def check_mode(mode: str, info: ModelInfo | None) -> None:
    if mode not in MODES:
        raise BackendError(f"Unknown reasoning mode {mode!r}; pick one of {', '.join(MODES)}.")
    if mode == "Think Max" and info is not None and not info.think_max_allowed:
        raise BackendError(
            f"Think Max needs a context window of at least {THINK_MAX_MIN_CONTEXT // 1024}K tokens; "
            f"this model is loaded with {info.context_limit // 1024}K. Pick Think High, or raise "
            "the context in the hardware-fit wizard."
        )


MODE_VALUES = {"Non-think": "non-think", "Think High": "think-high", "Think Max": "think-max"}


def engine_messages(messages: Sequence[dict]) -> list[dict]:
    """The app's message dicts -> what `engine.chat.encode_messages` takes."""
    out = []
    for m in messages:
        item = {"role": m["role"], "content": m.get("content", "")}
        if m["role"] == "assistant" and m.get("reasoning"):
            item["reasoning_content"] = m["reasoning"]
        out.append(item)
    return out


def encode_text(messages: Sequence[dict], mode: str) -> str:
    from flashdesk.engine.chat import encode_messages

    return encode_messages(engine_messages(messages), MODE_VALUES[mode], tokenize=False).text


# --------------------------------------------------------------------------------------------
class ScriptedBackend(Backend):
    """Deterministic backend for UI tests: one character-level 'token' per character.

    The answer to a prompt is `reply(last user text)` (default: an echo with Markdown), streamed
    `chars_per_event` characters at a time with `delay_s` between events; in the think modes a
    reasoning part comes first. The prompt text is the real V4 encoding (`engine.chat`); its ids
    are one per character, so no tokenizer is loaded.
    """

    def __init__(
        self,
        *,
        context_limit: int = 8192,
        delay_s: float = 0.0,
        chars_per_event: int = 4,
        reply: Callable[[str], str] | None = None,
        load_delay_s: float = 0.0,
        fail_load: str | None = None,
        name: str = "scripted",
        note: str = "scripted replies, no model",
    ):
        self.name = name
        self.note = note
        self.plan_summary = "no engine"
        self.context_limit = context_limit
        self.delay_s = delay_s
        self.chars_per_event = chars_per_event
        self.reply = reply or (lambda text: f"You said: **{text}**\n\n```python\nprint(1)\n```")
        self.load_delay_s = load_delay_s
        self.fail_load = fail_load
        self._cancel = threading.Event()
        self.prompts: list[Prompt] = []

    def load(self, progress: Progress, is_cancelled: Callable[[], bool]) -> ModelInfo:
        steps = 10
        for i in range(steps):
            if is_cancelled():
                raise LoadCancelled()
            progress(i / steps, f"Loading part {i + 1} of {steps}")
            time.sleep(self.load_delay_s / steps)
        if self.fail_load:
            raise BackendError(self.fail_load, kind="load")
        progress(1.0, "Ready")
        self.info = ModelInfo(
            self.name,
            self.context_limit,
            test_model=True,
            plan_summary=self.plan_summary,
            note=self.note,
        )
        return self.info

    def encode(self, messages: Sequence[dict], mode: str) -> Prompt:
        check_mode(mode, self.info)
        text = encode_text(messages, mode)
        return Prompt([ord(c) for c in text], text, mode)

    def count_tokens(self, text: str) -> int:
        return len(text)

    def cancel(self) -> None:
        self._cancel.set()

    def configure(
        self, model_path: str, context_limit: int, plan_summary: str, plan: dict | None = None
    ) -> None:
        self.context_limit = int(context_limit)
        self.plan_summary = plan_summary

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[TurnEvent]:
        if prompt.tokens >= self.context_limit:
            raise PromptTooLong(prompt.tokens, self.context_limit)
        self.prompts.append(prompt)
        self._cancel.clear()
        from flashdesk.engine.chat import ASSISTANT, USER

        user_text = prompt.text.rsplit(USER, 1)[-1].split(ASSISTANT)[0]
        answer = self.reply(user_text)
        parts = []
        if prompt.mode != "Non-think":
            parts.append(("reasoning", f"The user wrote {len(user_text)} characters. Reply."))
        parts.append(("answer", answer))
        start = time.perf_counter()
        stats = TurnStats(prompt_tokens=prompt.tokens, context_limit=self.context_limit)
        generated = 0
        for phase, text in parts:
            for i in range(0, len(text), self.chars_per_event):
                if self._cancel.is_set():
                    stats.stop_reason = "cancelled"
                    yield TurnEvent("", phase, stats, done=True)
                    return
                if generated >= sampling.max_tokens:
                    stats.stop_reason = "max_tokens"
                    yield TurnEvent("", phase, stats, done=True)
                    return
                time.sleep(self.delay_s)
                piece = text[i : i + self.chars_per_event][: sampling.max_tokens - generated]
                generated += len(piece)
                elapsed = time.perf_counter() - start
                stats = TurnStats(
                    prompt_tokens=prompt.tokens,
                    generated_tokens=generated,
                    reasoning_tokens=stats.reasoning_tokens + len(piece) * (phase == "reasoning"),
                    ttft_s=stats.ttft_s if stats.ttft_s is not None else elapsed,
                    prefill_tok_s=prompt.tokens / max(elapsed, 1e-6),
                    decode_tok_s=generated / max(elapsed, 1e-6),
                    context_used=prompt.tokens + generated,
                    context_limit=self.context_limit,
                    kv_bytes=(prompt.tokens + generated) * 64,
                )
                yield TurnEvent(piece, phase, stats)
        stats.stop_reason = "eos"
        yield TurnEvent("", "answer", stats, done=True)
