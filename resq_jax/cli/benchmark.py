"""Benchmarks, written as JSON (no timing is asserted in the test suite).

Sections (default: all that are available):
  throughput  evaluation tokens/s of our jitted model vs transformers+torch on the same windows,
              same thread count, side by side in one run; their perplexities must agree
  stages      wall time of each ResQ stage (calibrate, projections, fuse, quantize = GPTQ, evaluate)
              and GPTQ's seconds per layer on SmolLM2, and the process's peak resident memory
              (run in a fresh subprocess)
  hadamard    native FFI Walsh-Hadamard vs the jnp fast reference vs a dense matmul
  packed      evaluation tokens/s and peak resident memory of the float model, the ResQ
              fake-quant model and the packed-integer runtime (each in a fresh process that
              loads a checkpoint written once beforehand), and the checkpoint sizes
  scale       a large model (--model DIR, e.g. from scripts/make_random_model.py) quantized with
              ResQ + GPTQ as scripts/quantize.py --out does it, in a fresh process: the seconds and
              the peak resident memory of every stage (load, float evaluation, calibration,
              projections, GPTQ with its seconds per layer, quantized evaluation, checkpoint
              write, checkpoint load and evaluation), and the model's size on disk and in float32

  cayley      one rotation-training step (scripts/quantize.py --cayley-steps) compiled against the model's
              shapes alone, no weights loaded (--model: a built-in name, a folder, or a shape of
              scripts/make_random_model.py such as qwen2.5-7b): XLA's memory analysis (arguments =
              the frozen model, rotations and optimizer state; temporaries = the activations kept
              for the backward pass) for float32 and bfloat16 storage, and the compile time

  python scripts/benchmark.py --out results/benchmark.json
  python scripts/benchmark.py --section throughput --seq-len 512 --windows 8
  python scripts/benchmark.py --section packed --weight-quantizer rtn
  python scripts/benchmark.py --section scale --model DIR --calib-windows 8 --eval-windows 2
  python scripts/benchmark.py --section cayley --model qwen2.5-7b --batch-size 8 --seq-len 2048
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

SECTIONS = ("throughput", "stages", "hadamard", "packed", "scale", "cayley")
DEFAULT_SECTIONS = ("throughput", "stages", "hadamard", "packed")  # scale needs a large --model
RUNTIME_PATHS = ("float", "fake", "packed")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def throughput(model_spec: str, windows: int, seq_len: int, batch_size: int, threads: int) -> dict:
    import numpy as np
    import torch

    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import eval_windows, tokenize
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.models.decoder import from_weights
    from resq_jax.models.loaders import load_model

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
    del ref_model
    floor = gemm_floor(loaded.config, batch_size * seq_len)
    batches = -(-windows // batch_size)
    floor_tps = {k: win.size / (batches * v) for k, v in floor["seconds_per_batch"].items()}
    return {
        "model": loaded.source, "windows": windows, "seq_len": seq_len, "batch_size": batch_size,
        "threads": threads, "ours_tokens_per_s": ours.tokens_per_second,
        "transformers_tokens_per_s": ref_tps, "ratio": ours.tokens_per_second / ref_tps,
        "ours_ppl": ours.ppl, "transformers_ppl": float(np.exp(np.mean(losses))),
        "gemm_floor": {
            **floor,
            "note": "the model's dense matmuls alone (every linear and the lm_head, float32, one batch), "
                    "timed by XLA and by torch on this machine: the tokens/s neither framework can beat "
                    "in float32; max_ratio = that bound over transformers' measured tokens/s",
            "tokens_per_s_bound": floor_tps,
            "max_ratio": max(floor_tps.values()) / ref_tps,
            "ours_fraction_of_bound": ours.tokens_per_second / floor_tps["xla"],
        },
    }


def gemm_floor(config, tokens: int, repeats: int = 3) -> dict:
    """Wall time of the model's dense matmuls for one batch of ``tokens`` tokens, in XLA and in
    torch (the better of ``repeats`` runs each): x: [tokens, d_in] @ w: [d_in, d_out] for every
    linear of every layer and the lm_head. Attention scores, norms, softmax and the loss come
    on top, so this bounds evaluation tokens/s from above."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    shapes = [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d), (d, f), (d, f), (f, d)]
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in set(shapes)]
    ws = {w.shape: w for w in ws}
    head = rng.standard_normal((d, config.vocab_size), dtype=np.float32) * 0.02
    xs = {k: rng.standard_normal((tokens, k), dtype=np.float32) for k in {s[0] for s in shapes}}
    flops = 2 * tokens * (config.num_layers * sum(a * b for a, b in shapes) + d * config.vocab_size)

    def best(run):
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    mm = jax.jit(lambda x, w: x @ w)
    jw = {k: jnp.asarray(v) for k, v in ws.items()}
    jx = {k: jnp.asarray(v) for k, v in xs.items()}
    jhead = jnp.asarray(head)

    def run_xla():
        outs = [mm(jx[s[0]], jw[s]) for _ in range(config.num_layers) for s in shapes]
        outs.append(mm(jx[d], jhead))
        jax.block_until_ready(outs)

    tw = {k: torch.from_numpy(v) for k, v in ws.items()}
    tx = {k: torch.from_numpy(v) for k, v in xs.items()}
    thead = torch.from_numpy(head)

    def run_torch():
        with torch.inference_mode():
            for _ in range(config.num_layers):
                for s in shapes:
                    tx[s[0]] @ tw[s]
            tx[d] @ thead

    seconds = {"xla": best(run_xla), "torch": best(run_torch)}
    return {"tokens_per_batch": tokens, "gflop_per_batch": flops / 1e9, "seconds_per_batch": seconds,
            "gflops": {k: flops / v / 1e9 for k, v in seconds.items()}}


