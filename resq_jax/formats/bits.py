"""Bit widths: the user-facing checks and the 'off' convention (16 bits = not quantized).
"""
from __future__ import annotations

from resq_jax.util.checks import is_int

OFF = 16  # bits >= OFF: the tensor / block is left unquantized


def check_bits(bits, name: str = "bits", *, allow_off: bool = True) -> int:
    """Validate a user-facing bit width: an integer in 2..8, or 16 (= no quantization) if
    ``allow_off``. Returns it as a Python int; raises ValueError naming ``name`` otherwise."""
    ok = is_int(bits) and (2 <= int(bits) <= 8 or (allow_off and int(bits) == OFF))
    if not ok:
        rng = "between 2 and 8 (or 16 to disable)" if allow_off else "between 2 and 8"
        raise ValueError(f"{name}: bits must be {rng}, got {bits!r}")
    return int(bits)


def is_off(bits: int) -> bool:
    """True when ``bits`` means 'leave unquantized' (bits >= 16)."""
    return bits >= OFF


def check_quant_bits(bits, name: str, *, allow_off: bool) -> int:
    """Internal check: 2..8 quantizes; with ``allow_off`` any bits >= 16 passes through."""
    if is_int(bits) and (2 <= int(bits) <= 8 or (allow_off and int(bits) >= OFF)):
        return int(bits)
    rng = "between 2 and 8 (or >= 16 to leave unquantized)" if allow_off else "between 2 and 8"
    raise ValueError(f"{name}: bits must be {rng}, got {bits!r}")


def check_positive_int(v, name: str) -> int:
    if not is_int(v) or int(v) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)
