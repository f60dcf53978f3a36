"""The local OpenAI-compatible server, over real loopback HTTP.

A scripted fake model stands in for V4 (real tokenizer, real prompt format, scripted answers), so
the protocol is tested fast: the official `openai` client streaming and not, reasoning apart from
the answer, tools round trip, the three modes, bad requests (each a 4xx with a message), a
schemathesis run against the published OpenAPI document, the queue (429 when full), cancellation
on disconnect, and bounded load (200 sequential, 20 concurrent). The test on the tiny native model
is in tests/test_server_model.py.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from flashdesk.engine.chat import DSML, EOS, THINK_END, THINK_START, Mode
from flashdesk.engine.generate import Session
from flashdesk.engine.server import (
    DEFAULT_PORT,
    ServedModel,
    ServerOptions,
    ServerStartError,
    start_server,
)
from flashdesk.engine.server.protocol import _StopMatcher
from flashdesk.engine.tokenizer import VOCAB_SIZE, load_tokenizer

TOKENIZER = load_tokenizer()
KEY = "test-key-123"

# ------------------------------------------------------------------------------------------------
# A scripted stand-in for the model
# ------------------------------------------------------------------------------------------------

TOOL_CALL = (
    f"\n\n<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="days" string="false">2</{DSML}parameter>\n'
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>"
)
REASONING = "The user wants an answer; I will give it."


def scripted_reply(prompt: str) -> str:
    """What the fake writes after `prompt`: a tool call when tools are offered and no result came
    back yet, an answer quoting the result once one did, else an echo of the last user text."""
    reasoning = REASONING + THINK_END if prompt.endswith(THINK_START) else ""
    last_user = prompt.rsplit("<｜User｜>", 1)[-1].split("<｜Assistant｜>", 1)[0]
    results = re.findall(r"<tool_result>(.*?)</tool_result>", last_user, flags=re.DOTALL)
    if results:
        return reasoning + f"The weather: {results[-1]}." + EOS
    if "## Tools" in prompt:
        return reasoning + "Let me look that up." + TOOL_CALL + EOS
    return reasoning + f"You said: {last_user}" + EOS


class _State:
    def __init__(self):
        self.fed: list[int] = []
        self.script: list[int] = []
        self.step = 0

    def nbytes(self) -> int:
        return 4 * len(self.fed)


class ScriptedChatModel:
    """The generate.py model contract; `delay_s` per decode step, `endless` never stops."""

    def __init__(self, delay_s: float = 0.0, endless: bool = False):
        self.delay_s = delay_s
        self.endless = endless
        self.prompts: list[str] = []
        self.decode_calls = 0
        self._lock = threading.Lock()
        self._logits_buf = torch.zeros(VOCAB_SIZE)  # one generation at a time per model
        self._hot = 0

    def new_state(self) -> _State:
        return _State()

    def _logits(self, state: _State) -> torch.Tensor:
        script = state.script[:-1] if self.endless else state.script  # endless: skip the EOS
        if self.endless:
            token = script[state.step % len(script)]
        else:
            token = script[min(state.step, len(script) - 1)]
        # One-hot logits in one reused buffer: a fresh (or re-zeroed) vocab-sized tensor per step
        # costs more than everything else here on a busy 2-core machine.
        self._logits_buf[self._hot] = 0.0
        self._logits_buf[token] = 30.0
        self._hot = token
        return self._logits_buf

    def prefill(self, ids, state: _State) -> torch.Tensor:
        state.fed.extend(int(t) for t in ids)
        prompt = TOKENIZER.decode(state.fed)
        with self._lock:
            self.prompts.append(prompt)
        state.script = TOKENIZER.encode(scripted_reply(prompt))
        state.step = 0
        return self._logits(state)

    def decode(self, token_id: int, state: _State) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.decode_calls += 1
        state.fed.append(int(token_id))
        state.step += 1
        return self._logits(state)


def make_served(delay_s=0.0, endless=False, context_limit=4096) -> ServedModel:
    model = ScriptedChatModel(delay_s=delay_s, endless=endless)
    return ServedModel("fake-v4", Session(model, TOKENIZER, context_limit=context_limit), TOKENIZER)


class Server:
    """A started server, its model, and small HTTP helpers."""

    def __init__(self, served: ServedModel | None, **kwargs):
        self.served = served
        self.handle = start_server(lambda: self.served, port=0, **kwargs)
        self.port = self.handle.port
        self.key = kwargs.get("api_key")

    @property
    def model(self) -> ScriptedChatModel:
        return self.served.session.model

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.handle.url, api_key=self.key or "none", **kwargs)

    def request(self, method, path, body=None, headers=None, conn=None, raw: bytes | None = None):
        """(status, parsed JSON or text, headers) over loopback."""
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {"Content-Type": "application/json"}
        if self.key:
            hdrs["Authorization"] = f"Bearer {self.key}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers={k: v for k, v in hdrs.items() if v})
            resp = conn.getresponse()
            text = resp.read().decode()
            try:
                payload = json.loads(text)
            except ValueError:
                payload = text
            return resp.status, payload, dict(resp.getheaders())
        finally:
            if own:
                conn.close()

    def chat(self, content="hello", **fields):
        """One user message; greedy unless told (sampling over 129K logits is slow on 2 cores)."""
        fields.setdefault("temperature", 0)
        body = {"model": "fake-v4", "messages": [{"role": "user", "content": content}], **fields}
        return self.request("POST", "/v1/chat/completions", body)

    def wait_idle(self, timeout=10.0):
        end = time.monotonic() + timeout
        while self.handle.pending and time.monotonic() < end:
            time.sleep(0.01)
        return self.handle.pending == 0

    def stop(self):
        self.handle.stop()


@pytest.fixture
def server():
    srv = Server(make_served())
    yield srv
    srv.stop()


@pytest.fixture
def keyed():
    srv = Server(make_served(), api_key=KEY)
    yield srv
    srv.stop()


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

# ------------------------------------------------------------------------------------------------
# The official openai client
# ------------------------------------------------------------------------------------------------


def test_openai_client_non_streaming_reasoning_apart_and_usage(server):
    resp = server.client().chat.completions.create(model="anything", messages=USER)
    choice = resp.choices[0]
    assert resp.model == "fake-v4" and resp.object == "chat.completion"
    assert choice.finish_reason == "stop"
    assert choice.message.content == "You said: What is the weather in Paris?"
    # Default mode is DeepSeek's (thinking, High): reasoning comes apart, never inline.
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert "<think>" not in choice.message.content and "</think>" not in choice.message.content
    prompt_ids = TOKENIZER.encode(server.model.prompts[-1])
    answer_ids = TOKENIZER.encode(REASONING + THINK_END + choice.message.content + EOS)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(answer_ids)
    assert resp.usage.total_tokens == len(prompt_ids) + len(answer_ids)
    assert resp.usage.completion_tokens_details.reasoning_tokens == len(
        TOKENIZER.encode(REASONING + THINK_END)
    )


def test_openai_client_streaming_matches_non_streaming(server):
    client = server.client()
    full = client.chat.completions.create(model="m", messages=USER)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert content == full.choices[0].message.content
    assert reasoning == REASONING
    assert len([d for d in deltas if d.content]) > 3  # really streamed, token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_tools_round_trip(server):
    client = server.client()
    first = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call-")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    # The tools were offered to the model in V4's format.
    assert (
        "## Tools" in server.model.prompts[-1]
        and '"name": "get_weather"' in server.model.prompts[-1]
    )

    history = [
        *USER,
        {
            "role": "assistant",
            "content": choice.message.content,
            "reasoning_content": choice.message.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 °C"},
    ]
    second = client.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0)
    assert second.choices[0].message.content == "The weather: sunny, 24 °C."
    assert second.choices[0].finish_reason == "stop"
    prompt = server.model.prompts[-1]
    # Our tool call went back as DSML, the result as a tool_result block, reasoning kept (tools).
    assert f'<{DSML}invoke name="get_weather">' in prompt
    assert "<tool_result>sunny, 24 °C</tool_result>" in prompt
    assert REASONING + THINK_END + "Let me look that up." in prompt


def test_tools_streaming(server):
    chunks = list(
        server.client().chat.completions.create(
            model="m", messages=USER, tools=TOOLS, stream=True, temperature=0
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me look that up."  # no piece of the DSML block leaks into the text
    assert DSML not in content
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_offers_no_tools(server):
    resp = server.client().chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="none", temperature=0
    )
    assert resp.choices[0].message.tool_calls is None
    assert "## Tools" not in server.model.prompts[-1]


@pytest.mark.parametrize(
    ("fields", "tail", "has_reasoning"),
    [
        ({}, THINK_START, True),
        ({"thinking": {"type": "disabled"}}, THINK_END, False),
        ({"thinking": {"type": "enabled"}, "reasoning_effort": "high"}, THINK_START, True),
        ({"think": False}, THINK_END, False),
        ({"think": True}, THINK_START, True),
        ({"reasoning_effort": "low"}, THINK_START, True),
        ({"reasoning_effort": "none"}, THINK_END, False),
    ],
)
def test_reasoning_switches_choose_the_mode(server, fields, tail, has_reasoning):
    status, body, _ = server.chat(**fields)
    assert status == 200, body
    assert server.model.prompts[-1].endswith("<｜Assistant｜>" + tail)
    message = body["choices"][0]["message"]
    assert ("reasoning_content" in message) == has_reasoning
    assert message["content"] == "You said: hello"


def test_think_max_needs_a_large_context(server):
    for fields in ({"reasoning_effort": "max"}, {"think": "max"}):
        status, body, _ = server.chat(**fields)
        assert status == 400
        assert "384" in body["error"]["message"] and "Think High" in body["error"]["message"]
    big = Server(make_served(context_limit=400_000))
    try:
        status, body, _ = big.chat(reasoning_effort="max")
        assert status == 200, body
        assert big.model.prompts[-1].startswith(
            "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum"
        )
    finally:
        big.stop()


def test_contradicting_switches_are_refused(server):
    status, body, _ = server.chat(thinking={"type": "disabled"}, think=True)
    assert status == 400 and "contradict" in body["error"]["message"]


def test_stop_strings_and_max_tokens(server):
    status, body, _ = server.chat(content="one two three", stop=["two", "zzz"])
    assert status == 200
    choice = body["choices"][0]
    assert choice["message"]["content"] == "You said: one " and choice["finish_reason"] == "stop"
    status, body, _ = server.chat(thinking={"type": "disabled"}, max_tokens=3)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    # A stop string split over several tokens never leaks out in pieces while streaming.
    chunks = list(
        server.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "abcdef"}],
            stream=True,
            stop="bcd",
            temperature=0,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: a"


def test_stop_matcher_holds_back_partial_matches():
    matcher = _StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("O") == ""
    assert matcher.feed("x") == "STOx"
    assert matcher.feed("yS") == "y"
    assert matcher.feed("TOP and more") == ""
    assert matcher.hit and matcher.flush() == ""


def test_prefix_reuse_across_turns(server):
    """An agent resending its history only prefills the new part (the session's cached state)."""
    first = server.chat(content="hi", thinking={"type": "disabled"})[1]
    history = [
        {"role": "user", "content": "hi"},
        first["choices"][0]["message"],
        {"role": "user", "content": "again"},
    ]
    status, second, _ = server.request(
        "POST",
        "/v1/chat/completions",
        {"messages": history, "thinking": {"type": "disabled"}},
    )
    assert status == 200, second
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1


def test_models_endpoint_and_openapi(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["fake-v4"]
    assert models.data[0].model_extra["context_length"] == 4096
    assert server.client().models.retrieve("fake-v4").id == "fake-v4"
    status, body, _ = server.request("GET", "/v1/models/other")
    assert status == 404 and "fake-v4" in body["error"]["message"]
    status, doc, _ = server.request("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/models", "/v1/chat/completions"} <= set(doc["paths"])


# ------------------------------------------------------------------------------------------------
# Bad requests: 4xx with a message, never a 5xx
# ------------------------------------------------------------------------------------------------


def _refused(result, status, *words):
    code, body, _ = result
    assert code == status, body
    message = body["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), message
    return body["error"]


def test_bad_json_wrong_types_and_missing_fields(server):
    post = lambda raw: server.request("POST", "/v1/chat/completions", raw=raw)  # noqa: E731
    _refused(post(b'{"messages": [}'), 400, "not valid JSON")
    _refused(post(b"[1, 2]"), 400, "invalid request")
    _refused(post(b"{}"), 400, "messages", "field required")
    _refused(post(b"\xff\xfe{}"), 400, "not valid JSON")
    # Valid JSON, but not text: a lone UTF-16 surrogate (the tokenizer would fail on it).
    lone = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    err = _refused(post(lone), 400, "unpaired", "surrogate")
    assert err["param"] == "messages[0].content"
    err = _refused(server.chat(temperature="hot"), 400, "temperature")
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    _refused(server.chat(temperature=5), 400, "temperature")
    _refused(server.chat(max_tokens=0), 400, "max_tokens")
    _refused(server.chat(seed=2**70), 400, "seed")
    _refused(server.request("POST", "/v1/chat/completions", {"messages": []}), 400, "messages")
    _refused(
        server.request("POST", "/v1/chat/completions", {"messages": [{"role": "robot"}]}),
        400,
        "role",
    )
    _refused(
        server.request(
            "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}
        ),
        400,
        "content",
    )


def test_requests_the_model_cannot_honour(server):
    _refused(server.chat(n=2), 400, "one choice")
    _refused(server.chat(logprobs=True), 400, "logprobs")
    _refused(server.chat(tools=TOOLS, tool_choice="required"), 400, "tool_choice")
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    _refused(server.chat(content=image), 400, "text only")
    _refused(
        server.request(
            "POST",
            "/v1/chat/completions",
            {"messages": [*USER, {"role": "assistant", "content": "x"}]},
        ),
        400,
        "last message",
    )
    _refused(server.chat(content="word " * 5000), 400, "context window")
    _refused(server.chat(stop=[str(k) for k in range(20)]), 400, "stop")
    assert server.model.prompts == []  # none of these reached the model


def test_huge_body_is_refused_before_reading(server):
    small = Server(make_served(), max_body_bytes=10_000)
    try:
        err = _refused(small.chat(content="x" * 20_000), 413, "larger than", "10,000")
        assert err["code"] == "request_too_large"
        # Without Content-Length (chunked), the limit holds too.
        conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=10)
        body = json.dumps({"messages": [{"role": "user", "content": "y" * 20_000}]}).encode()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=iter([body[:5000], body[5000:]]),
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and "larger than" in json.loads(resp.read())["error"]["message"]
        conn.close()
    finally:
        small.stop()


def test_api_key_required_when_set(keyed):
    for headers in (
        {"Authorization": None},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
    ):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            err = _refused(keyed.request(method, path, {"messages": USER}, headers), 401, "API key")
            assert err["type"] == "authentication_error"
    _refused(keyed.request("GET", "/openapi.json", headers={"Authorization": None}), 401, "API key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.handle.url, api_key="wrong").models.list()
    assert keyed.client().chat.completions.create(model="m", messages=USER).choices
    assert keyed.model.prompts  # with the right key it went through


def test_content_type_host_and_unknown_routes(server):
    _refused(
        server.request(
            "POST", "/v1/chat/completions", {"messages": USER}, {"Content-Type": "text/plain"}
        ),
        415,
        "application/json",
    )
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 is not answered.
    _refused(
        server.request("GET", "/v1/models", headers={"Host": "evil.example:8437"}), 403, "loopback"
    )
    assert (
        server.request("GET", "/v1/models", headers={"Host": f"localhost:{server.port}"})[0] == 200
    )
    assert server.request("GET", "/v1/models", headers={"Host": f"[::1]:{server.port}"})[0] == 200
    _refused(server.request("GET", "/v1/completions"), 404, "no such endpoint")
    _refused(server.request("DELETE", "/v1/models"), 405, "method")


def test_no_model_loaded():
    srv = Server(None)
    try:
        assert srv.request("GET", "/v1/models")[1]["data"] == []
        err = _refused(srv.chat(), 503, "no model is loaded")
        assert err["code"] == "model_not_loaded"
        srv.served = make_served()  # the app loads a model while the server runs
        assert srv.chat()[0] == 200
    finally:
        srv.stop()


def test_a_failing_model_gives_a_500_message_and_the_server_lives_on(server):
    def broken(*_args):
        raise RuntimeError("CUDA out of memory (simulated)")

    server.model.decode = broken
    err = _refused(server.chat(), 500, "out of memory", "keeps running")
    assert err["type"] == "server_error"
    chunks = server.request("POST", "/v1/chat/completions", {"messages": USER, "stream": True})[1]
    assert "out of memory" in chunks and chunks.rstrip().endswith("data: [DONE]")
    server.served = make_served()
    assert server.chat()[0] == 200


def test_schemathesis_finds_no_server_errors():
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    srv = Server(make_served(), api_key=KEY)
    try:
        doc = srv.request("GET", "/openapi.json")[1]
        schema = schemathesis.openapi.from_dict(doc)
        seen: dict[int, int] = {}
        base = f"http://127.0.0.1:{srv.port}"
        for result in schema.get_all_operations():
            operation = result.ok()
            # Negative cases need an input to break; GET /v1/models has none.
            modes = [GenerationMode.POSITIVE]
            if operation.method.upper() == "POST":
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:

                @settings(
                    max_examples=20,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def check(case):
                    resp = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"})
                    seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                    assert resp.status_code < 500, (resp.status_code, resp.text, case.body)
                    if resp.status_code >= 400:
                        assert resp.json()["error"]["message"]

                check()
        assert seen.get(200) and any(400 <= s < 500 for s in seen), seen
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------
# Queue, cancellation, load
# ------------------------------------------------------------------------------------------------


def test_queue_full_gives_429_and_queued_requests_complete():
    srv = Server(make_served(delay_s=0.02), max_waiting=1)
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(srv.chat, "first")
            while srv.handle.pending < 1:
                time.sleep(0.005)
            second = pool.submit(srv.chat, "second")
            while srv.handle.pending < 2:
                time.sleep(0.005)
            err = _refused(srv.chat("third"), 429, "busy", "retry")
            assert err["code"] == "queue_full"
            results = [first.result(), second.result()]
        assert [r[0] for r in results] == [200, 200]
        assert [r[1]["choices"][0]["message"]["content"] for r in results] == [
            "You said: first",
            "You said: second",
        ]
    finally:
        srv.stop()


def _stream_then_hang_up(port: int, after_bytes: int = 200) -> bytes:
    body = json.dumps({"messages": USER, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    got = b""
    while len(got) < after_bytes:
        got += sock.recv(4096)
    sock.close()
    return got


def test_client_disconnect_cancels_the_generation():
    srv = Server(make_served(delay_s=0.005, endless=True))
    try:
        got = _stream_then_hang_up(srv.port)
        assert b"200 OK" in got and b"data: " in got
        assert srv.wait_idle(), "the endless generation was not cancelled after the hang-up"
        calls = srv.model.decode_calls
        time.sleep(0.1)
        assert srv.model.decode_calls == calls  # nothing runs any more
        # A non-streaming request that hangs up is cancelled too.
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        body = json.dumps({"messages": USER}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        while srv.model.decode_calls == calls:
            time.sleep(0.005)
        sock.close()
        assert srv.wait_idle()
        assert srv.chat(thinking={"type": "disabled"}, max_tokens=2)[0] == 200  # model usable
    finally:
        srv.stop()


def test_stop_cancels_running_generations():
    srv = Server(make_served(delay_s=0.005, endless=True))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.chat)
        while srv.model.decode_calls == 0:
            time.sleep(0.005)
        srv.stop()
        status, body, _ = pending.result(timeout=10)
    assert status == 503 and "cancelled" in body["error"]["message"]
    assert not srv.handle.running


def test_port_in_use_is_reported():
    srv = Server(make_served())
    try:
        with pytest.raises(ServerStartError, match=rf"Port {srv.port} .* in use.*--port"):
            start_server(lambda: None, port=srv.port)
    finally:
        srv.stop()
    assert DEFAULT_PORT not in (1234, 11434, 1337, 4891, 5001, 5000, 8000, 8080)
    assert ServerOptions().host == "127.0.0.1" and ServerOptions().default_mode is Mode.THINK_HIGH


def test_200_sequential_requests(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for k in range(200):
            status, body, _ = server.request(
                "POST",
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": f"n{k}"}],
                    "thinking": {"type": "disabled"},
                    "temperature": 0,
                },
                conn=conn,
            )
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == f"You said: n{k}"
    finally:
        conn.close()
    assert server.wait_idle()


@pytest.mark.parametrize("max_waiting", [4, 19])
def test_20_concurrent_requests_complete_or_are_refused_cleanly(max_waiting):
    srv = Server(make_served(delay_s=0.002), max_waiting=max_waiting)
    answered_while_busy = []

    def one(k):
        return k, *srv.chat(f"c{k}", thinking={"type": "disabled"})[:2]

    try:
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(one, k) for k in range(20)]
            # The server stays responsive while the model is busy.
            for _ in range(20):
                if srv.handle.pending:
                    status, body, _ = srv.request("GET", "/v1/models")
                    answered_while_busy.append(status == 200 and body["data"][0]["id"] == "fake-v4")
                time.sleep(0.002)
            results = [f.result(timeout=60) for f in futures]
        assert answered_while_busy and all(answered_while_busy)
        for k, status, body in results:
            assert status in (200, 429), body
            if status == 200:
                assert body["choices"][0]["message"]["content"] == f"You said: c{k}"
            else:
                assert body["error"]["code"] == "queue_full"
        done = sum(status == 200 for _, status, _ in results)
        assert done >= max_waiting + 1
        if max_waiting == 19:
            assert done == 20
        assert srv.wait_idle()
    finally:
        srv.stop()


def test_app_and_server_share_the_model_lock(monkeypatch):
    """While the app generates (it holds ServedModel.lock), server requests wait in the queue,
    streaming ones get SSE keep-alive comments, and all run once the app is done."""
    from flashdesk.engine.server import app as server_app

    monkeypatch.setattr(server_app, "KEEPALIVE_S", 0.05)
    srv = Server(make_served())
    try:
        srv.served.lock.acquire()  # the app is generating
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                srv.request,
                "POST",
                "/v1/chat/completions",
                {"messages": USER, "stream": True, "temperature": 0},
            )
            time.sleep(0.3)
            assert not pending.done() and srv.handle.pending == 1
            assert srv.model.prompts == []  # nothing reached the model while the app held it
            srv.served.lock.release()
            status, text, _ = pending.result(timeout=10)
        assert status == 200
        assert text.startswith("data: ") and ": keep-alive" in text
        assert text.rstrip().endswith("data: [DONE]")
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert content == "You said: What is the weather in Paris?"
    finally:
        if srv.served.lock.locked():
            srv.served.lock.release()
        srv.stop()


def test_request_waits_while_the_app_streams_without_the_lock():
    """An app that streams on the shared Session without taking ServedModel.lock does not make
    server requests fail: they wait for the session and then run."""
    srv = Server(make_served(delay_s=0.002, endless=True))
    session = srv.served.session
    app_tokens = []

    def app_generates():
        for event in session.stream(TOKENIZER.encode("<｜User｜>hi<｜Assistant｜></think>")):
            app_tokens.append(event)
            if len(app_tokens) == 100:
                session.cancel()

    try:
        with ThreadPoolExecutor(2) as pool:
            app_turn = pool.submit(app_generates)
            while not app_tokens:
                time.sleep(0.005)
            status, body, _ = srv.chat(thinking={"type": "disabled"}, max_tokens=4)
            assert app_turn.done()  # the request came back only after the app's turn ended
        assert status == 200, body
        assert len(app_tokens) > 100 and app_tokens[-1].stats.stop_reason == "cancelled"
        assert body["choices"][0]["message"]["content"] == "You said: hello"
        assert body["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()