def stages(model_spec: str, calib_windows: int, eval_windows_n: int, seq_len: int,
           weight_quantizer: str = "gptq") -> dict:
    """ResQ W4A4KV4 stage times (GPTQ weights by default: GPTQ seconds per layer too) and peak
    memory (after loading, after calibrating, at the end) against the model's float32 size and
    one layer's; meant to run in a fresh process."""
    import numpy as np

    from resq_jax.calibration.statistics import calibrate
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows as sample
    from resq_jax.data.windows import eval_windows, tokenize
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.models.loaders import load_model
    from resq_jax.models.streaming import LayerStreamer
    from resq_jax.pipeline.quantize import prepare, quantize_model
    from resq_jax.pipeline.recipes import QuantConfig
    from resq_jax.runtime.pack import integer_decoder

    t0 = time.perf_counter()
    loaded = load_model(model_spec)
    load_s = time.perf_counter() - t0
    rss_model = _peak_rss_mb()
    calib = sample(tokenize(load_text("wiki-calib").text, loaded.tokenizer), calib_windows, seq_len, 0)
    win = eval_windows(tokenize(load_text("wiki-eval").text, loaded.tokenizer), eval_windows_n, seq_len)
    qc = QuantConfig(method="resq", weight_quantizer=weight_quantizer)
    config, w = prepare(loaded.config, loaded.weights, qc.recipe)
    t0 = time.perf_counter()
    stats = calibrate(LayerStreamer.from_weights(config, w), calib, progress=False)
    calib_s = time.perf_counter() - t0
    rss_calib = _peak_rss_mb()
    del config, w
    qm = quantize_model(loaded.config, loaded.weights, qc, calib, stats=stats, progress=False)
    model, hooks = integer_decoder(qm)  # as scripts/quantize.py evaluates it (--eval-path packed)
    res = perplexity(model, win, hooks=hooks, progress=False)
    mb = lambda arrays: sum(np.asarray(a).nbytes for a in arrays) / 1e6  # noqa: E731
    stats_mb = mb([stats.attn_sum, stats.mlp_sum, stats.value, stats.key, *stats.abs_mean.values()])
    activations_mb = calib.size * loaded.config.hidden_size * 4 / 1e6
    model_mb = mb(v for v in loaded.weights.values() if hasattr(v, "nbytes"))
    layer_mb = mb(v for k, v in loaded.weights.items() if k.startswith("layers.0.") and hasattr(v, "nbytes"))
    return {"model": loaded.source, "calib_windows": calib_windows, "eval_windows": eval_windows_n,
            "seq_len": seq_len, "weight_quantizer": qm.qconfig.weights_by,
            "seconds": {"load": load_s, **qm.seconds, "calibrate": calib_s, "evaluate": res.seconds},
            "gptq_seconds_per_layer": qm.details.get("gptq_per_layer"),
            "ppl": res.ppl,
            "memory_mb": {"model_float32": model_mb, "one_layer_float32": layer_mb,
                          "calibration_statistics_float64": stats_mb,
                          "calibration_activations_float32": activations_mb,
                          "peak_rss_after_load": rss_model, "peak_rss_after_calibrate": rss_calib,
                          "calibrate_increase": rss_calib - rss_model,
                          # what calibration holds beyond its output (statistics) and the streamed
                          # activations of the windows: one layer plus JAX/XLA's working set
                          "calibrate_working_set": rss_calib - rss_model - stats_mb - activations_mb,
                          "peak_rss_end": _peak_rss_mb()}}


