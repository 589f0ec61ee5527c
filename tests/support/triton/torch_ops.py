"""torch launchers of the Triton kernels: for Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors; set before this module is imported) and for checks on a CUDA device from torch.

Inputs and outputs are NumPy arrays so the checks can compare them with the JAX reference
directly; tensors are created on ``device``.
"""
from __future__ import annotations

import numpy as np
import torch

from resq_jax.kernels.triton import kernels, launch

__all__ = ["quantize_pack", "mixed_gemm", "int_accumulators", "triton_call_stand_in"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8,
                 "int32": torch.int32}


def _t(a, device):
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes bfloat16: move the bits
        return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(a, copy=True, order="C")).to(device)  # writable copy


def _np(t):
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)
    return t.numpy()


def _empty(shape, dtype, device):
    return torch.zeros(shape, dtype=_TORCH_DTYPES[dtype], device=device)


def quantize_pack(x: np.ndarray, high: int, low_bits: int = 4, high_bits: int = 8,
                  config: launch.QuantizePackConfig | None = None, device: str = "cpu") -> dict:
    """x: [M, K] float32/bfloat16 -> dict q4 [M, (K-r)/2], scale4, zero4 [M], q8 [M, r], scale8,
    zero8 [M] (the high entries None when r = 0)."""
    cfg = config or launch.QuantizePackConfig()
    m, k = x.shape
    kp = (k - high) // 2
    xt = _t(x, device)
    out = [_empty((m, kp), "int8", device), _empty((m,), "float32", device),
           _empty((m,), "float32", device), _empty((m, high) if high else (1,), "int8", device),
           _empty((m,) if high else (1,), "float32", device),
           _empty((m,) if high else (1,), "float32", device)]
    kernels.quantize_pack_kernel[launch.quantize_pack_grid(m, cfg)](
        xt, m, k, high, *out, num_warps=cfg.num_warps,
        **launch.quantize_pack_constexprs(low_bits, high_bits, high, cfg))
    names = ("q4", "scale4", "zero4", "q8", "scale8", "zero8")
    res = {n: _np(t) for n, t in zip(names, out)}
    if not high:
        res.update(q8=None, scale8=None, zero8=None)
    return res


def _dummies(device):
    return (_empty((1,), "int8", device), _empty((1,), "float32", device),
            _empty((1,), "int32", device))


def mixed_gemm(x: dict, w: dict, out_dtype: str = "bfloat16",
               config: launch.GemmConfig | None = None, device: str = "cpu") -> np.ndarray:
    """x: dict of quantize_pack arrays ([M, ...]); w: dict w4, scale4, colsum4, w8, scale8,
    colsum8, bias (NumPy) -> y [M, N] in out_dtype ("bfloat16" or "float32")."""
    m, kp = x["q4"].shape
    n = w["w4"].shape[1]
    r = 0 if w["w8"] is None else w["w8"].shape[0]
    cfg = config or launch.default_gemm_config(m)
    xt = {k: _t(v, device) for k, v in x.items()}
    wt = {k: _t(v, device) for k, v in w.items()}
    y = _empty((m, n), out_dtype, device)
    kernels.mixed_gemm_kernel[launch.gemm_grid(m, n, cfg)](
        *launch.gemm_operands(xt, wt, *_dummies(device)), m, n, kp, r, y,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch.gemm_constexprs(r, w["bias"] is not None, out_dtype == "bfloat16", cfg))
    return _np(y)


def int_accumulators(x: dict, w: dict, config: launch.GemmConfig | None = None,
                     device: str = "cpu"):
    """(acc4, acc8 or None): int32 [M, N] accumulators of the kernel's ``_accumulate``."""
    m, kp = x["q4"].shape
    n = w["w4"].shape[1]
    r = 0 if w["w8"] is None else w["w8"].shape[0]
    cfg = config or launch.default_gemm_config(m)
    xt = {k: _t(v, device) for k, v in x.items()}
    wt = {k: _t(v, device) for k, v in w.items()}
    acc4, acc8 = _empty((m, n), "int32", device), _empty((m, n) if r else (1,), "int32", device)
    kernels.int_acc_kernel[launch.gemm_grid(m, n, cfg)](
        *launch.int_acc_operands(xt, wt, _dummies(device)[0]), m, n, kp, r, acc4, acc8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch.int_acc_constexprs(r, cfg))
    return _np(acc4), (_np(acc8) if r else None)


def triton_call_stand_in(*args, kernel, grid, out_type=None, out_shape=None, num_warps=4,
                         num_stages=None, device: str = "cpu", **constexprs):
    """A stand-in for ``jax_triton.triton_call`` on concrete arrays (not under jit): launches
    ``kernel`` through torch (the interpreter on CPU) with the positional arguments, then the
    outputs allocated from ``out_type``, then the constexprs, as jax_triton does. Lets the
    checks run the JAX launchers of ``jax_ops`` without a GPU."""
    import jax.numpy as jnp

    outs = out_type if out_type is not None else out_shape
    single = not isinstance(outs, (list, tuple))
    outs = [outs] if single else list(outs)
    targs = [_t(np.asarray(a), device) if hasattr(a, "shape") else a for a in args]
    touts = [_empty(o.shape, jnp.dtype(o.dtype).name, device) for o in outs]
    opts = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    kernel[tuple(grid)](*targs, *touts, **opts, **constexprs)
    res = [jnp.asarray(_np(t)) for t in touts]
    return res[0] if single else res
