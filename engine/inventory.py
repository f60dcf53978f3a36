"""Every tensor of a V4 checkpoint in the official layout, computed from a ModelConfig alone.

The planner sizes GPU/RAM placement from this without opening any file; the checkpoint reader
checks real files against it (`Checkpoint.verify`) and the writer writes exactly these tensors.
Names, dtypes, shapes and the shard layout follow spec §4.1–4.2 and the official
`inference/model.py` module structure. Torch-free.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

from flashdesk.engine.config import CSA, ModelConfig

# safetensors dtype string -> bytes per element
DTYPE_BYTES = {
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "I64": 8,
}

# Categories of the spec's byte budget (§4.2). MTP tensors all count as MTP there; their
# `component` still says what they are.
ROUTED_EXPERTS = "routed_experts"
SHARED_EXPERTS = "shared_experts"
ATTENTION = "attention"  # wq_a, wq_b, wkv, wo_a, wo_b (+scales), q_norm, kv_norm, attn_sink
COMPRESSOR = "compressor"  # CSA/HCA main-KV compressor
INDEXER = "indexer"  # lightning indexer incl. its own compressor
ROUTER = "router"  # gate.weight, gate.bias, gate.tid2eid
MHC = "mhc"  # per-layer hyper-connection mixing (hc_attn_*, hc_ffn_*)
MHC_HEAD = "mhc_head"  # hc_head_* before the final norm
NORMS = "norms"  # attn_norm, ffn_norm, the final norm
EMBED = "embed"
HEAD = "head"
MTP = "mtp"  # everything under mtp.N. (and MTP-only tensors: e_proj, h_proj, enorm, ...)
MTP_ONLY = "mtp_only"  # component of e_proj, h_proj, enorm, hnorm, mtp norm, mtp hc_head

CATEGORIES = (
    ROUTED_EXPERTS,
    SHARED_EXPERTS,
    ATTENTION,
    COMPRESSOR,
    INDEXER,
    ROUTER,
    MHC,
    MHC_HEAD,
    NORMS,
    EMBED,
    HEAD,
    MTP,
)


# BF16-stored weights the GPU model widens to float32 (see `TensorSpec.gpu_bytes`).
_FLOAT32_ON_DEVICE = ("norm.weight",)


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor. `layer` is the logical layer (MTP block j is num_hidden_layers + j)."""

    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    category: str  # spec byte-budget category (MTP collapsed into "mtp")
    component: str  # what it is, also inside MTP (routed_experts, attention, ...)
    layer: int | None
    expert: int | None
    shard: str  # file name of the official shard holding it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def gpu_bytes(self) -> int:
        """Bytes the runtime holds for this tensor when it is placed on a GPU (engine/runtime.py,
        default options): FP8 weights and their scales, the BF16 linears (head, router gate,
        compressors' wkv/wgate) and the routed experts as stored; the BF16 norm weights the model
        computes with in float32 widened to float32. tests/test_runtime.py checks this against
        the model."""
        if self.dtype == "BF16" and self.name.endswith(_FLOAT32_ON_DEVICE):
            return 4 * self.numel
        return self.nbytes

    @property
    def scale_name(self) -> str | None:
        """Companion scale of a quantized weight (`x.weight` -> `x.scale`)."""
        if self.dtype in ("F8_E4M3", "I8") and self.name.endswith(".weight"):
            return self.name[: -len(".weight")] + ".scale"
        return None


def shard_count(config: ModelConfig) -> int:
    """embed, one per main layer, the head shard, and one for all MTP blocks (if any)."""
    return config.num_hidden_layers + 2 + (1 if config.num_nextn_predict_layers else 0)


