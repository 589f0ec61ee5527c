"""Launch geometry and operand order of the Triton kernels, independent of the array library.

No triton import: the JAX launchers (``jax_ops``), the torch launchers used by the interpreter
checks (tests/support/triton/torch_ops.py) and the ahead-of-time compile (tests/support/triton/aot.py)
share these functions, so the operand order and the constexprs are defined once (kernels.py documents
the parameters).
"""
from __future__ import annotations

import dataclasses

__all__ = ["QuantizePackConfig", "GemmConfig", "default_gemm_config", "cdiv",
           "quantize_pack_grid", "quantize_pack_constexprs", "gemm_grid", "gemm_constexprs",
           "int_acc_constexprs", "gemm_operands", "int_acc_operands"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class QuantizePackConfig:
    """block_m rows per program; the low block advances block_p packed bytes (2 * block_p
    channels) a step, the high block block_r channels. Powers of two."""

    block_m: int = 4
    block_p: int = 128
    block_r: int = 128
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Output tile block_m x block_n; K advances block_kp packed bytes (2 * block_kp int4
    channels) in the int4 loop and block_r channels in the int8 loop. Powers of two, each >= 16
    (tl.dot), block_kp and block_r >= 32 (int8 MMA K)."""

    block_m: int = 64
    block_n: int = 64
    block_kp: int = 64
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_kp", "block_r"):
            v = getattr(self, name)
            low = 32 if name in ("block_kp", "block_r") else 16
            if v < low or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= {low}, got {v}")


def default_gemm_config(m: int) -> GemmConfig:
    """Smaller row tiles for decode-sized token counts."""
    return GemmConfig(block_m=16 if m <= 16 else 32 if m <= 32 else 64)


def quantize_pack_grid(m: int, cfg: QuantizePackConfig) -> tuple[int]:
    return (cdiv(m, cfg.block_m),)


def quantize_pack_constexprs(low_bits: int, high_bits: int, high: int,
                             cfg: QuantizePackConfig) -> dict:
    return dict(LOW_BITS=low_bits, HIGH_BITS=high_bits, HAS_HIGH=bool(high), BLOCK_M=cfg.block_m,
                BLOCK_P=cfg.block_p, BLOCK_R=cfg.block_r)


def gemm_grid(m: int, n: int, cfg: GemmConfig) -> tuple[int, int]:
    return (cdiv(m, cfg.block_m), cdiv(n, cfg.block_n))


def gemm_constexprs(high: int, has_bias: bool, out_bf16: bool, cfg: GemmConfig) -> dict:
    return dict(HAS_HIGH=bool(high), HAS_BIAS=bool(has_bias), OUT_BF16=bool(out_bf16),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KP=cfg.block_kp,
                BLOCK_R=cfg.block_r)


def int_acc_constexprs(high: int, cfg: GemmConfig) -> dict:
    return dict(HAS_HIGH=bool(high), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_KP=cfg.block_kp, BLOCK_R=cfg.block_r)


def gemm_operands(x, w, dummy_i8, dummy_f32, dummy_i32) -> list:
    """Input pointers of mixed_gemm_kernel in order. ``x``: dict q4, scale4, zero4, q8, scale8,
    zero8 (2-D / 1-D arrays); ``w``: dict w4, scale4, colsum4, w8, scale8, colsum8, bias. Missing
    blocks (None) are replaced by the dummies (never read: HAS_HIGH / HAS_BIAS are False)."""
    def pick(v, dummy):
        return dummy if v is None else v
    return [x["q4"], w["w4"], x["scale4"], x["zero4"], w["scale4"], w["colsum4"],
            pick(x["q8"], dummy_i8), pick(w["w8"], dummy_i8),
            pick(x["scale8"], dummy_f32), pick(x["zero8"], dummy_f32),
            pick(w["scale8"], dummy_f32), pick(w["colsum8"], dummy_i32),
            pick(w["bias"], dummy_f32)]


def int_acc_operands(x, w, dummy_i8) -> list:
    """Input pointers of int_acc_kernel in order (see gemm_operands)."""
    return [x["q4"], w["w4"], dummy_i8 if x["q8"] is None else x["q8"],
            dummy_i8 if w["w8"] is None else w["w8"]]
