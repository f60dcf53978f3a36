"""The inventory computed from a ModelConfig alone reproduces the official checkpoint's numbers."""

from __future__ import annotations

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import (
    ATTENTION,
    COMPRESSOR,
    EMBED,
    HEAD,
    INDEXER,
    MHC,
    MTP,
    ROUTED_EXPERTS,
    ROUTER,
    SHARED_EXPERTS,
    inventory,
    shard_name,
)


def test_v4_flash_totals_match_the_official_index():
    inv = inventory(ModelConfig.v4_flash())
    assert inv.count == 69_187
    assert inv.total_bytes == 159_609_485_896  # model.safetensors.index.json metadata.total_size
    assert inv.expert_bytes == 13_369_344
    assert len(inv.by_name) == inv.count  # names are unique
    assert len(inv.shards) == 46


def test_v4_flash_byte_budget_by_category_matches_spec():
    by = inventory(ModelConfig.v4_flash()).bytes_by_category()
    assert by[ROUTED_EXPERTS] == 147_169_738_752
    assert by[ATTENTION] == 4_599_478_144
    assert by[COMPRESSOR] == 525_722_624
    assert by[INDEXER] == 275_353_344
    assert by[SHARED_EXPERTS] == 1_082_196_480
    assert by[ROUTER] == 108_834_816
    assert by[MHC] == 135_275_592
    assert by[EMBED] == by[HEAD] == 1_059_061_760
    assert by[MTP] == 3_593_787_756


def test_v4_flash_per_layer_and_expert_layout():
    cfg = ModelConfig.v4_flash()
    inv = inventory(cfg)
    assert inv.layer_bytes(5, ROUTED_EXPERTS) == 3_422_552_064
    # non-expert bytes per layer (spec §4.2, layers 0 and 2 incl. the tid2eid table)
    non_expert = {i: inv.layer_bytes(i) - inv.layer_bytes(i, ROUTED_EXPERTS) for i in (0, 2, 3)}
    assert [round(v / 1e6, 1) for v in non_expert.values()] == [143.6, 173.5, 146.0]
    expert = inv.expert_tensors(7, 42)
    assert [t.name for t in expert] == [
        f"layers.7.ffn.experts.42.{w}.{k}" for w in ("w1", "w3", "w2") for k in ("weight", "scale")
    ]
    assert [(t.dtype, t.shape) for t in expert[:2]] == [
        ("I8", (2048, 2048)),
        ("F8_E8M0", (2048, 128)),
    ]
    assert [(t.dtype, t.shape) for t in expert[4:]] == [
        ("I8", (4096, 1024)),
        ("F8_E8M0", (4096, 64)),
    ]
    by = inv.by_name
    assert by["layers.0.ffn.gate.tid2eid"].shape == (129280, 6)
    assert "layers.0.ffn.gate.bias" not in by and by["layers.3.ffn.gate.bias"].dtype == "F32"
    assert by["layers.2.attn.indexer.compressor.ape"].shape == (4, 256)
    assert by["layers.3.attn.compressor.ape"].shape == (128, 512)
    assert "layers.3.attn.indexer.wq_b.weight" not in by
    assert "layers.0.attn.compressor.wkv.weight" not in by
    assert by["layers.2.attn.wq_b.scale"].shape == (256, 8)
    assert by["mtp.0.e_proj.scale"].shape == (32, 32)
    assert by["mtp.0.ffn.gate.bias"].category == MTP
    assert by["mtp.0.ffn.experts.0.w1.weight"].component == ROUTED_EXPERTS
    # shard layout: embed alone, one shard per layer, head shard, MTP shard
    assert by["embed.weight"].shard == shard_name(1, 46)
    assert by["layers.42.attn.wkv.weight"].shard == shard_name(44, 46)
    assert by["head.weight"].shard == by["hc_head_fn"].shard == shard_name(45, 46)
    assert by["mtp.0.hc_head_scale"].shard == shard_name(46, 46)


def test_tiny_inventory_has_every_mechanism():
    inv = inventory(ModelConfig.tiny())
    names = inv.by_name
    assert "layers.1.attn.indexer.weights_proj.weight" in names
    assert "layers.2.attn.compressor.ape" in names
    assert "layers.1.ffn.gate.tid2eid" in names and "layers.2.ffn.gate.bias" in names
    assert names["layers.0.attn.wq_a.scale"].shape == (1, 2)  # 128x256 -> one by two tiles
    assert len(inv.shards) == 4 + 3
    summary = inv.summary()
    assert summary["total_bytes"] == sum(summary["by_category"].values()) == inv.total_bytes
    assert summary["expert_bytes"] == sum(t.nbytes for t in inv.expert_tensors(2, 0))


def test_fp8_experts_and_no_mtp():
    cfg = ModelConfig.tiny(expert_dtype="fp8", num_nextn_predict_layers=0)
    inv = inventory(cfg)
    w1 = inv.by_name["layers.0.ffn.experts.0.w1.weight"]
    assert (w1.dtype, w1.shape) == ("F8_E4M3", (128, 256))
    assert inv.by_name["layers.0.ffn.experts.0.w1.scale"].shape == (1, 2)
    assert inv.expert_bytes == sum(t.nbytes for t in inv.expert_tensors(0, 0))
    assert not any(t.name.startswith("mtp.") for t in inv.tensors)
    assert len(inv.shards) == 4 + 2


# File sizes of the 46 official shards (from the release's Git-LFS pointers, commit 60d8d70).
OFFICIAL_SHARD_SIZES = [1059061856, 3566321192, 3566321192, 3596229272] + [
    3568768976, 3590024776,
] * 3 + [3568768976, 3590026352] + [3568770544, 3590026352] * 16 + [1059332516, 3593956092]  # fmt: skip


def test_official_shard_file_sizes_are_reproduced_byte_for_byte():
    """Names, dtypes, shapes and the shard split of every shard are right: with the safetensors
    header our writer produces (dtype-ranked order, no metadata) every file size matches."""
    from flashdesk.engine.checkpoint.safetensors_file import shard_file_sizes

    sizes = shard_file_sizes(inventory(ModelConfig.v4_flash()).tensors)
    assert [sizes[shard_name(i, 46)] for i in range(1, 47)] == OFFICIAL_SHARD_SIZES
