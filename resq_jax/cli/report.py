"""A self-contained HTML report of a quantize.py results JSON: what quantization did, in plots.

    python scripts/report.py results.json --out report/        (pip install -e ".[report]": matplotlib)
    python scripts/report.py results.json --checkpoint ckpt/ --out report/

report/index.html holds every plot inline (PNG, also written beside it; the measured numbers in measurements.json)
and reads without the code:
  - activation magnitude per channel at one layer's attention input, float model against each rotating method's
    transformed model (ResQ's figure: the outlier channels spread out, the high-variance subspace last);
  - the activation quantizers' SNR (dB) per layer and site for each integer method, measured on a few windows of
    the evaluation text with the method's transforms (from the same calibration text, windows and seed as the
    run, fewer windows) and weights in float, so it isolates the activation / KV quantization error;
  - with --checkpoint DIR (a folder quantize.py --out wrote from the same model), the same two measurements on the
    quantized model itself, as it is evaluated: its quantized weights and, if it has them, learned rotations;
  - perplexity per method and text, the lm-eval task scores with their standard errors, the training loss of
    learned rotations; and the run's settings.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

import numpy as np

from resq_jax.cli.common import UserError, guarded, load
from resq_jax.cli.table import method_label
from resq_jax.util.files import write_json_atomic

DEFAULT_WINDOWS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a results JSON written by scripts/quantize.py --json")
    p.add_argument("--out", required=True, help="folder for index.html and its PNG plots (created)")
    p.add_argument("--model", default=None, help="the model the results came from (default: the JSON's 'model')")
    p.add_argument("--layer", type=int, default=None, help="layer of the magnitude plot (default: the middle one)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help="evaluation windows (256 tokens) of the SNR and magnitude measurements (default %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="a folder written by quantize.py --out from the same model: also measure that quantized "
                        "model as it runs (quantized weights, learned rotations)")
    p.add_argument("--no-measure", action="store_true", help="plots from the JSON only (no model run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))


def _read_results(path: str) -> dict:
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable results JSON ({e}); give the file quantize.py --json wrote") from None
    if not isinstance(res, dict) or not isinstance(res.get("runs"), list) or not res["runs"]:
        raise UserError(f"{path}: no 'runs' in it; give the file scripts/quantize.py --json wrote")
    return res


def run(args) -> int:
    res = _read_results(args.results)
    if args.windows <= 0:
        raise UserError(f"--windows must be a positive integer, got {args.windows}")
    if args.checkpoint and args.no_measure:
        raise UserError("--checkpoint is measured by running it; drop --no-measure")
    if args.checkpoint and not (Path(args.checkpoint) / "meta.json").is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no checkpoint there (no meta.json); give a folder "
                        "quantize.py --out wrote")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: F401
    except ImportError:
        raise UserError("the report needs matplotlib: pip install 'resq-jax[report]'") from None
    out = Path(args.out)
    figures, measured = [], None  # figures: (file name, title, caption, png bytes)
    if not args.no_measure:
        measured_figures, measured = _measured_figures(args, res)
        figures += measured_figures
    figures += _result_figures(res)
    out.mkdir(parents=True, exist_ok=True)
    for name, _, _, png in figures:
        (out / name).write_bytes(png)
    if measured is not None:
        write_json_atomic(out / "measurements.json", measured)
    page = _page(res, figures)
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "index.html")
    print(f"wrote {out / 'index.html'} ({len(figures)} plots)")
    return 0


# --- measurements -------------------------------------------------------------------------------------------
def _quant_config(run: dict):
    """The run's activation/KV quantizers and transforms, weights left in float (w_bits 16), no learned rotations."""
    from resq_jax.pipeline.recipes import RECIPES, QuantConfig, setting_applies

    cfg, method = run["config"], run["method"]
    if method not in RECIPES or not RECIPES[method].quantize or RECIPES[method].formats != "int":
        return None
    own = {k: cfg[k] for k in ("high_bits", "high_fraction") if cfg.get(k) is not None and setting_applies(
        k, method, cfg.get("high_fraction"))}
    if RECIPES[method].default_cayley_steps:
        own["cayley_steps"] = 0
    return QuantConfig(method=method, w_bits=16, a_bits=cfg["a_bits"], kv_bits=cfg["kv_bits"],
                       seed=cfg.get("seed", 0), **own)


