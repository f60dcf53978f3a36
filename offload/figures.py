"""ModelFigures: the sizes of a model as plain numbers, all the planner needs to know about it.

The planner never imports the engine: the glue (`flashdesk fit`) turns the engine's inventory and
config into these figures with `ModelFigures.from_inventory`, which reads them by duck typing
(tensors with `layer`, `component`, `expert`, `nbytes`, `numel`; a config with the HF keys).
Tests build figures straight from the spec's tables.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

# Inventory component names (engine/inventory.py, spec §4.2 categories).
ROUTED = "routed_experts"
SHARED = "shared_experts"
EMBED = "embed"
HEAD = "head"


# The engine's prefill attention takes query blocks of this many tokens once a CSA layer's entries
# outnumber twice its top-k (engine.model.attention.GATHER_QUERY_BLOCK; a test keeps them equal).
GATHER_QUERY_BLOCK = 16
# A prefill chunk's fixed GPU scratch: FP8 weights dequantized for one matmul (V4-Flash's largest
# is 64 MB in bf16), small-context attention blocks, library workspaces.
PREFILL_BASE_BYTES = 512 << 20


def prefill_activation_bytes(
    hidden: int,
    heads: int,
    head_dim: int,
    experts_per_token: int,
    index_heads: int,
    index_dim: int,
    csa_ratio: int,
) -> tuple[int, int]:
    """(bytes per prompt token of a chunk, bytes per context token) a GPU prefill holds beside
    the weights and the KV cache.

    Per chunk token: the attention's peak, where each query's `heads × head_dim` values live as
    the bf16 projection, its float32 norm and rotary temporaries and the float32 output (~16
    bytes per value), plus the routed experts' float32 output per pick when a chunk streams its
    experts. Measured on the CPU path (same torch code, bf16 activations, V4-Flash dims, 2026-11-27,
    dev VM): 449–517 KiB per token from the peak RSS between 1024-, 2048- and 4096-token chunks;
    this gives 608 KiB. Per context token: a CSA layer's lightning-indexer scores for one query
    block (`[block, index_heads, context/ratio]` float32) and its float32 copy of the index keys.
    """
    per_token = 16 * heads * head_dim + 4 * experts_per_token * hidden
    per_context = (GATHER_QUERY_BLOCK * index_heads * 4 + 4 * index_dim) // csa_ratio
    return per_token, per_context


def prefill_bytes_of(config: Any) -> tuple[int, int]:
    """`prefill_activation_bytes` for a model config (the engine's `ModelConfig`, duck-typed);
    (0, 0) for one without those dimensions (a GGUF's: llama.cpp sizes its own batches)."""
    dims = [
        getattr(config, name, None)
        for name in (
            "hidden_size", "num_attention_heads", "head_dim", "num_experts_per_tok",
            "index_n_heads", "index_head_dim",
        )
    ]  # fmt: skip
    if None in dims:
        return 0, 0
    return prefill_activation_bytes(*(int(d) for d in dims), 4)  # CSA's compress ratio


@dataclass(frozen=True)
class LayerFigures:
    """One main layer. `attention` is "window", "csa" or "hca" (compress ratio 0, 4, other)."""

    index: int
    attention: str
    compress_ratio: int
    hash_routed: bool
    dense_bytes: int  # attention, compressor, indexer, mHC, norms, router: read every token
    dense_params: int
    shared_bytes: int  # the shared expert: read every token
    shared_params: int
    n_experts: int
    expert_bytes: int  # one routed expert (w1, w3, w2 with scales)
    expert_params: int
    table_bytes: int = 0  # in dense_bytes but not read per token: the hash layers' tid2eid table
    # The same as the runtime holds them in VRAM (FP8 widened to bf16, ...); None: as stored.
    dense_gpu: int | None = None
    shared_gpu: int | None = None

    @property
    def experts_bytes(self) -> int:
        return self.n_experts * self.expert_bytes

    @property
    def dense_read_bytes(self) -> int:
        """Dense bytes one decode token reads (one tid2eid row instead of the table)."""
        return self.dense_bytes - self.table_bytes

    def dense_on(self, gpu: bool) -> int:
        """Dense bytes held where they are placed: VRAM (as the runtime widens them) or RAM."""
        return self.dense_gpu if gpu and self.dense_gpu is not None else self.dense_bytes

    def shared_on(self, gpu: bool) -> int:
        return self.shared_gpu if gpu and self.shared_gpu is not None else self.shared_bytes

    def dense_read_on(self, gpu: bool) -> int:
        """`dense_read_bytes` as held on the GPU or in RAM (the tid2eid table is stored as is)."""
        return self.dense_on(gpu) - self.table_bytes


@dataclass(frozen=True)
class ModelFigures:
    """Byte and parameter counts by placement unit, plus the KV-cache geometry (spec §3)."""

    name: str
    layers: tuple[LayerFigures, ...]
    experts_per_token: int
    embed_bytes: int
    embed_row_bytes: int
    head_bytes: int
    head_params: int
    final_bytes: int  # hc_head + final norm
    mtp_bytes: int  # the MTP block: planned in the CPU mode only (it drafts there)
    total_bytes: int  # the whole checkpoint on disk
    total_params: int
    window: int  # sliding-window entries per layer
    kv_dim: int  # one KV entry (K = V), head_dim
    rope_dim: int
    index_dim: int  # one lightning-indexer key
    max_context: int
    csa_ratio: int = 4
    head_gpu: int | None = None  # head + final as the runtime holds them in VRAM; None: as stored
    # GPU memory a prefill chunk needs beside the weights and the KV cache (`prefill_workspace`);
    # 0: not modelled (a GGUF runs through llama.cpp, which sizes its own batches)
    prefill_token_bytes: int = 0
    prefill_context_bytes: int = 0

    def prefill_workspace(self, chunk: int, context: int) -> int | None:
        """GPU bytes a prefill chunk of `chunk` tokens needs at up to `context` tokens of
        context (activations, scratch, the indexer's scores), or None where not modelled."""
        if not self.prefill_token_bytes:
            return None
        return (
            PREFILL_BASE_BYTES
            + chunk * self.prefill_token_bytes
            + context * self.prefill_context_bytes
        )

    def head_on(self, gpu: bool) -> int:
        """The LM head and the final norm/hyper-connection tensors, in VRAM or in RAM."""
        stored = self.head_bytes + self.final_bytes
        return self.head_gpu if gpu and self.head_gpu is not None else stored

    # ------------------------------------------------------------------ totals

    @property
    def expert_bytes(self) -> int:
        return self.layers[0].expert_bytes

    @property
    def n_experts(self) -> int:
        return self.layers[0].n_experts

    @property
    def experts_total_bytes(self) -> int:
        return sum(layer.experts_bytes for layer in self.layers)

    @property
    def dense_total_bytes(self) -> int:
        """Everything read every token except the KV cache: layers' dense + shared, head, final."""
        return (
            sum(layer.dense_bytes + layer.shared_bytes for layer in self.layers)
            + self.head_bytes
            + self.final_bytes
        )

    def dense_total_on(self, gpu: bool) -> int:
        """`dense_total_bytes` as held in VRAM (the runtime's widened dtypes) or in RAM."""
        layers = sum(layer.dense_on(gpu) + layer.shared_on(gpu) for layer in self.layers)
        return layers + self.head_on(gpu)

    @property
    def active_params(self) -> int:
        k = self.experts_per_token
        return self.head_params + sum(
            layer.dense_params + layer.shared_params + k * layer.expert_params
            for layer in self.layers
        )

    # ------------------------------------------------------------------ KV cache (spec §3)

    def kv_entry_bytes(self, kv_dtype: str) -> tuple[int, int]:
        """Bytes of one 512-d KV entry and one indexer key.

        bf16: the reference cache (2 bytes per value). fp8: vLLM's layout — the no-rope part as FP8
        with one E8M0 scale per 64 values, the rope part in BF16, padded to 8 bytes; index keys as
        FP8 plus one FP32 scale (spec §3.2).
        """
        if kv_dtype == "bf16":
            return 2 * self.kv_dim, 2 * self.index_dim
        if kv_dtype == "fp8":
            nope = self.kv_dim - self.rope_dim
            entry = nope + -(-nope // 64) + 2 * self.rope_dim
            return -(-entry // 8) * 8, self.index_dim + 4
        raise ValueError(f"KV dtype {kv_dtype!r} is not 'bf16' or 'fp8'")

    def compressor_state_bytes(self, layer: LayerFigures) -> int:
        """FP32 state the engine's compressors carry (`cache.CompressorCarry`): projections and
        gates [m, (1+ov)·c] each, the overlapping one also the last window's [m, c] halves
        (the reference keeps [(1+ov)·m, (1+ov)·c] each: 8·m·c floats where this is 6·m·c)."""
        if layer.attention == "window":
            return 0
        overlap = 1 if layer.attention == "csa" else 0
        floats = 2 * layer.compress_ratio * (1 + 2 * overlap)  # per channel
        state = floats * self.kv_dim * 4
        if layer.attention == "csa":  # the indexer's own compressor
            state += floats * self.index_dim * 4
        return state

    def kv_layer_bytes(self, layer: LayerFigures, context: int, kv_dtype: str) -> int:
        """Cache of one layer for one sequence of `context` tokens: window + compressed + state."""
        e_kv, e_idx = self.kv_entry_bytes(kv_dtype)
        size = min(self.window, context) * e_kv + self.compressor_state_bytes(layer)
        if layer.attention == "csa":
            size += (context // layer.compress_ratio) * (e_kv + e_idx)
        elif layer.attention == "hca":
            size += (context // layer.compress_ratio) * e_kv
        return size

    def kv_bytes(self, context: int, kv_dtype: str) -> int:
        return sum(self.kv_layer_bytes(layer, context, kv_dtype) for layer in self.layers)

    def kv_read_layer_bytes(
        self, layer: LayerFigures, context: int, kv_dtype: str, index_topk: int = 512
    ) -> int:
        """KV bytes one decode token reads in a layer at `context` (spec §6.2 table).

        Window entries always; CSA: every indexer key plus the top-k selected entries; HCA: every
        compressed entry.
        """
        e_kv, e_idx = self.kv_entry_bytes(kv_dtype)
        read = min(self.window, context) * e_kv
        if layer.attention == "csa":
            n = context // layer.compress_ratio
            read += n * e_idx + min(index_topk, n) * e_kv
        elif layer.attention == "hca":
            read += (context // layer.compress_ratio) * e_kv
        return read

    # ------------------------------------------------------------------ from the engine

    @classmethod
    def from_inventory(cls, inventory: Any, config: Any, name: str = "") -> ModelFigures:
        """Figures from `flashdesk.engine.inventory.Inventory` and its `ModelConfig` (duck-typed)."""
        n_layers = int(config.num_hidden_layers)
        dense_b: dict[int, int] = defaultdict(int)
        dense_g: dict[int, int] = defaultdict(int)  # as held in VRAM (`gpu_bytes`)
        dense_p: dict[int, int] = defaultdict(int)
        table_b: dict[int, int] = defaultdict(int)
        shared_b: dict[int, int] = defaultdict(int)
        shared_g: dict[int, int] = defaultdict(int)
        shared_p: dict[int, int] = defaultdict(int)
        expert_b: dict[tuple[int, int], int] = defaultdict(int)
        expert_p: dict[tuple[int, int], int] = defaultdict(int)
        totals = defaultdict(int)
        params = defaultdict(int)
        total_bytes = 0
        total_params = 0
        head_g = 0
        for t in inventory.tensors:
            nbytes = int(t.nbytes)
            gbytes = int(getattr(t, "gpu_bytes", nbytes))
            total_bytes += nbytes
            counted = _param_count(t)
            layer = t.layer
            if layer is not None and layer >= n_layers:
                totals["mtp"] += nbytes
                continue
            total_params += counted
            if layer is None:
                totals[t.component] += nbytes
                params[t.component] += counted
                if t.component != EMBED:
                    head_g += gbytes
                if t.component == EMBED:
                    totals["embed_rows"] = max(totals["embed_rows"], int(t.shape[0]))
                continue
            if t.component == ROUTED:
                expert_b[(layer, t.expert)] += nbytes
                expert_p[(layer, t.expert)] += counted
            elif t.component == SHARED:
                shared_b[layer] += nbytes
                shared_g[layer] += gbytes
                shared_p[layer] += counted
            else:
                dense_b[layer] += nbytes
                dense_g[layer] += gbytes
                dense_p[layer] += counted
                if str(t.name).endswith("gate.tid2eid"):
                    table_b[layer] += nbytes
        layers = []
        for i in range(n_layers):
            ratio = int(config.compress_ratios[i])
            kind = "window" if ratio == 0 else ("csa" if ratio == 4 else "hca")
            experts = sorted(e for (layer, e) in expert_b if layer == i)
            layers.append(
                LayerFigures(
                    index=i,
                    attention=kind,
                    compress_ratio=ratio,
                    hash_routed=i < int(config.num_hash_layers),
                    dense_bytes=dense_b[i],
                    dense_params=dense_p[i],
                    shared_bytes=shared_b[i],
                    shared_params=shared_p[i],
                    n_experts=len(experts),
                    expert_bytes=expert_b[(i, experts[0])] if experts else 0,
                    expert_params=expert_p[(i, experts[0])] if experts else 0,
                    table_bytes=table_b[i],
                    dense_gpu=dense_g[i],
                    shared_gpu=shared_g[i],
                )
            )
        embed = totals[EMBED]
        rows = totals["embed_rows"] or int(config.vocab_size)
        final = sum(v for k, v in totals.items() if k not in (EMBED, HEAD, "mtp", "embed_rows"))
        per_token, per_context = prefill_bytes_of(config)
        return cls(
            name=name,
            layers=tuple(layers),
            experts_per_token=int(config.num_experts_per_tok),
            embed_bytes=embed,
            embed_row_bytes=embed // rows if rows else 0,
            head_bytes=totals[HEAD],
            head_params=params[HEAD],
            final_bytes=final,
            mtp_bytes=totals["mtp"],
            total_bytes=total_bytes,
            total_params=total_params,
            window=int(config.sliding_window),
            kv_dim=int(config.head_dim),
            rope_dim=int(config.qk_rope_head_dim),
            index_dim=int(config.index_head_dim),
            max_context=int(config.max_position_embeddings),
            head_gpu=head_g,
            prefill_token_bytes=per_token,
            prefill_context_bytes=per_context,
        )


def _param_count(tensor: Any) -> int:
    """Parameters a tensor holds: packed FP4 bytes hold two; scales hold none."""
    name = str(tensor.name)
    if name.endswith(".scale") and tensor.dtype == "F8_E8M0":
        return 0
    if tensor.dtype == "I8" and tensor.component == ROUTED:
        return 2 * int(tensor.numel)
    if tensor.dtype == "I64":  # tid2eid routing table: data, not weights
        return 0
    return int(tensor.numel)
