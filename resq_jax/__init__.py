"""resq-jax: post-training quantization of LLMs (ResQ, LQER, baselines) in JAX/XLA."""

__version__ = "0.1.0"
