"""DeepSeek-V4 prompt encoding, the three reasoning modes, and completion parsing (DSML tool calls).

V4 ships no Jinja template: prompts must be byte-identical to DeepSeek's own encoder
(`encoding/encoding_dsv4.py`, spec §5.2-5.4), or the model answers worse. This module is our own
implementation of that format; `tests/test_chat.py` checks it against the official golden files.

Messages are OpenAI-style dicts: `{"role": "system"|"user"|"assistant"|"tool", "content": str}`,
assistant turns may carry `reasoning_content` and OpenAI `tool_calls`, tool results carry
`tool_call_id`. The official extras are accepted too: roles `developer` and `latest_reminder`,
per-message `tools`, `response_format`, `task` (quick-instruction tokens), `wo_eos`,
`content_blocks`.

Public API:
  encode_messages(messages, mode, tools=None, ...) -> EncodedPrompt(text, ids)
  parse_completion(text, mode=None, strict=False) -> Completion(reasoning, answer, tool_calls, ...)
  CompletionStream(mode): feed(text_delta) -> list[StreamEvent]; close() -> Completion
  TurnStream(mode, tokenizer=None): push(token_id) -> list[StreamEvent]; close() -> Completion
  check_mode(mode, context_tokens) / mode_available(...): Think Max needs >= 384K context.
"""

from __future__ import annotations

import copy
import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashdesk.engine.tokenizer import V4Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"

TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# Copied byte for byte from REASONING_EFFORT_MAX in DeepSeek's encoding_dsv4.py (a golden test
# checks the rendered prompt against the official text).
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)

_TOOLS_BLOCK = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_BLOCK_END = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke "
    "tool calls.\n"
)
_RESPONSE_FORMAT = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
)
TOOL_CALLS_START = f"\n\n<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"

# Model card: Think Max wants a context window of at least 384K tokens.
THINK_MAX_MIN_CONTEXT = 384 * 1024


class Mode(str, enum.Enum):
    """The three reasoning modes of V4 (spec §5.3)."""

    NON_THINK = "non-think"
    THINK_HIGH = "think-high"
    THINK_MAX = "think-max"

    @property
    def thinking(self) -> bool:
        return self is not Mode.NON_THINK

    @property
    def label(self) -> str:
        return {"non-think": "Non-think", "think-high": "Think High", "think-max": "Think Max"}[
            self.value
        ]


class ChatFormatError(ValueError):
    """Messages that cannot be encoded, or a completion that does not parse (strict mode)."""


class ModeUnavailable(ValueError):
    """A reasoning mode the current context size does not allow; the message says why."""


def mode_available(mode: Mode | str, context_tokens: int) -> tuple[bool, str]:
    """Whether `mode` may be used with a context of `context_tokens`, and why not if it may not.

    Think Max needs at least 384K tokens of context (model card); the app greys it out otherwise.
    """
    mode = Mode(mode)
    if mode is Mode.THINK_MAX and context_tokens < THINK_MAX_MIN_CONTEXT:
        return False, (
            f"Think Max needs a context window of at least {THINK_MAX_MIN_CONTEXT:,} tokens (384K, "
            f"DeepSeek's recommendation); this session has {context_tokens:,}. Raise the context "
            "size if your memory plan allows it, or use Think High."
        )
    return True, ""


def check_mode(mode: Mode | str, context_tokens: int) -> Mode:
    """`Mode(mode)`, or ModeUnavailable when the context is too small for it."""
    ok, why = mode_available(mode, context_tokens)
    if not ok:
        raise ModeUnavailable(why)
    return Mode(mode)


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt: the exact text and its token ids (`ids` is None if not tokenized)."""

    text: str
    ids: list[int] | None
    mode: Mode

    def __len__(self) -> int:
        if self.ids is None:
            raise TypeError("this prompt was encoded without a tokenizer; it has no ids")
        return len(self.ids)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (UnicodeEncodeError, ValueError):  # lone surrogates cannot be written as UTF-8
        return json.dumps(value, ensure_ascii=True)


def render_tools(tools: Sequence[dict]) -> str:
    """The `## Tools` block for OpenAI-format tools (`{"type": "function", "function": {...}}`)."""
    functions = []
    for tool in tools:
        if not isinstance(tool, dict) or "function" not in tool:
            raise ChatFormatError(
                f"A tool must be an OpenAI tool object {{'type': 'function', 'function': {{...}}}}; "
                f"got {tool!r}."
            )
        functions.append(_json(tool["function"]))
    return _TOOLS_BLOCK + "\n".join(functions) + _TOOLS_BLOCK_END


def _dsml_arguments(arguments: Any) -> str:
    """OpenAI tool-call arguments (a JSON string) as DSML parameter lines."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = {"arguments": arguments}
    else:
        parsed = arguments
    if not isinstance(parsed, dict):  # official code would fail here; keep the value visible
        parsed = {"arguments": arguments}
    lines = []
    for key, value in parsed.items():
        is_str = isinstance(value, str)
        lines.append(
            f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">'
            f"{value if is_str else _json(value)}</{DSML}parameter>"
        )
    return "\n".join(lines)


