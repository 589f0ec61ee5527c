"""Compare the Triton kernels with the JAX reference (resq_jax.kernels.gemm_reference) on many shapes.

    PYTHONPATH=tests python -m support.triton.selfcheck [--device cpu|cuda] [--json out.json] [--quick]

``--device cpu`` (default) runs the kernels under Triton's interpreter (this module sets
``TRITON_INTERPRET=1`` before triton is imported; torch CPU tensors); ``--device cuda`` runs
them compiled on a CUDA device through torch. Per case it reports: codes/scales/zeros identical
(quantize_pack), int32 accumulators identical, and the max absolute / normalized difference
of the outputs (float32 and bfloat16) from the reference. Exit status 1 if any case fails
(codes or accumulators differ, or an output is off by more than float rounding, ``tolerances``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def _cli_device(argv) -> str:
    """The --device value of a command line (before argparse: the env must be set first)."""
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return "cpu"


if __name__ == "__main__" and _cli_device(sys.argv[1:]) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from resq_jax.formats.integer import quantize_weight_sym
from resq_jax.kernels.gemm_reference import int_accumulators, mixed_gemm_jnp, pack_weights, quantize_pack_jnp
from resq_jax.kernels.mixed_gemm import mixed_gemm, quantize_pack
from resq_jax.kernels.triton import launch  # noqa: E402
from resq_jax.runtime.linear import ActQuant, LinearLayout, PackedLinear, pack_block_np

__all__ = ["Case", "CASES", "QUICK_CASES", "make_inputs", "run_case", "run", "main"]

_EPS32 = float(np.finfo(np.float32).eps)
_BF16_REL = 2.0 ** -8  # half a bfloat16 ulp relative to the value


@dataclasses.dataclass(frozen=True)
class Case:
    """x: [m, k] (dtype), w: [k, n], the last r channels / rows in 8 bits; tile configs."""

    m: int
    k: int
    r: int
    n: int
    x_dtype: str = "float32"
    bias: bool = True
    quant: launch.QuantizePackConfig = launch.QuantizePackConfig()
    gemm: launch.GemmConfig | None = None  # None: launch.default_gemm_config(m)
    seed: int = 0

    @property
    def name(self) -> str:
        g = self.gemm or launch.default_gemm_config(self.m)
        return (f"m{self.m}_k{self.k}_r{self.r}_n{self.n}_{self.x_dtype}"
                f"_q{self.quant.block_m}x{self.quant.block_p}x{self.quant.block_r}"
                f"_g{g.block_m}x{g.block_n}x{g.block_kp}x{g.block_r}{'_bias' if self.bias else ''}")


_SMALL_Q = launch.QuantizePackConfig(block_m=2, block_p=32, block_r=32)
_SMALL_G = launch.GemmConfig(block_m=16, block_n=16, block_kp=32, block_r=32)

# Sizes not multiples of the tiles (m, n, K - r, r), the model sizes K = 576 (SmolLM2-135M
# hidden), 896 (Qwen2-0.5B hidden), 1536 (SmolLM2 intermediate, Qwen2-1.5B hidden) and 4864
# (Qwen2-0.5B intermediate) with r = K / 8 and r = 0; small m and n keep the interpreter fast.
CASES = (
    Case(5, 96, 16, 40),
    Case(1, 98, 14, 17, quant=_SMALL_Q, gemm=_SMALL_G),
    Case(3, 34, 0, 1, bias=False, quant=_SMALL_Q, gemm=_SMALL_G),
    Case(19, 200, 70, 33, x_dtype="bfloat16", quant=_SMALL_Q, gemm=_SMALL_G),
    Case(33, 576, 72, 80),
    Case(33, 576, 0, 80, bias=False),
    Case(17, 896, 112, 48, x_dtype="bfloat16"),
    Case(17, 896, 0, 48, x_dtype="bfloat16", quant=_SMALL_Q, gemm=_SMALL_G),
    Case(9, 1536, 192, 64, gemm=_SMALL_G),
    Case(9, 1536, 0, 64, x_dtype="bfloat16"),
    Case(7, 4864, 608, 40),
    Case(7, 4864, 0, 40, x_dtype="bfloat16", bias=False),
)
QUICK_CASES = CASES[:4]


def _special_rows(k: int, r: int) -> np.ndarray:
    """Rows that stress the quantizer: all zero, all positive, all negative, exact rounding ties
    (scale 1/8 in the 4-bit block: x = (j + 1/2) / 8), a constant row."""
    rows = np.zeros((5, k), np.float32)
    kl = k - r
    rows[1] = np.linspace(0.1, 3.0, k, dtype=np.float32)
    rows[2] = -np.linspace(0.1, 3.0, k, dtype=np.float32)
    ties = (np.arange(kl) % 15 - 8 + 0.5) / 8.0  # (j + 0.5) / 8, j in -8..6
    ties[0], ties[1 % kl] = -1.0, 0.875          # range [-1, 0.875]: scale = 1.875 / 15 = 1/8
    rows[3, :kl] = ties
    if r:
        rows[3, kl:] = (np.arange(r) % 255 - 128 + 0.5) / 64.0
        rows[3, kl], rows[3, kl + (1 % r)] = -2.0, 127.0 / 64.0  # 8-bit ties, scale 1/64
    rows[4] = 0.75
    return rows


def make_inputs(case: Case):
    """x: [m, k] (case.x_dtype), w: [k, n] float32, bias: [n] float32 or None (seeded)."""
    rng = np.random.default_rng(case.seed + case.k * 7 + case.m)
    x = rng.standard_normal((case.m, case.k)).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, size=(case.m, 1))).astype(np.float32)  # per-token range
    if case.r:
        x[:, case.k - case.r:] *= 8.0  # outlier channels in the high block
    special = _special_rows(case.k, case.r)
    x[: min(case.m, len(special))] = special[: case.m]
    w = (rng.standard_normal((case.k, case.n)) / np.sqrt(case.k)).astype(np.float32)
    bias = rng.standard_normal(case.n).astype(np.float32) if case.bias else None
    x = jnp.asarray(x).astype(case.x_dtype)
    return x, jnp.asarray(w), None if bias is None else jnp.asarray(bias)


def _as_np_dict(obj, names):
    return {n: None if getattr(obj, n) is None else np.asarray(getattr(obj, n)) for n in names}


_X_NAMES = ("q4", "scale4", "zero4", "q8", "scale8", "zero8")
_W_NAMES = ("w4", "scale4", "colsum4", "w8", "scale8", "colsum8", "bias")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _terms_magnitude(px, pw, acc4, acc8):
    """|s4 s_w4 c4| + |s8 s_w8 c8| + |bias| per output: the scale of float32 rounding."""
    c4 = acc4.astype(np.int64) - px["zero4"].astype(np.int64)[:, None] * pw["colsum4"][None, :]
    mag = np.abs(px["scale4"][:, None] * pw["scale4"][None, :] * c4.astype(np.float64))
    if acc8 is not None:
        c8 = acc8.astype(np.int64) - px["zero8"].astype(np.int64)[:, None] * pw["colsum8"][None, :]
        mag += np.abs(px["scale8"][:, None] * pw["scale8"][None, :] * c8.astype(np.float64))
    if pw["bias"] is not None:
        mag += np.abs(pw["bias"][None, :])
    return mag


def tolerances(mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32, bfloat16) allowed |kernel - reference|: 8 float32 ulps of the term magnitudes
    (a few roundings, FMA contraction); bfloat16 adds one bfloat16 ulp (the two float32 values
    may straddle a bfloat16 rounding boundary)."""
    tol32 = 8 * _EPS32 * mag + 1e-30
    return tol32, tol32 + 2 * _BF16_REL * mag


