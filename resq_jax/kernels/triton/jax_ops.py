"""JAX entry points of the Triton kernels through ``jax_triton.triton_call`` (NVIDIA GPUs).

Imported lazily by resq_jax.kernels.mixed_gemm when impl resolves to "triton". Runtime sizes
(M, K, N, r) are passed as Python ints, which jax_triton bakes in as specialization values
(one compiled kernel per shape, as for any jitted JAX program).
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import jax_triton as jt

from resq_jax.kernels.gemm_reference import PackedActivations, PackedWeights
from resq_jax.kernels.triton import kernels, launch

__all__ = ["quantize_pack", "mixed_gemm", "int_accumulators"]

# jax_triton renamed out_shape to out_type; accept both versions.
_OUT_KW = "out_type" if "out_type" in inspect.signature(jt.triton_call).parameters else "out_shape"


def _call(*args, kernel, outs, grid, num_warps, num_stages=None, **constexprs):
    kw = {_OUT_KW: outs, "grid": grid, "num_warps": num_warps}
    if num_stages is not None:
        kw["num_stages"] = num_stages
    return jt.triton_call(*args, kernel=kernel, **kw, **constexprs)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def quantize_pack(x: jax.Array, high: int, low_bits: int, high_bits: int,
                  config: launch.QuantizePackConfig | None = None) -> PackedActivations:
    """Triton twin of gemm_reference.quantize_pack_jnp for ``x: [..., K]`` (validated by the caller)."""
    cfg = config or launch.QuantizePackConfig()
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    kp = (k - high) // 2
    # r = 0: 1-element placeholders for the high-block outputs (the kernel never writes them)
    outs = [_sds((m, kp), jnp.int8), _sds((m,), jnp.float32), _sds((m,), jnp.float32),
            _sds((m, high) if high else (1,), jnp.int8), _sds((m,) if high else (1,), jnp.float32),
            _sds((m,) if high else (1,), jnp.float32)]
    q4, s4, z4, q8, s8, z8 = _call(
        x2, m, k, high, kernel=kernels.quantize_pack_kernel, outs=outs,
        grid=launch.quantize_pack_grid(m, cfg), num_warps=cfg.num_warps,
        **launch.quantize_pack_constexprs(low_bits, high_bits, high, cfg))
    px = dict(q4=q4.reshape(*lead, kp), scale4=s4.reshape(lead), zero4=z4.reshape(lead),
              q8=None, scale8=None, zero8=None)
    if high:
        px.update(q8=q8.reshape(*lead, high), scale8=s8.reshape(lead), zero8=z8.reshape(lead))
    return PackedActivations(**px, low_bits=low_bits, high_bits=high_bits)


def _flat_x(px: PackedActivations) -> dict:
    flat = lambda a, tail: None if a is None else a.reshape(-1, *tail)  # noqa: E731
    return dict(q4=flat(px.q4, (px.q4.shape[-1],)), scale4=flat(px.scale4, ()),
                zero4=flat(px.zero4, ()), q8=None if px.q8 is None else flat(px.q8, (px.high,)),
                scale8=flat(px.scale8, ()), zero8=flat(px.zero8, ()))


def _w_dict(pw: PackedWeights) -> dict:
    return dict(w4=pw.w4, scale4=pw.scale4, colsum4=pw.colsum4, w8=pw.w8, scale8=pw.scale8,
                colsum8=pw.colsum8, bias=pw.bias)


def _dummies():
    return (jnp.zeros((1,), jnp.int8), jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))


def mixed_gemm(px: PackedActivations, pw: PackedWeights, out_dtype,
               config: launch.GemmConfig | None = None) -> jax.Array:
    """Triton twin of gemm_reference.mixed_gemm_jnp: ``[..., K] x [K, N] -> [..., N]``."""
    lead = px.q4.shape[:-1]
    x = _flat_x(px)
    m, n, kp, r = x["q4"].shape[0], pw.n, pw.w4.shape[0], pw.high
    cfg = config or launch.default_gemm_config(m)
    out_bf16 = jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16)
    y = _call(*launch.gemm_operands(x, _w_dict(pw), *_dummies()), m, n, kp, r,
              kernel=kernels.mixed_gemm_kernel, outs=_sds((m, n), out_dtype),
              grid=launch.gemm_grid(m, n, cfg), num_warps=cfg.num_warps,
              num_stages=cfg.num_stages,
              **launch.gemm_constexprs(r, pw.bias is not None, out_bf16, cfg))
    return y.reshape(*lead, n)


def int_accumulators(px: PackedActivations, pw: PackedWeights,
                     config: launch.GemmConfig | None = None):
    """Triton twin of gemm_reference.int_accumulators: (acc4, acc8 or None), int32 [tokens, N]."""
    x = _flat_x(px)
    m, n, kp, r = x["q4"].shape[0], pw.n, pw.w4.shape[0], pw.high
    cfg = config or launch.default_gemm_config(m)
    outs = [_sds((m, n), jnp.int32), _sds((m, n) if r else (1,), jnp.int32)]
    acc4, acc8 = _call(*launch.int_acc_operands(x, _w_dict(pw), _dummies()[0]), m, n, kp, r,
                       kernel=kernels.int_acc_kernel, outs=outs, grid=launch.gemm_grid(m, n, cfg),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       **launch.int_acc_constexprs(r, cfg))
    return acc4, (acc8 if r else None)
