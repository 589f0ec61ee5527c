"""Quantize a Llama/Qwen2 model and print a perplexity table.

With no arguments: SmolLM2-135M-Instruct (the embedded default), ResQ W4A4KV4 with the float,
RTN and QuaRot baselines, calibrated on 64 x 512 tokens of the built-in calibration text and
evaluated on 40 x 512 tokens of the built-in evaluation text.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from resq_jax.cli.common import (
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

DEFAULT_METHODS = ("none", "rtn", "quarot", "resq")


def parse_args(argv=None) -> argparse.Namespace:
    from resq_jax.data.texts import BUILTIN_TEXTS, DEFAULT_CALIB_TEXT
    from resq_jax.pipeline.recipes import METHODS, WEIGHT_QUANTIZERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", action="append", default=None,
                   help=f"recipe to run, repeatable or comma-separated: {', '.join(METHODS)} "
                        f"(default: {','.join(DEFAULT_METHODS)}; the float model 'none' is always included)")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits (2..8, 16 = off; default %(default)s)")
    p.add_argument("--a-bits", type=int, default=None,
                   help="activation bits (2..8, 16 = off; default: the method's: 4, or 8 for the MXINT "
                        "recipes mxint/lqer/l2qer, whose widths are 4, 6 or 8)")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="KV cache bits (2..8, 16 = off; default: the method's: 4, off for mxint/lqer/l2qer)")
    p.add_argument("--high-bits", type=int, default=None,
                   help="bits of the high-precision channels (default 8; integer recipes with a high fraction)")
    p.add_argument("--high-fraction", type=float, default=None,
                   help="fraction of channels kept at --high-bits, in [0, 1) (default: the method's: "
                        "resq 0.125, others 0)")
    p.add_argument("--weight-quantizer", choices=WEIGHT_QUANTIZERS, default=None,
                   help="weight quantizer of the integer recipes (default: the method's: rtn for rtn, gptq for "
                        "gptq, quarot, resq and resq+l2qer)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize input rows in descending order of the Hessian diagonal (each row keeps "
                        "its 4- or 8-bit group); default off")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ: damping added to the Hessian diagonal, relative to its mean (default 0.01)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="MSE clip search of the weight scales (shrink factors 1 - i/100, i < 80, error "
                        "norm 2.4, per output channel; for --embed-bits tables 1 - 2i/100, i < 20, squared "
                        "error, per row and group); default on for the integer recipes, "
                        "--no-clip-search for plain max scaling")
    p.add_argument("--rank", type=int, default=None,
                   help="rank k of the low-rank correction of lqer, l2qer and resq+l2qer (default 32)")
    p.add_argument("--w-format", choices=("mxint", "int"), default=None,
                   help="weights of mxint/lqer/l2qer: MXINT blocks of 16 (default) or symmetric integer "
                        "with --group-size rows per scale (weight-only LQER: add --a-bits 16)")
    p.add_argument("--group-size", type=int, default=None,
                   help="rows per weight scale group for --w-format int (default 128)")
    p.add_argument("--embed-bits", type=int, default=16,
                   help="bits of the embeddings and lm_head (2..8; default 16: float, as in the papers). "
                        "Symmetric per row and --embed-group channels, float16 scales; a tied model keeps one "
                        "table (resq_jax/quant/embeddings.py). 8 is close to lossless; 4 makes --out checkpoints "
                        "about 4x smaller than float16 at a perplexity cost")
    p.add_argument("--embed-group", type=int, default=None,
                   help="channels per embedding scale, a divisor of the hidden size (default: 64 at <= 4 bits, "
                        "else the whole row)")
    g = p.add_argument_group("learned rotations (docs/algorithms.md, Learned rotations)")
    g.add_argument("--cayley-steps", type=int, default=None,
                   help="Cayley-SGD steps refining the rotations of resq, quarot, resq+l2qer (default 0) and "
                        "spinquant (default 100) on the calibration windows, activations and KV quantized")
    g.add_argument("--cayley-lr", type=float, default=None,
                   help="initial learning rate of those steps, cosine-decayed to 0 (default 1.5, the papers')")
    g.add_argument("--cayley-windows", type=int, default=None,
                   help="train on the first N calibration windows (default: all of them)")
    g.add_argument("--cayley-batch", type=int, default=None, help="windows per training step (default 8)")
    g.add_argument("--cayley-checkpoint", default=None, metavar="DIR",
                   help="save the rotation training every 10 steps to DIR/<method> (orbax: rotations, optimizer "
                        "state, losses); the same command run again resumes there, to the same rotations")
    g.add_argument("--cayley-weights", choices=("float", "rtn"), default=None,
                   help="the weights while the rotations train: float (default; SpinQuant's advice when GPTQ "
                        "follows) or RTN-quantized to --w-bits, passed straight through")
    g.add_argument("--cayley-loss", choices=("ce", "kl"), default=None,
                   help="the training loss: ce, the next-token cross-entropy of the calibration windows (default, "
                        "the papers'), or kl, the KL divergence from the float model's next-token distribution "
                        "(one more forward pass per step, no backward)")
    g.add_argument("--cayley-momentum", type=float, default=None, metavar="MU",
                   help="momentum of Cayley SGD in [0, 1) (default 0: plain steps, as SpinQuant's and ResQ's "
                        "official training; Li et al. use 0.9)")
    g.add_argument("--cayley-clip", type=float, default=None, metavar="NORM",
                   help="scale the gradient down to this global norm before each step when it is larger "
                        "(default 1.0, as the papers' code through the Hugging Face Trainer; 0: no clipping)")
    g.add_argument("--cayley-dtype", choices=("float32", "bfloat16"), default=None,
                   help="how the frozen model is stored while the rotations train: float32 (default) or bfloat16 "
                        "(half the memory, for large models; the arithmetic stays float32)")
    g.add_argument("--cayley-micro-batch", type=int, default=None, metavar="M",
                   help="windows per forward and backward pass of a training step, the gradient summed over "
                        "--cayley-batch / M passes (default: the whole batch at once); the same training with "
                        "one pass's activations in memory (7B at 8 x 2048 tokens: docs/algorithms.md)")
    p.add_argument("--calib-text", default=DEFAULT_CALIB_TEXT,
                   help=f"calibration text: a UTF-8 file or a built-in name ({', '.join(BUILTIN_TEXTS)}); "
                        "default %(default)s")
    p.add_argument("--calib-windows", type=int, default=64, help="random calibration windows (default %(default)s)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default %(default)s)")
    add_eval_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of calibration windows and random rotations")
    p.add_argument("--eval-path", choices=("packed", "fake"), default="packed",
                   help="how a quantized model is evaluated. packed (default): with the packed runtime's integer "
                        "arithmetic wherever it can run the model (integer weights and activations: rtn, gptq, "
                        "quarot, resq, resq+l2qer), exact int32 products, the perplexity of the --out "
                        "checkpoint; fake: dequantized activations times dequantized weights in float32 "
                        "(classic fake quantization; the W4A4 perplexity then depends on float rounding, a "
                        "few tenths of a percent at 40 x 512 tokens). Other models always run fake")
    p.add_argument("--out", default=None,
                   help="save the last method's quantized model, packed (int4/int8 codes, scales, projections, "
                        "config, tokenizer), to this folder; scripts/evaluate.py --checkpoint runs it")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out folder")
    add_task_args(p)
    add_job_args(p)
    return p.parse_args(argv)


def method_list(args) -> list[str]:
    names = [m.strip() for spec in (args.method or [",".join(DEFAULT_METHODS)]) for m in spec.split(",") if m.strip()]
    return ["none"] + [m for m in dict.fromkeys(names) if m != "none"]


def quant_configs(args, methods: list[str]) -> list:
    """One QuantConfig per method. Every method gets the bit widths; each optional setting goes only to the
    methods that use it (``--rank 16`` with ``--method resq,resq+l2qer`` reaches resq+l2qer), and a flag
    that none of the requested methods uses is refused instead of being ignored."""
    from resq_jax.pipeline.recipes import SETTINGS, QuantConfig, QuantConfigError, not_applicable, setting_applies

    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    quantizing = [m for m in methods if m != "none"]
    for name in given:
        if not any(setting_applies(name, m, args.high_fraction, args.weight_quantizer, args.cayley_steps)
                   for m in quantizing):
            raise QuantConfigError(not_applicable(name, quantizing))
    configs = [QuantConfig(method="none")]
    for m in quantizing:
        own = {k: v for k, v in given.items()
               if setting_applies(k, m, args.high_fraction, args.weight_quantizer, args.cayley_steps)}
        configs.append(QuantConfig(method=m, w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                                   clip_search=args.clip_search, seed=args.seed, embed_bits=args.embed_bits,
                                   embed_group=args.embed_group, **own))
    return configs


def _check_cayley_checkpoint(args, configs: list) -> None:
    """--cayley-checkpoint: some method learns rotations, one process, and no folder of another training there."""
    from resq_jax.pipeline.quantize import check_training_folder, training_fingerprint

    learners = [qc for qc in configs if qc.cayley_steps_used]
    if not learners:
        raise UserError("--cayley-checkpoint applies to methods that learn rotations (spinquant, or --cayley-steps N "
                        "with resq, quarot, resq+l2qer)")
    if (args.num_processes or 1) > 1:
        raise UserError("--cayley-checkpoint works in one-process jobs (every process would write the folder)")
    if os.path.exists(args.cayley_checkpoint) and not os.path.isdir(args.cayley_checkpoint):
        raise UserError(f"--cayley-checkpoint {args.cayley_checkpoint} is a file; give a folder")
    from resq_jax.pipeline.recipes import QuantConfigError

    for qc in learners:  # the model is not loaded yet: compare the settings now, the model and windows later
        try:
            check_training_folder(os.path.join(args.cayley_checkpoint, qc.method), training_fingerprint(None, qc),
                                  write=False)
        except QuantConfigError as e:
            raise UserError(str(e)) from None


def main(argv=None) -> int:
    return guarded(run, parse_args(argv), module="resq_jax.cli.quantize", argv=argv)


def run(args) -> int:
    from resq_jax.pipeline.recipes import QuantConfigError

    # --- every check before any work -------------------------------------------------------
    check_positive(args, "calib_windows", "calib_seq_len", "eval_windows", "eval_seq_len", "batch_size")
    tasks = task_list(args)
    try:
        configs = quant_configs(args, method_list(args))
    except QuantConfigError as e:
        raise UserError(str(e)) from None
    if args.cayley_checkpoint:
        _check_cayley_checkpoint(args, configs)
    main_process = start(args)  # join a multi-process job (a no-op for one process) before any JAX call
    args.quiet = args.quiet or not main_process  # process 0 alone reports
    if args.cayley_checkpoint:
        import jax

        if jax.process_count() > 1:
            raise UserError("--cayley-checkpoint works in one-process jobs (every process would write the folder)")
    from resq_jax.pipeline.recipes import uses_gptq

    if any(qc.recipe.needs_calibration or uses_gptq(qc) for qc in configs):
        import jax

        from resq_jax.calibration.statistics import check_window_count
        from resq_jax.quant.weights import GPTQ_BATCH, check_gptq_windows

        try:
            if any(qc.recipe.needs_calibration for qc in configs):
                check_window_count(args.calib_windows)
            if any(uses_gptq(qc) for qc in configs):
                check_gptq_windows(args.calib_windows, GPTQ_BATCH, jax.device_count())
        except ValueError as e:
            raise UserError(f"--calib-windows: {e}") from None
    if not main_process:
        args.out = args.json = None  # process 0 writes them
    if args.out and os.path.exists(args.out) and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to overwrite it or choose another folder")
    if args.out:
        from resq_jax.runtime.checkpoint import CheckpointError, check_target
        from resq_jax.runtime.pack import PackError, check_packable_config

        try:
            check_target(args.out, args.force)
            check_packable_config(configs[-1])
        except (CheckpointError, PackError) as e:
            raise UserError(f"--out {args.out}: {e}") from None
    from resq_jax.pipeline.quantize import check_embed_quantization, check_hadamard_sizes, check_rank

    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    loaded = load(args.model)
    if loaded.tokenizer is None:
        raise UserError(f"model {args.model} has no tokenizer files; add them to the folder")
    for qc in configs:
        try:
            check_hadamard_sizes(loaded.config, qc.recipe)
            check_rank(loaded.config, qc)
            check_embed_quantization(loaded.config, qc)
        except ValueError as e:
            raise UserError(f"{qc.method}: {e}") from None
    log(f"loaded {loaded.source} ({loaded.config.arch}, {loaded.config.num_layers} layers) in "
        f"{time.perf_counter() - t0:.1f}s")
    if any(qc.recipe.down_hadamard for qc in configs):
        from resq_jax.kernels.hadamard import describe_auto

        log(describe_auto())
    evals = eval_sets(loaded.tokenizer, args.eval_text, args.eval_windows, args.eval_seq_len)
    calib = None
    if any(qc.recipe.needs_calibration or uses_gptq(qc) or qc.cayley_steps_used for qc in configs):
        calib = _calibration_windows(args, loaded.tokenizer)  # statistics, GPTQ Hessians, rotation training
    if args.cayley_checkpoint:  # the same model and windows as the training found there
        from resq_jax.pipeline.quantize import check_training_folder, training_fingerprint

        for qc in configs:
            if qc.cayley_steps_used:
                try:
                    check_training_folder(os.path.join(args.cayley_checkpoint, qc.method),
                                          training_fingerprint(loaded.config, qc, calib), write=False)
                except QuantConfigError as e:
                    raise UserError(str(e)) from None

    # --- the work --------------------------------------------------------------------------
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.learn.train import DivergedError
    from resq_jax.models.streaming import LayerStreamer
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.quant.code_store import CodeStore
    from resq_jax.runtime.pack import packed_streamer, try_pack

    # every method streams from the same store, layer by layer; its integer codes are spilled to a private
    # temporary folder (removed after the method, or after --out is written), so no model is whole in memory
    runs = []
    stats_cache: dict = {}
    last = None
    for qc in configs:
        if last is not None:
            last[0].codes.close()
            last = None
        codes = CodeStore.spilled()
        try:
            qm = quantize_model(loaded.config, loaded.weights, qc, calib, stats=stats_cache.get(qc.recipe.fold_norms),
                                progress=not args.quiet, log=log, codes=codes,
                                cayley_dir=args.cayley_checkpoint if qc.cayley_steps_used else None)
        except DivergedError as e:  # nothing is written: the table, --json and --out come after every method
            codes.close()
            raise UserError(f"{qc.method}: {e}") from None
        if qm.stats is not None:
            stats_cache[qc.recipe.fold_norms] = qm.stats
        # --eval-path packed: the model as pack_model stores it (runtime.pack.integer_decoder), kept for --out
        packed = None
        if args.eval_path == "packed" and qc.recipe.quantize:
            packed, why = try_pack(qm)
            if packed is None:
                print(f"{qc.method}: evaluated with fake quantization (eval column 'fake'): the packed runtime "
                      f"cannot run it ({why})", file=sys.stderr, flush=True)
        model, hooks = ((packed_streamer(packed), packed.hooks) if packed else
                        (LayerStreamer.from_weights(qm.config, qm.weights), qm.hooks))
        ppl, secs = {}, 0.0
        for name, windows in evals.items():
            res = perplexity(model, windows, batch_size=args.batch_size, hooks=hooks,
                             progress=False if args.quiet else f"eval {qc.method} {name}",
                             shard_weights=args.shard_weights)
            ppl[name] = res.ppl
            secs += res.seconds
            log(f"{qc.method} {name}: ppl {res.ppl:.3f} ({res.tokens_per_second:.0f} tok/s)")
        del model  # the evaluated model's device head and layer cache go now, before the next method
        scores = task_scores(args, tasks, _resolved(qm, packed, loaded.tokenizer), log) if tasks else {}
        runs.append({"method": qc.method, "config": qc.to_dict(), "ppl": ppl,
                     "eval_path": "packed" if packed else ("fake" if qc.recipe.quantize else "float"),
                     "weight_bits": qm.details.get("weight_bits"),
                     "seconds": {"calibrate": qm.seconds["calibrate"], "train": qm.seconds["train"],
                                 "quantize": sum(v for k, v in qm.seconds.items() if k not in ("calibrate", "train")),
                                 "evaluate": secs}})
        if scores:
            runs[-1]["tasks"] = scores
        if "cayley" in qm.details:
            runs[-1]["cayley"] = qm.details["cayley"]
        last = (qm, packed)
    if main_process:
        print(format_table(loaded.source, runs))
    if args.json:
        write_json_atomic(args.json, {"model": loaded.source, "runs": runs,
                                          "calib": {"text": args.calib_text, "windows": args.calib_windows,
                                                    "seq_len": args.calib_seq_len, "seed": args.seed},
                                          "eval": {"windows": args.eval_windows, "seq_len": args.eval_seq_len}})
    if args.out:
        from resq_jax.runtime.checkpoint import save_packed
        from resq_jax.runtime.pack import pack_model

        qm, packed = last
        save_packed(args.out, packed or pack_model(qm), tokenizer=loaded.tokenizer, source=loaded.source,
                    force=args.force)
        log(f"saved {qm.qconfig.method} (packed) to {args.out}")
    if last is not None:
        last[0].codes.close()
    from resq_jax.distributed.job import barrier

    barrier("quantize: outputs written")  # the other processes exit once process 0 has written --out
    return 0


def _resolved(qm, packed, tokenizer):
    """The lm-eval adapter's view of a method's model: the packed runtime's when it ran, else the fake-quant one."""
    from resq_jax.cli.harness import Resolved

    if packed is None:
        return Resolved(qm.config, qm.weights, qm.hooks, tokenizer, qm.qconfig.method)
    return Resolved.packed(packed, tokenizer, qm.qconfig.method)


def _calibration_windows(args, tokenizer):
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows as sample
    from resq_jax.data.windows import tokenize

    try:
        src = load_text(args.calib_text)
        return sample(tokenize(src.text, tokenizer), args.calib_windows, args.calib_seq_len, args.seed)
    except ValueError as e:
        raise UserError(f"--calib-text {args.calib_text}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