def run_case(case: Case, device: str = "cpu") -> dict:
    from support.triton import torch_ops

    x, w, bias = make_inputs(case)
    t0 = time.perf_counter()
    ref_x = quantize_pack_jnp(x, case.r)
    got_x = torch_ops.quantize_pack(np.asarray(x), case.r, config=case.quant, device=device)
    ref_xd = _as_np_dict(ref_x, _X_NAMES)
    codes_equal = {n: _same(got_x[n], ref_xd[n]) for n in _X_NAMES}

    wc = quantize_weight_sym(w, 4, 8, case.r)
    pw = pack_weights(wc, bias)
    pwd = _as_np_dict(pw, _W_NAMES)
    ref_a4, ref_a8 = int_accumulators(ref_x, pw)
    a4, a8 = torch_ops.int_accumulators(ref_xd, pwd, config=case.gemm, device=device)
    acc_equal = _same(a4, np.asarray(ref_a4)) and _same(
        a8, None if ref_a8 is None else np.asarray(ref_a8))

    mag = _terms_magnitude(ref_xd, pwd, np.asarray(ref_a4),
                           None if ref_a8 is None else np.asarray(ref_a8))
    tol32, tol16 = tolerances(mag)
    out = {}
    for dt, tol in (("float32", tol32), ("bfloat16", tol16)):
        y = torch_ops.mixed_gemm(ref_xd, pwd, dt, config=case.gemm, device=device)
        y_ref = np.asarray(mixed_gemm_jnp(ref_x, pw, jnp.dtype(dt)))
        d = np.abs(y.astype(np.float64) - y_ref.astype(np.float64))
        out[dt] = dict(max_abs=float(d.max()), max_over_mag=float((d / (mag + 1e-30)).max()),
                       bit_identical_fraction=float(np.mean(y == y_ref)),
                       within_tol=bool(np.all(d <= tol)), dtype_ok=y.dtype == y_ref.dtype)
    ok = all(codes_equal.values()) and acc_equal and all(
        v["within_tol"] and v["dtype_ok"] for v in out.values())
    return dict(case=case.name, ok=bool(ok), codes_equal=codes_equal, acc_equal=bool(acc_equal),
                out=out, seconds=round(time.perf_counter() - t0, 2))


