"""Bad checkpoints: each is refused (or reported by verify) with a message saying what to do."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from flashdesk.engine.checkpoint import Checkpoint, CheckpointError, write_random
from flashdesk.engine.checkpoint.reader import INDEX_NAME
from flashdesk.engine.config import ModelConfig

CFG = ModelConfig.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
LAYER1 = "model-00003-of-00004.safetensors"  # embed, layer 0, layer 1, head


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("bad") / "ckpt", CFG, seed=1)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def rewrite_header(path: Path, mutate) -> None:
    """Re-serialize a shard header after `mutate(header_dict)`; the data bytes follow unchanged."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def test_pristine_copy_is_clean(ckpt):
    assert Checkpoint.open(ckpt).verify().ok


def test_missing_shard(ckpt):
    (ckpt / LAYER1).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {LAYER1} is missing .* Download it into"):
        Checkpoint.open(ckpt)
    report = Checkpoint.open(ckpt, strict=False).verify()
    assert not report.ok
    assert len(report.problems) == 1 and LAYER1 in report.problems[0]  # its tensors not re-listed
    assert report.shards_checked == 3
    with pytest.raises(
        CheckpointError,
        match=rf"layers\.1\.attn\.wkv\.weight is in shard {LAYER1}, which is missing",
    ):
        Checkpoint.open(ckpt, strict=False).tensor("layers.1.attn.wkv.weight")


def test_truncated_shard(ckpt):
    p = ckpt / LAYER1
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{LAYER1} is truncated: .*download did not finish"):
        Checkpoint.open(ckpt)
    p.write_bytes(p.read_bytes()[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match=r"is truncated: its header alone needs"):
        Checkpoint.open(ckpt)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        Checkpoint.open(ckpt)


def test_corrupt_header_length_and_json(ckpt):
    p = ckpt / LAYER1
    blob = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**40) + blob[8:])
    with pytest.raises(
        CheckpointError, match=r"corrupt safetensors header \(claimed header length"
    ):
        Checkpoint.open(ckpt)
    p.write_bytes(blob[:8] + b"#" + blob[9:])
    with pytest.raises(CheckpointError, match=rf"{LAYER1} has a corrupt safetensors header"):
        Checkpoint.open(ckpt)


def test_corrupt_offsets(ckpt):
    p = ckpt / LAYER1

    def shrink(h):
        h["layers.1.attn.wkv.weight"]["data_offsets"][1] -= 1

    rewrite_header(p, shrink)
    with pytest.raises(CheckpointError, match=r"byte range .* does not match its size"):
        Checkpoint.open(ckpt)


def test_overlapping_tensors(ckpt):
    p = ckpt / LAYER1

    def overlap(h):
        a, b = h["layers.1.attn.wq_a.weight"], h["layers.1.attn.wkv.weight"]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    rewrite_header(p, overlap)
    with pytest.raises(CheckpointError, match="overlap"):
        Checkpoint.open(ckpt)


def test_unknown_and_missing_tensors(ckpt):
    p = ckpt / LAYER1

    def rename(h):
        h["layers.1.attn.surprise"] = h.pop("layers.1.attn.attn_sink")

    rewrite_header(p, rename)
    with pytest.raises(CheckpointError, match=r"listed in model\.safetensors\.index\.json are not"):
        Checkpoint.open(ckpt)
    report = Checkpoint.open(ckpt, strict=False).verify()
    text = str(report)
    assert "1 tensor(s) missing: layers.1.attn.attn_sink" in text
    assert "1 unexpected tensor(s): layers.1.attn.surprise" in text


def test_wrong_dtype_and_shape(ckpt):
    p = ckpt / LAYER1

    def retype(h):
        h["layers.1.attn.wq_a.weight"]["dtype"] = "I8"  # same size, wrong type
        h["layers.1.attn.wkv.weight"]["shape"] = h["layers.1.attn.wkv.weight"]["shape"][::-1]

    rewrite_header(p, retype)
    report = Checkpoint.open(ckpt).verify()
    assert len(report.problems) == 1
    assert "2 tensor(s) with the wrong dtype or shape" in report.problems[0]
    assert (
        "layers.1.attn.wq_a.weight is I8 [128, 256], expected F8_E4M3 [128, 256]"
        in report.problems[0]
    )
    assert (
        "layers.1.attn.wkv.weight is F8_E4M3 [256, 64], expected F8_E4M3 [64, 256]"
        in report.problems[0]
    )


def test_config_that_does_not_match_the_files(ckpt):
    report = Checkpoint.open(ckpt, config=CFG.replace(n_routed_experts=16)).verify()
    assert "16 tensor(s) missing" not in str(report)  # 8 experts x 2 layers x 6 tensors
    assert "96 tensor(s) missing: layers.0.ffn.experts.8.w1.weight" in str(report)
    assert "wrong dtype or shape" in str(report)  # gate.weight, gate.bias are [16, ...]


def test_index_problems(ckpt):
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["metadata"]["total_size"] += 8
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"says the tensors total .* do not belong together"):
        Checkpoint.open(ckpt)
    (ckpt / INDEX_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is damaged"):
        Checkpoint.open(ckpt)


def test_missing_scale_and_unknown_name(ckpt):
    p = ckpt / LAYER1
    rewrite_header(p, lambda h: h.pop("layers.1.attn.wo_b.scale"))
    ck = Checkpoint.open(ckpt, strict=False)
    with pytest.raises(CheckpointError, match=r"its scale layers\.1\.attn\.wo_b\.scale is missing"):
        ck.tensor("layers.1.attn.wo_b.weight")
    with pytest.raises(CheckpointError, match=r"has no tensor 'model\.layers\.1\.nope'"):
        ck.raw("model.layers.1.nope")


def test_pickles_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(CheckpointError, match="never loads pickles"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="never loads pickles"):
        Checkpoint.open(tmp_path / "pytorch_model.bin")


def test_gguf_points_to_the_gguf_backend(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(CheckpointError, match="GGUF backend"):
        Checkpoint.open(gguf)
    with pytest.raises(CheckpointError, match="GGUF backend"):
        Checkpoint.open(tmp_path)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(CheckpointError, match="GGUF backend"):
        Checkpoint.open(disguised)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"holds no \.safetensors files"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_config_of_another_model(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"not 'deepseek_v4'\..*GGUF backend"):
        Checkpoint.open(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v41"}))
    with pytest.raises(CheckpointError, match=r"V4\.1"):
        Checkpoint.open(ckpt)


def test_verify_without_config(pristine, tmp_path):
    shard = tmp_path / LAYER1
    shutil.copy(pristine / LAYER1, shard)
    ck = Checkpoint.open(shard)
    assert ck.config is None
    assert "no config.json" in ck.verify().problems[0]
    with pytest.raises(CheckpointError, match=r"needs the model's config\.json"):
        ck.inventory()
    assert ck.tensor("layers.1.attn.wq_a.weight").dtype == torch.float32  # reading still works
