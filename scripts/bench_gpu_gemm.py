"""Time the Triton mixed-precision GEMM against a bfloat16 jnp matmul on a CUDA GPU.

    python scripts/bench_gpu_gemm.py [--tokens 1 16 128 2048] [--shapes 576x1536 ...] [--json out]

Per (tokens M, K x N): the packed GEMM alone (activations quantized and packed beforehand),
quantize_pack + GEMM (the whole W4A4 linear), and ``x_bf16 @ w_bf16`` (jnp, XLA's cuBLAS
matmul), each jitted, median of ``--iters`` timed calls after warm-up. Before timing, the Triton
output is checked against the jnp reference (max difference recorded). The last K/8 channels are
the 8-bit block (``--high-fraction``).

Without a CUDA backend (or without jax_triton) it prints why and exits with status 2: nothing is
measured and no JSON is written; GPU speed is only ever reported from a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from resq_jax.formats.integer import quantize_weight_sym
from resq_jax.kernels.gemm_reference import pack_weights
from resq_jax.kernels.mixed_gemm import mixed_gemm, quantize_pack, triton_available

# SmolLM2-135M (576 / 1536) and Qwen2-0.5B (896 / 4864) projections: K x N
DEFAULT_SHAPES = ("576x576", "576x1536", "1536x576", "896x896", "896x4864", "4864x896")


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be KxN like 576x1536, got {s!r}") from None
    return k, n


def _time(fn, *args, iters: int, warmup: int = 3) -> float:
    """Median seconds of one call (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _high(k: int, frac: float) -> int:
    r = int(round(k * frac))
    return r if (k - r) % 2 == 0 else r + 1


def bench_one(m: int, k: int, n: int, frac: float, iters: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    r = _high(k, frac)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    pw = pack_weights(quantize_weight_sym(w, 4, 8, r), jnp.zeros((n,), jnp.float32))
    px = jax.block_until_ready(quantize_pack(x, r, impl="triton"))
    px_ref = quantize_pack(x, r, impl="jnp")
    codes_equal = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), px, px_ref))

    gemm = jax.jit(lambda px, pw: mixed_gemm(px, pw, impl="triton"))
    linear = jax.jit(lambda x, pw: mixed_gemm(quantize_pack(x, r, impl="triton"), pw,
                                                 impl="triton"))
    dense = jax.jit(lambda x, w: x @ w)
    w16 = w.astype(jnp.bfloat16)
    y = gemm(px_ref, pw).astype(jnp.float32)
    y_ref = mixed_gemm(px_ref, pw, impl="jnp").astype(jnp.float32)
    t_gemm = _time(gemm, px, pw, iters=iters)
    t_linear = _time(linear, x, pw, iters=iters)
    t_dense = _time(dense, x, w16, iters=iters)
    return dict(tokens=m, k=k, n=n, high=r, codes_equal_reference=bool(codes_equal),
                max_abs_diff_vs_jnp_reference=float(jnp.max(jnp.abs(y - y_ref))),
                max_abs_reference=float(jnp.max(jnp.abs(y_ref))),
                seconds=dict(triton_gemm=t_gemm, triton_quantize_pack_gemm=t_linear,
                             jnp_bf16_matmul=t_dense),
                speedup_vs_bf16=dict(gemm=t_dense / t_gemm, quantize_pack_gemm=t_dense / t_linear))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 2048],
                    help="token counts M (rows of x)")
    ap.add_argument("--shapes", type=_parse_shape, nargs="+",
                    default=[_parse_shape(s) for s in DEFAULT_SHAPES], help="KxN weight shapes")
    ap.add_argument("--high-fraction", type=float, default=0.125,
                    help="fraction of K in the 8-bit block (rounded so that K - r is even)")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    if backend != "gpu" or not triton_available():
        why = (f"jax's default backend is {backend!r}" if backend != "gpu"
               else "jax_triton (pip install -e '.[gpu]') does not import")
        print(f"bench_gpu_gemm: no CUDA backend for the Triton kernels ({why}); nothing was "
              "measured and no results were written. Run on an NVIDIA GPU with jax[cuda] and "
              "jax-triton installed.", file=sys.stderr)
        return 2

    import triton
    rows = []
    for k, n in args.shapes:
        for m in args.tokens:
            res = bench_one(m, k, n, args.high_fraction, args.iters)
            rows.append(res)
            s = res["seconds"]
            print(f"M={m:5d} K={k:5d} N={n:5d} r={res['high']:4d}: triton gemm "
                  f"{s['triton_gemm'] * 1e6:9.1f} us, +quantize {s['triton_quantize_pack_gemm'] * 1e6:9.1f}"
                  f" us, bf16 matmul {s['jnp_bf16_matmul'] * 1e6:9.1f} us "
                  f"(x{res['speedup_vs_bf16']['gemm']:.2f}), max diff "
                  f"{res['max_abs_diff_vs_jnp_reference']:.3g}", flush=True)
    out = dict(measured=True, device=str(jax.devices()[0]),
               device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
               triton=triton.__version__, iters=args.iters, results=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