def _install_stand_in(device: str):
    """Make ``import jax_triton`` give torch_ops.triton_call_stand_in (for run_jax_glue)."""
    import types

    from support.triton import torch_ops

    fake = types.ModuleType("jax_triton")

    def triton_call(*args, kernel, grid, out_type=None, num_warps=4, num_stages=None, **kw):
        return torch_ops.triton_call_stand_in(*args, kernel=kernel, grid=grid, out_type=out_type,
                                              num_warps=num_warps, num_stages=num_stages,
                                              device=device, **kw)

    fake.triton_call = triton_call
    sys.modules["jax_triton"] = fake


def run_jax_glue(case: Case, device: str = "cpu") -> dict:
    """The JAX launchers (jax_ops, what impl="triton" runs) with jax_triton replaced by the torch
    stand-in: x with a leading batch axis, quantize_pack + mixed_gemm vs the jnp reference."""
    _install_stand_in(device)
    x, w, bias = make_inputs(case)
    x = x.reshape(1, *x.shape)
    pw = pack_weights(quantize_weight_sym(w, 4, 8, case.r), bias)
    ref_x = quantize_pack(x, case.r, impl="jnp")
    got_x = quantize_pack(x, case.r, impl="triton")
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)),
        got_x, ref_x))
    from resq_jax.kernels.triton import jax_ops
    acc = jax_ops.int_accumulators(ref_x, pw)
    ref_acc = int_accumulators(ref_x, pw)
    acc_same = all(_same(None if a is None else np.asarray(a), None if b is None else np.asarray(b))
                   for a, b in zip(acc, ref_acc))
    y = mixed_gemm(ref_x, pw, impl="triton", out_dtype=jnp.float32)
    y_ref = mixed_gemm(ref_x, pw, impl="jnp", out_dtype=jnp.float32)
    d = float(jnp.max(jnp.abs(y - y_ref)))
    scale = float(jnp.max(jnp.abs(y_ref)))
    ok = same and acc_same and y.shape == y_ref.shape and d <= 64 * _EPS32 * scale
    return dict(case=case.name, ok=bool(ok), codes_equal=bool(same), acc_equal=bool(acc_same),
                shape=list(y.shape), max_abs=d)


