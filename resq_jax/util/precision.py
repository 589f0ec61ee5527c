"""Matmul precision of every float dot in resq-jax, stated once.

JAX's default float32 dot is not float32 everywhere: on Ampere/Hopper GPUs it runs in TF32 (10-bit
mantissa), on TPUs in one bfloat16 pass. Every number this project validates on the CPU (logits against
transformers, perplexities, calibration second moments, GPTQ Hessians and updates) would move on a GPU.
So every float dot passes ``precision=EXACT`` explicitly:

- decoder (linears, q.k and p.v, the online key rotation, logits and the chunked cross-entropy):
  evaluation numbers must not depend on the device;
- calibration statistics (float64 on the host, float64 or compensated float32 on devices) and GPTQ's
  Hessians and error propagation: an eigendecomposition or a Cholesky of a TF32 Gram matrix is a
  different basis and a different quantization;
- the jnp Hadamard reference (resq_jax.kernels.hadamard).

Where a faster precision is allowed, and why: the packed runtime's integer GEMMs (int8 x int8 with
int32 accumulation) are exact whatever the flag; its float32 path multiplies integer codes of at most 8
significant bits (exact in TF32's 11-bit significand) and accumulates in float32 in chunks short enough
to stay below 2^24, so it is exact at the default precision too and keeps the default (tensor cores).
Fusion and the eigendecompositions run in float64 NumPy on the host, outside XLA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["EXACT", "exact_matmul"]

EXACT = jax.lax.Precision.HIGHEST


def exact_matmul(a, b):
    """``jnp.matmul`` at ``EXACT`` precision (float32 products on every device, no TF32)."""
    return jnp.matmul(a, b, precision=EXACT)
