"""ModelConfig: the hyper-parameters of a DeepSeek-V4 checkpoint and its per-layer schedule.

Field names are the HF `config.json` keys of `deepseek_v4` (spec §1), so the forward pass, the
planner and the checkpoint code all speak one vocabulary. The reference code's
`inference/config.json` (keys `dim`, `n_layers`, `moe_inter_dim`, ...) is translated on load.

Torch-free on purpose: the planner (`flashdesk.offload`) imports this without torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Attention kind of a layer, from its compression ratio (spec §1 "Derived layer schedule").
WINDOW = "window"  # ratio 0: sliding-window only ("SWA")
CSA = "csa"  # ratio 4: compressed sparse attention with the lightning indexer
HCA = "hca"  # any other ratio (128 in V4): heavily compressed attention, dense over entries

# transformers' `layer_types` labels, for configs that ship those instead of `compress_ratios`.
HF_LAYER_TYPES = {
    WINDOW: "sliding_attention",
    CSA: "compressed_sparse_attention",
    HCA: "heavily_compressed_attention",
}

CSA_RATIO = 4  # V4 has exactly one CSA ratio; every other non-zero ratio is HCA


class ConfigError(ValueError):
    """A config that FlashDesk cannot run, with what is wrong and what to do."""


@dataclass(frozen=True)
class LayerSpec:
    """One block of the schedule. `index` is the logical layer: 0..L-1, then L.. for MTP blocks."""

    index: int
    compress_ratio: int  # 0 / 4 / 128
    attention: str  # WINDOW / CSA / HCA
    hash_routed: bool  # router is the fixed `tid2eid[token_id]` table (no `gate.bias`)
    is_mtp: bool
    prefix: str  # tensor-name prefix in the official checkpoint: "layers.7." or "mtp.0."

    @property
    def has_compressor(self) -> bool:
        return self.compress_ratio != 0

    @property
    def has_indexer(self) -> bool:
        return self.attention == CSA


def _default_quantization_config() -> dict:
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }


def _default_rope_scaling() -> dict:
    return {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    }


def _flash_ratios(n_layers: int) -> tuple[int, ...]:
    """V4-Flash: two window layers, then CSA/HCA alternating (CSA first), MTP ratio 0."""
    body = [CSA_RATIO if i % 2 == 0 else 128 for i in range(max(n_layers - 2, 0))]
    return (*[0, 0, *body][:n_layers], 0)


def _pro_ratios(n_layers: int) -> tuple[int, ...]:
    """V4-Pro: two HCA layers, then CSA/HCA alternating (CSA first), MTP ratio 0."""
    body = [CSA_RATIO if i % 2 == 0 else 128 for i in range(max(n_layers - 2, 0))]
    return (*[128, 128, *body][:n_layers], 0)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one V4 checkpoint. Defaults are V4-Flash (spec §1)."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    sliding_window: int = 128
    # One entry per main layer, then one per MTP block (44 for V4-Flash).
    compress_ratios: tuple[int, ...] = field(default_factory=lambda: _flash_ratios(43))
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=_default_rope_scaling, hash=False)
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    expert_dtype: str = "fp4"  # "fp4" (V4-Flash/Pro) or "fp8" (the -Base checkpoints)
    quantization_config: dict = field(default_factory=_default_quantization_config, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # ------------------------------------------------------------------ presets

    @classmethod
    def v4_flash(cls) -> ModelConfig:
        """DeepSeek-V4-Flash as published (284B total, 13B active)."""
        return cls()

    @classmethod
    def v4_pro(cls) -> ModelConfig:
        """DeepSeek-V4-Pro (spec §7; values from third-party copies of its config.json)."""
        return cls(
            hidden_size=7168,
            num_hidden_layers=61,
            num_attention_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            o_lora_rank=1024,
            index_topk=1024,
            n_routed_experts=384,
            moe_intermediate_size=3072,
            routed_scaling_factor=2.5,
            compress_ratios=_pro_ratios(61),
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A small config with every mechanism present, for tests.

        Layers: 0 window+hash, 1 CSA+hash, 2 HCA, 3 CSA, then one MTP block (window). Dimensions keep
        every FP8 matrix at least one 128-wide tile in some direction and every FP4 row a multiple of
        32. Indexer heads ≥ 16 (spec §8.13: fewer heads make top-k ties common). Overriding
        `num_hidden_layers` alone extends the schedule (CSA/HCA alternating after layer 1).
        """
        n_layers = int(overrides.get("num_hidden_layers", 4))
        if "compress_ratios" not in overrides:
            body = [CSA_RATIO if i % 2 == 0 else 128 for i in range(max(n_layers - 1, 0))]
            n_mtp = int(overrides.get("num_nextn_predict_layers", 1))
            overrides["compress_ratios"] = tuple(([0, *body])[:n_layers] + [0] * n_mtp)
        base: dict[str, Any] = {
            "vocab_size": 512,
            "hidden_size": 256,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 4,
            "head_dim": 64,
            "qk_rope_head_dim": 16,
            "q_lora_rank": 128,
            "o_lora_rank": 64,
            "o_groups": 2,
            "sliding_window": 8,
            "max_position_embeddings": 4096,
            # YaRN factor 16 over 256 original positions = 4096, as consistent as the real 65536·16
            "rope_scaling": {**_default_rope_scaling(), "original_max_position_embeddings": 256},
            "index_n_heads": 16,
            "index_head_dim": 32,
            "index_topk": 4,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "num_hash_layers": 2,
        }
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ schedule

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Main layers then MTP blocks, in order."""
        specs = []
        for i in range(self.num_hidden_layers + self.num_nextn_predict_layers):
            specs.append(self.layer(i))
        return tuple(specs)

    @property
    def main_layers(self) -> tuple[LayerSpec, ...]:
        return tuple(self.layer(i) for i in range(self.num_hidden_layers))

    @property
    def mtp_layers(self) -> tuple[LayerSpec, ...]:
        n = self.num_hidden_layers
        return tuple(self.layer(n + j) for j in range(self.num_nextn_predict_layers))

    def layer(self, index: int) -> LayerSpec:
        """The schedule entry of logical layer `index` (MTP blocks follow the main layers)."""
        total = self.num_hidden_layers + self.num_nextn_predict_layers
        if not 0 <= index < total:
            raise IndexError(f"layer {index} out of range 0..{total - 1}")
        ratio = self.compress_ratio(index)
        is_mtp = index >= self.num_hidden_layers
        prefix = f"mtp.{index - self.num_hidden_layers}." if is_mtp else f"layers.{index}."
        return LayerSpec(
            index=index,
            compress_ratio=ratio,
            attention=self.attention_kind(index),
            hash_routed=self.is_hash_layer(index),
            is_mtp=is_mtp,
            prefix=prefix,
        )

    def compress_ratio(self, index: int) -> int:
        """0 (window only), 4 (CSA) or the HCA ratio. MTP blocks past the list's end are 0."""
        return self.compress_ratios[index] if index < len(self.compress_ratios) else 0

    def attention_kind(self, index: int) -> str:
        ratio = self.compress_ratio(index)
        if ratio == 0:
            return WINDOW
        return CSA if ratio == CSA_RATIO else HCA

    def is_hash_layer(self, index: int) -> bool:
        """Layers 0..num_hash_layers-1 route by token id; MTP blocks never do."""
        return index < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def layer_types(self) -> list[str]:
        """transformers' `layer_types` for the main layers."""
        return [HF_LAYER_TYPES[s.attention] for s in self.main_layers]

    @property
    def hca_ratio(self) -> int | None:
        ratios = {r for r in self.compress_ratios[: self.num_hidden_layers] if r not in (0, 4)}
        return next(iter(ratios)) if ratios else None

    # ------------------------------------------------------------------ derived sizes

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def fp8_block(self) -> tuple[int, int]:
        """FP8 tile (out, in) of the E8M0 weight scales."""
        block = self.quantization_config.get("weight_block_size", [128, 128])
        return int(block[0]), int(block[1])

    @property
    def fp4_group(self) -> int:
        """Inputs per FP4 scale (MXFP4)."""
        return 32

    @property
    def rope_factor(self) -> float:
        return float(self.rope_scaling.get("factor", 1.0))

    @property
    def rope_original_max_position(self) -> int:
        return int(self.rope_scaling.get("original_max_position_embeddings", 0))

    @property
    def rope_beta_fast(self) -> float:
        return float(self.rope_scaling.get("beta_fast", 32))

    @property
    def rope_beta_slow(self) -> float:
        return float(self.rope_scaling.get("beta_slow", 1))

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ConfigError when the numbers cannot describe a V4 model FlashDesk can run."""
        problems = []
        n = self.num_hidden_layers
        if n < 1:
            problems.append(f"num_hidden_layers is {n}; it must be at least 1")
        if self.num_nextn_predict_layers < 0:
            problems.append("num_nextn_predict_layers must be ≥ 0")
        if len(self.compress_ratios) < n:
            problems.append(
                f"compress_ratios has {len(self.compress_ratios)} entries but the model has {n} "
                "layers; it needs one per layer (plus one per MTP block)"
            )
        bad = sorted({r for r in self.compress_ratios if r < 0 or r == 1})
        if bad:
            problems.append(f"compress_ratios has invalid values {bad} (0, 4 or ≥ 2 for HCA)")
        if self.head_dim <= self.qk_rope_head_dim or self.qk_rope_head_dim % 2:
            problems.append(
                f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and below head_dim "
                f"{self.head_dim}"
            )
        if self.num_attention_heads % max(self.o_groups, 1):
            problems.append(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of o_groups "
                f"{self.o_groups}"
            )
        if self.num_key_value_heads != 1:
            problems.append("V4 attention has one shared KV head (num_key_value_heads must be 1)")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds n_routed_experts "
                f"{self.n_routed_experts}"
            )
        if self.expert_dtype not in ("fp4", "fp8"):
            problems.append(f"expert_dtype {self.expert_dtype!r} is not 'fp4' or 'fp8'")
        if self.expert_dtype == "fp4":
            for name in ("hidden_size", "moe_intermediate_size"):
                if getattr(self, name) % 64:
                    problems.append(
                        f"{name} {getattr(self, name)} must be a multiple of 64 for FP4 experts "
                        "(two codes per byte, one scale per 32 inputs)"
                    )
        qc = self.quantization_config
        if qc.get("quant_method", "fp8") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
            problems.append(
                f"quantization_config {qc} is not FP8 E4M3; FlashDesk reads the official FP8 "
                "checkpoint only"
            )
        if qc.get("scale_fmt", "ue8m0") != "ue8m0":
            problems.append(
                f"quantization_config scale_fmt {qc.get('scale_fmt')!r} is not 'ue8m0' (the "
                "-Base checkpoints with FP32 scales are not supported)"
            )
        if (
            self.hca_ratio is not None
            and len({r for r in self.compress_ratios if r not in (0, CSA_RATIO)}) > 1
        ):
            problems.append("compress_ratios may use one HCA ratio only (besides 0 and 4)")
        if problems:
            raise ConfigError("Invalid DeepSeek-V4 config: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ files

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the path of a config file itself).

        Understands the HF file and the reference code's `inference/config.json`.
        """
        path = Path(path)
        if path.is_dir():
            candidates = [path / "config.json", path / "inference" / "config.json"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ConfigError(
                    f"No config.json in {path}. Point FlashDesk at the folder you downloaded "
                    "DeepSeek-V4-Flash into (it holds config.json and the .safetensors shards)."
                )
            path = found
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} is not a readable JSON config ({exc}). Download config.json again."
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object; download config.json again.")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelConfig:
        """Build from a parsed config (HF or reference-code keys); reject other models by name."""
        _reject_other_models(data, source)
        if "dim" in data and "hidden_size" not in data:
            data = _from_reference_keys(data)
        else:
            data = dict(data)
            if data.get("model_type") != "deepseek_v4":
                raise ConfigError(
                    f"{source} has model_type {data.get('model_type')!r}, not 'deepseek_v4'. "
                    "FlashDesk's native engine runs DeepSeek-V4-Flash/Pro checkpoints only; for "
                    "other models use a GGUF file with the GGUF backend."
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "compress_ratios" not in kwargs and isinstance(data.get("layer_types"), list):
            kwargs["compress_ratios"] = _ratios_from_layer_types(data)
        if "compress_ratios" not in kwargs:
            raise ConfigError(
                f"{source} has neither compress_ratios nor layer_types; FlashDesk cannot tell "
                "which layers compress their KV. Download config.json again."
            )
        n_layers = int(kwargs.get("num_hidden_layers", 43))
        n_mtp = int(kwargs.get("num_nextn_predict_layers", 1))
        ratios = list(kwargs["compress_ratios"])
        if len(ratios) < n_layers + n_mtp and len(ratios) >= n_layers:
            ratios += [0] * (n_layers + n_mtp - len(ratios))
        kwargs["compress_ratios"] = tuple(ratios)
        if "num_hash_layers" not in kwargs and isinstance(data.get("mlp_layer_types"), list):
            kwargs["num_hash_layers"] = sum(1 for t in data["mlp_layer_types"] if t == "hash_moe")
        if "qk_rope_head_dim" not in kwargs and data.get("partial_rotary_factor"):
            head_dim = int(kwargs.get("head_dim", 512))
            kwargs["qk_rope_head_dim"] = int(head_dim * float(data["partial_rotary_factor"]))
        if kwargs.get("quantization_config") is None:
            # transformers drops it when it saves a dequantized model; the layout is still V4's.
            kwargs.pop("quantization_config", None)
        rope = data.get("rope_parameters")
        if "rope_scaling" not in kwargs and isinstance(rope, dict):
            compress = rope.get("compress")
            if (
                isinstance(compress, dict)
                and compress.get("rope_type", compress.get("type")) == "yarn"
            ):
                keys = ("beta_fast", "beta_slow", "factor", "original_max_position_embeddings")
                kwargs["rope_scaling"] = {k: compress[k] for k in keys if k in compress}
                kwargs["rope_scaling"]["type"] = "yarn"
                if "rope_theta" in compress:
                    kwargs.setdefault("compress_rope_theta", compress["rope_theta"])
        qc = kwargs.get("quantization_config")
        if isinstance(qc, dict) and "expert_dtype" in qc and "expert_dtype" not in data:
            kwargs["expert_dtype"] = qc["expert_dtype"]
        if kwargs.get("expert_dtype") is None:
            # Before the 27 Apr 2026 amendment config.json had no expert_dtype; the checkpoint
            # itself always stored FP4 experts.
            kwargs["expert_dtype"] = "fp4"
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}. Download config.json again.") from None

    def to_hf_dict(self) -> dict:
        """The HF `config.json` of the official release for this config."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"]}
        out["attention_bias"] = False
        out["attention_dropout"] = 0.0
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = json.loads(json.dumps(value))
            out[f.name] = value
        out["model_type"] = "deepseek_v4"
        out["initializer_range"] = 0.02
        out["use_cache"] = True
        out["transformers_version"] = "4.57.1"
        # Ratios transformers' legacy parser does not know (only 0/4/128): also ship the
        # explicit schedule in its own keys so the test oracle loads the same model.
        if self.hca_ratio not in (None, 128):
            out["layer_types"] = self.layer_types
            out["compress_rates"] = {
                "compressed_sparse_attention": CSA_RATIO,
                "heavily_compressed_attention": self.hca_ratio,
            }
        return out


_OTHER_MODELS = {
    "deepseek_v41": "DeepSeek-V4.1 (model_type deepseek_v41) is a different model (hidden 5120, "
    "Engram layers, a vision tower); FlashDesk runs DeepSeek-V4-Flash and V4-Pro only",
    "deepseek_v3": "DeepSeek-V3/R1 (model_type deepseek_v3) is a different model; FlashDesk runs "
    "DeepSeek-V4-Flash and V4-Pro only (use a GGUF file with the GGUF backend for V3)",
    "deepseek_v32": "DeepSeek-V3.2 (model_type deepseek_v32) is a different model; FlashDesk runs "
    "DeepSeek-V4-Flash and V4-Pro only (use a GGUF file with the GGUF backend)",
}


def _reject_other_models(data: dict, source: str) -> None:
    model_type = data.get("model_type")
    if model_type in _OTHER_MODELS:
        raise ConfigError(f"{source}: {_OTHER_MODELS[model_type]}.")
    dspark = sorted(k for k in data if k.startswith("dspark_"))
    if dspark:
        raise ConfigError(
            f"{source} is DeepSeek-V4-Flash-0731 (DSpark block-diffusion MTP, keys {dspark}), a "
            "variant FlashDesk does not run yet. Use the original DeepSeek-V4-Flash release."
        )


_REFERENCE_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
}

# inference/model.py ModelArgs defaults for keys its config.json may leave out.
_REFERENCE_DEFAULTS = {
    "n_hash_layers": 0,
    "n_mtp_layers": 1,
    "route_scale": 1.0,
    "swiglu_limit": 0.0,
    "norm_eps": 1e-6,
    "original_seq_len": 0,
    "rope_factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "compress_rope_theta": 40000.0,
}


def _from_reference_keys(ref: dict) -> dict:
    """Translate inference/config.json (reference-code ModelArgs keys) to HF keys."""
    ref = {**_REFERENCE_DEFAULTS, **ref}
    out: dict[str, Any] = {"model_type": "deepseek_v4"}
    for key, value in ref.items():
        out[_REFERENCE_KEYS.get(key, key)] = value
    out["rope_scaling"] = {
        "beta_fast": ref["beta_fast"],
        "beta_slow": ref["beta_slow"],
        "factor": ref["rope_factor"],
        "original_max_position_embeddings": ref["original_seq_len"],
        "type": "yarn",
    }
    if ref.get("dtype", "fp8") != "fp8":
        raise ConfigError(
            "inference/config.json says dtype "
            f"{ref.get('dtype')!r}; FlashDesk reads the FP8 checkpoint as published (dtype fp8)."
        )
    qc = _default_quantization_config()
    qc["scale_fmt"] = ref.get("scale_fmt") or "ue8m0"
    out["quantization_config"] = qc
    return out


def _ratios_from_layer_types(data: dict) -> tuple[int, ...]:
    rates = {"sliding_attention": 0, "compressed_sparse_attention": 4}
    rates["heavily_compressed_attention"] = 128
    rates.update(data.get("compress_rates") or {})
    try:
        return tuple(int(rates[t]) for t in data["layer_types"])
    except KeyError as exc:
        raise ConfigError(f"layer_types has an unknown entry {exc}.") from None
