"""EngineBackend on our engine with the tiny random-weights test model (no window)."""

from __future__ import annotations

import pytest

from flashdesk.app.backend import BackendError, LoadCancelled, Sampling
from flashdesk.app.engine_backend import (
    TEST_MODEL_DIR,
    EngineBackend,
    built_bytes,
    check_memory,
    ensure_test_model,
)
from flashdesk.engine.generate import THINK_END_ID, THINK_START_ID


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-app")
    ensure_test_model(folder / TEST_MODEL_DIR)
    return folder


@pytest.fixture(scope="module")
def loaded(data_folder):
    backend = EngineBackend(None, data_folder, context_limit=2048)
    steps = []
    info = backend.load(lambda f, what: steps.append((f, what)), lambda: False)
    return backend, info, steps


def test_load_reports_progress_and_labels_the_test_model(loaded):
    _backend, info, steps = loaded
    assert info.test_model and info.label == "V4 tiny (test model — random weights)"
    assert info.context_limit == 2048
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(what == "Loading weights" for _, what in steps)


def test_encode_uses_v4_prompt_and_tokenizer(loaded):
    backend, _, _ = loaded
    msgs = [{"role": "user", "content": "Hi"}]
    non = backend.encode(msgs, "Non-think")
    high = backend.encode(msgs, "Think High")
    assert non.ids[0] == 0 and non.ids[-1] == THINK_END_ID
    assert high.ids[-1] == THINK_START_ID and high.ids[:-1] == non.ids[:-1]
    assert backend.count_tokens("hello world") == 2
    with pytest.raises(BackendError, match="384K"):
        backend.encode(msgs, "Think Max")


def test_stream_generates_with_stats(loaded):
    backend, _, _ = loaded
    prompt = backend.encode([{"role": "user", "content": "Hello"}], "Non-think")
    events = list(backend.stream(prompt, Sampling(max_tokens=3, seed=0)))
    last = events[-1]
    assert last.done and last.stats.stop_reason in ("max_tokens", "eos")
    assert 1 <= last.stats.generated_tokens <= 3
    assert last.stats.prompt_tokens == prompt.tokens and last.stats.ttft_s is not None
    assert last.stats.context_limit == 2048


def test_a_think_follow_up_does_not_read_the_document_again(loaded):
    """Think High drops earlier reasoning and renders the earlier turn's <think> as </think>, so
    the follow-up's prompt diverges from what the model holds one token before the first
    answer: the Session resumes there (a marked state) instead of prefilling the document again,
    and the stats line says how much was cached."""
    backend, _, _ = loaded
    document = "Quarterly report. " * 60
    first = [{"role": "user", "content": document}]
    prompt = backend.encode(first, "Think High")
    events = list(backend.stream(prompt, Sampling(max_tokens=4, seed=0)))
    assert events[-1].stats.reused_tokens == 0
    reasoning = "".join(e.text for e in events if e.phase == "reasoning")
    answer = "".join(e.text for e in events if e.phase == "answer")
    second = [
        *first,
        {"role": "assistant", "content": answer or "ok", "reasoning_content": reasoning},
        {"role": "user", "content": "And the margin?"},
    ]
    follow = backend.encode(second, "Think High")
    assert follow.ids[: prompt.tokens - 1] == prompt.ids[:-1]  # the document, as held
    last = list(backend.stream(follow, Sampling(max_tokens=2, seed=0)))[-1]
    assert last.stats.reused_tokens == prompt.tokens - 1
    assert last.stats.prompt_tokens == follow.tokens


def test_prompt_over_the_context_is_refused_before_work(loaded):
    backend, _, _ = loaded
    prompt = backend.encode([{"role": "user", "content": "word " * 3000}], "Non-think")
    with pytest.raises(BackendError) as err:
        next(iter(backend.stream(prompt, Sampling(max_tokens=3))))
    assert err.value.kind == "overflow" and "2,048" in err.value.message


