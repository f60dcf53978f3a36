"""The DeepSeek-V4 forward pass in torch, one module per mechanism.

rope (partial interleaved RoPE, YaRN), mhc (hyper-connections), compressor, indexer, attention,
moe, qsim (the reference's quantisation simulation), model (blocks, V4Model), loader (load_model).
"""
