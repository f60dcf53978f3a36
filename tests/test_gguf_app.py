"""The app's EngineBackend on GGUF models: the demo model as the out-of-the-box chat, .gguf paths."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python (the gguf extra) is not installed; make test installs it"
)

from flashdesk.app.backend import BackendError, LoadCancelled, Sampling
from flashdesk.app.engine_backend import EngineBackend
from flashdesk.engine.gguf.demo import DEMO_FILE, demo_model_path
from flashdesk.engine.gguf.synthetic import write_tiny_moe


@pytest.fixture(scope="module")
def demo_backend(tmp_path_factory):
    if demo_model_path(required=False) is None:
        pytest.skip(f"the demo model ({DEMO_FILE}) is not installed; make test installs it")
    backend = EngineBackend(None, tmp_path_factory.mktemp("app"), context_limit=2048, demo=True)
    steps = []
    info = backend.load(lambda f, what: steps.append((f, what)), lambda: False)
    return backend, info, steps


def test_demo_model_loads_labelled(demo_backend):
    _backend, info, steps = demo_backend
    assert info.label == "SmolLM2-135M-Instruct (demo model)"
    assert not info.test_model and info.context_limit == 2048
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_demo_model_chats_through_the_backend(demo_backend):
    backend, _info, _steps = demo_backend
    messages = [{"role": "user", "content": "Say hello."}]
    prompt = backend.encode(messages, "Non-think")
    assert prompt.text.endswith("<|im_start|>assistant\n") and "Say hello." in prompt.text
    events = list(backend.stream(prompt, Sampling(temperature=0, max_tokens=16)))
    assert events[-1].done
    text = "".join(e.text for e in events)
    assert text.strip() and "<|im_end|>" not in text
    assert backend.count_tokens("hello world") == 2
    assert backend.document_tokenizer().count_many(["a b", "c"]) == [2, 1]


def test_gguf_model_path_and_its_refusals(tmp_path):
    path = write_tiny_moe(tmp_path / "tiny.gguf")
    backend = EngineBackend(path, tmp_path, context_limit=128)
    info = backend.load(lambda f, what: None, lambda: False)
    assert info.name == "tiny random qwen3moe (FlashDesk tests)" and info.note == ""
    assert info.plan_summary.startswith("llama.cpp on the CPU; KV cache f16")  # not a V4 model
    assert info.context_limit >= 128
    with pytest.raises(LoadCancelled):
        EngineBackend(path, tmp_path).load(lambda f, what: None, lambda: True)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(BackendError, match="not a GGUF file"):
        EngineBackend(bad, tmp_path).load(lambda f, what: None, lambda: False)


def test_without_demo_flag_the_tiny_v4_test_model_stays_the_default(tmp_path):
    backend = EngineBackend(None, tmp_path, demo=False)
    assert backend._gguf_path() is None
    assert EngineBackend(None, tmp_path, demo=True)._gguf_path() == demo_model_path(required=False)


def test_missing_extra_is_explained(tmp_path, monkeypatch):
    path = write_tiny_moe(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails
    with pytest.raises(BackendError, match=r"pip install 'flashdesk\[gguf\]'") as err:
        EngineBackend(path, tmp_path).load(lambda f, what: None, lambda: False)
    assert err.value.kind == "load"