def run_packed_linear(case: Case, device: str = "cpu") -> dict:
    """resq_jax.runtime.linear.PackedLinear with impl="triton" (the jax launchers, jax_triton replaced by
    the stand-in) against the same linear on XLA's integer dot (impl="jnp"), called eagerly on
    x: [2, M, K]: the arrays the runtime stores feed the Triton kernels unchanged."""
    pass

    _install_stand_in(device)
    x, w, bias = make_inputs(case)
    x = jnp.asarray(np.stack([np.asarray(x), np.asarray(x)[::-1]]))
    codes = quantize_weight_sym(w, 4, 8, case.r)
    k, n = w.shape
    lay = LinearLayout(d_in=k, d_out=n, groups=1, low_rows=k - case.r, high_rows=case.r, w_low_bits=4,
                               w_high_bits=8, act=ActQuant(4, 8, case.r))
    arrays = {} if bias is None else {"bias": np.asarray(bias, np.float32)}
    for b, q, scale in (("low", codes.q_low, codes.scale_low), ("high", codes.q_high, codes.scale_high)):
        if lay.rows(b):
            q = np.asarray(q, np.int8)[None]
            arrays.update({f"w_{b}": pack_block_np(q, lay.bits(b)), f"scale_{b}": np.asarray(scale[0])})
    tri, ref = (PackedLinear(lay, arrays, impl) for impl in ("triton", "jnp"))
    y, y_ref = tri(x), ref(x)
    d = float(jnp.max(jnp.abs(y - y_ref)))
    scale = float(jnp.max(jnp.abs(y_ref)))
    ok = tri.triton_applies() and y.shape == y_ref.shape and y.dtype == y_ref.dtype and d <= 64 * _EPS32 * scale
    return dict(case=case.name, ok=bool(ok), shape=list(y.shape), max_abs=d, max_over_mag=d / max(scale, 1e-30))


def run(cases=CASES, device: str = "cpu", glue_cases=QUICK_CASES[:3]) -> dict:
    """All cases -> {"device", "interpret", "cases": [...], "jax_glue": [...], "packed_linear":
    [...], "ok"}."""
    results = [run_case(c, device) for c in cases]
    glue = [run_jax_glue(c, device) for c in glue_cases]
    linear = [run_packed_linear(c, device) for c in glue_cases]
    return dict(device=device, interpret=os.environ.get("TRITON_INTERPRET") == "1",
                jax_backend=jax.default_backend(),
                ok=all(r["ok"] for r in results + glue + linear), cases=results, jax_glue=glue,
                packed_linear=linear)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: Triton interpreter (TRITON_INTERPRET=1); cuda: compiled, via torch")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="only the first few (small) cases")
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1 before triton is imported; run this module "
              "with python -m", file=sys.stderr)
        return 2
    res = run(QUICK_CASES if args.quick else CASES, args.device)
    for c in res["cases"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['case']}: codes {all(c['codes_equal'].values())}"
              f", acc {c['acc_equal']}, f32 max {c['out']['float32']['max_abs']:.3g} "
              f"(/mag {c['out']['float32']['max_over_mag']:.3g}), bf16 max "
              f"{c['out']['bfloat16']['max_abs']:.3g}, {c['seconds']}s")
    for g in res["jax_glue"]:
        print(f"{'ok  ' if g['ok'] else 'FAIL'} jax launchers {g['case']}: codes {g['codes_equal']}, "
              f"acc {g['acc_equal']}, f32 max {g['max_abs']:.3g}")
    for g in res["packed_linear"]:
        print(f"{'ok  ' if g['ok'] else 'FAIL'} runtime PackedLinear on triton {g['case']}: "
              f"f32 max {g['max_abs']:.3g} (/mag {g['max_over_mag']:.3g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
