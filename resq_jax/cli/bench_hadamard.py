"""Benchmark of the native FFI Hadamard transform (resq_jax.kernels.hadamard) on this machine.

For each size n, float32 x: [rows, n]: wall time of the FFI transform, the jnp fast reference
(resq_jax.transforms.fwht.hadamard_transform) and a dense ``x @ H^T`` matmul, each jit-compiled,
warmed up (compilation excluded), ``block_until_ready``, median of ``repeats`` runs; the speedups;
and the FFI transform's effective memory bandwidth (bytes read + written / time) as a fraction of
the machine's measured copy bandwidth (a 256 MiB NumPy copy into a preallocated array, the hardware
reference, and a 256 MiB jitted jnp ``v + 1``, which like every jitted call here also pays for a fresh
output buffer, i.e. page faults).

  python scripts/bench_hadamard.py [--rows 2048] [--sizes 576 1536 ...] [--repeats 5] [--out FILE]

Targets (issue 5): FFI >= 3x faster than dense for n >= 4096, and faster than jnp at every size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from resq_jax.kernels import hadamard as hk  # noqa: E402
from resq_jax.transforms.fwht import hadamard_transform
from resq_jax.transforms.hadamard import hadamard_factor, sylvester

DEFAULT_SIZES = (576, 1536, 4096, 4864, 8960, 14336, 18944)
DENSE_BUDGET_S = 60.0  # per size: fewer dense repeats when one dense matmul is very slow


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up, excluded
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """Copy bandwidth in GB/s (bytes read + written per second) of a NumPy copy and a jitted jnp copy."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    numpy_gbs = 2 * nbytes / statistics.median(times) / 1e9
    del b
    xa = jnp.asarray(a)
    del a
    copy = jax.jit(lambda v: v + 1.0)  # one read + one write per element, as the transform
    jnp_gbs = 2 * nbytes / _median_seconds(copy, xa, repeats=repeats) / 1e9
    return {"numpy_copy_gbs": numpy_gbs, "jnp_copy_gbs": jnp_gbs, "reference_gbs": max(numpy_gbs, jnp_gbs)}


def _dense_matrix_f32(n: int) -> np.ndarray:
    """hadamard_matrix(n).T in float32 without the float64 n x n intermediate."""
    k, h_k, m = hadamard_factor(n)
    syl = sylvester(1 << m).astype(np.float32)
    return (np.kron(h_k.T.astype(np.float32), syl) * np.float32(1.0 / math.sqrt(n))).astype(np.float32)


def run(rows: int = 2048, sizes=DEFAULT_SIZES, repeats: int = 5, dense: bool = True) -> dict:
    """Times FFI / jnp / dense for each n (float32 [rows, n]); returns a JSON-ready dict."""
    status = hk.ffi_status()
    bw = memory_bandwidth()
    out: dict = {
        "rows": rows,
        "dtype": "float32",
        "repeats": repeats,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "ffi_library": status.cpu_library,
        "ffi_isa": status.cpu_isa,
        "memory_bandwidth": bw,
        "sizes": [],
    }
    ffi_fn = jax.jit(lambda a: hk.hadamard(a, impl="ffi"))
    jnp_fn = jax.jit(lambda a: hadamard_transform(a))
    dense_fn = jax.jit(lambda a, h: jnp.matmul(a, h, precision=jax.lax.Precision.HIGHEST))
    rng = np.random.default_rng(0)
    for n in sizes:
        k, _, m = hadamard_factor(n)
        x = jnp.asarray(rng.standard_normal((rows, n), dtype=np.float32))
        row: dict = {"n": n, "K": k, "pow2": 1 << m}
        t_jnp = _median_seconds(jnp_fn, x, repeats=repeats)
        row["jnp_ms"] = 1e3 * t_jnp
        if status.cpu_library is not None:
            t_ffi = _median_seconds(ffi_fn, x, repeats=repeats)
            row["ffi_ms"] = 1e3 * t_ffi
            row["speedup_vs_jnp"] = t_jnp / t_ffi
            gbs = 2 * rows * n * 4 / t_ffi / 1e9
            row["ffi_gbs"] = gbs
            row["ffi_bandwidth_fraction"] = gbs / bw["reference_gbs"]
            row["ffi_bandwidth_fraction_of_jnp_copy"] = gbs / bw["jnp_copy_gbs"]
            err = float(jnp.max(jnp.abs(ffi_fn(x) - jnp_fn(x))))
            row["max_abs_diff_vs_jnp"] = err
        if dense:
            h = jnp.asarray(_dense_matrix_f32(n))
            t0 = time.perf_counter()
            jax.block_until_ready(dense_fn(x, h))  # compile + first run
            first = time.perf_counter() - t0
            dense_repeats = max(1, min(repeats, int(DENSE_BUDGET_S / max(first, 1e-6))))
            t_dense = _median_seconds(dense_fn, x, h, repeats=dense_repeats)
            row["dense_ms"] = 1e3 * t_dense
            row["dense_repeats"] = dense_repeats
            if "ffi_ms" in row:
                row["speedup_vs_dense"] = t_dense / (row["ffi_ms"] / 1e3)
            del h
        out["sizes"].append(row)
        print(_format_row(row), file=sys.stderr, flush=True)
    measured = [r for r in out["sizes"] if "ffi_ms" in r]
    out["targets"] = {
        "ffi_3x_faster_than_dense_for_n_ge_4096": all(
            r["speedup_vs_dense"] >= 3 for r in measured if r["n"] >= 4096 and "speedup_vs_dense" in r
        )
        if dense and measured
        else None,
        "ffi_faster_than_jnp_everywhere": all(r["speedup_vs_jnp"] > 1 for r in measured) if measured else None,
    }
    return out


def _format_row(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    return (
        f"n={r['n']:>6} (K={r['K']:>3} x 2^{int(math.log2(r['pow2'])):>2})  ffi {f('ffi_ms', '9.2f')} ms  "
        f"jnp {f('jnp_ms', '9.2f')} ms  dense {f('dense_ms', '10.2f')} ms  "
        f"ffi/jnp x{f('speedup_vs_jnp', '.2f')}  ffi/dense x{f('speedup_vs_dense', '.1f')}  "
        f"ffi {f('ffi_gbs', '.1f')} GB/s ({f('ffi_bandwidth_fraction', '.0%')} of copy)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048, help="rows of x (tokens)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="transform sizes n")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense O(n^2) matmul")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    res = run(rows=args.rows, sizes=tuple(args.sizes), repeats=args.repeats, dense=not args.no_dense)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
