"""load_model: from an official-layout folder written by our writer to a running model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import one_thread, our_model, random_official_tensors, tiny_config

from flashdesk.engine import load_model
from flashdesk.engine.checkpoint import Checkpoint, CheckpointError, write_checkpoint

_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = tiny_config()
    tensors = random_official_tensors(config, 11)
    folder = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(folder, config, tensors)
    return config, folder


def test_loaded_model_equals_the_checkpoints_dequantized_weights(written):
    """load_model reads exactly what the checkpoint holds (FP8/FP4 dequantized, BF16 upcast):
    a model built from Checkpoint.tensor values gives the same logits."""
    config, folder = written
    ckpt = Checkpoint.open(folder)
    values = {n: ckpt.tensor(n) for n in ckpt.names() if not n.endswith(".scale")}
    ids = torch.arange(0, 90) * 7 % config.vocab_size
    loaded = load_model(folder, with_mtp=True)
    assert torch.equal(loaded.forward_full(ids), our_model(config, values).forward_full(ids))
    assert loaded.mtp and loaded.config == config


def test_bf16_load_and_mtp_draft(written):
    config, folder = written
    model = load_model(folder, dtype=torch.bfloat16, with_mtp=True)
    assert model.embed.dtype == torch.bfloat16
    state = model.new_state()
    ids = torch.arange(1, 30)
    streams = model.forward_streams(ids[:-1], state)
    draft = model.mtp_logits(streams, ids[1:], state)
    assert draft.shape == (28, config.vocab_size) and torch.isfinite(draft).all()


def test_load_errors_say_what_to_do(written, tmp_path):
    _, folder = written
    with pytest.raises(ValueError, match="float32"):
        load_model(folder, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    no_mtp = tiny_config(num_nextn_predict_layers=0, compress_ratios=(0, 4, 16, 4))
    write_checkpoint(tmp_path / "plain", no_mtp, random_official_tensors(no_mtp, 1, False))
    with pytest.raises(CheckpointError, match="with_mtp=False"):
        load_model(tmp_path / "plain", with_mtp=True)
    model = load_model(tmp_path / "plain")
    with pytest.raises(RuntimeError, match="without its MTP block"):
        model.mtp_logits(torch.zeros(1, 4, 256), [1], model.new_state())
