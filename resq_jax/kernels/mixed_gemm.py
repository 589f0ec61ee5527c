"""The mixed-precision GEMM's entry points: ``quantize_pack`` and ``mixed_gemm`` dispatch to the jnp reference
(``resq_jax.kernels.gemm_reference``, the CPU path and the definition of the numerics) or to the Triton kernels
(``resq_jax.kernels.triton``, NVIDIA GPUs). ``impl``: ``"jnp"``, ``"triton"`` or ``"auto"`` (triton when JAX's
default backend is a GPU and jax_triton imports, else jnp). Triton and jax_triton are imported only when the
triton path is taken.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from resq_jax.kernels.gemm_reference import (
    OUT_DTYPES,
    PackedActivations,
    PackedWeights,
    check_activations,
    check_mixed_layout,
    check_operands,
    check_packed_bits,
    mixed_gemm_jnp,
    quantize_pack_jnp,
)

IMPLS = ("auto", "jnp", "triton")


def triton_available() -> bool:
    """True when JAX's default backend is a GPU and jax_triton (with triton) imports."""
    if jax.default_backend() != "gpu":
        return False
    try:
        import jax_triton  # noqa: F401  (lazy: only on GPU machines)
    except Exception:  # ImportError, or a jaxlib without its triton library
        return False
    return True


def select_impl(impl: str) -> str:
    """Resolve ``impl`` in IMPLS to "jnp" or "triton"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if triton_available() else "jnp"
    return impl


def _triton_ops():
    """The jax_triton launchers (imports triton and jax_triton)."""
    try:
        from resq_jax.kernels.triton import jax_ops
    except ImportError as e:
        raise RuntimeError("impl='triton' needs the triton and jax-triton packages and a CUDA "
                           "GPU (pip install -e '.[gpu]'); use impl='jnp' on CPU") from e
    return jax_ops


def quantize_pack(x: jax.Array, high: int, low_bits: int = 4, high_bits: int = 8,
                  impl: str = "auto") -> PackedActivations:
    """Per-token asymmetric mixed-precision codes of ``x: [..., K]`` (float32 or bfloat16): the
    first K - high channels in ``low_bits`` (packed int4), the last ``high`` in ``high_bits``
    (int8), each block with its own float32 scale and zero per token."""
    x = jnp.asarray(x)
    check_activations(x)
    check_packed_bits(low_bits, high_bits)
    _, high = check_mixed_layout(x.shape[-1], high)
    if select_impl(impl) == "triton":
        return _triton_ops().quantize_pack(x, high, low_bits, high_bits)
    return quantize_pack_jnp(x, high, low_bits, high_bits)


def mixed_gemm(px: PackedActivations, pw: PackedWeights, impl: str = "auto",
               out_dtype=jnp.bfloat16) -> jax.Array:
    """``y: [..., N]`` = dequantized(px) @ dequantized(pw) + bias computed on the integer codes
    (module docstring), in ``out_dtype`` (bfloat16 or float32)."""
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    check_operands(px, pw)
    if select_impl(impl) == "triton":
        return _triton_ops().mixed_gemm(px, pw, out_dtype)
    return mixed_gemm_jnp(px, pw, out_dtype)
