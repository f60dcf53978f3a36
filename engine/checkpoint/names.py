"""Official tensor names ↔ the transformers port's names (spec §4.6), in one table. Torch-free.

A checkpoint saved by transformers (`model.layers.N.self_attn.q_a_proj.weight`, FP8 scales as
`weight_scale_inv`, routed experts merged into `experts.gate_up_proj [E, 2I, D]` and
`experts.down_proj [E, D, I]`) is read by translating every stored name to the official ones it
holds; an expert's official tensor is then a slice of the merged one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (official, transformers) inside `layers.N.`. A module name without `.weight` is an FP8 linear:
# `.weight` maps to `.weight` and `.scale` to `.weight_scale_inv`.
LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.wq_a", "self_attn.q_a_proj"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b", "self_attn.q_b_proj"),
    ("attn.wkv", "self_attn.kv_proj"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a", "self_attn.o_a_proj"),
    ("attn.wo_b", "self_attn.o_b_proj"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1", "mlp.shared_experts.gate_proj"),
    ("ffn.shared_experts.w2", "mlp.shared_experts.down_proj"),
    ("ffn.shared_experts.w3", "mlp.shared_experts.up_proj"),
)
GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
)
HF_GATE_UP = "mlp.experts.gate_up_proj"  # [E, 2I, D]: w1 rows then w3 rows of every expert
HF_DOWN = "mlp.experts.down_proj"  # [E, D, I]: w2 of every expert


def _expand() -> dict[str, str]:
    pairs = {}
    for official, hf in LAYER_NAMES:
        if official.endswith(
            (".weight", "_fn", "_base", "_scale", ".ape", ".attn_sink", ".tid2eid", ".bias")
        ):
            pairs[official] = hf
        else:  # FP8 linear module
            pairs[official + ".weight"] = hf + ".weight"
            pairs[official + ".scale"] = hf + ".weight_scale_inv"
    return pairs


_LAYER_TO_HF = _expand()
_LAYER_FROM_HF = {hf: official for official, hf in _LAYER_TO_HF.items()}
_GLOBAL_TO_HF = dict(GLOBAL_NAMES)
_GLOBAL_FROM_HF = {hf: official for official, hf in GLOBAL_NAMES}
_OFFICIAL_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OFFICIAL_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)")


@dataclass(frozen=True)
class ExpertSlice:
    """An official expert tensor inside a merged transformers tensor: `stored[expert, rows]`."""

    expert: int
    row_start: int | None  # None: all rows (down_proj)
    row_stop: int | None


def official_to_hf(name: str) -> str | None:
    """transformers name of an official tensor; None for MTP (transformers drops it) and routed
    experts (merged there; see `expert_to_hf`)."""
    if name in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[name]
    m = _OFFICIAL_LAYER.fullmatch(name)
    if m is None:
        return None
    hf = _LAYER_TO_HF.get(m.group(2))
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}"


def expert_to_hf(name: str, intermediate: int) -> tuple[str, ExpertSlice] | None:
    """(merged transformers tensor, slice) holding an official routed-expert weight."""
    m = _OFFICIAL_EXPERT.fullmatch(name)
    if m is None or m.group(4) != "weight":
        return None
    layer, expert, w = int(m.group(1)), int(m.group(2)), m.group(3)
    if w == "w2":
        return f"model.layers.{layer}.{HF_DOWN}", ExpertSlice(expert, None, None)
    start = 0 if w == "w1" else intermediate
    return f"model.layers.{layer}.{HF_GATE_UP}", ExpertSlice(expert, start, start + intermediate)


def hf_to_official(name: str) -> str | None:
    """Official name of a (non-merged) transformers tensor, or None if it has none."""
    if name in _GLOBAL_FROM_HF:
        return _GLOBAL_FROM_HF[name]
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        return None
    official = _LAYER_FROM_HF.get(m.group(2))
    return None if official is None else f"layers.{m.group(1)}.{official}"


def merged_experts(name: str) -> tuple[int, str] | None:
    """(layer, "gate_up" | "down") for a merged transformers expert tensor."""
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        return None
    if m.group(2) == HF_GATE_UP:
        return int(m.group(1)), "gate_up"
    if m.group(2) == HF_DOWN:
        return int(m.group(1)), "down"
    return None


def is_hf_name(name: str) -> bool:
    return name.startswith("model.") or name == "lm_head.weight"