def _render_tool_calls(tool_calls: Sequence[dict]) -> str:
    invokes = []
    for call in tool_calls:
        fn = call.get("function", call)
        invokes.append(
            f'<{DSML}invoke name="{fn.get("name")}">\n'
            f"{_dsml_arguments(fn.get('arguments', '{}'))}\n</{DSML}invoke>"
        )
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _fold_tool_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI `tool` messages become `<tool_result>` blocks of a user turn (V4 has no tool role).

    Consecutive tool results and the user text that follows them share one user turn; results are
    ordered like the calls of the assistant turn before them.
    """
    folded: list[dict] = []
    for original in messages:
        msg = copy.deepcopy(original)
        role = msg.get("role")
        last = folded[-1] if folded else None
        joinable = last is not None and last.get("role") == "user" and "content_blocks" in last
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if joinable:
                last["content_blocks"].append(block)
            else:
                folded.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if joinable and last.get("task") is None:
                last["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                folded.append(new)
        else:
            folded.append(msg)

    call_order: dict[str, int] = {}
    for msg in folded:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            call_order = {}
            for k, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    call_order[call_id] = k
        elif msg.get("role") == "user" and msg.get("content_blocks") and call_order:
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1:
                results.sort(key=lambda b: call_order.get(b.get("tool_use_id", ""), 0))
                it = iter(results)
                msg["content_blocks"] = [
                    next(it) if b.get("type") == "tool_result" else b for b in msg["content_blocks"]
                ]
    return folded


def _user_text(msg: dict) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return msg.get("content") or ""
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "tool_result":
            result = block.get("content", "")
            if isinstance(result, list):
                result = "\n\n".join(
                    b.get("text", "")
                    if b.get("type") == "text"
                    else f"[Unsupported {b.get('type')}]"
                    for b in result
                )
            parts.append(f"<tool_result>{result}</tool_result>")
        else:
            parts.append(f"[Unsupported {kind}]")
    return "\n\n".join(parts)


def _last_user_index(messages: Sequence[dict]) -> int:
    for k in range(len(messages) - 1, -1, -1):
        if messages[k].get("role") in ("user", "developer"):
            return k
    return -1


_ALWAYS_KEPT = ("user", "system", "tool", "latest_reminder", "direct_search_results")


def _drop_old_reasoning(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistant turns lose their reasoning, developer turns vanish."""
    last_user = _last_user_index(messages)
    kept = []
    for k, msg in enumerate(messages):
        role = msg.get("role")
        if k >= last_user or role in _ALWAYS_KEPT:
            kept.append(msg)
        elif role == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            kept.append(msg)
    return kept