def test_load_can_be_cancelled(data_folder):
    backend = EngineBackend(None, data_folder)
    calls = []
    with pytest.raises(LoadCancelled):
        backend.load(lambda f, w: calls.append(f), lambda: len(calls) > 5)
    assert backend.session is None


def test_broken_checkpoint_lists_its_problems(tmp_path, data_folder):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(data_folder / TEST_MODEL_DIR, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    backend = EngineBackend(folder, tmp_path / "data")
    with pytest.raises(BackendError) as err:
        backend.load(lambda f, w: None, lambda: False)
    assert err.value.kind == "load" and shard.name in err.value.message


def test_memory_check_refuses_a_model_too_big_for_this_machine(data_folder):
    from flashdesk.engine.checkpoint import Checkpoint

    with Checkpoint.open(data_folder / TEST_MODEL_DIR) as ckpt:
        needed, on_gpu = built_bytes(ckpt), built_bytes(ckpt, "cuda")
        embed = ckpt.info("embed.weight").nbytes
        stored = sum(
            ckpt.info(n).nbytes
            for n in ckpt.names()
            if ".ffn.experts." not in n and not n.startswith("mtp.")
        )
    # the test model: its stored non-expert bytes (mostly the BF16 embedding and head, as held)
    assert stored <= needed < 1.2 * stored
    assert on_gpu == needed - embed  # on a GPU the embedding stays in RAM
    check_memory(needed, "cpu")  # fits here
    with pytest.raises(BackendError) as err:
        check_memory(1 << 50, "cpu")
    assert err.value.kind == "oom" and "GiB of RAM" in err.value.message


def test_a_checkpoint_folder_is_planned_and_loaded_through_the_runtime(data_folder, monkeypatch):
    """A user's checkpoint (here the tiny one, copied as if downloaded) goes through the planner
    and the hybrid runtime: routed experts stay stored bytes, the summary says where they live."""
    import shutil

    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(data_folder / "cache"))
    folder = data_folder / "my-model"
    if not folder.exists():
        from flashdesk.engine.tokenizer import bundled_tokenizer_path

        shutil.copytree(data_folder / TEST_MODEL_DIR, folder)
        shutil.copy(bundled_tokenizer_path(), folder / "tokenizer.json")
    backend = EngineBackend(folder, data_folder, context_limit=1024)
    steps = []
    info = backend.load(lambda f, what: steps.append(what), lambda: False)
    assert not info.test_model and info.name == "my-model"
    assert "Planning GPU and RAM placement" in steps
    assert "routed experts:" in info.plan_summary
    events = list(
        backend.stream(
            backend.encode([{"role": "user", "content": "hi"}], "Non-think"),
            Sampling(max_tokens=4, temperature=0.0),
        )
    )
    assert events[-1].stats.generated_tokens >= 1
    # Loading again releases the previous runtime (its checkpoint mapping) first.
    first = backend.model
    backend.load(lambda f, what: None, lambda: False)
    assert first.checkpoint is None


