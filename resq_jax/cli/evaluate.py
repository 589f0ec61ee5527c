"""Evaluate a model's perplexity (jitted, float32) and optionally continue a prompt greedily.

Examples:
  python scripts/evaluate.py                                  # SmolLM2 on the built-in eval text
  python scripts/evaluate.py --model Qwen/Qwen2.5-0.5B --eval-text wikitext2 --eval-seq-len 2048
  python scripts/evaluate.py --prompt "The capital of France is"
"""
from __future__ import annotations

import argparse
import sys
import time

from resq_jax.cli.common import (
    DEFAULT_MODEL,
    UserError,
    add_eval_args,
    add_job_args,
    add_model_args,
    add_task_args,
    check_positive,
    eval_sets,
    guarded,
    load,
    start,
    task_list,
    task_scores,
)
from resq_jax.cli.table import format_table
from resq_jax.util.files import write_json_atomic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="a folder written by scripts/quantize.py --out: evaluate that quantized model through "
                        "the packed-integer runtime (generation with a quantized KV cache); with --model too, "
                        "the checkpoint must come from that model")
    add_eval_args(p)
    p.add_argument("--prompt", default=None, help="greedily continue this prompt and print the text")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate for --prompt")
    p.add_argument("--no-ppl", action="store_true", help="skip perplexity (e.g. only generate)")
    add_task_args(p)
    add_job_args(p)
    p.set_defaults(model=None)  # None: the default model, or the checkpoint's own
    return p.parse_args(argv)


def main(argv=None) -> int:
    return guarded(run, parse_args(argv), module="resq_jax.cli.evaluate", argv=argv)


def run(args) -> int:
    check_positive(args, "eval_windows", "eval_seq_len", "batch_size", "max_new_tokens")
    tasks = task_list(args)
    main_process = start(args)  # join a multi-process job (a no-op for one process) before any JAX call
    if not main_process:  # process 0 alone reports and writes --json
        args.quiet, args.json = True, None
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    from resq_jax.models.decoder import IDENTITY, from_weights
    from resq_jax.models.streaming import LayerStreamer

    t0 = time.perf_counter()
    new_cache = None  # (rows, positions) -> an empty generation cache; None: the float cache
    if args.checkpoint:
        from resq_jax.runtime.checkpoint import load_checkpoint, runnable

        expect = None if args.model is None else load(args.model).config
        try:
            ckpt = runnable(load_checkpoint(args.checkpoint, expect_config=expect))
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        config, weights, hooks, qconfig = ckpt.config, ckpt.weights, ckpt.hooks, ckpt.qconfig
        tokenizer, source, method, new_cache = ckpt.tokenizer, ckpt.source, ckpt.method, ckpt.new_cache
        eval_path = "packed" if ckpt.packed else "fake"  # fake: an older fake-quant checkpoint
        bits = ckpt.weight_bits  # None for a checkpoint written before it was recorded: "-" in the table
    else:
        loaded = load(args.model or DEFAULT_MODEL)
        config, hooks, tokenizer = loaded.config, IDENTITY, loaded.tokenizer
        source, method, qconfig, eval_path = loaded.source, "none", {}, "float"
        bits = 16.0
        weights = loaded.weights
    # weights: a mapping read on access (a store, a checkpoint's layers); perplexity streams it layer by layer,
    # generation builds the whole decoder
    if tokenizer is None:
        raise UserError("the model has no tokenizer files; add them to its folder")
    log(f"loaded {source} in {time.perf_counter() - t0:.1f}s")
    evals = {} if args.no_ppl else eval_sets(tokenizer, args.eval_text, args.eval_windows, args.eval_seq_len)

    if args.prompt is not None:
        from resq_jax.eval.generate import generate_greedy

        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        cache = None if new_cache is None else new_cache(1, len(ids) + args.max_new_tokens)
        new = generate_greedy(from_weights(config, dict(weights)), ids, args.max_new_tokens, hooks=hooks,
                              eos_token_id=config.eos_token_id, cache=cache)
        if main_process:
            print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))

    ppl, secs = {}, 0.0
    if evals:
        from resq_jax.eval.perplexity import perplexity

        for name, windows in evals.items():
            res = perplexity(LayerStreamer.from_weights(config, weights), windows, batch_size=args.batch_size,
                             hooks=hooks, progress=False if args.quiet else f"eval {name}",
                             shard_weights=args.shard_weights)
            ppl[name] = res.ppl
            secs += res.seconds
            log(f"{name}: ppl {res.ppl:.4f} over {windows.shape[0]} x {windows.shape[1]} tokens "
                f"({res.tokens_per_second:.0f} tok/s)")
    scores = {}
    if tasks:
        from resq_jax.cli.harness import Resolved

        t0 = time.perf_counter()
        scores = task_scores(args, tasks, Resolved(config, weights, hooks, tokenizer, f"{method}", new_cache), log)
        secs += time.perf_counter() - t0
    if evals or tasks:
        run = {"method": method, "config": qconfig, "weight_bits": bits, "ppl": ppl, "eval_path": eval_path,
               "seconds": {"calibrate": 0.0, "train": 0.0, "quantize": 0.0, "evaluate": secs}}
        if scores:
            run["tasks"] = scores
        if main_process:
            print(format_table(source, [run]) if method != "none" or scores else
                  "\n".join([f"model: {source}"] + [f"ppl {k}: {v:.4f}" for k, v in ppl.items()]))
        if args.json:
            write_json_atomic(args.json, {"model": source, "runs": [run],
                                              "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