def scale(model_spec: str, calib_windows: int, eval_windows_n: int, seq_len: int, folder: str,
          weight_quantizer: str = "gptq") -> dict:
    """ResQ W4A4KV4 of ``model_spec`` stage by stage as scripts/quantize.py --method resq --out runs it
    (codes spilled, layer-streamed evaluation, checkpoint written layer by layer), each stage's seconds and
    peak RSS (util.memory.StageMeter); meant to run in a fresh process."""
    import numpy as np

    from resq_jax.calibration.statistics import calibrate
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows as sample
    from resq_jax.data.windows import eval_windows, tokenize
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.models.loaders import load_model
    from resq_jax.models.streaming import LayerStreamer
    from resq_jax.pipeline.quantize import prepare, quantize_model
    from resq_jax.pipeline.recipes import QuantConfig
    from resq_jax.quant.code_store import CodeStore
    from resq_jax.runtime.checkpoint import load_packed, save_packed
    from resq_jax.runtime.pack import pack_model, packed_streamer
    from resq_jax.util.memory import StageMeter

    meter = StageMeter()
    with meter.stage("load"):
        loaded = load_model(model_spec)
    cfg = loaded.config
    calib = sample(tokenize(load_text("wiki-calib").text, loaded.tokenizer), calib_windows, seq_len, 0)
    win = eval_windows(tokenize(load_text("wiki-eval").text, loaded.tokenizer), eval_windows_n, seq_len)
    ppl = {}
    with meter.stage("evaluate_float"):
        ppl["float"] = perplexity(LayerStreamer.from_weights(cfg, loaded.weights), win, progress=False).ppl
    qc = QuantConfig(method="resq", weight_quantizer=weight_quantizer)
    with meter.stage("calibrate"):
        config, w = prepare(cfg, loaded.weights, qc.recipe)
        stats = calibrate(LayerStreamer.from_weights(config, w), calib, progress=False)
        del config, w
    with meter.stage("quantize"):  # projections + fusion (a view) + GPTQ, codes spilled
        qm = quantize_model(cfg, loaded.weights, qc, calib, stats=stats, progress=False,
                            codes=CodeStore.spilled())
    with meter.stage("evaluate_packed"):
        pm = pack_model(qm)
        ppl["resq_packed"] = perplexity(packed_streamer(pm), win, hooks=pm.hooks, progress=False).ppl
    with meter.stage("save_checkpoint"):
        save_packed(folder, pm, tokenizer=loaded.tokenizer, source=loaded.source, force=True)
    codes_mb = qm.codes.nbytes_spilled() / 1e6
    quant_seconds, gptq_per_layer = dict(qm.seconds), qm.details.get("gptq_per_layer")
    del pm, qm
    with meter.stage("load_and_evaluate_checkpoint"):
        back = load_packed(folder).model
        ppl["checkpoint"] = perplexity(packed_streamer(back), win, hooks=back.hooks, progress=False).ppl
    store = loaded.weights
    layer = [k for k in store if k.startswith("layers.0.")]
    stored = store.stored_bytes() if hasattr(store, "stored_bytes") else None
    float32 = store.float32_bytes() if hasattr(store, "float32_bytes") else None
    shape_of = getattr(store, "shape", None)
    layer_f32 = sum(4 * int(np.prod(shape_of(k))) for k in layer) if shape_of else None
    return {"model": loaded.source, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "calib_windows": calib_windows, "eval_windows": eval_windows_n, "seq_len": seq_len,
            "weight_quantizer": weight_quantizer, "stages": meter.stages, "peak_reset_per_stage": meter.resettable,
            "quantize_seconds": quant_seconds, "gptq_seconds_per_layer": gptq_per_layer,
            "ppl": ppl, "checkpoint_mb": _folder_mb(folder), "spilled_codes_mb": codes_mb,
            "model_mb": {"stored": None if stored is None else stored / 1e6,
                         "float32": None if float32 is None else float32 / 1e6,
                         "one_layer_float32": None if layer_f32 is None else layer_f32 / 1e6}}