def test_the_wizards_kv_choice_is_what_the_loaded_model_stores(data_folder, monkeypatch):
    """The wizard's saved plan (its KV format) applies when the app loads a checkpoint, and the
    cache holds the bytes the plan counted; a model whose rows the FP8 layout cannot hold says
    what to pick instead."""
    import shutil

    from flashdesk.app.engine_backend import V4_VOCAB
    from flashdesk.engine.checkpoint import Checkpoint, write_random
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.tokenizer import bundled_tokenizer_path
    from flashdesk.offload.figures import ModelFigures

    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(data_folder / "cache"))
    config = ModelConfig.tiny(
        vocab_size=V4_VOCAB, head_dim=128, qk_rope_head_dim=64, index_head_dim=64
    )
    folder = write_random(data_folder / "wide-heads", config, seed=2, overwrite=True)
    narrow = data_folder / "narrow-heads"  # the test model's 48 no-rope channels
    shutil.copytree(data_folder / TEST_MODEL_DIR, narrow, dirs_exist_ok=True)
    for f in (folder, narrow):
        shutil.copy(bundled_tokenizer_path(), f / "tokenizer.json")
    backend = EngineBackend(folder, data_folder, context_limit=1024)
    held = {}
    for kv in ("bf16", "fp8"):
        backend.configure(str(folder), 1024, "", {"kv_dtype": kv, "vram_reserve_bytes": None})
        backend.load(lambda f, what: None, lambda: False)
        assert backend.model.kv_format == kv
        prompt = backend.encode([{"role": "user", "content": "hello there " * 200}], "Non-think")
        events = list(backend.stream(prompt, Sampling(max_tokens=2, temperature=0.0)))
        held[kv] = events[-1].stats.kv_bytes
    with Checkpoint.open(folder) as ckpt:
        figures = ModelFigures.from_inventory(ckpt.inventory(), config, "wide-heads")
    tokens = events[-1].stats.context_used
    planned = {kv: figures.kv_bytes(tokens, kv) for kv in held}
    for kv in held:  # what the context meter shows is what the plan counted
        assert held[kv] == pytest.approx(planned[kv], rel=0.01)
    assert held["fp8"] < held["bf16"]  # mostly float32 compressor state here; rows 583 vs 1024 B
    backend.configure(str(narrow), 1024, "", {"kv_dtype": "fp8"})
    with pytest.raises(BackendError, match=r"no-rope channels.*bf16 KV") as err:
        backend.load(lambda f, what: None, lambda: False)
    assert err.value.kind == "load"


def test_installing_a_model_releases_the_previous_one(data_folder):
    """Whichever backend the old model came from (runtime or llama.cpp), it is closed once the
    new one is current."""

    class Closable:
        closed = False

        def close(self):
            self.closed = True

    backend = EngineBackend(None, data_folder)
    first, second = Closable(), Closable()
    backend._install(first, "tok", "session-1")
    backend._install(second, "tok", "session-2")
    assert first.closed and not second.closed
    assert (backend.model, backend.session) == (second, "session-2")


@pytest.mark.parametrize("kind", ["oom", "load"])
def test_runtime_load_errors_keep_their_kind(data_folder, monkeypatch, kind):
    """The app shows out-of-memory differently from other load failures; the runtime says which."""
    import flashdesk.engine.runtime as runtime

    def fail(*args, **kwargs):
        raise runtime.RuntimeLoadError("the GPU ran out of memory while loading", kind=kind)

    monkeypatch.setattr(runtime, "load_runtime", fail)
    backend = EngineBackend(None, data_folder)
    with pytest.raises(BackendError) as err:
        backend.load(lambda f, what: None, lambda: False)
    assert err.value.kind == kind and "ran out of memory" in err.value.message
    assert runtime.RuntimeLoadError("x").kind == "load"


def test_the_cpu_mode_drafts_with_the_mtp_block_unless_turned_off(data_folder, monkeypatch):
    """On the CPU the checkpoint's MTP block drafts (the same tokens greedy); the stats line
    says how many drafts were kept; FLASHDESK_MTP=0 loads without the block."""
    from flashdesk.app.formatting import stats_line

    prompt_msgs = [{"role": "user", "content": "Hello"}]
    answers = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("FLASHDESK_MTP", setting)
        backend = EngineBackend(None, data_folder, context_limit=2048, device="cpu")
        backend.load(lambda f, what: None, lambda: False)
        assert backend.model.speculative is (setting == "1")
        assert ("MTP block drafts" in backend.model.describe()) is (setting == "1")
        events = list(
            backend.stream(
                backend.encode(prompt_msgs, "Non-think"), Sampling(max_tokens=10, temperature=0.0)
            )
        )
        answers[setting] = "".join(e.text for e in events)
        stats = events[-1].stats
        assert (stats.draft_acceptance is not None) is (setting == "1")
        assert ("drafts kept" in stats_line(stats.to_dict())) is (setting == "1")
        backend.model.close()
    assert answers["1"] == answers["0"]
