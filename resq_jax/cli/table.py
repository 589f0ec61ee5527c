"""The printed results table: one row per run, one column per text and per lm-eval task metric, labels that
describe what ran.
"""
from __future__ import annotations

import math


def format_table(model: str, runs: list[dict], baseline: str = "none") -> str:
    """Plain-text perplexity table, one row per run, one column per text (+ ratio to fp)."""
    texts = list(dict.fromkeys(t for r in runs for t in r["ppl"]))
    base = next((r["ppl"] for r in runs if r["method"] == baseline), None)
    scores = list(dict.fromkeys((t, m) for r in runs for t, s in r.get("tasks", {}).items() for m in s["metrics"]))
    header = ["method", "config", "w bits", "eval"] + [f"ppl {t}" for t in texts] + (
        [f"x fp ({texts[0]})"] if base else []) + [f"{t} {m}" for t, m in scores]
    rows = []
    for r in runs:
        cfg = r["config"]
        bits = r.get("weight_bits")
        row = [method_label(r["method"]), _describe(r["method"], cfg), "-" if bits is None else f"{bits:.2f}",
               r.get("eval_path", "-")]
        row += [_fmt(r["ppl"].get(t)) for t in texts]
        if base:
            row.append(f"{r['ppl'][texts[0]] / base[texts[0]]:.2f}")
        row += [_task_cell(r.get("tasks", {}).get(t), m) for t, m in scores]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([f"model: {model}", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _describe(method: str, cfg: dict) -> str:
    """A short config label: W4A4KV4 hi=0.125@8b gptq, or W4A8 mxint r32 for the MXINT recipes."""
    if method == "none":
        return "float32"
    off = lambda b: b is None or b >= 16  # noqa: E731
    kv = "" if off(cfg.get("kv_bits")) else f"KV{cfg['kv_bits']}"
    text = f"W{cfg['w_bits']}A{cfg['a_bits']}{kv}"
    if cfg.get("w_format") is not None:
        text += f" {cfg['w_format']}" + (f" g{cfg['group_size']}" if cfg.get("group_size") else "")
    else:
        if cfg.get("high_fraction"):
            text += f" hi={cfg['high_fraction']:g}@{cfg['high_bits']}b"
        text += f" {cfg['weight_quantizer']}" + ("+clip" if cfg.get("clip_search") else "")
        if cfg["weight_quantizer"] == "gptq":
            from resq_jax.quant.gptq import DEFAULT_DAMP

            text += ("+act" if cfg.get("act_order") else "") + (
                f" damp={cfg['damp']:g}" if cfg.get("damp", DEFAULT_DAMP) != DEFAULT_DAMP else "")
    if cfg.get("rank"):
        text += f" r{cfg['rank']}"
    if cfg.get("cayley_steps"):
        text += f" cayley{cfg['cayley_steps']}@{cfg['cayley_lr']:g}"
        if cfg.get("cayley_weights") == "rtn":
            text += "/w-rtn"
        if cfg.get("cayley_loss") == "kl":
            text += "/kl"
        from resq_jax.pipeline.recipes import DEFAULT_CAYLEY_CLIP, DEFAULT_CAYLEY_MOMENTUM

        if cfg.get("cayley_momentum") not in (None, DEFAULT_CAYLEY_MOMENTUM):
            text += f"/m{cfg['cayley_momentum']:g}"
        if cfg.get("cayley_clip") not in (None, DEFAULT_CAYLEY_CLIP):
            text += f"/clip{cfg['cayley_clip']:g}"
        if cfg.get("cayley_dtype") == "bfloat16":
            text += "/bf16"
    if not off(cfg.get("embed_bits")):
        text += f" E{cfg['embed_bits']}"
    return text


def _task_cell(task: dict | None, metric: str) -> str:
    """A task metric as lm-eval reports it, value +- its standard error: 0.550+-0.080 (perplexities 8.84+-4.44)."""
    if task is None or metric not in task["metrics"]:
        return "-"
    v, e = task["metrics"][metric], task["stderr"].get(metric)
    digits = 2 if abs(v) >= 2 else 3
    return f"{v:.{digits}f}" + ("" if e is None else f"+-{e:.{digits}f}")


def method_label(method: str) -> str:
    return "fp" if method == "none" else method


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if math.isfinite(v) and v < 1e6 else f"{v:.3g}"
