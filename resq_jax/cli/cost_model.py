"""On-paper memory and time of ResQ + GPTQ (calibration, projections, GPTQ) for a model shape on a machine.

Nothing here is measured when it runs: it counts each layer's floating-point work and bytes from the shape and
divides by rates. The default rates were measured on the project's 2-core CPU machine (a one-core profile of one
Qwen2.5-7B layer with 4096 calibration tokens): XLA float32 matmuls 50 GFLOP/s per core, the LAPACK Cholesky
factor 90 GFLOP/s per core, the float64 fusion of the rotations 35 GFLOP/s per core. GPU rows assume float32 at
full precision (no TF32) at 10 TFLOP/s achieved per GPU (an A100's peak is 19.5) and 16 host cores per job for
the work that stays on the host (the Hessian factors and the float64 fusion); they are assumptions, not
measurements. With several GPUs, the calibration and Hessian accumulation (the work proportional to tokens)
is split over them; the GPTQ column sweeps, the factors and the fusion are not.

Per layer (d hidden, f intermediate, q = heads x head_dim, k = kv_heads x head_dim, T calibration tokens,
P = the layer's weight entries = d(q + 2k) + qd + 2df + fd):
  calibration   2 T P (forward) + 4 T d^2 (the two residual second moments)
  GPTQ stage    4 T P (forwards of the float and the quantized layer) + 2 T (2d^2 + q^2 + f^2) (Hessians)
                + sum over the linears of n_in^2 n_out (column sweeps) + 2/3 (2d^3 + q^3 + f^3) (factors)
  fusion        2 d P in float64
  host memory   2.0 GB (program, tokenizer, buffers; 5.8 GB measured for Qwen2.5-7B minus its layer terms)
                + the layer in float32 + two down_proj Hessians (f x f float32) while they are summed
  device memory the layer and one Hessian in float32, the head in bfloat16, 4 float32 buffers of 4 windows x 512 tokens
                at width f

    python scripts/cost_model.py                     # the README's tables
    python scripts/cost_model.py --tokens 32768 --gpus 1,8,64
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from resq_jax.models.config import config_from_hf
from resq_jax.models.synthetic import SHAPES


@dataclasses.dataclass(frozen=True)
class Rates:
    """FLOP/s of each kind of work; host rates are per core."""

    xla_core: float = 50e9
    factor_core: float = 90e9
    fuse_core: float = 35e9
    gpu: float = 10e12
    host_cores: int = 2  # this machine; a GPU job's host gets gpu_host_cores
    gpu_host_cores: int = 16


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One decoder layer's work (FLOPs) and memory (bytes) for T calibration tokens."""

    layers: int
    weights: int  # the layer's weight entries P
    calibrate: float
    per_token: float  # GPTQ-stage work proportional to tokens (forwards and Hessians)
    sweeps: float
    factors: float
    fusion: float
    host_bytes: float
    device_bytes: float


def layer_cost(shape: str, tokens: int) -> LayerCost:
    c = config_from_hf(SHAPES[shape].hf_config)
    d, f = c.hidden_size, c.intermediate_size
    q, k = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    linears = [(d, q), (d, k), (d, k), (q, d), (d, f), (d, f), (f, d)]  # (n_in, n_out)
    p = sum(a * b for a, b in linears)
    return LayerCost(
        layers=c.num_layers,
        weights=p,
        calibrate=2 * tokens * p + 4 * tokens * d * d,
        per_token=4 * tokens * p + 2 * tokens * (2 * d * d + q * q + f * f),
        sweeps=sum(a * a * b for a, b in linears),
        factors=sum(2 / 3 * n**3 for n in (d, q, d, f)),
        fusion=2 * d * p,
        host_bytes=2.0e9 + 4 * p + 2 * 4 * f * f,
        device_bytes=4 * p + 4 * f * f + 2 * d * c.vocab_size + 4 * (4 * 512 * f * 4),
    )


def seconds(lc: LayerCost, gpus: int, rates: Rates = Rates()) -> float:
    """The whole model's calibration + GPTQ time on ``gpus`` GPUs (0: this CPU machine)."""
    if gpus == 0:
        cores = rates.host_cores
        per = (lc.calibrate + lc.per_token + lc.sweeps) / (rates.xla_core * cores) \
            + lc.factors / (rates.factor_core * cores) + lc.fusion / (rates.fuse_core * cores)
    else:
        cores = rates.gpu_host_cores
        per = (lc.calibrate + lc.per_token) / (rates.gpu * gpus) + lc.sweeps / rates.gpu \
            + lc.factors / (rates.factor_core * cores) + lc.fusion / (rates.fuse_core * cores)
    return per * lc.layers


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{max(s / 60, 1):.0f} min"


def table(shapes: list[str], tokens: int, gpus: list[int], rates: Rates = Rates()) -> str:
    head = ["model", "host peak", "device peak", "this machine (2 cores)"] + [f"{g} GPU{'s' * (g > 1)}" for g in gpus]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        lc = layer_cost(s, tokens)
        cells = [s, f"{lc.host_bytes / 1e9:.1f} GB", f"{lc.device_bytes / 1e9:.1f} GB", _duration(seconds(lc, 0, rates))]
        rows.append("| " + " | ".join(cells + [_duration(seconds(lc, g, rates)) for g in gpus]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-7b,llama-3-8b,llama-3-70b", help="comma-separated shape names")
    ap.add_argument("--tokens", default="4096,32768,262144",
                    help="comma-separated calibration token counts (windows x sequence length)")
    ap.add_argument("--gpus", default="1,8,64", help="comma-separated GPU counts")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    gpus = [int(g) for g in args.gpus.split(",")]
    for t in (int(x) for x in args.tokens.split(",")):
        print(f"\ncalibration tokens: {t}\n\n{table(shapes, t, gpus)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
