"""The README's workflow end to end on the embedded default model, on a short protocol: quantize.py (ResQ,
RTN weights) with --json and --out, then evaluate.py --checkpoint on the same windows and with --prompt.

Checks the printed table, the results JSON's schema, that the checkpoint reproduces the perplexity
quantize.py reported for it (both run the packed runtime's exact integer arithmetic), and that the
script's generation is the checkpoint's own greedy continuation through its quantized KV cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL = ["--calib-windows", "8", "--calib-seq-len", "128", "--eval-windows", "2", "--eval-seq-len", "128"]
PROMPT = "The capital of France is"


def _run(script, *args):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--quiet", *args],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    out, js = tmp / "ckpt", tmp / "results.json"
    stdout = _run("quantize.py", "--method", "resq", "--weight-quantizer", "rtn", *PROTOCOL, "--json", str(js),
                  "--out", str(out))
    return stdout, json.loads(js.read_text()), out, tmp


def test_table_and_json_schema(quantized):
    stdout, res, out, _ = quantized
    assert set(res) == {"model", "runs", "calib", "eval"}
    assert res["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert res["calib"] == {"text": "wiki-calib", "windows": 8, "seq_len": 128, "seed": 0}
    assert res["eval"] == {"windows": 2, "seq_len": 128}
    assert [r["method"] for r in res["runs"]] == ["none", "resq"]
    for r in res["runs"]:
        assert set(r) == {"method", "config", "ppl", "eval_path", "weight_bits", "seconds"}
        assert set(r["seconds"]) == {"calibrate", "train", "quantize", "evaluate"}
        assert list(r["ppl"]) == ["wiki-eval"]
    fp, resq = (r["ppl"]["wiki-eval"] for r in res["runs"])
    assert 5 < fp < 40 and fp < resq < 4 * fp, (fp, resq)
    cfg = res["runs"][1]["config"]
    assert (cfg["w_bits"], cfg["a_bits"], cfg["kv_bits"], cfg["high_bits"], cfg["high_fraction"]) == (4, 4, 4, 8, 0.125)
    assert cfg["weight_quantizer"] == "rtn" and cfg["rank"] == 0 and cfg["act_order"] is None
    assert [r["eval_path"] for r in res["runs"]] == ["float", "packed"]
    assert res["runs"][0]["weight_bits"] == 16.0 and 4.0 < res["runs"][1]["weight_bits"] < 5.0

    lines = stdout.strip().splitlines()
    assert lines[0] == f"model: {res['model']}"
    assert lines[1].split() == ["method", "config", "w", "bits", "eval", "ppl", "wiki-eval", "x", "fp", "(wiki-eval)"]
    rows = [line.split() for line in lines[3:]]
    assert rows[0] == ["fp", "float32", "16.00", "float", f"{fp:.2f}", "1.00"]
    assert rows[1] == ["resq", "W4A4KV4", "hi=0.125@8b", "rtn+clip", f"{res['runs'][1]['weight_bits']:.2f}", "packed",
                       f"{resq:.2f}", f"{resq / fp:.2f}"]


def test_checkpoint_reproduces_the_reported_perplexity(quantized):
    _, res, out, tmp = quantized
    js = tmp / "eval.json"
    stdout = _run("evaluate.py", "--checkpoint", str(out), *PROTOCOL[4:], "--json", str(js))
    run = json.loads(js.read_text())["runs"][0]
    assert run["method"] == "resq" and run["eval_path"] == "packed"
    assert run["ppl"]["wiki-eval"] == pytest.approx(res["runs"][1]["ppl"]["wiki-eval"], rel=1e-6)
    assert run["weight_bits"] == res["runs"][1]["weight_bits"]  # recorded in the checkpoint, not "-"
    row = stdout.strip().splitlines()[3].split()
    assert row[:5] == ["resq", "W4A4KV4", "hi=0.125@8b", "rtn+clip", f"{run['weight_bits']:.2f}"], row
    assert f"{run['ppl']['wiki-eval']:.2f}" in stdout


def test_generation_is_the_checkpoints_greedy_continuation(quantized):
    from resq_jax.eval.generate import generate_greedy
    from resq_jax.runtime.checkpoint import load_checkpoint
    from resq_jax.runtime.kv_cache import init_packed_cache
    from resq_jax.runtime.pack import packed_decoder

    _, _, out, _ = quantized
    stdout = _run("evaluate.py", "--checkpoint", str(out), "--no-ppl", "--prompt", PROMPT, "--max-new-tokens", "8")
    ckpt = load_checkpoint(str(out))
    pm = ckpt.model
    ids = ckpt.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    new = generate_greedy(packed_decoder(pm), ids, 8, hooks=pm.hooks, eos_token_id=pm.config.eos_token_id,
                          cache=init_packed_cache(pm.config, pm.spec, 1, len(ids) + 8))
    assert len(new) >= 1
    assert stdout.rstrip("\n") == PROMPT + ckpt.tokenizer.decode(new, skip_special_tokens=True)


def test_report_measures_the_checkpoint_as_it_runs(quantized, tmp_path):
    """report.py --checkpoint measures the saved model (quantized weights, packed runtime) beside the recomputed
    transforms with float weights. Layer 0's attention input depends on neither's weights: its quantizer SNR is the
    same in both (measured 21.3386 dB, equal to 3e-6); averaged over layers the quantized weights move the SNR of
    every site by under 0.15 dB (24.13 vs 24.14 dB at the attention input)."""
    pytest.importorskip("matplotlib")
    _, _, out, tmp = quantized
    rep = tmp_path / "rep"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report.py"), str(tmp / "results.json"),
                          "--checkpoint", str(out), "--windows", "2", "--out", str(rep)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0 and "index.html" in res.stdout, res.stderr[-3000:]
    m = json.loads((rep / "measurements.json").read_text())
    assert set(m["snr_db"]) == {"resq", "resq (checkpoint)"} and m["high_channels"]["resq (checkpoint)"] == 72
    ours, saved = m["snr_db"]["resq"], m["snr_db"]["resq (checkpoint)"]
    assert abs(ours["attn_in"][0] - saved["attn_in"][0]) < 1e-3, (ours["attn_in"][0], saved["attn_in"][0])
    for site in ours:
        assert None not in saved[site], site  # every site of resq is quantized, and measured so
        assert abs(sum(ours[site]) - sum(saved[site])) / len(saved[site]) < 0.5, site
    assert 15 < sum(saved["attn_in"]) / len(saved["attn_in"]) < 35


def test_report_bad_checkpoint_is_one_line(quantized, tmp_path):
    _, _, _, tmp = quantized
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report.py"), str(tmp / "results.json"),
                          "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --checkpoint")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_lm_eval_model_runs_a_checkpoint(quantized):
    """model_args checkpoint=DIR: the packed checkpoint through the lm-eval model, with its quantized KV cache for
    generation (this path once failed reading the method name)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from resq_jax.cli.harness import ResqJaxLM

    _, _, out, _ = quantized
    lm = ResqJaxLM(checkpoint=str(out), batch_size=2)
    assert lm.resolved.description.endswith("(resq, packed)") and lm.resolved.new_cache is not None
    (logp, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0)],
                                       disable_tqdm=True)
    assert np.isfinite(logp) and logp < 0
