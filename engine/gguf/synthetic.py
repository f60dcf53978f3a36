"""Tiny random GGUF models written with the `gguf` library, for tests and benchmarks.

`write_tiny_moe(path)` writes a 2-layer `qwen3moe` model (4 routed experts, top 2) with a 259-token
byte vocabulary: small enough to load in milliseconds, yet it has llama.cpp's standard routed-expert
tensors (`blk.N.ffn_{gate,up,down}_exps`) so expert placement can be checked on any machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _byte_vocab() -> list[str]:
    """GPT-2 byte-level symbols for all 256 bytes (so any text tokenizes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    printable += list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tiny_moe(
    path: str | Path,
    *,
    layers: int = 2,
    embd: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 4,
    experts_used: int = 2,
    expert_ff: int = 32,
    context: int = 256,
    seed: int = 0,
    expert_type: str = "F32",
) -> Path:
    """A random `qwen3moe` GGUF; expert_type "F32", "F16" or "Q8_0"."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    head_dim = embd // heads
    # One merge: llama.cpp's BPE vocabulary needs a non-empty merge list.
    tokens = [*_byte_vocab(), "he", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_name("tiny random qwen3moe (FlashDesk tests)")
    writer.add_context_length(context)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(expert_ff)
    writer.add_expert_feed_forward_length(expert_ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(experts_used)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * 2)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def expert(*shape: int) -> np.ndarray:
        data = rand(*shape)
        if expert_type == "F32":
            return data
        if expert_type == "F16":
            return data.astype(np.float16)
        qtype = gguf.GGMLQuantizationType[expert_type]
        return gguf.quants.quantize(data, qtype)

    raw_type = None if expert_type in ("F32", "F16") else gguf.GGMLQuantizationType[expert_type]
    writer.add_tensor("token_embd.weight", rand(vocab, embd))
    writer.add_tensor("output_norm.weight", np.ones(embd, np.float32))
    writer.add_tensor("output.weight", rand(vocab, embd))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(embd, np.float32))
        writer.add_tensor(p + "attn_q.weight", rand(heads * head_dim, embd))
        writer.add_tensor(p + "attn_k.weight", rand(kv_heads * head_dim, embd))
        writer.add_tensor(p + "attn_v.weight", rand(kv_heads * head_dim, embd))
        writer.add_tensor(p + "attn_output.weight", rand(embd, heads * head_dim))
        writer.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(embd, np.float32))
        writer.add_tensor(p + "ffn_gate_inp.weight", rand(experts, embd))
        for name, shape in (
            ("ffn_gate_exps", (experts, expert_ff, embd)),
            ("ffn_up_exps", (experts, expert_ff, embd)),
            ("ffn_down_exps", (experts, embd, expert_ff)),
        ):
            writer.add_tensor(p + name + ".weight", expert(*shape), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
