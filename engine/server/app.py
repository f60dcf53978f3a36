"""The HTTP application: routes, the guard in front of them, and OpenAI-style errors.

Order of checks for every request: Host header (a loopback server answers only to loopback host
names, which defeats DNS rebinding from a web page), API key, JSON content type for POSTs (a web
page cannot send one cross-origin without a CORS preflight, which this server never grants), and
body size (refused from Content-Length before reading, or while reading a chunked body).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashdesk import __version__
from flashdesk.engine.chat import ChatFormatError, Mode, ModeUnavailable, encode_messages
from flashdesk.engine.generate import ContextOverflowError

from . import protocol
from .generation import GenerationQueue, Job, QueueFullError, ServedModel
from .protocol import RequestError, error_body
from .schema import ChatCompletionRequest, error_responses

log = logging.getLogger("flashdesk.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a full 1M-token conversation is ~4-10 MB of JSON
KEEPALIVE_S = 10.0
INLINE_ENCODE_CHARS = 32_768


@dataclass(frozen=True)
class ServerOptions:
    """Settings of one server; the defaults are the safe ones (loopback, no key, small queue)."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    max_waiting: int = 4  # requests that may wait behind the running one before 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_mode: Mode = Mode.THINK_HIGH


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _error(status: int, message: str, kind: str, code: str | None = None, headers=None):
    return JSONResponse(error_body(message, kind, code=code), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: host check, API key, content type and body size, before any route runs.

    The body is read here (up to the limit) and replayed to the application, so a huge body is
    never buffered whole; later `receive` calls go to the server (the app sees the disconnect).
    """

    def __init__(self, app: ASGIApp, options: ServerOptions):
        self.app = app
        self.options = options
        self.check_host = is_loopback(options.host)
        self.key = options.api_key.encode() if options.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.options.max_body_bytes
        too_big = _error(
            413,
            f"The request body is larger than this server's limit of {limit:,} bytes. Send less "
            "text, or start the server with a larger --max-body-mb.",
            "invalid_request_error",
            code="request_too_large",
        )
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _error(400, "Content-Length is not a number.", "invalid_request_error")(
                    scope, receive, send
                )
                return
            if int(declared) > limit:
                await too_big(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await too_big(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]):
        if self.check_host and "host" in headers:
            host = headers["host"]
            name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if not is_loopback(name.lower()):
                return _error(
                    403,
                    f"This server listens on loopback only and answers to 127.0.0.1 or localhost, "
                    f"not {host!r}.",
                    "permission_error",
                )
        if self.key is not None:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.key
            ):
                what = "no API key was sent" if not auth else "the API key is wrong"
                return _error(
                    401,
                    f"This server needs an API key and {what}. Send it as "
                    "'Authorization: Bearer <key>' (the OpenAI clients' api_key).",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return _error(
                    415,
                    f"The request body must be JSON with 'Content-Type: application/json' "
                    f"(got {ctype or 'no content type'!r}).",
                    "invalid_request_error",
                )
        return None


class _SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving, so a disconnect cancels
    the generation even while nothing is being sent (queue wait, long prefill)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def wrap(func) -> None:
                await func()
                tg.cancel_scope.cancel()

            tg.start_soon(wrap, partial(self.stream_response, send))
            await wrap(partial(self.listen_for_disconnect, receive))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request is not valid.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return (
            f"The request body is not valid JSON ({ctx.get('error', 'parse error')}). Send a JSON "
            "object.",
            None,
        )
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return "Invalid request: " + "; ".join(parts) + more + ".", param


def create_app(
    provider: Callable[[], ServedModel | None],
    options: ServerOptions | None = None,
    queue: GenerationQueue | None = None,
) -> FastAPI:
    """The ASGI application. `provider()` returns the loaded model (None: nothing loaded)."""
    options = options or ServerOptions()
    queue = queue or GenerationQueue(options.max_waiting)
    app = FastAPI(
        title="FlashDesk local API",
        version=__version__,
        description="OpenAI-compatible Chat Completions for the DeepSeek-V4 model loaded in "
        "FlashDesk. Reasoning comes back as `reasoning_content`; tools use OpenAI's format.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.queue = queue
    app.state.options = options
    app.add_middleware(Guard, options=options)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        body = error_body(message, "invalid_request_error", param=param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (
                "No such endpoint. This server offers GET /v1/models and POST /v1/chat/completions."
            )
        elif exc.status_code == 405:
            message = "This endpoint does not accept that HTTP method."
        else:
            message = str(exc.detail)
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception):
        return _crash_response(exc)

    def served_model() -> ServedModel:
        served = provider()
        if served is None:
            raise RequestError(
                "No model is loaded. Load one in FlashDesk (or start `flashdesk serve --model "
                "DIR`) and retry.",
                status=503,
                kind="server_error",
                code="model_not_loaded",
            )
        return served

    def model_card(served: ServedModel) -> dict:
        return {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "flashdesk",
            "context_length": served.context_limit,
        }

    common = (401, 403)

    @app.get(
        "/v1/models",
        summary="The loaded model (an empty list when none is loaded)",
        responses=error_responses(*common),
    )
    async def list_models() -> dict:
        served = provider()
        return {"object": "list", "data": [model_card(served)] if served else []}

    @app.get(
        "/v1/models/{model_id:path}",
        summary="One model by id",
        responses=error_responses(*common, 404),
    )
    async def get_model(model_id: str) -> dict:
        served = provider()
        if served is None or served.name != model_id:
            raise RequestError(
                f"The model {model_id!r} is not loaded"
                + (f"; this server serves {served.name!r}." if served else "; none is loaded."),
                status=404,
                code="model_not_found",
            )
        return model_card(served)

    @app.post(
        "/v1/chat/completions",
        summary="Chat completion (streaming or not)",
        description="With `stream: true` the answer is Server-Sent Events: `data: {chunk}` "
        "lines (`chat.completion.chunk`), `: keep-alive` comments while queued or prefilling, "
        "and `data: [DONE]`; an error after the stream started comes as `data: {error}`.",
        responses=error_responses(*common, 400, 413, 415, 429, 500, 503),
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            return await _chat_completions(body, request)
        except (RequestError, StarletteHTTPException):
            raise
        except Exception as exc:  # answered here, so the server log gets one traceback, not two
            log.exception("chat completion failed")
            return _crash_response(exc)

    async def _chat_completions(body: ChatCompletionRequest, request: Request):
        served = served_model()
        mode = protocol.resolve_mode(body, options.default_mode)
        messages, tools = protocol.build_messages(body)
        stops = protocol.stop_strings(body)
        encode = partial(
            encode_messages,
            messages,
            mode,
            tools,
            tokenizer=served.tokenizer,
            context_tokens=served.context_limit,
        )
        try:
            # Short prompts encode in microseconds: a thread hop would cost more than it saves.
            # Long ones (documents: up to seconds) must not block the event loop.
            if _approx_chars(messages, tools) < INLINE_ENCODE_CHARS:
                prompt = encode()
            else:
                prompt = await anyio.to_thread.run_sync(encode)
        except ModeUnavailable as exc:
            raise RequestError(str(exc), param="reasoning_effort") from exc
        except ChatFormatError as exc:
            raise RequestError(f"The messages cannot be encoded: {exc}", param="messages") from exc
        params = protocol.sampling_params(body, len(prompt.ids), served.context_limit)
        job = Job(served, prompt.ids, params, asyncio.get_running_loop())
        try:
            queue.submit(job)
        except QueueFullError as exc:
            return JSONResponse(
                error_body(str(exc), "rate_limit_error", code="queue_full"),
                status_code=429,
                headers={"Retry-After": "1"},
            )
        except RuntimeError as exc:
            raise RequestError(
                "The server is stopping; retry once it is started again.", 503, kind="server_error"
            ) from exc
        turn = protocol.TurnAssembler(mode, stops)
        rid = protocol.new_id("chatcmpl")
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _SSEResponse(
                _sse(job, turn, rid, served.name, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async for batch in job.batches():
                for event in batch:
                    turn.feed(event)
                if turn.stopped_by_string:
                    job.cancel()
        except ContextOverflowError as exc:
            raise RequestError(str(exc), param="messages", code="context_length_exceeded") from exc
        finally:
            watcher.cancel()
            job.cancel()
        _check_not_interrupted(turn)
        return protocol.completion_response(rid, served.name, turn)

    return app


def _crash_response(exc: Exception) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"FlashDesk failed while handling the request ({type(exc).__name__}: {exc}). The "
            "server keeps running; see the log for details.",
            "server_error",
        ),
        status_code=500,
    )


def _approx_chars(messages: list[dict], tools: list[dict] | None) -> int:
    total = len(json.dumps(tools)) if tools else 0
    for msg in messages:
        total += len(msg.get("content") or "") + len(msg.get("reasoning_content") or "")
        total += sum(len(c["function"]["arguments"]) for c in msg.get("tool_calls") or ())
    return total


def _check_not_interrupted(turn: protocol.TurnAssembler) -> None:
    stats = turn.stats
    if stats is None or (stats.stop_reason == "cancelled" and not turn.stopped_by_string):
        raise RequestError(
            "The generation was cancelled before it finished (the server is stopping, or the "
            "model was stopped from the app). Retry the request.",
            status=503,
            kind="server_error",
            code="cancelled",
        )


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse_data(payload: dict | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


async def _sse(
    job: Job, turn: protocol.TurnAssembler, rid: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """The SSE body: a role chunk, one chunk per delta, the finish chunk, usage, [DONE]."""
    created = int(time.time())
    try:
        yield _sse_data(protocol.chunk(rid, model, created, {"role": "assistant", "content": ""}))
        async for batch in job.batches(keepalive_s=KEEPALIVE_S):
            if not batch:
                yield ": keep-alive\n\n"
                continue
            out = [
                _sse_data(protocol.chunk(rid, model, created, delta))
                for event in batch
                for delta in turn.feed(event)
            ]
            if out:
                yield "".join(out)
            if turn.stopped_by_string:
                job.cancel()
        _check_not_interrupted(turn)
        yield _sse_data(protocol.chunk(rid, model, created, {}, turn.finish_reason))
        if include_usage:
            final = protocol.chunk(rid, model, created, None)
            final["usage"] = turn.usage()
            yield _sse_data(final)
    except RequestError as exc:
        yield _sse_data(exc.body())
    except ContextOverflowError as exc:
        yield _sse_data(
            error_body(str(exc), "invalid_request_error", code="context_length_exceeded")
        )
    except Exception as exc:  # the headers are sent: report in-band, never crash the server
        log.exception("streaming generation failed")
        yield _sse_data(
            error_body(
                f"FlashDesk failed while generating ({type(exc).__name__}: {exc}).", "server_error"
            )
        )
    finally:
        job.cancel()
    yield _sse_data("[DONE]")
