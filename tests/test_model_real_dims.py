"""Two layers at V4-Flash's real dimensions (random weights in the official FP8/FP4 format,
16 routed experts instead of 256): load, prefill 1,024 tokens, decode 16 steps on the CPU."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from flashdesk.engine import load_model
from flashdesk.engine.checkpoint import write_random
from flashdesk.engine.config import ModelConfig


def real_dims_config() -> ModelConfig:
    """V4-Flash dimensions; layer 0 CSA (hash-routed), layer 1 HCA (ratio 128); 16 experts."""
    return ModelConfig.v4_flash().replace(
        num_hidden_layers=2,
        compress_ratios=(4, 128),
        num_nextn_predict_layers=0,
        n_routed_experts=16,
        num_hash_layers=1,
    )


def _peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


@pytest.mark.slow
def test_two_real_layers_prefill_1024_and_decode_16(tmp_path, record_property):
    config = real_dims_config()
    write_random(tmp_path, config, seed=0)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1024,), generator=torch.Generator().manual_seed(0))
    state = model.new_state()
    logits = model.prefill(ids, state)
    assert logits.shape == (config.vocab_size,)
    assert torch.isfinite(logits).all() and logits.std() > 0
    # ⌊1024/4⌋ CSA entries and index keys, ⌊1024/128⌋ HCA entries
    assert state.layers[0].kv_entries.n == 256 and state.layers[0].index_keys.n == 256
    assert state.layers[1].kv_entries.n == 8
    tokens = []
    for _ in range(16):
        token = int(logits.argmax())
        tokens.append(token)
        logits = model.decode(token, state)
        assert torch.isfinite(logits).all()
    assert state.position == 1040
    peak = _peak_rss_gib()
    record_property("peak_rss_gib", round(peak, 2))
    record_property("state_bytes", state.nbytes)
    print(f"\nreal-dims 2 layers: peak RSS {peak:.2f} GiB, state {state.nbytes / 2**20:.2f} MiB")