def shard_name(index: int, total: int) -> str:
    """1-based, as in `model-00002-of-00046.safetensors`."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class _Builder:
    def __init__(self, config: ModelConfig) -> None:
        self.c = config
        self.out: list[TensorSpec] = []
        self.total = shard_count(config)

    def add(self, name, dtype, shape, component, layer, shard, expert=None, mtp=False):
        category = MTP if mtp else component
        self.out.append(
            TensorSpec(name, dtype, tuple(shape), category, component, layer, expert, shard)
        )

    def fp8_linear(self, name, out_f, in_f, component, layer, shard, expert=None, mtp=False):
        bo, bi = self.c.fp8_block
        self.add(name + ".weight", "F8_E4M3", (out_f, in_f), component, layer, shard, expert, mtp)
        self.add(
            name + ".scale",
            "F8_E8M0",
            (_ceil(out_f, bo), _ceil(in_f, bi)),
            component,
            layer,
            shard,
            expert,
            mtp,
        )

    def expert_linear(self, name, out_f, in_f, layer, shard, expert, mtp):
        if self.c.expert_dtype == "fp8":
            self.fp8_linear(name, out_f, in_f, ROUTED_EXPERTS, layer, shard, expert, mtp)
            return
        g = self.c.fp4_group
        self.add(
            name + ".weight", "I8", (out_f, in_f // 2), ROUTED_EXPERTS, layer, shard, expert, mtp
        )
        self.add(
            name + ".scale",
            "F8_E8M0",
            (out_f, in_f // g),
            ROUTED_EXPERTS,
            layer,
            shard,
            expert,
            mtp,
        )

    def block(self, spec) -> None:
        """Everything a Block (or the Block part of an MTPBlock) stores."""
        c = self.c
        D, L, mtp = c.hidden_size, spec.index, spec.is_mtp
        shard = shard_name(L + 2 if not mtp else self.total, self.total)
        p = spec.prefix
        add = self.add
        mix = (2 + c.hc_mult) * c.hc_mult
        for part in ("attn", "ffn"):
            add(f"{p}hc_{part}_fn", "F32", (mix, c.hc_mult * D), MHC, L, shard, mtp=mtp)
            add(f"{p}hc_{part}_base", "F32", (mix,), MHC, L, shard, mtp=mtp)
            add(f"{p}hc_{part}_scale", "F32", (3,), MHC, L, shard, mtp=mtp)
        add(f"{p}attn_norm.weight", "BF16", (D,), NORMS, L, shard, mtp=mtp)
        add(f"{p}ffn_norm.weight", "BF16", (D,), NORMS, L, shard, mtp=mtp)

        # attention core
        H, d = c.num_attention_heads, c.head_dim
        a = f"{p}attn."
        add(a + "attn_sink", "F32", (H,), ATTENTION, L, shard, mtp=mtp)
        self.fp8_linear(a + "wq_a", c.q_lora_rank, D, ATTENTION, L, shard, mtp=mtp)
        add(a + "q_norm.weight", "BF16", (c.q_lora_rank,), ATTENTION, L, shard, mtp=mtp)
        self.fp8_linear(a + "wq_b", H * d, c.q_lora_rank, ATTENTION, L, shard, mtp=mtp)
        self.fp8_linear(a + "wkv", d, D, ATTENTION, L, shard, mtp=mtp)
        add(a + "kv_norm.weight", "BF16", (d,), ATTENTION, L, shard, mtp=mtp)
        og, orank = c.o_groups, c.o_lora_rank
        self.fp8_linear(a + "wo_a", og * orank, H * d // og, ATTENTION, L, shard, mtp=mtp)
        self.fp8_linear(a + "wo_b", D, og * orank, ATTENTION, L, shard, mtp=mtp)

        # compressor (+ indexer for CSA)
        if spec.has_compressor:
            ratio = spec.compress_ratio
            coff = 2 if spec.attention == CSA else 1
            self.compressor(a + "compressor.", ratio, coff, d, COMPRESSOR, L, shard, mtp)
        if spec.has_indexer:
            i = a + "indexer."
            nh, hd = c.index_n_heads, c.index_head_dim
            self.fp8_linear(i + "wq_b", nh * hd, c.q_lora_rank, INDEXER, L, shard, mtp=mtp)
            add(i + "weights_proj.weight", "BF16", (nh, D), INDEXER, L, shard, mtp=mtp)
            self.compressor(i + "compressor.", spec.compress_ratio, 2, hd, INDEXER, L, shard, mtp)

        # MoE
        f = f"{p}ffn."
        E, inter = c.n_routed_experts, c.moe_intermediate_size
        add(f + "gate.weight", "BF16", (E, D), ROUTER, L, shard, mtp=mtp)
        if spec.hash_routed:
            add(
                f + "gate.tid2eid",
                "I64",
                (c.vocab_size, c.num_experts_per_tok),
                ROUTER,
                L,
                shard,
                mtp=mtp,
            )
        else:
            add(f + "gate.bias", "F32", (E,), ROUTER, L, shard, mtp=mtp)
        s = f + "shared_experts."
        self.fp8_linear(s + "w1", inter, D, SHARED_EXPERTS, L, shard, mtp=mtp)
        self.fp8_linear(s + "w3", inter, D, SHARED_EXPERTS, L, shard, mtp=mtp)
        self.fp8_linear(s + "w2", D, inter, SHARED_EXPERTS, L, shard, mtp=mtp)
        for e in range(E):
            x = f"{f}experts.{e}."
            self.expert_linear(x + "w1", inter, D, L, shard, e, mtp)
            self.expert_linear(x + "w3", inter, D, L, shard, e, mtp)
            self.expert_linear(x + "w2", D, inter, L, shard, e, mtp)

    def compressor(self, q, ratio, coff, head_dim, component, layer, shard, mtp):
        D = self.c.hidden_size
        self.add(q + "wkv.weight", "BF16", (coff * head_dim, D), component, layer, shard, mtp=mtp)
        self.add(q + "wgate.weight", "BF16", (coff * head_dim, D), component, layer, shard, mtp=mtp)
        self.add(q + "ape", "F32", (ratio, coff * head_dim), component, layer, shard, mtp=mtp)
        self.add(q + "norm.weight", "BF16", (head_dim,), component, layer, shard, mtp=mtp)

    def hc_head(self, p, component, layer, shard, mtp):
        c = self.c
        self.add(
            f"{p}hc_head_fn",
            "F32",
            (c.hc_mult, c.hc_mult * c.hidden_size),
            component,
            layer,
            shard,
            mtp=mtp,
        )
        self.add(f"{p}hc_head_base", "F32", (c.hc_mult,), component, layer, shard, mtp=mtp)
        self.add(f"{p}hc_head_scale", "F32", (1,), component, layer, shard, mtp=mtp)

    def build(self) -> list[TensorSpec]:
        c, total = self.c, self.total
        D, V = c.hidden_size, c.vocab_size
        self.add("embed.weight", "BF16", (V, D), EMBED, None, shard_name(1, total))
        for spec in c.main_layers:
            self.block(spec)
        head_shard = shard_name(c.num_hidden_layers + 2, total)
        self.hc_head("", MHC_HEAD, None, head_shard, False)
        self.add("norm.weight", "BF16", (D,), NORMS, None, head_shard)
        self.add("head.weight", "BF16", (V, D), HEAD, None, head_shard)
        for spec in c.mtp_layers:
            self.block(spec)
            p, L, shard = spec.prefix, spec.index, shard_name(total, total)
            self.fp8_linear(p + "e_proj", D, D, MTP_ONLY, L, shard, mtp=True)
            self.fp8_linear(p + "h_proj", D, D, MTP_ONLY, L, shard, mtp=True)
            for norm in ("enorm", "hnorm", "norm"):
                self.add(f"{p}{norm}.weight", "BF16", (D,), MTP_ONLY, L, shard, mtp=True)
            self.hc_head(p, MTP_ONLY, L, shard, True)
        return self.out


class Inventory:
    """All tensors of a checkpoint with byte totals by category, component, layer and shard."""

    def __init__(self, config: ModelConfig, tensors: list[TensorSpec]) -> None:
        self.config = config
        self.tensors = tensors

    @classmethod
    def from_config(cls, config: ModelConfig) -> Inventory:
        return cls(config, _Builder(config).build())

    @cached_property
    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @property
    def count(self) -> int:
        return len(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def _sum(self, key) -> dict:
        out: dict = defaultdict(int)
        for t in self.tensors:
            out[key(t)] += t.nbytes
        return dict(out)

    def bytes_by_category(self) -> dict[str, int]:
        return self._sum(lambda t: t.category)

    def bytes_by_component(self) -> dict[str, int]:
        return self._sum(lambda t: t.component)

    def bytes_by_layer(self) -> dict[int | None, int]:
        """Logical layer -> bytes (None: embed, head, final norm, hc_head)."""
        return self._sum(lambda t: t.layer)

    def bytes_by_shard(self) -> dict[str, int]:
        return self._sum(lambda t: t.shard)

    def layer_bytes(self, layer: int, component: str | None = None) -> int:
        return sum(
            t.nbytes
            for t in self.tensors
            if t.layer == layer and (component is None or t.component == component)
        )

    def expert_tensors(self, layer: int, expert: int) -> list[TensorSpec]:
        """The weights and scales of one routed expert (w1, w3, w2 order)."""
        return [t for t in self.tensors if t.layer == layer and t.expert == expert]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (all experts have the same size)."""
        return expert_bytes(self.config)

    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors})

    def summary(self) -> dict:
        """Plain-dict totals for JSON and the planner."""
        return {
            "tensors": self.count,
            "total_bytes": self.total_bytes,
            "expert_bytes": self.expert_bytes,
            "by_category": self.bytes_by_category(),
            "by_component": self.bytes_by_component(),
            "by_layer": {
                ("global" if k is None else k): v for k, v in self.bytes_by_layer().items()
            },
            "shards": len(self.shards),
        }

    def as_dicts(self) -> list[dict]:
        return [asdict(t) | {"nbytes": t.nbytes} for t in self.tensors]


@lru_cache(maxsize=8)
def inventory(config: ModelConfig) -> Inventory:
    """The full inventory of the official checkpoint for `config` (cached: 69k entries for
    V4-Flash take ~0.5 s to build; treat the result as read-only)."""
    return Inventory.from_config(config)


def expert_bytes(config: ModelConfig) -> int:
    """Bytes one routed expert occupies on disk (data + scales, w1 + w3 + w2)."""
    D, inter = config.hidden_size, config.moe_intermediate_size
    if config.expert_dtype == "fp8":
        bo, bi = config.fp8_block
        one = lambda o, i: o * i + _ceil(o, bo) * _ceil(i, bi)  # noqa: E731
    else:
        g = config.fp4_group
        one = lambda o, i: o * i // 2 + o * (i // g)  # noqa: E731
    return 2 * one(inter, D) + one(D, inter)
