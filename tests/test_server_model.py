"""The server on the tiny native V4 model (random weights, full V4 vocabulary), and `flashdesk
serve` as a user runs it.

The weights are random, so these tests check the protocol, not the words: the official `openai`
client gets well-formed answers streaming and not, greedy streaming and non-streaming agree token
for token, usage counts the real prompt, a tool conversation encodes and answers, and the command
serves until Ctrl+C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from flashdesk.engine.chat import DSML, encode_messages
from flashdesk.engine.checkpoint import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.generate import Session
from flashdesk.engine.model.loader import load_model
from flashdesk.engine.server import ServedModel, start_server
from flashdesk.engine.tokenizer import VOCAB_SIZE, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-v4")
    write_random(folder, ModelConfig.tiny(vocab_size=VOCAB_SIZE), seed=3, overwrite=True)
    return folder


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    tokenizer = load_tokenizer()
    model = load_model(tiny_dir)
    served = ServedModel("tiny-v4", Session(model, tokenizer, context_limit=1024), tokenizer)
    handle = start_server(lambda: served, port=0)
    yield handle
    handle.stop()


def test_openai_client_on_the_tiny_model(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url, api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny-v4"]
    off = {"thinking": {"type": "disabled"}}
    full = client.chat.completions.create(
        model="tiny-v4", messages=MESSAGES, max_tokens=6, temperature=0, extra_body=off
    )
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert isinstance(choice.message.content, str)
    prompt = encode_messages(MESSAGES, "non-think")
    assert full.usage.prompt_tokens == len(prompt.ids)
    assert 1 <= full.usage.completion_tokens <= 6
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="tiny-v4",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=off,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streaming and not agree exactly
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    thinking = client.chat.completions.create(
        model="tiny-v4", messages=MESSAGES, max_tokens=4, temperature=0
    )
    assert thinking.usage.completion_tokens_details.reasoning_tokens >= 1
    assert "reasoning_content" in thinking.choices[0].message.model_extra


def test_tool_conversation_on_the_tiny_model(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url, api_key="none")
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should look it up.",
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
    ]
    resp = client.chat.completions.create(
        model="tiny-v4", messages=history, tools=TOOLS, max_tokens=5, temperature=0
    )
    expected = encode_messages(history, "think-high", TOOLS)
    assert DSML in expected.text and "<tool_result>sunny</tool_result>" in expected.text
    assert resp.usage.prompt_tokens == len(expected.ids)
    assert resp.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_flashdesk_serve_command(tiny_dir):
    env = {**os.environ, "FLASHDESK_API_KEY": "secret-1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashdesk", "serve", "--model", str(tiny_dir), "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
            url = found.group(1) if found else None
        assert url, "".join(lines)
        assert "API key required" in lines[-1]
        assert "no tokenizer.json" in "".join(lines)  # the bundled tokenizer, said so
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong").models.list()
        client = openai.OpenAI(base_url=url, api_key="secret-1")
        resp = client.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"think": False}
        )
        assert resp.model == tiny_dir.name and resp.usage.completion_tokens <= 3
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_flashdesk_serve_refuses_bad_input(tmp_path, capsys):
    from flashdesk.cli import main

    def serve(*args) -> tuple[int, str]:
        code = main(["serve", *args])
        return code, capsys.readouterr().err

    code, err = serve("--model", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, err = serve("--model", str(gguf))
    assert code == 2 and "GGUF" in err and "folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = serve("--model", str(empty))
    assert code == 2 and "could not load" in err
    code, err = serve("--test-model", "--max-queue", "-1")
    assert code == 2 and "--max-queue" in err
