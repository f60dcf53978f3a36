"""The request bodies the server accepts, as pydantic models (they also make the OpenAPI document).

They follow OpenAI's Chat Completions API, plus DeepSeek's `thinking` and Ollama's `think`.
Unknown fields are accepted and ignored, as other OpenAI-compatible servers do, because clients
send many optional fields; fields that would change the result and that FlashDesk cannot honour
(n > 1, logprobs, a forced tool choice) are refused with a message by the handler instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# torch.Generator.manual_seed accepts exactly this range.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Lenient):
    """One part of a multi-part message content; only `text` parts can be read by V4."""

    type: str
    text: str | None = None


Content = str | list[ContentPart]


class FunctionCall(_Lenient):
    name: str
    arguments: str = Field(description="The arguments as a JSON object in a string.")


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Lenient):
    role: Literal["system", "developer"] = Field(
        description="`developer` is OpenAI's newer name for `system` and is treated the same."
    )
    content: Content
    name: str | None = None


class UserMessage(_Lenient):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Lenient):
    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = Field(
        default=None,
        description="The reasoning the server returned for this turn; send it back in tool-use "
        "conversations (V4 keeps reasoning in context when tools are defined).",
    )
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(_Lenient):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class Thinking(_Lenient):
    type: Literal["enabled", "disabled"]


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Lenient):
    """POST /v1/chat/completions."""

    model: str | None = Field(
        default=None,
        description="Accepted for compatibility: the server answers with the model it has loaded "
        "(its id is in every response and in GET /v1/models).",
    )
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="Extension: 0 disables top-k.")
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(
        default=None, description="Up to 16 strings; the answer ends before the first one."
    )
    n: int | None = Field(default=None, ge=1, description="Only 1 is supported.")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="`none` or `auto`; V4 cannot be forced to call a tool."
    )
    parallel_tool_calls: bool | None = None
    reasoning_effort: (
        Literal["none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra"] | None
    ) = Field(
        default=None,
        description="DeepSeek's mapping: `none` turns thinking off; minimal/low/medium/high/xhigh "
        "think at High effort; max/ultra at Max effort (needs a context of 384K tokens or more).",
    )
    thinking: Thinking | None = Field(
        default=None, description="DeepSeek's switch; thinking is on by default."
    )
    think: bool | Literal["low", "medium", "high", "max"] | None = Field(
        default=None, description="Ollama's switch: true/false, or an effort (`max` is Think Max)."
    )
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Accepted and ignored, as DeepSeek's API does."
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, description="Accepted and ignored, as DeepSeek's API does."
    )
    user: str | None = None


class ErrorDetail(BaseModel):
    message: str = Field(description="What happened and what to do.")
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, "
        "rate_limit_error or server_error"
    )
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI-shaped."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route can answer with."""
    meaning = {
        400: "Malformed JSON, wrong types, or a request the model cannot honour",
        401: "API key missing or wrong (only when the server has one)",
        403: "Host header is not a loopback name (DNS-rebinding guard)",
        404: "No such model",
        413: "Request body over the server's limit",
        415: "Body is not application/json",
        429: "Queue full; retry after the Retry-After seconds",
        500: "FlashDesk failed; the message says how",
        503: "No model loaded, or the server is stopping",
    }
    return {s: {"model": ErrorResponse, "description": meaning[s]} for s in statuses}
