"""GGUF headers: what is read from a file and every refusal a user can run into."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (make test installs it)")

from flashdesk.engine.gguf.errors import GGUFError  # noqa: E402
from flashdesk.engine.gguf.metadata import (  # noqa: E402
    EXPERT_TENSOR,
    LLAMACPP_ARCHITECTURES,
    inventory,
    read_gguf,
    split_parts,
)
from flashdesk.engine.gguf.synthetic import write_tiny_moe  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_moe(tmp_path_factory.mktemp("gguf") / "tiny.gguf", expert_type="Q8_0")


def test_reads_architecture_hparams_and_inventory(tiny):
    info = read_gguf(tiny)
    assert info.architecture == "qwen3moe" and not info.is_v4
    assert (info.n_layers, info.n_experts, info.context_length) == (2, 4, 256)
    assert info.vocab_size == 259
    assert info.chat_template.startswith("{% for m in messages %}")
    names = {t.name for t in info.tensors}
    assert "blk.1.ffn_down_exps.weight" in names and "token_embd.weight" in names
    # Bytes per tensor from ggml's block sizes: Q8_0 is 34 bytes per 32 values.
    down = next(t for t in info.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert down.type_name == "Q8_0" and down.shape == (32, 64, 4)
    assert down.nbytes == 4 * 64 * 32 // 32 * 34
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    assert embd.nbytes == 259 * 64 * 4
    assert info.expert_layers() == [0, 1]
    assert info.expert_bytes == 2 * 3 * (4 * 64 * 32 // 32 * 34)
    # The data section ends exactly at the end of the file.
    assert info.weight_bytes < info.file_bytes == tiny.stat().st_size
    assert info.type_counts() == {"F32": info.weight_bytes - info.expert_bytes, "Q8_0": 52224}
    rows = inventory(info)
    assert sum(r["nbytes"] for r in rows if r["expert"]) == info.expert_bytes
    assert {r["layer"] for r in rows} == {None, 0, 1}


def test_agrees_with_the_gguf_library_reader(tiny):
    reader = gguf.GGUFReader(str(tiny))
    ours = {t.name: t for t in read_gguf(tiny).tensors}
    assert set(ours) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        assert ours[t.name].nbytes == int(t.n_bytes)
        assert ours[t.name].type_name == t.tensor_type.name
        assert ours[t.name].shape == tuple(int(d) for d in t.shape)


def test_expert_pattern_matches_routed_experts_only():
    assert EXPERT_TENSOR.match("blk.12.ffn_gate_exps.weight")
    assert EXPERT_TENSOR.match("blk.0.ffn_gate_up_exps.weight")
    assert not EXPERT_TENSOR.match("blk.0.ffn_gate_shexp.weight")
    assert not EXPERT_TENSOR.match("blk.0.ffn_gate_inp.weight")
    assert "deepseek4" in LLAMACPP_ARCHITECTURES and "clip" not in LLAMACPP_ARCHITECTURES


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(path)


def test_refuses_a_missing_file_and_an_empty_folder(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match=r"holds no \.gguf file"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("keep", [10, 300, -1000])
def test_refuses_a_truncated_file(tiny, tmp_path, keep):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(GGUFError, match="cut short") as err:
        read_gguf(cut)
    assert "get the file again" in str(err.value)
    if keep < 0:
        assert "MiB missing" in str(err.value)


def _write_minimal(path, arch, extra=None, tensor=True):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    if tensor:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refuses_an_unknown_architecture(tmp_path):
    path = _write_minimal(tmp_path / "m.gguf", "flux-llm-9000")
    with pytest.raises(GGUFError, match="'flux-llm-9000' model") as err:
        read_gguf(path)
    assert "cannot run" in str(err.value)
    # Reading without the check still gives the header (the planner can show it).
    assert read_gguf(path, check_architecture=False).architecture == "flux-llm-9000"


def test_refuses_a_projector_and_a_vocab_only_file(tmp_path):
    with pytest.raises(GGUFError, match="projector"):
        read_gguf(_write_minimal(tmp_path / "mmproj.gguf", "clip"))
    with pytest.raises(GGUFError, match="holds no tensors"):
        read_gguf(_write_minimal(tmp_path / "vocab.gguf", "llama", tensor=False))


def test_split_files_are_read_together_and_missing_parts_named(tiny, tmp_path):
    # Two parts: the first with the metadata and part of the tensors, announced as a split.
    first = tmp_path / "m-00001-of-00002.gguf"
    second = tmp_path / "m-00002-of-00002.gguf"
    w1 = gguf.GGUFWriter(str(first), "llama")
    w1.add_uint16("split.no", 0)
    w1.add_uint16("split.count", 2)
    w1.add_int32("split.tensors.count", 3)
    w1.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w1.add_tensor("output.weight", np.zeros((4, 8), np.float32))
    w2 = gguf.GGUFWriter(str(second), "llama")
    w2.add_uint16("split.no", 1)
    w2.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float16))
    for w in (w1, w2):
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    info = read_gguf(second)  # any part names the whole model
    assert info.files == (first, second)
    assert len(info.tensors) == 3 and info.tensors[2].file_index == 1
    assert info.weight_bytes == 2 * 4 * 8 * 4 + 8 * 8 * 2
    second.unlink()
    with pytest.raises(GGUFError, match=r"2-part model and 1 part\(s\) are missing") as err:
        split_parts(first)
    assert "m-00002-of-00002.gguf" in str(err.value)


def test_wrong_tensor_count_across_parts(tmp_path):
    first = tmp_path / "x-00001-of-00001.gguf"
    w = gguf.GGUFWriter(str(first), "llama")
    w.add_int32("split.tensors.count", 5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="announces 5"):
        read_gguf(first)


def test_a_long_vocabulary_is_kept_as_its_length(tiny, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny, copy)
    tokens = read_gguf(copy).metadata["tokenizer.ggml.tokens"]
    assert (tokens.value_type, tokens.length) == ("STRING", 259)
