"""Shared by the forward-pass tests: tiny configs, random official-layout weights, and the
transformers oracle built from the same weights."""

from __future__ import annotations

import math

import torch

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.model.common import Numerics
from flashdesk.engine.model.model import V4Model


def tiny_config(**overrides) -> ModelConfig:
    """Layers: window+hash, CSA+hash, HCA (ratio 16), CSA; one MTP block; window 8."""
    base = {"compress_ratios": (0, 4, 16, 4, 0)}
    base.update(overrides)
    return ModelConfig.tiny(**base)


def official_shapes(c: ModelConfig, with_mtp: bool = True) -> dict[str, tuple[tuple, str]]:
    """name → (shape, kind) for every tensor of the official layout; kind says how to draw it."""
    D, H, d = c.hidden_size, c.num_attention_heads, c.head_dim
    hc = c.hc_mult
    out: dict[str, tuple[tuple, str]] = {
        "embed.weight": ((c.vocab_size, D), "embed"),
        "head.weight": ((c.vocab_size, D), "linear"),
        "norm.weight": ((D,), "norm"),
        "hc_head_fn": ((hc, hc * D), "hc_fn"),
        "hc_head_base": ((hc,), "hc_base"),
        "hc_head_scale": ((1,), "hc_scale"),
    }
    specs = list(c.main_layers) + (list(c.mtp_layers) if with_mtp else [])
    for spec in specs:
        p = spec.prefix
        mix = (2 + hc) * hc
        for site in ("attn", "ffn"):
            out[f"{p}hc_{site}_fn"] = ((mix, hc * D), "hc_fn")
            out[f"{p}hc_{site}_base"] = ((mix,), "hc_base")
            out[f"{p}hc_{site}_scale"] = ((3,), "hc_scale")
        out[p + "attn_norm.weight"] = ((D,), "norm")
        out[p + "ffn_norm.weight"] = ((D,), "norm")
        a = p + "attn."
        out[a + "attn_sink"] = ((H,), "sink")
        out[a + "wq_a.weight"] = ((c.q_lora_rank, D), "linear")
        out[a + "q_norm.weight"] = ((c.q_lora_rank,), "norm")
        out[a + "wq_b.weight"] = ((H * d, c.q_lora_rank), "linear")
        out[a + "wkv.weight"] = ((d, D), "linear")
        out[a + "kv_norm.weight"] = ((d,), "norm")
        out[a + "wo_a.weight"] = ((c.o_groups * c.o_lora_rank, H * d // c.o_groups), "linear")
        out[a + "wo_b.weight"] = ((D, c.o_groups * c.o_lora_rank), "linear")
        ratio = spec.compress_ratio
        if ratio:
            coff = 2 if ratio == 4 else 1
            cp = a + "compressor."
            out[cp + "wkv.weight"] = ((coff * d, D), "linear")
            out[cp + "wgate.weight"] = ((coff * d, D), "linear")
            out[cp + "ape"] = ((ratio, coff * d), "ape")
            out[cp + "norm.weight"] = ((d,), "norm")
        if spec.has_indexer:
            di, hi = c.index_head_dim, c.index_n_heads
            ip = a + "indexer."
            out[ip + "wq_b.weight"] = ((hi * di, c.q_lora_rank), "linear")
            out[ip + "weights_proj.weight"] = ((hi, D), "linear")
            out[ip + "compressor.wkv.weight"] = ((2 * di, D), "linear")
            out[ip + "compressor.wgate.weight"] = ((2 * di, D), "linear")
            out[ip + "compressor.ape"] = ((ratio, 2 * di), "ape")
            out[ip + "compressor.norm.weight"] = ((di,), "norm")
        f = p + "ffn."
        E, inter = c.n_routed_experts, c.moe_intermediate_size
        out[f + "gate.weight"] = ((E, D), "linear")
        if spec.hash_routed:
            out[f + "gate.tid2eid"] = ((c.vocab_size, c.num_experts_per_tok), "tid2eid")
        else:
            out[f + "gate.bias"] = ((E,), "bias")
        for w, shape in (("w1", (inter, D)), ("w2", (D, inter)), ("w3", (inter, D))):
            out[f"{f}shared_experts.{w}.weight"] = (shape, "linear")
            for e in range(E):
                out[f"{f}experts.{e}.{w}.weight"] = (shape, "linear")
        if spec.is_mtp:
            out[p + "e_proj.weight"] = ((D, D), "linear")
            out[p + "h_proj.weight"] = ((D, D), "linear")
            for n in ("enorm", "hnorm", "norm"):
                out[f"{p}{n}.weight"] = ((D,), "norm")
            out[p + "hc_head_fn"] = ((hc, hc * D), "hc_fn")
            out[p + "hc_head_base"] = ((hc,), "hc_base")
            out[p + "hc_head_scale"] = ((1,), "hc_scale")
    return out


def random_official_tensors(
    c: ModelConfig, seed: int, with_mtp: bool = True
) -> dict[str, torch.Tensor]:
    """Random float32 weights (int64 tid2eid) scaled so activations stay O(1) and every learned
    constant (sinks, ape, mHC bases/scales, norms, router bias, tid2eid) is non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    out = {}
    for name, (shape, kind) in official_shapes(c, with_mtp).items():
        if kind == "linear":
            t = randn(*shape) / math.sqrt(shape[-1])
        elif kind == "embed":
            t = randn(*shape)
        elif kind == "norm":
            t = 1 + 0.2 * randn(*shape)
        elif kind == "hc_fn":
            t = 0.5 * randn(*shape) / math.sqrt(shape[-1])
        elif kind == "hc_base":
            t = 0.5 * randn(*shape)
        elif kind == "hc_scale":
            t = 1 + 0.3 * randn(*shape)
        elif kind == "sink":
            t = randn(*shape)
        elif kind == "ape":
            t = 0.5 * randn(*shape)
        elif kind == "bias":
            t = 0.1 * randn(*shape)
        elif kind == "tid2eid":
            t = torch.stack(
                [
                    torch.randperm(c.n_routed_experts, generator=g)[: shape[1]]
                    for _ in range(shape[0])
                ]
            )
        else:
            raise AssertionError(kind)
        out[name] = t
    return out


def dict_fetch(tensors: dict[str, torch.Tensor]):
    def fetch(name: str, dtype: torch.dtype) -> torch.Tensor:
        t = tensors[name]
        return t if t.dtype == torch.int64 else t.to(dtype)

    return fetch


def our_model(c: ModelConfig, tensors, **numerics) -> V4Model:
    with_mtp = any(k.startswith("mtp.") for k in tensors)
    return V4Model(c, dict_fetch(tensors), numerics=Numerics(**numerics), with_mtp=with_mtp)


def write_tiny(folder, config: ModelConfig, seed: int, with_mtp: bool = True):
    """Random weights written in the official layout by our writer (FP8/FP4 quantized)."""
    from flashdesk.engine.checkpoint import write_checkpoint

    return write_checkpoint(folder, config, random_official_tensors(config, seed, with_mtp))


def hf_from_checkpoint(folder):
    """transformers' DeepseekV4ForCausalLM loading the same folder itself, all float32."""
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    # Dequantize on load also where a GPU exists (transformers' FP8 kernels need one otherwise).
    fp8 = FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4")
    model = DeepseekV4ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=fp8
    )
    return model.to(torch.float32).eval()


def one_thread():
    """Generator for an autouse fixture: tiny-tensor ops run far faster on one thread when the
    machine's cores are shared (thread hand-offs dominate); the previous count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