def _render(k: int, messages: list[dict], thinking: bool, drop: bool, max_effort: bool) -> str:
    msg = messages[k]
    role = msg.get("role")
    content = msg.get("content")
    tools = msg.get("tools")
    response_format = msg.get("response_format")
    last_user = _last_user_index(messages)
    out = THINK_MAX_PREFIX if (k == 0 and thinking and max_effort) else ""

    def extras() -> str:
        text = ""
        if tools:
            text += "\n\n" + render_tools(tools)
        if response_format:
            text += "\n\n" + _RESPONSE_FORMAT + _json(response_format)
        return text

    if role == "system":
        out += (content or "") + extras()
    elif role == "developer":
        if not content:
            raise ChatFormatError(f"A developer message needs content: {msg!r}")
        out += USER + content + extras()
    elif role == "user":
        out += USER + _user_text(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + (content or "")
    elif role == "assistant":
        reasoning = ""
        after_task = k > 0 and messages[k - 1].get("task") is not None
        if thinking and not after_task and (not drop or k > last_user):
            reasoning = (msg.get("reasoning_content") or "") + THINK_END
        calls = _render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
        out += reasoning + (content or "") + calls + ("" if msg.get("wo_eos") else EOS)
    elif role == "tool":
        raise ChatFormatError("internal: tool messages must be folded into user turns first")
    else:
        raise ChatFormatError(
            f"Unknown message role {role!r}; use system, user, assistant or tool."
        )

    # What follows the message: the assistant's turn opener, or a quick-instruction token.
    if k + 1 < len(messages) and messages[k + 1].get("role") not in (
        "assistant",
        "latest_reminder",
    ):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ChatFormatError(f"Unknown task {task!r}; known: {sorted(TASK_TOKENS)}")
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop or k >= last_user)
        out += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return out


def encode_messages(
    messages: Sequence[dict],
    mode: Mode | str,
    tools: Sequence[dict] | None = None,
    *,
    tokenizer: V4Tokenizer | None = None,
    tokenize: bool = True,
    drop_thinking: bool = True,
    context_tokens: int | None = None,
) -> EncodedPrompt:
    """Render a conversation as V4's prompt text (byte-exact with DeepSeek's encoder) and its ids.

    messages: OpenAI-style dicts (see the module docstring); not modified.
    mode: a Mode or its value ("non-think", "think-high", "think-max").
    tools: OpenAI tools; attached to the first message when it is a system message, otherwise to a
        new empty system message in front (the official encoder reads tools from a message).
    tokenizer: defaults to the bundled V4 tokenizer; `tokenize=False` returns text only.
    drop_thinking: drop earlier turns' reasoning (DeepSeek's default); always off when any message
        defines tools, so tool-using turns keep their reasoning.
    context_tokens: when given, Think Max is refused below 384K (ModeUnavailable).
    The prompt ends with `<｜Assistant｜>` plus `<think>` (Think High/Max) or `</think>`
    (Non-think) when the last message is a user or tool turn.
    """
    mode = Mode(mode)
    if context_tokens is not None:
        check_mode(mode, context_tokens)
    msgs = [dict(m) for m in messages]
    for m in msgs:
        if not isinstance(m.get("role"), str):
            raise ChatFormatError(f"Every message needs a 'role'; got {m!r}.")
    if tools:
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["tools"] = list(tools)
        else:
            msgs.insert(0, {"role": "system", "content": "", "tools": list(tools)})

    msgs = _fold_tool_messages(msgs)
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if mode.thinking and drop:
        msgs = _drop_old_reasoning(msgs)
    text = BOS + "".join(
        _render(k, msgs, mode.thinking, drop, mode is Mode.THINK_MAX) for k in range(len(msgs))
    )
    ids = None
    if tokenize:
        if tokenizer is None:
            from flashdesk.engine.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        ids = tokenizer.encode(text)
    return EncodedPrompt(text=text, ids=ids, mode=mode)


# ------------------------------------------------------------------------------------------------
# Parsing model output
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One DSML invoke: `arguments` is the JSON text (OpenAI style), `parsed` the decoded dict."""

    name: str
    arguments: str
    parsed: dict | None

    def to_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    """A parsed assistant turn.

    finished: the model ended its turn (EOS seen); False for a stopped or cut-off generation.
    problems: what did not parse (malformed DSML, missing </think>, ...); the raw text of a block
        that did not parse stays in `answer`, so nothing the model wrote is lost.
    """

    reasoning: str = ""
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: bool = False
    problems: list[str] = field(default_factory=list)

    def to_message(self) -> dict:
        """The OpenAI-style assistant message to store in the history and encode next turn."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.answer}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


_INVOKE_RE = re.compile(rf'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>\n', flags=re.DOTALL)
_PARAM_RE = re.compile(
    rf'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>\n',
    flags=re.DOTALL,
)


