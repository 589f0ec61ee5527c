"""The quantized model made real: packed linears with integer GEMMs (linear), the quantized K/V cache
(kv_cache), packing a quantized model (pack), checkpoints on disk (checkpoint).
"""
