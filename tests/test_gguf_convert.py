"""Our write_random V4 checkpoint through llama.cpp's own converter (wrapped, not copied).

Needs llama.cpp's converter from the llama-cpp-python 0.3.36 source distribution on this machine
(FLASHDESK_LLAMA_CPP_SRC, or the cache `fetch_llama_cpp_source()` fills); tests never download it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed (make test installs it)")

from flashdesk.engine.checkpoint import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.gguf.convert import convert_checkpoint, llama_cpp_source
from flashdesk.engine.gguf.errors import GGUFError
from flashdesk.engine.gguf.metadata import read_gguf

SOURCE = llama_cpp_source()
needs_source = pytest.mark.skipif(
    SOURCE is None, reason="llama.cpp's converter source is not on this machine"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v4") / "tiny"
    config = ModelConfig.tiny(vocab_size=129_280, sliding_window=128, index_topk=64)
    write_random(folder, config, seed=0)
    return folder, config


@needs_source
@pytest.mark.slow
def test_exact_conversion_is_all_f32_with_v4_metadata(checkpoint, tmp_path):
    folder, config = checkpoint
    info = read_gguf(convert_checkpoint(folder, tmp_path / "exact.gguf", exact=True))
    assert info.is_v4 and info.n_layers == config.num_hidden_layers
    assert info.vocab_size == 129_280 and info.n_experts == config.n_routed_experts
    assert info.arch_value("attention.compress_ratios")[: info.n_layers] == list(
        config.compress_ratios[: config.num_hidden_layers]
    )
    assert set(info.type_counts()) == {"F32", "I32"}  # I32: the hash-routing tables
    gate = next(t for t in info.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert gate.shape == (config.hidden_size, config.moe_intermediate_size, config.n_routed_experts)
    assert info.expert_layers() == list(range(config.num_hidden_layers))
    assert not any(t.name.startswith("mtp") for t in info.tensors)  # MTP is skipped


@needs_source
@pytest.mark.slow
def test_upstream_conversion_keeps_mxfp4_experts(checkpoint, tmp_path):
    folder, _config = checkpoint
    info = read_gguf(convert_checkpoint(folder, tmp_path / "upstream.gguf"))
    assert {t.type_name for t in info.tensors if t.is_expert} == {"MXFP4"}
    assert "Q8_0" in info.type_counts()  # FP8 linears
    gate = next(t for t in info.tensors if t.name == "blk.0.ffn_gate_exps.weight")
    assert gate.nbytes == gate.shape[0] * gate.shape[1] * gate.shape[2] // 32 * 17


def test_missing_converter_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDESK_LLAMA_CPP_SRC", str(tmp_path / "nowhere"))
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path / "cache"))
    assert llama_cpp_source() is None
    with pytest.raises(GGUFError, match="converter is not on this machine"):
        convert_checkpoint(tmp_path, tmp_path / "x.gguf")