def parse_tool_calls(block: str) -> list[ToolCall]:
    """The invokes of one DSML block (the text between `<｜DSML｜tool_calls>` and its end tag).

    Raises ChatFormatError when the block is not well formed.
    """
    if not block.startswith("\n"):
        raise ChatFormatError(f"Tool-call block must start with a newline: {block[:60]!r}")
    pos = 1
    calls = []
    while pos < len(block):
        m = _INVOKE_RE.match(block, pos)
        if m is None:
            raise ChatFormatError(f"Malformed DSML invoke: {block[pos : pos + 80]!r}")
        name, body = m.group(1), m.group(2)
        params: dict[str, tuple[str, bool]] = {}
        p = 0
        if not body.strip("\n"):  # no parameters: the encoder writes an empty line here
            p = len(body)
        while p < len(body):
            pm = _PARAM_RE.match(body, p)
            if pm is None:
                raise ChatFormatError(f"Malformed DSML parameter in {name!r}: {body[p : p + 80]!r}")
            if pm.group(1) in params:
                raise ChatFormatError(f"Duplicate parameter {pm.group(1)!r} in call to {name!r}")
            params[pm.group(1)] = (pm.group(3), pm.group(2) == "true")
            p = pm.end()
        # Same JSON text as the official decoder: strings quoted, other values verbatim.
        arguments = (
            "{"
            + ", ".join(f"{_json(k)}: {_json(v) if s else v}" for k, (v, s) in params.items())
            + "}"
        )
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        calls.append(ToolCall(name=name, arguments=arguments, parsed=parsed))
        pos = m.end()
    return calls


def parse_completion(text: str, mode: Mode | str | None = None, strict: bool = False) -> Completion:
    """Split generated text (what follows the prompt) into reasoning, answer and tool calls.

    mode: the mode the prompt was encoded with; with None, text before a `</think>` is reasoning.
    strict: raise ChatFormatError on anything DeepSeek's own parser rejects; by default problems
        are listed in `Completion.problems` and the text is kept.
    A missing EOS (generation stopped by the user or a limit) is not a problem: `finished=False`.
    """
    stream = CompletionStream(mode if mode is not None else _guess_mode(text))
    stream.feed(text)
    result = stream.close()
    if strict and result.problems:
        raise ChatFormatError("; ".join(result.problems))
    if strict:
        for token in (BOS, EOS, THINK_START, THINK_END, DSML):
            if token in result.answer or token in result.reasoning:
                raise ChatFormatError(f"Unexpected special token {token!r} in the content")
    return result


def _guess_mode(text: str) -> Mode:
    return Mode.THINK_HIGH if THINK_END in text else Mode.NON_THINK


@dataclass(frozen=True)
class StreamEvent:
    """One piece of streamed output.

    kind: "reasoning" or "answer" (text in `text`), "tool_call" (a parsed call in `tool_call`),
    "phase" (the phase changed to `phase`), or "problem" (text says what did not parse).
    """

    kind: str
    text: str = ""
    tool_call: ToolCall | None = None
    phase: str = ""


