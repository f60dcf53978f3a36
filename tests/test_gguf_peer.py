"""llama.cpp as a correctness peer: our write_random V4 checkpoint, converted by llama.cpp's own
converter with every weight F32, run greedily by both engines from the same prompt.

The two must agree token for token (and on logits to ~1e-5): llama.cpp's deepseek4 graph is an
independent implementation of CSA/HCA, the indexer, mHC and hash routing. With the upstream
Q8_0/MXFP4 conversion they would not: Q8_0 rounds the FP8 linears (logit differences ~0.2), so
the exact conversion is the peer. Dimensions: llama.cpp's indexer needs index_head_dim 128 (the
tiny config's 32 aborts in its graph), and its loader takes compress ratios 0, 4 and 128 only.

Needs llama-cpp-python and llama.cpp's converter source (FLASHDESK_LLAMA_CPP_SRC, or the cache
`fetch_llama_cpp_source()` fills); tests never download it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf extra) is not installed")

import torch

from flashdesk.engine import load_model
from flashdesk.engine.checkpoint import write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.gguf.backend import GGUFPlacement, LlamaCppModel
from flashdesk.engine.gguf.convert import convert_checkpoint, llama_cpp_source

pytestmark = [
    pytest.mark.skipif(
        llama_cpp_source() is None, reason="llama.cpp's converter source is not on this machine"
    ),
    pytest.mark.slow,
]

PROMPT_TOKENS = 300  # past the 128-token window: CSA (4) and HCA (128) both compress
STEPS = 40


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peer") / "tiny"
    config = ModelConfig.tiny(
        vocab_size=129_280, sliding_window=128, index_topk=64, index_head_dim=128
    )
    write_random(folder, config, seed=0)
    gguf = convert_checkpoint(folder, folder.parent / "tiny-f32.gguf", exact=True)
    ours = load_model(folder)
    placement = GGUFPlacement(context=512, threads=2, kv_type="f32", flash_attn=False)
    theirs = LlamaCppModel(gguf, placement)
    yield config, ours, theirs
    theirs.close()


def test_greedy_tokens_identical_for_40_steps(engines):
    config, ours, theirs = engines
    prompt = torch.randint(
        2, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    runs = []
    for model in (ours, theirs):
        state = model.new_state()
        logits = model.prefill(prompt, state)
        tokens, rows = [], [logits.float().clone()]
        for _ in range(STEPS):
            tokens.append(int(logits.argmax()))
            logits = model.decode(tokens[-1], state)
            rows.append(logits.float().clone())
        runs.append((tokens, torch.stack(rows)))
    (ours_tokens, ours_logits), (theirs_tokens, theirs_logits) = runs
    assert ours_tokens == theirs_tokens
    diff = (ours_logits - theirs_logits).abs().amax(dim=-1)
    assert float(diff.max()) < 1e-4, diff
    print(f"max |logit diff| over {STEPS + 1} rows: {float(diff.max()):.2e}")
