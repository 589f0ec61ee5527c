"""Evaluation: perplexity over token windows (perplexity) and greedy generation with a KV cache (generate).
"""