def _model_config(model_spec: str):
    """The config of a built-in name, a folder or a .gguf file (weights not read), or of a synthetic shape."""
    from resq_jax.models.config import config_from_hf
    from resq_jax.models.loaders import load_model
    from resq_jax.models.synthetic import SHAPES, hf_config

    if model_spec in SHAPES:
        return config_from_hf(hf_config(model_spec)), f"shape {model_spec}"
    loaded = load_model(model_spec, with_tokenizer=False)
    return loaded.config, loaded.source


def cayley_step(model_spec: str, batch: int, seq_len: int, method: str = "resq",
                dtypes=("float32", "bfloat16"), micro_batches=(None,)) -> dict:
    """XLA's memory analysis of one compiled rotation-training step (learn.train.training_step, the recipe's
    activation/KV quantizers straight-through, float weights) at [batch, seq_len] tokens, compiled against the
    shapes of the fused model (learn.rotated.frozen_spec) for each storage dtype: nothing is allocated, so a
    7B step is measured on a small machine, for each micro-batch (None: the whole batch in one pass). The figures
    are XLA:CPU's buffer assignment; a GPU compile differs."""
    import jax
    import jax.numpy as jnp

    from resq_jax.learn.refine import start_rotations
    from resq_jax.learn.rotated import StraightThrough, frozen_spec
    from resq_jax.learn.train import optimizer, training_step
    from resq_jax.pipeline.quantize import activation_spec, cayley_config, check_hadamard_sizes
    from resq_jax.pipeline.recipes import QuantConfig
    from resq_jax.quant.fake_quant import FakeQuantHooks

    config, source = _model_config(model_spec)
    out = {"model": source, "method": method, "layers": config.num_layers, "hidden": config.hidden_size,
           "vocab": config.vocab_size, "batch": batch, "seq_len": seq_len, "backend": jax.default_backend(),
           "runs": []}
    for dtype in dtypes:
        for micro in micro_batches:
            qc = QuantConfig(method=method, cayley_steps=1 if method != "spinquant" else None, cayley_batch=batch,
                             cayley_dtype=dtype, cayley_micro_batch=micro)
            check_hadamard_sizes(config, qc.recipe)
            spec = activation_spec(config, qc)
            rotations = jax.eval_shape(functools.partial(start_rotations, config, spec))
            cc = cayley_config(qc)
            opt = optimizer(cc)
            frozen = frozen_spec(config, dtype)
            arrays = {k: v for k, v in frozen.items() if k != "down_hadamard"}
            step = training_step(config, opt, StraightThrough(FakeQuantHooks(spec)), hadamard=frozen["down_hadamard"],
                                 micro_batch=cc.micro_batch)
            t0 = time.perf_counter()
            compiled = step.lower(rotations, jax.eval_shape(opt.init, rotations),
                                  jax.ShapeDtypeStruct((batch, seq_len), jnp.int32), arrays).compile()
            seconds = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(arrays))
            out["runs"].append({"dtype": dtype, "micro_batch": qc.cayley_micro_batch_used, "compile_seconds": seconds,
                                "frozen_model_gb": frozen_bytes / 1e9,
                                "arguments_gb": ma.argument_size_in_bytes / 1e9,
                                "temporaries_gb": ma.temp_size_in_bytes / 1e9,
                                "outputs_gb": ma.output_size_in_bytes / 1e9,
                                "total_gb": (ma.argument_size_in_bytes + ma.temp_size_in_bytes
                                             + ma.output_size_in_bytes - ma.alias_size_in_bytes) / 1e9})
    return out


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


