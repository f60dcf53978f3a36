"""OpenAI Chat Completions <-> FlashDesk: messages and modes in, deltas and responses out.

Requests become V4 prompts through `engine.chat` (reasoning modes, DSML tools); the session's
events become OpenAI deltas: reasoning as `reasoning_content` (never inline `<think>`), answer text
as `content`, DSML tool-call blocks as OpenAI `tool_calls`. Stop strings are matched on the answer
text, holding back a possible partial match so a stop string never leaks out in pieces.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from flashdesk.engine.chat import EOS, THINK_END, CompletionStream, Mode
from flashdesk.engine.generate import SamplingParams, Stats, StreamEvent

from .schema import ChatCompletionRequest, ContentPart

MAX_STOP_STRINGS = 16


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# ------------------------------------------------------------------------------------------------
# Request -> prompt
# ------------------------------------------------------------------------------------------------

_EFFORT_ON = {"minimal", "low", "medium", "high", "xhigh", "max", "ultra"}
_EFFORT_MAX = {"max", "ultra"}


def resolve_mode(req: ChatCompletionRequest, default: Mode) -> Mode:
    """The reasoning mode from DeepSeek's `thinking`/`reasoning_effort` and Ollama's `think`.

    Each switch that is present votes thinking on or off; contradicting votes are refused rather
    than one silently winning. With no switch the server's default applies (DeepSeek's API
    default is thinking on, High effort).
    """
    votes: dict[str, bool] = {}
    if req.thinking is not None:
        votes["thinking"] = req.thinking.type == "enabled"
    if req.think is not None:
        votes["think"] = req.think is not False
    if req.reasoning_effort is not None:
        votes["reasoning_effort"] = req.reasoning_effort in _EFFORT_ON
    if len(set(votes.values())) > 1:
        said = ", ".join(f"{k} says thinking {'on' if v else 'off'}" for k, v in votes.items())
        raise RequestError(
            f"The thinking switches contradict each other ({said}). Send one of them, or make "
            "them agree.",
            param="thinking",
        )
    if not votes:
        return default
    if not next(iter(votes.values())):
        return Mode.NON_THINK
    wants_max = req.reasoning_effort in _EFFORT_MAX or req.think == "max"
    return Mode.THINK_MAX if wants_max else Mode.THINK_HIGH


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    """Message content as text; content parts V4 cannot read are refused, not dropped."""
    if content is None or isinstance(content, str):
        return content or ""
    pieces = []
    for k, part in enumerate(content):
        if part.type != "text":
            raise RequestError(
                f"{where}.content[{k}] is a {part.type!r} part; DeepSeek-V4-Flash reads text "
                "only. Send the content as text (extract text from documents first).",
                param=f"{where}.content",
            )
        if part.text is None:
            raise RequestError(
                f"{where}.content[{k}] is a text part without 'text'.", param=f"{where}.content"
            )
        pieces.append(part.text)
    return "\n".join(pieces)


def _find_unpaired_surrogate(value: Any, where: str) -> str | None:
    """Where in `value` a string holds a lone UTF-16 surrogate (valid JSON, not valid text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _find_unpaired_surrogate(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for k, item in enumerate(value):
            found = _find_unpaired_surrogate(item, f"{where}[{k}]")
            if found:
                return found
    return None


def build_messages(req: ChatCompletionRequest) -> tuple[list[dict], list[dict] | None]:
    """The request's messages as `engine.chat` dicts, and the tools to offer (None: no tools)."""
    bad = _find_unpaired_surrogate(req.model_dump(include={"messages", "tools"}), "")
    if bad:
        raise RequestError(
            f"{bad} contains an unpaired UTF-16 surrogate (an escape like \\ud800 without its "
            "pair), which is not text. Send valid Unicode.",
            param=bad,
        )
    if req.n not in (None, 1):
        raise RequestError(
            f"n={req.n}: FlashDesk generates one choice per request. Send n=1 (or leave it out) "
            "and repeat the request for more choices.",
            param="n",
        )
    if req.logprobs or req.top_logprobs:
        raise RequestError(
            "logprobs are not supported by FlashDesk's server; leave logprobs/top_logprobs out.",
            param="logprobs",
        )
    choice = req.tool_choice
    if choice is not None and not (isinstance(choice, str) and choice in ("none", "auto")):
        raise RequestError(
            "tool_choice must be 'auto' or 'none': DeepSeek-V4 decides itself whether to call a "
            "tool and cannot be forced to. Use 'auto' and describe in the prompt which tool to use.",
            param="tool_choice",
        )
    messages: list[dict] = []
    for k, msg in enumerate(req.messages):
        where = f"messages[{k}]"
        if msg.role in ("system", "developer"):
            messages.append({"role": "system", "content": _text(msg.content, where)})
        elif msg.role == "user":
            messages.append({"role": "user", "content": _text(msg.content, where)})
        elif msg.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": _text(msg.content, where)}
            if msg.reasoning_content:
                out["reasoning_content"] = msg.reasoning_content
            if msg.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": call.id or "",
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                    for call in msg.tool_calls
                ]
            messages.append(out)
        else:  # tool
            messages.append(
                {
                    "role": "tool",
                    "content": _text(msg.content, where),
                    "tool_call_id": msg.tool_call_id,
                }
            )
    if messages[-1]["role"] not in ("user", "tool"):
        raise RequestError(
            f"The last message is a {messages[-1]['role']!r} message; the model answers a 'user' "
            "or 'tool' message, so end the conversation with one.",
            param="messages",
        )
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        # DeepSeek's encoder states a response schema in the system message.
        schema = fmt.json_schema if fmt.type == "json_schema" else {"type": "json_object"}
        if schema is None:
            raise RequestError(
                "response_format of type 'json_schema' needs a 'json_schema' object.",
                param="response_format",
            )
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["response_format"] = schema
    tools = None
    if req.tools and choice != "none":
        tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    return messages, tools


def stop_strings(req: ChatCompletionRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(
            f"{len(stops)} stop strings given; at most {MAX_STOP_STRINGS} are allowed.",
            param="stop",
        )
    return [s for s in stops if s]


def sampling_params(
    req: ChatCompletionRequest, prompt_tokens: int, context_limit: int
) -> SamplingParams:
    """Sampling from the request; the answer may use whatever context the prompt leaves."""
    room = context_limit - prompt_tokens
    if room < 1:
        raise RequestError(
            f"The prompt is {prompt_tokens:,} tokens but the loaded model's context window holds "
            f"{context_limit:,} (at least 1 must stay free for the answer). Shorten the "
            "conversation or load the model with a larger context.",
            param="messages",
            code="context_length_exceeded",
        )
    asked = req.max_completion_tokens or req.max_tokens
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        max_tokens=min(asked, room) if asked else room,
    )


# ------------------------------------------------------------------------------------------------
# Session events -> OpenAI deltas
# ------------------------------------------------------------------------------------------------


class _StopMatcher:
    """Releases text up to the first stop string, holding back a possible partial match."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        text = self._held + text
        if not self.stops:
            self._held = ""
            return text
        first = min((k for k in (text.find(s) for s in self.stops) if k != -1), default=-1)
        if first != -1:
            self.hit = True
            self._held = ""
            return text[:first]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = ("" if self.hit else self._held), ""
        return held


_FINISH = {
    "eos": "stop",
    "stop_token": "stop",
    "max_tokens": "length",
    "context_full": "length",
}


@dataclass
class TurnAssembler:
    """Turns one generation's StreamEvents into OpenAI deltas and the final message."""

    mode: Mode
    stops: list[str] = field(default_factory=list)
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stats: Stats | None = None

    def __post_init__(self):
        self._parser = CompletionStream(self.mode)
        self._matcher = _StopMatcher(self.stops)
        self._phase = "reasoning" if self.mode.thinking else "answer"

    @property
    def stopped_by_string(self) -> bool:
        return self._matcher.hit

    def feed(self, event: StreamEvent) -> list[dict]:
        """Deltas for one session event (often none: prefill progress, held-back text)."""
        raw = ""
        if event.phase == "answer" and self._phase == "reasoning":
            raw += THINK_END  # the session consumes </think>; the parser wants to see it
        self._phase = event.phase
        raw += event.text
        if event.done:
            self.stats = event.stats
            if event.stats.stop_reason == "eos":
                raw += EOS
        deltas = self._deltas(self._parser.feed(raw)) if raw else []
        if event.done:
            deltas += self._close()
        return deltas

    def _deltas(self, events) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if ev.kind == "reasoning":
                self.reasoning += ev.text
                out.append({"reasoning_content": ev.text})
            elif ev.kind == "answer":
                text = self._matcher.feed(ev.text)
                if text:
                    self.content += text
                    out.append({"content": text})
            elif ev.kind == "tool_call" and not self._matcher.hit:
                call = ev.tool_call
                entry = {
                    "index": len(self.tool_calls),
                    "id": new_id("call"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                self.tool_calls.append(entry)
                out.append({"tool_calls": [entry]})
            elif ev.kind == "problem":
                self.problems.append(ev.text)
        return out

    def _close(self) -> list[dict]:
        out: list[dict] = []
        before_r, before_a = (
            len(self._parser.completion.reasoning),
            len(self._parser.completion.answer),
        )
        done = self._parser.close()
        self.problems.extend(p for p in done.problems if p not in self.problems)
        if len(done.reasoning) > before_r:
            tail = done.reasoning[before_r:]
            self.reasoning += tail
            out.append({"reasoning_content": tail})
        tail = self._matcher.feed(done.answer[before_a:]) + self._matcher.flush()
        if tail:
            self.content += tail
            out.append({"content": tail})
        return out

    @property
    def finish_reason(self) -> str:
        if self._matcher.hit:
            return "stop"
        if self.tool_calls:
            return "tool_calls"
        reason = self.stats.stop_reason if self.stats else None
        return _FINISH.get(reason or "", "stop")

    def usage(self) -> dict:
        s = self.stats or Stats()
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": s.reused_tokens},
            "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
        }

    def message(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning or self.mode.thinking:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in self.tool_calls
            ]
        return msg


def completion_response(rid: str, model: str, turn: TurnAssembler) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": turn.message(),
                "finish_reason": turn.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": turn.usage(),
    }


def chunk(
    rid: str, model: str, created: int, delta: dict | None, finish: str | None = None
) -> dict:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    )
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