def _measured_figures(args, res: dict) -> tuple[list, dict]:
    """The magnitude and SNR figures, and their numbers for measurements.json: {"layer", "windows", "magnitude":
    {label: [channels]}, "high_channels": {label: n}, "snr_db": {label: {site: [layers]}}} (inf: exact, None)."""
    from resq_jax.data.texts import DEFAULT_CALIB_TEXT, DEFAULT_EVAL_TEXT, load_text
    from resq_jax.data.windows import calib_windows, eval_windows, tokenize
    from resq_jax.eval.diagnostics import channel_magnitude, site_snr
    from resq_jax.models.streaming import LayerStreamer
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.quant.fake_quant import FakeQuantHooks

    loaded = load(args.model or res.get("model") or "smollm2")
    config = loaded.config
    layer = config.num_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < config.num_layers:
        raise UserError(f"--layer {layer} is out of range: the model has {config.num_layers} layers")
    calib = res.get("calib") or {}
    tok = loaded.tokenizer
    windows = eval_windows(tokenize(load_text(DEFAULT_EVAL_TEXT).text, tok), args.windows, 256)
    cwin = calib_windows(tokenize(load_text(calib.get("text", DEFAULT_CALIB_TEXT)).text, tok),
                         min(16, calib.get("windows", 16)), min(256, calib.get("seq_len", 256)), calib.get("seed", 0))
    before = channel_magnitude(LayerStreamer.from_weights(config, loaded.weights), windows, layer)
    after, snr = {}, {}
    for r in res["runs"]:
        qc = _quant_config(r)
        if qc is None or r["method"] in snr:
            continue
        qm = quantize_model(config, loaded.weights, qc, cwin, progress=False)
        streamer = LayerStreamer.from_weights(qm.config, qm.weights)
        if qm.transforms.residual is not None:
            after[r["method"]] = (channel_magnitude(streamer, windows, layer), qm.hooks.spec.high_residual)
        snr[r["method"]] = site_snr(streamer, windows, qm.hooks)
    if args.checkpoint:
        label, streamer, hooks, spec = _checkpoint_model(args.checkpoint, config)
        after[label] = (channel_magnitude(streamer, windows, layer), spec.high_residual)
        snr[label] = site_snr(streamer, windows, hooks, measure=FakeQuantHooks(spec))
    figs = [_magnitude_figure(before, after, layer)]
    if snr:
        figs.append(_snr_figure(snr))
    finite = lambda a: [float(v) if np.isfinite(v) else None for v in np.asarray(a, np.float64)]  # noqa: E731
    numbers = {"layer": layer, "windows": {"count": args.windows, "seq_len": 256},
               "magnitude": {"float model": finite(before), **{k: finite(a) for k, (a, _) in after.items()}},
               "high_channels": {k: int(h) for k, (_, h) in after.items()},
               "snr_db": {k: {s: finite(v) for s, v in by_site.items()} for k, by_site in snr.items()}}
    return figs, numbers


def _checkpoint_model(path: str, config) -> tuple:
    """A checkpoint of ``config``'s model -> (label, LayerStreamer running it as evaluated, its hooks, its
    ActivationSpec)."""
    from resq_jax.models.streaming import LayerStreamer
    from resq_jax.runtime.checkpoint import load_checkpoint, runnable

    try:
        r = runnable(load_checkpoint(path, expect_config=config))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--checkpoint {path}: {e}") from None
    return f"{r.method} (checkpoint)", LayerStreamer.from_weights(r.config, r.weights), r.hooks, r.spec


# --- figures --------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _magnitude_figure(before: np.ndarray, after: dict, layer: int):
    import matplotlib.pyplot as plt

    panels = [("float model", before, 0)] + [(f"{m} (transformed)", a, high) for m, (a, high) in after.items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False, layout="constrained")
    top = max(float(p[1].max()) for p in panels)
    for ax, (name, mag, high) in zip(axes[:, 0], panels):
        ax.bar(np.arange(mag.size), mag, width=1.0, color="tab:blue")
        if high:
            ax.axvspan(mag.size - high - 0.5, mag.size - 0.5, color="tab:orange", alpha=0.25,
                       label=f"high-precision subspace ({high} channels, 8 bits)")
            ax.legend(loc="upper left")
        ax.set_ylim(0, top * 1.05)
        ax.set_title(f"{name}: max/mean = {mag.max() / mag.mean():.1f}")
        ax.set_ylabel("mean |activation|")
    axes[-1, 0].set_xlabel("channel")
    fig.suptitle(f"Attention input of layer {layer}, per channel")
    return ("magnitude.png", "Activation magnitude per channel",
            f"Mean absolute value of each channel of layer {layer}'s attention input (after RMSNorm) over the "
            "measurement windows: the float model, then each rotating method's transformed model (norm gains folded "
            "into the weights). Outlier channels force a coarse quantization step on every channel of a token.",
            _png(fig))