def packed_prepare(model_spec: str, calib_windows: int, seq_len: int, folder: str, weight_quantizer: str,
                   embed_bits: int = 16) -> dict:
    """Quantize with ResQ W4A4KV4 once and write the packed and the (older) fake-quant checkpoints."""
    import numpy as np

    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows as sample
    from resq_jax.data.windows import tokenize
    from resq_jax.models.loaders import load_model
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.pipeline.recipes import QuantConfig
    from resq_jax.quant.layouts import LINEARS
    from resq_jax.runtime.checkpoint import save_fake_quant, save_packed
    from resq_jax.runtime.pack import pack_model

    loaded = load_model(model_spec)
    calib = sample(tokenize(load_text("wiki-calib").text, loaded.tokenizer), calib_windows, seq_len, 0)
    qm = quantize_model(loaded.config, loaded.weights, QuantConfig(method="resq", weight_quantizer=weight_quantizer,
                                                                   embed_bits=embed_bits), calib, progress=False)
    packed, fake = os.path.join(folder, "packed"), os.path.join(folder, "fake")
    pm = pack_model(qm)
    save_packed(packed, pm, tokenizer=loaded.tokenizer, source=loaded.source, force=True)
    save_fake_quant(fake, qm, loaded, force=True)
    fp16_mb = 2 * sum(np.asarray(v).size for v in loaded.weights.values()) / 1e6
    packed_mb = _folder_mb(packed) - _folder_mb(os.path.join(packed, "tokenizer"))
    # where the packed bytes go: the decoder linears (codes, scales, biases) against the same
    # linears in float16, the embeddings / lm_head (16-bit, or codes and scales), the rest
    linears = [k for k in pm.arrays if k.startswith("layers.") and k.split(".")[2] in LINEARS and k.count(".") >= 3]
    lin_mb = sum(pm.arrays[k].nbytes for k in linears) / 1e6
    table_mb = lambda name: sum(a.nbytes for k, a in pm.arrays.items() if k.split(".")[0] == name) / 1e6  # noqa
    lin_fp16_mb = 2 * sum(np.asarray(loaded.weights[f"layers.{i}.{n}"]).size for i in range(loaded.config.num_layers)
                          for n in LINEARS) / 1e6
    return {"weight_quantizer": weight_quantizer, "calib_windows": calib_windows, "embedding": pm.embedding,
            "float16_weights_mb": fp16_mb, "transforms_mb": sum(a.nbytes for a in pm.transforms.values()) / 1e6,
            "packed_checkpoint_mb": packed_mb, "fake_quant_checkpoint_mb": _folder_mb(fake) - _folder_mb(
                os.path.join(fake, "tokenizer")), "size_ratio_float16_to_packed": fp16_mb / packed_mb,
            "packed_arrays_mb": {"linears": lin_mb, "embed": table_mb("embed"), "lm_head": table_mb("lm_head"),
                                 "other": sum(a.nbytes for k, a in pm.arrays.items() if k not in linears
                                              and k.split(".")[0] not in ("embed", "lm_head")) / 1e6},
            "size_ratio_linears_float16_to_packed": lin_fp16_mb / lin_mb}


def runtime_path(path: str, model_spec: str, folder: str, windows: int, seq_len: int, batch_size: int) -> dict:
    """Evaluate one of RUNTIME_PATHS in this (fresh) process: tokens/s after a compile batch, peak RSS."""
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import eval_windows, tokenize
    from resq_jax.eval.perplexity import perplexity
    from resq_jax.models.decoder import IDENTITY, from_weights

    t0 = time.perf_counter()
    if path == "float":
        from resq_jax.models.loaders import load_model

        loaded = load_model(model_spec)
        model, hooks, tokenizer = from_weights(loaded.config, loaded.weights), IDENTITY, loaded.tokenizer
        del loaded
    elif path == "fake":
        from resq_jax.runtime.checkpoint import load_fake_quant

        ck = load_fake_quant(os.path.join(folder, "fake"))
        model, hooks, tokenizer = from_weights(ck.config, ck.weights), ck.hooks, ck.tokenizer
        del ck
    else:
        from resq_jax.runtime.checkpoint import load_packed
        from resq_jax.runtime.pack import packed_decoder

        ck = load_packed(os.path.join(folder, "packed"))
        model, hooks, tokenizer = packed_decoder(ck.model), ck.model.hooks, ck.tokenizer
        del ck
    load_s = time.perf_counter() - t0
    rss_load = _peak_rss_mb()
    win = eval_windows(tokenize(load_text("wiki-eval").text, tokenizer), windows, seq_len)
    perplexity(model, win[:batch_size], batch_size=batch_size, hooks=hooks, progress=False)  # compile
    res = perplexity(model, win, batch_size=batch_size, hooks=hooks, progress=False)
    return {"path": path, "tokens_per_s": res.tokens_per_second, "ppl": res.ppl, "load_seconds": load_s,
            "peak_rss_mb_after_load": rss_load, "peak_rss_mb": _peak_rss_mb()}


