"""transformers' DeepseekV4ForCausalLM (test-only oracle) reads what our writer writes, and we read
what transformers saves: same weights both ways, through one name table."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flashdesk.engine.checkpoint import Checkpoint, write_random
from flashdesk.engine.checkpoint import names as hf_names
from flashdesk.engine.config import ModelConfig

transformers = pytest.importorskip("transformers")

TINY = ModelConfig.tiny()


def _load_hf(path: Path):
    from transformers import DeepseekV4ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(torch.float32).eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_random(tmp_path_factory.mktemp("oracle") / "ckpt", TINY, seed=7)


@pytest.fixture(scope="module")
def hf_model(written):
    return _load_hf(written)


def test_transformers_loads_our_checkpoint_with_equal_weights(written, hf_model):
    ck = Checkpoint.open(written)
    state = hf_model.state_dict()
    covered = set()
    for name in ck.names():
        if name.startswith("mtp."):
            continue  # transformers drops the MTP block
        if name.endswith(".scale") and ck.info(name).dtype == "F8_E8M0":
            continue  # folded into the dequantized weight
        hf = hf_names.official_to_hf(name)
        if hf is not None:
            ours = ck.tensor(name)
            theirs = state[hf]
            if ours.is_floating_point():
                theirs = theirs.float()
            assert torch.equal(ours, theirs), name
            covered.add(hf)
            continue
        merged, part = hf_names.expert_to_hf(name, TINY.moe_intermediate_size)
        theirs = state[merged][part.expert]
        if part.row_start is not None:
            theirs = theirs[part.row_start : part.row_stop]
        assert torch.equal(ck.tensor(name), theirs.float()), name
        covered.add(merged)
    assert covered == set(state), sorted(set(state) - covered)


def test_forward_of_our_weights_is_finite(written, hf_model):
    ids = torch.randint(0, TINY.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert 0.01 < logits.std() < 100


def test_we_read_a_checkpoint_saved_by_transformers(written, hf_model, tmp_path):
    out = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model.save_pretrained(str(out), save_original_format=False)
    ck = Checkpoint.open(out)
    assert ck.naming == "hf"
    assert ck.config.replace(rope_scaling=TINY.rope_scaling) == TINY
    report = ck.verify()
    assert report.ok, str(report)
    assert any("dequantized" in n for n in report.notes)
    ours = Checkpoint.open(written)
    non_mtp = [n for n in ours.names() if not n.startswith("mtp.") and not n.endswith(".scale")]
    assert sorted(n for n in ck.names() if not n.endswith(".scale")) == sorted(non_mtp)
    for name in non_mtp:
        assert torch.equal(ck.tensor(name), ours.tensor(name)), name


@pytest.mark.slow
def test_random_weights_stay_sane_through_43_layers(tmp_path):
    """V4-Flash's depth (43 layers, its CSA/HCA alternation and hash layers) at tiny width."""
    cfg = ModelConfig.tiny(
        num_hidden_layers=43,
        compress_ratios=ModelConfig.v4_flash().compress_ratios,
        num_hash_layers=3,
    )
    model = _load_hf(write_random(tmp_path / "deep", cfg, seed=1))
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    rms = [h.float().pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert max(rms) < 1e3, rms
    assert 0.01 < out.logits.std() < 100