class CompletionStream:
    """Incremental `parse_completion`: feed text as it is decoded, get typed events.

    Phases: "reasoning" (thinking modes start here) -> "answer" -> "tool_calls" -> "done". Markers
    that arrive split over several deltas are held back until they are complete, so reasoning never
    shows a piece of `</think>` and the answer never shows a piece of the DSML block.
    """

    def __init__(self, mode: Mode | str):
        self.mode = Mode(mode)
        self.phase = "reasoning" if self.mode.thinking else "answer"
        self._pending = ""  # text not yet attributed (might be the start of a marker)
        self._block = ""  # text of the DSML block so far
        self._result = Completion()
        self._after = ""  # text after the DSML block, before EOS (should be empty)

    @property
    def completion(self) -> Completion:
        """What has been parsed so far (reasoning/answer grow as text arrives)."""
        return self._result

    def feed(self, delta: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self._pending += delta
        while self._pending and self.phase != "done":
            before = (self.phase, len(self._pending))
            self._step(events, final=False)
            if (self.phase, len(self._pending)) == before:
                break
        if self.phase == "done" and self._pending:
            self._after += self._pending
            self._pending = ""
        return events

    def close(self) -> Completion:
        """End of generation: flush held-back text, report an unfinished DSML block."""
        events: list[StreamEvent] = []
        while self._pending and self.phase != "done":
            self._step(events, final=True)
        r = self._result
        if self.phase == "reasoning":
            r.problems.append(
                "The model stopped while still reasoning (no </think>); there is no answer."
            )
        elif self.phase == "tool_calls":
            r.problems.append("The tool-call block was cut off before its end tag.")
            r.answer += TOOL_CALLS_START + self._block
            self._block = ""
        after = self._after
        if not r.finished and after.startswith(EOS):  # EOS right after the DSML block
            r.finished = True
            after = after[len(EOS) :]
        if after:
            r.problems.append(f"Unexpected text after the end of the turn: {after[:80]!r}")
        return r

    # -- internals -----------------------------------------------------------------------------

    def _emit(self, events: list[StreamEvent], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self._result.reasoning += text
        else:
            self._result.answer += text
        events.append(StreamEvent(kind, text=text))

    def _set_phase(self, events: list[StreamEvent], phase: str) -> None:
        self.phase = phase
        events.append(StreamEvent("phase", phase=phase))

    def _step(self, events: list[StreamEvent], final: bool) -> None:
        text = self._pending
        if self.phase == "reasoning":
            markers = (THINK_END, TOOL_CALLS_START, EOS)
        elif self.phase == "answer":
            markers = (TOOL_CALLS_START, EOS)
        else:  # tool_calls
            markers = (TOOL_CALLS_END,)
        hit, where = _first_marker(text, markers)
        if hit is None:
            keep = 0 if final else _partial_marker_len(text, markers)
            body, self._pending = text[: len(text) - keep], text[len(text) - keep :]
            if self.phase == "tool_calls":
                self._block += body
                if final:
                    self._pending = ""
            else:
                self._emit(events, self.phase, body)
                if final:
                    self._pending = ""
            return
        body, self._pending = text[:where], text[where + len(hit) :]
        if self.phase == "tool_calls":
            self._block += body
            self._finish_block(events)
            return
        self._emit(events, self.phase, body)
        if hit == THINK_END:
            self._set_phase(events, "answer")
        elif hit == TOOL_CALLS_START:
            if self.phase == "reasoning":
                self._result.problems.append("Tool calls started before </think>.")
            self._set_phase(events, "tool_calls")
        else:  # EOS
            if self.phase == "reasoning":
                self._result.problems.append("The turn ended without </think>.")
            self._result.finished = True
            self._set_phase(events, "done")

    def _finish_block(self, events: list[StreamEvent]) -> None:
        block, self._block = self._block, ""
        try:
            calls = parse_tool_calls(block)
        except ChatFormatError as exc:
            self._result.problems.append(str(exc))
            events.append(StreamEvent("problem", text=str(exc)))
            raw = TOOL_CALLS_START + block + TOOL_CALLS_END
            self._emit(events, "answer", raw)
        else:
            for call in calls:
                self._result.tool_calls.append(call)
                events.append(StreamEvent("tool_call", tool_call=call))
        self._set_phase(events, "done")  # only EOS may follow; close() checks the rest


def _first_marker(text: str, markers: Sequence[str]) -> tuple[str | None, int]:
    best, where = None, len(text)
    for m in markers:
        k = text.find(m)
        if k != -1 and k < where:
            best, where = m, k
    return best, where


def _partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return longest


class TurnStream:
    """Generated token ids of one assistant turn -> typed events (decode + parse in one place).

    Characters split over several tokens are held back until whole (StreamDecoder), markers split
    over several tokens until complete (CompletionStream). Push the EOS id too: it ends the turn.
    """

    def __init__(self, mode: Mode | str, tokenizer: V4Tokenizer | None = None):
        if tokenizer is None:
            from flashdesk.engine.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self._decoder = tokenizer.stream_decoder()
        self._parser = CompletionStream(mode)

    @property
    def phase(self) -> str:
        return self._parser.phase

    @property
    def completion(self) -> Completion:
        return self._parser.completion

    def push(self, token_id: int) -> list[StreamEvent]:
        text = self._decoder.push(token_id)
        return self._parser.feed(text) if text else []

    def close(self) -> Completion:
        tail = self._decoder.flush()
        if tail:
            self._parser.feed(tail)
        return self._parser.close()