def packed_section(args) -> dict:
    import tempfile

    def child(*extra):
        out = subprocess.run([sys.executable, "-m", "resq_jax.cli.benchmark", "--model", args.model, "--seq-len", str(args.seq_len),
                              *extra], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"benchmark child {extra} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory(prefix="resq-bench-") as folder:
        result = {"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
                  "batch_size": args.batch_size,
                  "checkpoints": child("--child-prepare", folder, "--calib-windows", str(args.calib_windows),
                                       "--weight-quantizer", args.weight_quantizer,
                                       "--embed-bits", str(args.embed_bits))}
        for path in RUNTIME_PATHS:
            print(f"   {path}", file=sys.stderr, flush=True)
            result[path] = child("--child-runtime", path, folder, "--windows", str(args.windows),
                                 "--batch-size", str(args.batch_size))
    result["packed_vs_fake_tokens_per_s"] = result["packed"]["tokens_per_s"] / result["fake"]["tokens_per_s"]
    result["packed_vs_float_tokens_per_s"] = result["packed"]["tokens_per_s"] / result["float"]["tokens_per_s"]
    return result


def hadamard_section() -> dict:
    from resq_jax.cli import bench_hadamard

    return bench_hadamard.run()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", action="append", choices=SECTIONS,
                   help=f"repeatable; default {','.join(DEFAULT_SECTIONS)} (scale needs a large --model)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows for throughput")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (XLA uses all cores)")
    p.add_argument("--micro-batch", type=int, action="append",
                   help="cayley section: windows per pass (repeatable; default the whole --batch-size)")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--out", default=os.path.join("results", "benchmark.json"))
    p.add_argument("--weight-quantizer", choices=("rtn", "gptq"), default="gptq",
                   help="ResQ's weight quantizer in the stages and packed sections (default %(default)s, "
                        "ResQ's own; rtn is much faster)")
    p.add_argument("--embed-bits", type=int, default=16,
                   help="embedding / lm_head bits of the packed section's model (default 16: float)")
    p.add_argument("--child-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-prepare", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--child-runtime", nargs=2, metavar=("PATH", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--child-scale", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_scale:
        print(json.dumps(scale(args.model, args.calib_windows, args.eval_windows, args.seq_len, args.child_scale,
                               args.weight_quantizer)))
        return 0
    if args.child_stages:
        print(json.dumps(stages(args.model, args.calib_windows, args.eval_windows, args.seq_len,
                                args.weight_quantizer)))
        return 0
    if args.child_prepare:
        print(json.dumps(packed_prepare(args.model, args.calib_windows, args.seq_len, args.child_prepare,
                                        args.weight_quantizer, args.embed_bits)))
        return 0
    if args.child_runtime:
        path, folder = args.child_runtime
        print(json.dumps(runtime_path(path, args.model, folder, args.windows, args.seq_len, args.batch_size)))
        return 0
    sections = args.section or list(DEFAULT_SECTIONS)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = {**json.load(f), **results}
    for name in sections:
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "throughput":
            results[name] = throughput(args.model, args.windows, args.seq_len, args.batch_size, args.threads)
        elif name == "stages":
            out = subprocess.run([sys.executable, "-m", "resq_jax.cli.benchmark", "--child-stages", "--model", args.model,
                                  "--calib-windows", str(args.calib_windows), "--eval-windows",
                                  str(args.eval_windows), "--seq-len", str(args.seq_len),
                                  "--weight-quantizer", args.weight_quantizer],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        elif name == "packed":
            results[name] = packed_section(args)
        elif name == "scale":
            import tempfile

            with tempfile.TemporaryDirectory(prefix="resq-jax-scale-") as tmp:
                out = subprocess.run([sys.executable, "-m", "resq_jax.cli.benchmark", "--child-scale",
                                      os.path.join(tmp, "ckpt"), "--model", args.model, "--calib-windows",
                                      str(args.calib_windows), "--eval-windows", str(args.eval_windows),
                                      "--seq-len", str(args.seq_len), "--weight-quantizer", args.weight_quantizer],
                                     capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"scale section failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        elif name == "cayley":
            results[name] = cayley_step(args.model, args.batch_size, args.seq_len,
                                        micro_batches=tuple(args.micro_batch or [None]))
        elif name == "hadamard":
            try:
                results[name] = hadamard_section()
            except ImportError as e:
                results[name] = {"skipped": f"no native Hadamard benchmark available: {e}"}
        print(json.dumps(results[name], indent=2), file=sys.stderr)
    from resq_jax.util.files import write_json_atomic

    write_json_atomic(args.out, results)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