def _snr_figure(snr: dict):
    import matplotlib.pyplot as plt

    from resq_jax.eval.diagnostics import SITE_LABELS, SITES

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True, layout="constrained")
    for ax, site in zip(axes.ravel(), SITES):
        for method, by_site in snr.items():
            values = np.where(np.isfinite(by_site[site]), by_site[site], np.nan)
            ax.plot(np.arange(values.size), values, marker="o", markersize=3, label=method)
        ax.set_title(SITE_LABELS[site])
        ax.set_ylabel("SNR (dB)")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    axes[0, 0].legend()
    fig.suptitle("Activation and KV quantization: signal-to-noise ratio per layer and site (higher is better)")
    return ("snr.png", "Quantization error per layer and site",
            "10 log10(|x|^2 / |x - q(x)|^2) at each quantized site, each method with its own transforms and "
            "quantizers (weights in float, learned rotations not applied), the model running quantized; a "
            "'(checkpoint)' line is the saved model as it is evaluated (quantized weights, learned rotations). A site "
            "a method leaves in 16 bits is not drawn.", _png(fig))


def _result_figures(res: dict) -> list:
    import matplotlib.pyplot as plt

    runs = res["runs"]
    figs = []
    texts = list(dict.fromkeys(t for r in runs for t in r.get("ppl", {})))
    if texts:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(runs)), 3.5))
        width = 0.8 / len(texts)
        for j, t in enumerate(texts):
            vals = [r["ppl"].get(t, np.nan) for r in runs]
            ax.bar(np.arange(len(runs)) + j * width, vals, width, label=t)
        ax.set_xticks(np.arange(len(runs)) + width * (len(texts) - 1) / 2, [method_label(r['method']) for r in runs])
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
        ax.legend()
        ax.set_title("Perplexity per method (lower is better)")
        figs.append(("perplexity.png", "Perplexity", "Perplexity of each method on each evaluation text.", _png(fig)))
    scores = list(dict.fromkeys((t, m) for r in runs for t, s in r.get("tasks", {}).items() for m in s["metrics"]
                                if m != "perplexity"))
    if scores:
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(scores)), 3.5))
        width = 0.8 / len(runs)
        for j, r in enumerate(runs):
            vals = [r.get("tasks", {}).get(t, {}).get("metrics", {}).get(m, np.nan) for t, m in scores]
            errs = [r.get("tasks", {}).get(t, {}).get("stderr", {}).get(m) or 0.0 for t, m in scores]
            ax.bar(np.arange(len(scores)) + j * width, vals, width, yerr=errs, capsize=3, label=method_label(r['method']))
        ax.set_xticks(np.arange(len(scores)) + width * (len(runs) - 1) / 2, [f"{t}\n{m}" for t, m in scores])
        ax.set_ylim(0, 1)
        ax.set_ylabel("score (fraction)")
        ax.legend()
        ax.set_title("lm-eval task scores (error bars: standard error)")
        figs.append(("tasks.png", "Task scores", "lm-evaluation-harness metrics per method, with lm-eval's standard "
                     "errors.", _png(fig)))
    trained = [r for r in runs if r.get("cayley")]
    if trained:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for r in trained:
            ax.plot(np.arange(1, len(r["cayley"]["losses"]) + 1), r["cayley"]["losses"], marker="o", markersize=3,
                    label=method_label(r['method']))
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        ax.set_title("Learned rotations: training loss of each step's batch")
        figs.append(("cayley.png", "Learned rotations", "Mean next-token loss of each Cayley-SGD step's batch, "
                     "activations and KV quantized.", _png(fig)))
    return figs


# --- the page -------------------------------------------------------------------------------------------------
def _page(res: dict, figures: list) -> str:
    from resq_jax.cli.table import format_table

    esc = html.escape
    rows = []
    for r in res["runs"]:
        cells = [method_label(r['method']), json.dumps({k: v for k, v in r.get("config", {}).items() if v is not None}),
                 " ".join(f"{t}: {v:.3f}" for t, v in r.get("ppl", {}).items())]
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    blocks = []
    for name, title, caption, png in figures:
        data = base64.b64encode(png).decode()
        blocks.append(f'<figure><h2>{esc(title)}</h2><img src="data:image/png;base64,{data}" alt="{esc(title)}" '
                      f'data-file="{esc(name)}"><figcaption>{esc(caption)}</figcaption></figure>')
    settings = {k: res[k] for k in ("calib", "eval") if k in res}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>resq-jax report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:0.85em}} td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top}}
pre{{background:#f6f6f6;padding:8px;overflow-x:auto}} figcaption{{color:#555;font-size:0.9em}}</style></head>
<body><h1>Quantization report</h1>
<p>Model: <code>{esc(str(res.get("model")))}</code></p>
<h2>Results</h2><pre>{esc(format_table(str(res.get("model")), res["runs"]))}</pre>
<h2>Settings</h2><pre>{esc(json.dumps(settings, indent=1))}</pre>
<table><tr><th>method</th><th>configuration</th><th>perplexity</th></tr>{"".join(rows)}</table>
{"".join(blocks)}
<script>
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `resq-jax report: ${{ok}} of ${{imgs.length}} images loaded`;
}});
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
