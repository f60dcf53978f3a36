"""A GGUF's tensor inventory as the planner's figures, and a plan as a llama.cpp placement.

The planner (offload/) never imports the engine; it reads an inventory by duck typing (tensors with
`name`, `layer`, `component`, `expert`, `nbytes`, `numel`, `dtype`, `shape`; a config with the HF
keys). A GGUF stores each layer's routed experts as one stacked tensor (`blk.N.ffn_*_exps`,
[.., .., n_experts]), so here it is split into per-expert rows of equal bytes, and the V4 config is
read from the `deepseek4.*` metadata. Bytes come from the file (the quant mix as published), so the
same roofline predicts tok/s for a 2-bit GGUF as for the FP4 checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

from flashdesk.engine.gguf.errors import GGUFError
from flashdesk.engine.gguf.metadata import GGUFInfo

_SHARED = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_shexp\.")


@dataclass(frozen=True)
class _Row:
    name: str
    layer: int | None
    component: str
    expert: int | None
    nbytes: int
    numel: int
    dtype: str
    shape: tuple[int, ...]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def gguf_inventory(info: GGUFInfo) -> SimpleNamespace:
    """The planner's inventory view of a GGUF (plain objects, duck-typed)."""
    from flashdesk.offload.figures import EMBED, HEAD, ROUTED, SHARED

    rows: list[_Row] = []
    for t in info.tensors:
        numel = _numel(t.shape)
        # ggml shapes are innermost-first; the planner wants rows first (embedding rows = vocab).
        shape = tuple(reversed(t.shape))
        if t.is_expert:
            n = int(t.shape[-1])  # [.., .., n_experts]
            for e in range(n):
                rows.append(
                    _Row(
                        f"{t.name}#{e}",
                        t.layer,
                        ROUTED,
                        e,
                        t.nbytes // n,
                        numel // n,
                        t.type_name,
                        shape[1:],
                    )
                )
            continue
        if t.name.startswith("token_embd."):
            component = EMBED
        elif t.name in ("output.weight",):
            component = HEAD
        elif _SHARED.match(t.name):
            component = SHARED
        else:
            component = "dense" if t.layer is not None else "final"
        name = f"layers.{t.layer}.ffn.gate.tid2eid" if "tid2eid" in t.name else t.name
        rows.append(_Row(name, t.layer, component, None, t.nbytes, numel, t.type_name, shape))
    return SimpleNamespace(tensors=rows)


def gguf_config(info: GGUFInfo) -> SimpleNamespace:
    """The HF-style config keys the planner reads, from a deepseek4 GGUF's metadata."""
    if not info.is_v4:
        raise GGUFError(
            f"{info.path.name} is a '{info.architecture}' model; the planner models "
            "DeepSeek-V4 (deepseek4) placements only."
        )
    v = info.arch_value
    n_layers = info.n_layers
    ratios = list(v("attention.compress_ratios", []) or [])
    if len(ratios) < n_layers:
        raise GGUFError(f"{info.path.name} has no compress ratio for every layer.")
    return SimpleNamespace(
        num_hidden_layers=n_layers,
        compress_ratios=ratios,
        num_hash_layers=int(v("hash_layer_count", 0) or 0),
        num_experts_per_tok=int(v("expert_used_count", 0) or 0),
        vocab_size=info.vocab_size,
        sliding_window=int(v("attention.sliding_window", 128) or 128),
        head_dim=int(v("attention.key_length", 512) or 512),
        qk_rope_head_dim=int(v("rope.dimension_count", 64) or 64),
        index_head_dim=int(v("attention.indexer.key_length", 128) or 128),
        max_position_embeddings=info.context_length,
    )


def model_figures(info: GGUFInfo):
    """offload.figures.ModelFigures for a deepseek4 GGUF (bytes per tensor from the file)."""
    from flashdesk.offload.figures import ModelFigures

    return ModelFigures.from_inventory(gguf_inventory(info), gguf_config(info), info.name)
