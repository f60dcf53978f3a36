"""ModelConfig: presets, the per-layer schedule, reading HF and reference-code configs, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashdesk.engine.config import CSA, HCA, WINDOW, ConfigError, ModelConfig

# The official config.json of DeepSeek-V4-Flash (HF repo, commit 60d8d70), verbatim.
OFFICIAL_HF = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "expert_dtype": "fp4",
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 512,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 512,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 43,
    "num_hash_layers": 3,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 129280,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}

# The official inference/config.json (reference-code key names), verbatim.
OFFICIAL_REFERENCE = {
    "vocab_size": 129280,
    "dim": 4096,
    "moe_inter_dim": 2048,
    "n_layers": 43,
    "n_hash_layers": 3,
    "n_heads": 64,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "n_activated_experts": 6,
    "score_func": "sqrtsoftplus",
    "route_scale": 1.5,
    "swiglu_limit": 10.0,
    "q_lora_rank": 1024,
    "head_dim": 512,
    "rope_head_dim": 64,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "window_size": 128,
    "original_seq_len": 65536,
    "rope_theta": 10000,
    "rope_factor": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
    "expert_dtype": "fp4",
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_flash_schedule_matches_spec():
    cfg = ModelConfig.v4_flash()
    assert len(cfg.layers) == 44
    kinds = [s.attention for s in cfg.main_layers]
    assert kinds[:2] == [WINDOW, WINDOW]
    assert [i for i, k in enumerate(kinds) if k == CSA] == list(range(2, 43, 2))
    assert [i for i, k in enumerate(kinds) if k == HCA] == list(range(3, 42, 2))
    assert [s.index for s in cfg.main_layers if s.hash_routed] == [0, 1, 2]
    (mtp,) = cfg.mtp_layers
    assert (mtp.index, mtp.prefix, mtp.attention, mtp.hash_routed) == (43, "mtp.0.", WINDOW, False)
    assert cfg.layer(2).has_indexer and cfg.layer(3).has_compressor and not cfg.layer(3).has_indexer
    assert cfg.fp8_block == (128, 128) and cfg.nope_head_dim == 448


def test_pro_schedule_matches_spec():
    cfg = ModelConfig.v4_pro()
    kinds = [s.attention for s in cfg.main_layers]
    assert len(kinds) == 61 and kinds.count(CSA) == 30 and kinds.count(HCA) == 31
    assert WINDOW not in kinds and cfg.mtp_layers[0].attention == WINDOW
    assert (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size) == (7168, 384, 3072)


def test_official_hf_and_reference_configs_equal_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_HF))
    assert ModelConfig.from_dir(tmp_path) == ModelConfig.v4_flash()
    ref = tmp_path / "ref"
    (ref / "inference").mkdir(parents=True)
    (ref / "inference" / "config.json").write_text(json.dumps(OFFICIAL_REFERENCE))
    cfg = ModelConfig.from_dir(ref)
    assert cfg == ModelConfig.v4_flash()
    assert cfg.rope_factor == 16 and cfg.rope_original_max_position == 65536


def test_config_without_expert_dtype_is_fp4_and_hf_dict_round_trips():
    old = {k: v for k, v in OFFICIAL_HF.items() if k != "expert_dtype"}
    assert ModelConfig.from_dict(old).expert_dtype == "fp4"
    tiny = ModelConfig.tiny(compress_ratios=(0, 4, 16, 4, 0))
    hf = tiny.to_hf_dict()
    assert hf["layer_types"][2] == "heavily_compressed_attention"
    assert hf["compress_rates"]["heavily_compressed_attention"] == 16
    assert ModelConfig.from_dict(json.loads(json.dumps(hf))) == tiny


def test_transformers_layer_types_form_is_understood():
    hf = ModelConfig.tiny().to_hf_dict()
    del hf["compress_ratios"], hf["num_hash_layers"]
    hf["layer_types"] = ModelConfig.tiny().layer_types
    hf["mlp_layer_types"] = ["hash_moe", "hash_moe", "moe", "moe"]
    assert ModelConfig.from_dict(hf) == ModelConfig.tiny()


def test_tiny_overrides_and_schedule():
    cfg = ModelConfig.tiny(num_hidden_layers=6)
    assert cfg.compress_ratios == (0, 4, 128, 4, 128, 4, 0)
    assert [s.hash_routed for s in cfg.main_layers] == [True, True] + [False] * 4
    assert cfg.replace(index_topk=8).index_topk == 8


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"model_type": "llama", "hidden_size": 8}, "not 'deepseek_v4'"),
        ({"model_type": "deepseek_v41"}, "V4.1"),
        ({**OFFICIAL_HF, "dspark_block_size": 5}, "0731"),
        ({**OFFICIAL_HF, "compress_ratios": [0, 4]}, "compress_ratios has 2 entries"),
        ({**OFFICIAL_HF, "num_key_value_heads": 8}, "one shared KV head"),
        (
            {**OFFICIAL_HF, "quantization_config": {"quant_method": "fp8", "scale_fmt": "fp32"}},
            "scale_fmt",
        ),
        ({**OFFICIAL_HF, "moe_intermediate_size": 100}, "multiple of 64"),
        ({k: v for k, v in OFFICIAL_HF.items() if k != "compress_ratios"}, "neither"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(data, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(data)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"No config\.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON"):
        ModelConfig.from_dir(tmp_path)


def test_config_module_does_not_import_torch():
    code = (
        "import sys; import flashdesk.engine.config; sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
