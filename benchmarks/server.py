"""What the local server costs on top of the engine: a streamed 64-token answer through HTTP
(request sent to `[DONE]`, prefill included) against the same Session driven directly (the bound),
and the latency of a one-token request against a direct one-token generation. Runs on the tiny native model (random weights, full V4 vocabulary), greedy,
so both paths generate the same tokens.
"""

from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

TOKENS = 64
REPEATS = 7
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def _stream_via_http(port: int, max_tokens: int) -> tuple[float, int]:
    """(seconds from sending the request to `[DONE]`, tokens generated per `usage`)."""
    body = json.dumps(
        {
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": 0,
            "thinking": {"type": "disabled"},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if line.startswith("data: {") and '"usage"' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed, tokens


def _one_token_via_http(port: int) -> float:
    body = json.dumps(
        {"messages": MESSAGES, "max_tokens": 1, "temperature": 0, "think": False}
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def run(json_output: bool = False) -> dict:
    import torch

    from flashdesk.engine.chat import encode_messages
    from flashdesk.engine.checkpoint import write_random
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.generate import SamplingParams, Session
    from flashdesk.engine.model.loader import load_model
    from flashdesk.engine.server import ServedModel, start_server
    from flashdesk.engine.tokenizer import VOCAB_SIZE, load_tokenizer

    info = _machine.describe()
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory(prefix="flashdesk-bench-server-") as tmp:
        write_random(tmp, ModelConfig.tiny(vocab_size=VOCAB_SIZE), seed=0, overwrite=True)
        model = load_model(tmp, device="cpu", dtype=torch.float32)

    prompt = encode_messages(MESSAGES, "non-think", tokenizer=tokenizer).ids
    greedy = SamplingParams(temperature=0, max_tokens=TOKENS)

    def direct_stream() -> tuple[float, int]:
        """Same measure as over HTTP: whole request, on a fresh session."""
        t0 = time.perf_counter()
        events = list(Session(model, tokenizer, context_limit=4096).stream(prompt, greedy))
        return time.perf_counter() - t0, events[-1].stats.generated_tokens

    def direct_one_token() -> float:
        t0 = time.perf_counter()
        list(Session(model, tokenizer).stream(prompt, SamplingParams(temperature=0, max_tokens=1)))
        return time.perf_counter() - t0

    # The server generates on a worker thread; so does the bound (torch's intra-op threading
    # behaves differently on the main thread, which would skew the ratio). The two paths take
    # turns so that both see the same load on a shared machine.
    served = ServedModel("bench", Session(model, tokenizer, context_limit=4096), tokenizer)
    handle = start_server(lambda: served, port=0)
    direct_rates, direct_one, http_rates, http_one = [], [], [], []
    try:
        with ThreadPoolExecutor(1) as worker:
            for _ in range(REPEATS):
                seconds, deltas = worker.submit(direct_stream).result()
                direct_rates.append(deltas / seconds if seconds > 0 else 0.0)
                seconds, deltas = _stream_via_http(handle.port, TOKENS)
                http_rates.append(deltas / seconds if seconds > 0 else 0.0)
                direct_one.append(worker.submit(direct_one_token).result())
                http_one.append(_one_token_via_http(handle.port))
    finally:
        handle.stop()

    direct = statistics.median(direct_rates)
    via_http = statistics.median(http_rates)
    one_direct = statistics.median(direct_one)
    one_http = statistics.median(http_one)
    figures = {
        "machine": info,
        "tokens": TOKENS,
        "direct_tok_s": direct,
        "server_stream_tok_s": via_http,
        "stream_ratio": via_http / direct if direct else None,
        "direct_one_token_ms": one_direct * 1000,
        "server_one_token_ms": one_http * 1000,
        "server_overhead_ms": (one_http - one_direct) * 1000,
    }
    if not json_output:
        _machine.print_machine(info)
        print(f"Session.stream directly (the bound): {direct:.1f} tok/s, tiny model, greedy")
        print(
            f"Through the server (SSE on loopback, request to [DONE]): {via_http:.1f} tok/s = "
            f"{figures['stream_ratio']:.2f} x the bound"
        )
        print(
            f"One-token request: {one_http * 1000:.1f} ms through the server against "
            f"{one_direct * 1000:.1f} ms direct (server overhead "
            f"{figures['server_overhead_ms']:.1f} ms)"
        )
    return figures
