"""Ahead-of-time compilation of the Triton kernels to cubin (no GPU needed: Triton bundles ptxas).

``compile_kernel("mixed_gemm", capability=80)`` runs Triton's full pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> cubin) for ``cuda`` ``sm_<capability>`` (Triton itself picks ``sm_90a`` for 90,
which wgmma needs) and returns the compiled kernel; ``compiled.asm`` holds "ptx" and "cubin".
Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import dataclasses

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from resq_jax.kernels.triton import kernels, launch

__all__ = ["KERNELS", "AotSpec", "signature", "compile_kernel"]

KERNELS = ("quantize_pack", "mixed_gemm", "int_acc")
_X_TYPES = {"float32": "*fp32", "bfloat16": "*bf16"}


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """What to specialize: activation dtype (quantize_pack), output dtype (mixed_gemm), whether
    the 8-bit block and the bias exist, bit widths and tile configs."""

    x_dtype: str = "bfloat16"
    out_dtype: str = "bfloat16"
    high: bool = True
    bias: bool = True
    low_bits: int = 4
    high_bits: int = 8
    quant: launch.QuantizePackConfig = launch.QuantizePackConfig()
    gemm: launch.GemmConfig = launch.GemmConfig()


def signature(name: str, spec: AotSpec) -> tuple[dict, dict]:
    """(signature, constexprs) of kernel ``name`` for ASTSource: pointer types "*i8"/"*fp32"/...,
    runtime scalars "i32", constexprs by value."""
    if name == "quantize_pack":
        sig = {"x_ptr": _X_TYPES[spec.x_dtype], "M": "i32", "K": "i32", "R": "i32",
               "q4_ptr": "*i8", "s4_ptr": "*fp32", "z4_ptr": "*fp32",
               "q8_ptr": "*i8", "s8_ptr": "*fp32", "z8_ptr": "*fp32"}
        const = launch.quantize_pack_constexprs(spec.low_bits, spec.high_bits, int(spec.high),
                                                spec.quant)
    elif name == "mixed_gemm":
        sig = {"x4_ptr": "*i8", "w4_ptr": "*i8", "sx4_ptr": "*fp32", "zx4_ptr": "*fp32",
               "sw4_ptr": "*fp32", "cs4_ptr": "*i32", "x8_ptr": "*i8", "w8_ptr": "*i8",
               "sx8_ptr": "*fp32", "zx8_ptr": "*fp32", "sw8_ptr": "*fp32", "cs8_ptr": "*i32",
               "bias_ptr": "*fp32", "M": "i32", "N": "i32", "KP": "i32", "R": "i32",
               "y_ptr": "*bf16" if spec.out_dtype == "bfloat16" else "*fp32"}
        const = launch.gemm_constexprs(int(spec.high), spec.bias, spec.out_dtype == "bfloat16",
                                       spec.gemm)
    elif name == "int_acc":
        sig = {"x4_ptr": "*i8", "w4_ptr": "*i8", "x8_ptr": "*i8", "w8_ptr": "*i8",
               "M": "i32", "N": "i32", "KP": "i32", "R": "i32",
               "acc4_ptr": "*i32", "acc8_ptr": "*i32"}
        const = launch.int_acc_constexprs(int(spec.high), spec.gemm)
    else:
        raise ValueError(f"unknown kernel {name!r}; choose one of {KERNELS}")
    sig.update({k: "constexpr" for k in const})
    return sig, const


def _kernel_fn(name: str):
    return {"quantize_pack": kernels.quantize_pack_kernel, "mixed_gemm": kernels.mixed_gemm_kernel,
            "int_acc": kernels.int_acc_kernel}[name]


def compile_kernel(name: str, capability: int = 80, spec: AotSpec = AotSpec()):
    """triton.compile of kernel ``name`` for cuda sm_<capability> (warp size 32)."""
    fn = _kernel_fn(name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were loaded under TRITON_INTERPRET=1 (interpreted "
                           "functions cannot be compiled); compile in a process without it")
    sig, const = signature(name, spec)
    cfg = spec.quant if name == "quantize_pack" else spec.gemm
    options = {"num_warps": cfg.num_warps}
    if name != "quantize_pack":
        options["num_stages"] = spec.gemm.num_stages
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
