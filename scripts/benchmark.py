#!/usr/bin/env python
"""Benchmarks, written as JSON (no timing is asserted in the test suite).

Sections (default: all that are available):
  throughput  evaluation tokens/s of our jitted model vs transformers+torch on the same windows,
              same thread count, side by side in one run; their perplexities must agree
  stages      wall time of each ResQ stage (calibrate, projections, fuse, quantize = GPTQ, evaluate)
              and GPTQ's seconds per layer on SmolLM2, and the process's peak resident memory
              (run in a fresh subprocess)
  hadamard    native FFI Walsh-Hadamard vs the jnp fast reference vs a dense matmul

  python scripts/benchmark.py --out results/benchmark.json
  python scripts/benchmark.py --section throughput --seq-len 512 --windows 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("throughput", "stages", "hadamard")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def throughput(model_spec: str, windows: int, seq_len: int, batch_size: int, threads: int) -> dict:
    import numpy as np
    import torch

    from models.decoder import from_weights
    from models.loaders import load_model
    from resq_jax.data import eval_windows, load_text, tokenize
    from resq_jax.evaluation import perplexity

    torch.set_num_threads(threads)
    loaded = load_model(model_spec)
    win = eval_windows(tokenize(load_text("wiki-eval").text, loaded.tokenizer), windows, seq_len)
    model = from_weights(loaded.config, loaded.weights)
    perplexity(model, win[:batch_size], batch_size=batch_size, progress=False)  # compile
    ours = perplexity(model, win, batch_size=batch_size, progress=False)

    from transformers import AutoModelForCausalLM

    if loaded.source.endswith(".gguf"):
        folder, name = os.path.split(loaded.source)
        ref_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32).eval()
    losses = []
    with torch.inference_mode():
        t = torch.as_tensor(win[:batch_size], dtype=torch.long)
        ref_model(t)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(win), batch_size):
            t = torch.as_tensor(win[i:i + batch_size], dtype=torch.long)
            logits = ref_model(t).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                                                    reduction="none").reshape(t.shape[0], -1).mean(-1)
            losses.extend(nll.tolist())
        ref_seconds = time.perf_counter() - start
    ref_tps = win.size / ref_seconds
    return {
        "model": loaded.source, "windows": windows, "seq_len": seq_len, "batch_size": batch_size,
        "threads": threads, "ours_tokens_per_s": ours.tokens_per_second,
        "transformers_tokens_per_s": ref_tps, "ratio": ours.tokens_per_second / ref_tps,
        "ours_ppl": ours.ppl, "transformers_ppl": float(np.exp(np.mean(losses))),
    }


def stages(model_spec: str, calib_windows: int, eval_windows_n: int, seq_len: int) -> dict:
    """ResQ W4A4KV4 (GPTQ weights, its default) stage times, GPTQ seconds per layer, and peak
    memory; meant to run in a fresh process."""
    from models.decoder import from_weights
    from models.loaders import load_model
    from resq_jax.data import calib_windows as sample, eval_windows, load_text, tokenize
    from resq_jax.evaluation import perplexity
    from resq_jax.methods import QuantConfig, quantize_model

    t0 = time.perf_counter()
    loaded = load_model(model_spec)
    load_s = time.perf_counter() - t0
    rss_model = _peak_rss_mb()
    calib = sample(tokenize(load_text("wiki-calib").text, loaded.tokenizer), calib_windows, seq_len, 0)
    win = eval_windows(tokenize(load_text("wiki-eval").text, loaded.tokenizer), eval_windows_n, seq_len)
    qm = quantize_model(loaded.config, loaded.weights, QuantConfig(method="resq"), calib, progress=False)
    res = perplexity(from_weights(qm.config, qm.weights), win, hooks=qm.hooks, progress=False)
    return {"model": loaded.source, "calib_windows": calib_windows, "eval_windows": eval_windows_n,
            "seq_len": seq_len, "weight_quantizer": qm.qconfig.weights_by,
            "seconds": {"load": load_s, **qm.seconds, "evaluate": res.seconds},
            "gptq_seconds_per_layer": qm.details.get("gptq_per_layer"),
            "ppl": res.ppl, "peak_rss_mb_after_load": rss_model, "peak_rss_mb": _peak_rss_mb()}


def hadamard() -> dict:
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_hadamard

    return bench_hadamard.run()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", action="append", choices=SECTIONS, help="repeatable; default all")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows for throughput")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (XLA uses all cores)")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "benchmark.json"))
    p.add_argument("--child-stages", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_stages:
        print(json.dumps(stages(args.model, args.calib_windows, args.eval_windows, args.seq_len)))
        return 0
    sections = args.section or list(SECTIONS)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = {**json.load(f), **results}
    for name in sections:
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "throughput":
            results[name] = throughput(args.model, args.windows, args.seq_len, args.batch_size, args.threads)
        elif name == "stages":
            out = subprocess.run([sys.executable, __file__, "--child-stages", "--model", args.model,
                                  "--calib-windows", str(args.calib_windows), "--eval-windows",
                                  str(args.eval_windows), "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        elif name == "hadamard":
            try:
                results[name] = hadamard()
            except ImportError as e:
                results[name] = {"skipped": f"no native Hadamard benchmark available: {e}"}
        print(json.dumps(results[name], indent=2), file=sys.stderr)
    from resq_jax.cli import write_json_atomic

    write_json_atomic(args.out, results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
