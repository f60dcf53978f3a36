"""Checkpoint reader and writer on tiny configs: round trips, zero-copy reads, inventory, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashdesk.engine import quant
from flashdesk.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    RandomWeights,
    write_checkpoint,
    write_random,
)
from flashdesk.engine.checkpoint.reader import INDEX_NAME
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import inventory

TINY = ModelConfig.tiny()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("tiny") / "ckpt", TINY, seed=3)


def test_written_layout_is_the_official_one(tiny_dir):
    files = sorted(p.name for p in tiny_dir.iterdir())
    shards = [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]
    assert files == sorted(["config.json", "generation_config.json", INDEX_NAME, *shards])
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    inv = inventory(TINY)
    assert index["metadata"]["total_size"] == inv.total_bytes
    assert index["weight_map"] == {t.name: t.shard for t in inv.tensors}
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4" and cfg["expert_dtype"] == "fp4"
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    assert ModelConfig.from_dir(tiny_dir) == TINY
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["do_sample"]) == (0, 1, True)
    # the header is plain safetensors: the reference library reads it too
    from safetensors import safe_open

    with safe_open(str(tiny_dir / shards[1]), "pt") as f:
        assert "layers.0.ffn.gate.tid2eid" in f.keys()  # noqa: SIM118
        assert f.get_tensor("layers.0.attn.wq_a.weight").dtype == torch.float8_e4m3fn


def test_round_trip_verify_and_values(tiny_dir):
    ck = Checkpoint.open(tiny_dir)
    report = ck.verify()
    assert report.ok, str(report)
    assert report.tensors_checked == inventory(TINY).count == len(ck)
    meant = RandomWeights(TINY, seed=3)
    for name in ck.names():
        assert torch.equal(ck.tensor(name), meant.tensor(name)), name


def test_raw_is_a_zero_copy_view_with_the_stored_dtype(tiny_dir):
    ck = Checkpoint.open(tiny_dir)
    dtypes = {
        "layers.0.attn.wq_a.weight": torch.float8_e4m3fn,
        "layers.0.attn.wq_a.scale": torch.float8_e8m0fnu,
        "layers.0.ffn.experts.1.w2.weight": torch.int8,
        "layers.0.ffn.gate.tid2eid": torch.int64,
        "layers.3.ffn.gate.bias": torch.float32,
        "embed.weight": torch.bfloat16,
    }
    for name, dtype in dtypes.items():
        raw = ck.raw(name)
        info = ck.info(name)
        assert raw.dtype == dtype and tuple(raw.shape) == info.shape
        with open(info.shard, "rb") as f:
            f.seek(info.begin)
            assert f.read(info.nbytes) == raw.contiguous().view(torch.uint8).numpy().tobytes()
    a, b = ck.raw("embed.weight"), ck.raw("embed.weight")
    assert a.data_ptr() == b.data_ptr()  # both view the one mapping, nothing copied
    before = (tiny_dir / ck.info("embed.weight").shard.name).read_bytes()
    a.zero_()  # private mapping: the file is never written
    assert (tiny_dir / ck.info("embed.weight").shard.name).read_bytes() == before


def test_tensor_dequantizes_like_the_spec_formula(tiny_dir):
    """W[o,i] = e4m3(Wq) · 2^(S[o//128, i//128] − 127); FP4 W[o,i] = e2m1(code) · 2^(S[o, i//32] − 127)."""
    ck = Checkpoint.open(tiny_dir)
    wq, s = ck.raw("layers.2.attn.wq_b.weight"), ck.raw("layers.2.attn.wq_b.scale")
    got = ck.tensor("layers.2.attn.wq_b.weight")
    codes, sb = wq.view(torch.uint8), s.view(torch.uint8)
    for o, i in [(0, 0), (255, 127), (128, 5), (17, 100)]:
        want = quant.e4m3_to_float(codes[o, i]) * 2.0 ** (int(sb[o // 128, i // 128]) - 127)
        assert got[o, i] == want
    packed = ck.raw("layers.2.ffn.experts.5.w2.weight").view(torch.uint8)
    sc = ck.raw("layers.2.ffn.experts.5.w2.scale").view(torch.uint8)
    got = ck.tensor("layers.2.ffn.experts.5.w2.weight")
    for o, i in [(0, 0), (0, 1), (255, 127), (100, 33)]:
        nibble = (int(packed[o, i // 2]) >> (4 * (i % 2))) & 15
        want = quant.E2M1_VALUES[nibble] * 2.0 ** (int(sc[o, i // 32]) - 127)
        assert got[o, i].item() == want
    w1, w3, w2 = ck.expert(2, 5)
    assert torch.equal(w2, got) and w1.shape == (128, 256) and w3.shape == (128, 256)


def test_random_weights_are_sane():
    meant = RandomWeights(TINY, seed=0)
    w = meant.tensor("layers.1.attn.wq_b.weight")  # [256, 128]
    assert 0.3 / 128**0.5 < w.std() < 3 / 128**0.5
    e = meant.tensor("layers.1.ffn.experts.0.w1.weight")  # [128, 256]
    assert 0.3 / 256**0.5 < e.std() < 3 / 256**0.5
    assert len(set(meant.tensor("layers.1.ffn.experts.0.w1.scale").flatten().tolist())) > 1
    tid = meant.tensor("layers.0.ffn.gate.tid2eid")
    assert tid.dtype == torch.int64 and tid.min() >= 0 and tid.max() < TINY.n_routed_experts
    assert all(len(set(row)) == TINY.num_experts_per_tok for row in tid.tolist())
    assert torch.equal(RandomWeights(TINY, 0).tensor("embed.weight"), meant.tensor("embed.weight"))
    assert not torch.equal(
        RandomWeights(TINY, 1).tensor("embed.weight"), meant.tensor("embed.weight")
    )


def test_inventory_from_files_equals_inventory_from_config(tiny_dir):
    from_files = Checkpoint.open(tiny_dir).inventory()
    from_config = inventory(TINY)
    assert from_files.as_dicts() == from_config.as_dicts()
    assert from_files.summary() == from_config.summary()


def test_write_checkpoint_quantizes_float_weights(tmp_path):
    cfg = ModelConfig.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    inv = inventory(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for spec in inv.tensors:
        if spec.name.endswith(".scale") and spec.dtype == "F8_E8M0":
            continue
        if spec.dtype == "I64":
            tensors[spec.name] = torch.randint(0, cfg.n_routed_experts, spec.shape, generator=g)
        elif spec.dtype == "I8":
            tensors[spec.name] = torch.randn(spec.shape[0], spec.shape[1] * 2, generator=g)
        else:
            tensors[spec.name] = torch.randn(spec.shape, generator=g) * 0.1
    ck = Checkpoint.open(write_checkpoint(tmp_path / "c", cfg, tensors))
    assert ck.verify().ok
    for name, x in tensors.items():
        spec = inv.by_name[name]
        if spec.dtype == "F8_E4M3":
            want = quant.dequant_fp8(*quant.quantize_fp8(x))
        elif spec.dtype == "I8":
            want = quant.dequant_fp4(*quant.quantize_fp4(x))
        elif spec.dtype == "BF16":
            want = x.to(torch.bfloat16).float()
        else:
            want = x
        assert torch.equal(ck.tensor(name), want), name


def test_write_checkpoint_keeps_raw_codes_byte_for_byte(tiny_dir, tmp_path):
    ck = Checkpoint.open(tiny_dir)
    raw = {n: ck.raw(n) for n in ck.names()}
    out = write_checkpoint(tmp_path / "copy", TINY, raw)
    for p in tiny_dir.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_write_checkpoint_refuses_bad_input(tmp_path):
    cfg = ModelConfig.tiny(num_hidden_layers=1, num_hash_layers=1, num_nextn_predict_layers=0)
    meant = RandomWeights(cfg)
    full = {n: meant.tensor(n) for n in inventory(cfg).by_name if not n.endswith(".scale")}
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing: embed\.weight"):
        write_checkpoint(
            tmp_path / "a", cfg, {k: v for k, v in full.items() if k != "embed.weight"}
        )
    with pytest.raises(CheckpointError, match=r"the config does not have: layers\.9\.x"):
        write_checkpoint(tmp_path / "b", cfg, {**full, "layers.9.x": torch.zeros(1)})
    bad = dict(full)
    bad["norm.weight"] = torch.ones(3)
    with pytest.raises(
        CheckpointError, match=r"norm\.weight has shape \[3\], but the config needs \[256\]"
    ):
        write_checkpoint(tmp_path / "c", cfg, bad)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        write_random(tmp_path / "d", cfg)


def test_single_safetensors_file_opens(tiny_dir):
    shard = tiny_dir / "model-00003-of-00007.safetensors"
    ck = Checkpoint.open(shard)
    assert ck.config == TINY  # config.json beside it
    assert all(n.startswith("layers.1.") for n in ck.names())
    assert torch.equal(
        ck.tensor("layers.1.attn.indexer.wq_b.weight"),
        Checkpoint.open(tiny_dir).tensor("layers.1.attn.indexer.wq_b.weight"),
    )
    report = ck.verify()  # a single layer file lacks the rest of the model
    assert not report.ok and "missing" in report.problems[0]


def test_fp8_expert_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig.tiny(num_hidden_layers=2, expert_dtype="fp8", num_nextn_predict_layers=0)
    ck = Checkpoint.open(write_random(tmp_path / "fp8", cfg))
    assert ck.verify().ok
    assert ck.raw("layers.1.ffn.experts.0.w2.weight").dtype == torch.float8_e4m3fn
    meant = RandomWeights(cfg)
    assert torch.equal(
        ck.tensor("layers.1.ffn.experts.0.w2.weight"),
        meant.tensor("layers.1.ffn.experts.0.w2.weight"),
    )


def test_make_checkpoint_cli(tmp_path, capsys):
    from flashdesk.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "make-checkpoint",
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--layers",
                "2",
                "--experts",
                "4",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    ck = Checkpoint.open(out)
    assert ck.verify().ok
    assert (ck.config.num_hidden_layers, ck.config.n_routed_experts) == (2, 4)
    assert torch.equal(
        ck.tensor("layers.1.attn.wkv.weight"),
        RandomWeights(ck.config, 5).tensor("layers.1.attn.wkv.weight"),
    )
    assert "verify: OK" in capsys.readouterr().out
    assert main(["make-checkpoint", "--out", str(out), "--preset", "tiny"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_written_files_have_the_official_header_form(tiny_dir):
    from flashdesk.engine.checkpoint.safetensors_file import read_header, shard_file_sizes

    sizes = shard_file_sizes(inventory(TINY).tensors)
    for shard, size in sizes.items():
        assert (tiny_dir / shard).stat().st_size == size
        header = read_header(tiny_dir / shard)
        assert header.metadata == {}
        begins = [e.begin for e in sorted(header.entries.values(), key=lambda e: e.begin)]
        assert all(
            e.begin % {"I64": 8, "F32": 4, "BF16": 2}.get(e.dtype, 1) == 0
            for e in header.entries.values()
        )
        assert begins[0] == header.data_start


def test_make_checkpoint_flash_configs():
    import argparse

    from flashdesk.engine.checkpoint_cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--out", "x", "--preset", "flash", "--layers", "2"]))
    assert (
        cfg.replace(num_hidden_layers=43, compress_ratios=ModelConfig.v4_flash().compress_ratios)
        == ModelConfig.v4_flash()
    )
    assert cfg.compress_ratios == (0, 0, 0) and inventory(cfg).layer_bytes(1) > 3.5e9
    args = [
        "--out",
        "x",
        "--preset",
        "flash",
        "--layers",
        "2",
        "--ratios",
        "4,128",
        "--experts",
        "16",
        "--mtp",
        "0",
    ]
    cfg = build_config(parser.parse_args(args))
    assert (cfg.compress_ratios, cfg.n_routed_experts, cfg.num_hidden_layers) == ((4, 128), 16, 2)
    assert [s.attention for s in cfg.layers] == ["csa", "hca"]
    with pytest.raises(ValueError, match="--ratios has 1 entries"):
        build_config(parser.parse_args(["--out", "x", "--layers", "2", "--ratios", "4"]))
