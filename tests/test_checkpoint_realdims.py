"""A layer at V4-Flash's real dimensions: written shard by shard, opened without being read."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch

from flashdesk.engine.checkpoint import Checkpoint, RandomWeights, write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import ROUTED_EXPERTS, inventory

pytestmark = pytest.mark.slow

# One CSA + hash-routed layer at real width (the largest non-expert layer kind, plus tid2eid),
# 32 of its 256 experts, and a small vocabulary so the embedding does not dominate the run time.
REAL_LAYER = ModelConfig.v4_flash().replace(
    num_hidden_layers=1,
    compress_ratios=(4, 0),
    num_nextn_predict_layers=0,
    n_routed_experts=32,
    vocab_size=4096,
)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    return write_random(tmp_path_factory.mktemp("real") / "ckpt", REAL_LAYER, seed=11)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_real_layer_has_the_spec_shapes_and_verifies(real_dir):
    ck = Checkpoint.open(real_dir)
    assert ck.verify().ok
    assert ck.info("layers.0.attn.wq_b.weight").shape == (32768, 1024)
    assert ck.info("layers.0.attn.wq_b.scale").shape == (256, 8)
    assert ck.info("layers.0.attn.wo_a.scale").shape == (64, 32)
    assert ck.info("layers.0.ffn.experts.31.w2.weight").shape == (4096, 1024)
    assert ck.info("layers.0.ffn.experts.31.w2.scale").shape == (4096, 64)
    assert ck.info("layers.0.ffn.gate.tid2eid").shape == (4096, 6)
    inv = inventory(REAL_LAYER)
    assert inv.layer_bytes(0, ROUTED_EXPERTS) == 32 * 13_369_344
    assert ck.inventory().as_dicts() == inv.as_dicts()
    layer_shard = real_dir / inv.by_name["layers.0.attn.wq_a.weight"].shard
    header = layer_shard.stat().st_size - inv.bytes_by_shard()[layer_shard.name]
    assert 0 < header < 1 << 20  # the file is the header plus exactly the inventory's bytes


def test_opening_does_not_read_the_files(real_dir):
    total = sum(p.stat().st_size for p in real_dir.glob("*.safetensors"))
    assert total > 500e6
    before = _rss()
    ck = Checkpoint.open(real_dir)
    report = ck.verify()
    views = [ck.raw(n) for n in ck.names()]  # every tensor, as views: still nothing read
    opened = _rss() - before
    assert report.ok and len(views) == len(ck)
    assert opened < 0.05 * total, f"RSS grew {opened / 1e6:.0f} MB opening {total / 1e6:.0f} MB"
    w1, w3, w2 = ck.expert(0, 17)  # touching one expert maps in about its 13 MB, no more
    touched = _rss() - before - (w1.nbytes + w3.nbytes + w2.nbytes)
    assert touched < 0.1 * total, f"RSS grew {touched / 1e6:.0f} MB for one expert"
    meant = RandomWeights(REAL_LAYER, seed=11)
    assert torch.equal(w2, meant.tensor("layers.0.ffn.experts.17.w2.weight"))
    assert torch.equal(
        ck.tensor("layers.0.attn.wo_b.weight"), meant.tensor("layers.0.attn.wo_b.weight")
    )
