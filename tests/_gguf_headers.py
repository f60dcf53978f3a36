"""A DeepSeek-V4-Flash GGUF header in memory (no weights): what the planner and the wizard read
from a community quant, for tests that cannot have the 80+ GB file."""

from __future__ import annotations

from pathlib import Path

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.gguf.metadata import GGUFInfo, GGUFTensor
from flashdesk.engine.inventory import inventory
from flashdesk.offload.figures import ModelFigures

Q2_K = (256, 84)  # ggml block: values, bytes (2.625 bits per weight)
Q8_0 = (32, 34)


def _bytes(numel: int, block: tuple[int, int]) -> int:
    return -(-numel // block[0]) * block[1]


def v4_flash_gguf(expert_block=Q2_K) -> GGUFInfo:
    """A V4-Flash GGUF header as community quants lay it out: 2-3-bit stacked experts, Q8_0
    elsewhere; parameter counts per layer from our own V4-Flash inventory."""
    config = ModelConfig.v4_flash()
    native = ModelFigures.from_inventory(inventory(config), config, "fp4")
    tensors = [
        GGUFTensor(
            "token_embd.weight",
            "Q8_0",
            (config.hidden_size, config.vocab_size),
            _bytes(config.hidden_size * config.vocab_size, Q8_0),
            0,
        ),
        GGUFTensor(
            "output.weight", "Q8_0", (native.head_params,), _bytes(native.head_params, Q8_0), 0
        ),
    ]
    for layer in native.layers:
        p = f"blk.{layer.index}."
        tensors.append(
            GGUFTensor(
                p + "attn_q_b.weight",
                "Q8_0",
                (layer.dense_params,),
                _bytes(layer.dense_params, Q8_0),
                0,
            )
        )
        tensors.append(
            GGUFTensor(
                p + "ffn_up_shexp.weight",
                "Q8_0",
                (layer.shared_params,),
                _bytes(layer.shared_params, Q8_0),
                0,
            )
        )
        per_proj = layer.expert_params // 3
        for proj in ("gate", "up", "down"):
            numel = per_proj * layer.n_experts
            shape = (config.hidden_size, per_proj // config.hidden_size, layer.n_experts)
            tensors.append(
                GGUFTensor(
                    f"{p}ffn_{proj}_exps.weight",
                    "Q2_K",
                    shape,
                    _bytes(numel, expert_block),
                    0,
                )
            )
    metadata = {
        "general.architecture": "deepseek4",
        "general.name": "DeepSeek-V4-Flash Q2_K (synthetic header)",
        "deepseek4.block_count": config.num_hidden_layers,
        "deepseek4.context_length": config.max_position_embeddings,
        "deepseek4.attention.compress_ratios": list(config.compress_ratios),
        "deepseek4.hash_layer_count": config.num_hash_layers,
        "deepseek4.expert_used_count": config.num_experts_per_tok,
        "deepseek4.expert_count": config.n_routed_experts,
        "deepseek4.attention.sliding_window": config.sliding_window,
        "deepseek4.attention.key_length": config.head_dim,
        "deepseek4.rope.dimension_count": config.qk_rope_head_dim,
        "deepseek4.attention.indexer.key_length": config.index_head_dim,
        "tokenizer.ggml.tokens": list(range(config.vocab_size)),
    }
    total = sum(t.nbytes for t in tensors)
    return GGUFInfo((Path("DeepSeek-V4-Flash-Q2_K.gguf"),), metadata, tuple(tensors), total)
