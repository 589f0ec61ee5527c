"""The headline result, pinned on a protocol that fits CI: SmolLM2-135M W4A4KV4 with GPTQ weights,
calibration 16 x 256 tokens (seed 0), evaluation on the first 8 x 512 tokens of wiki-eval, packed
(integer) evaluation, as ``scripts/quantize.py`` runs it.

Measured on this protocol (seeds 0 / 1 / 2): fp 14.76; RTN 3196 (x217, no randomness); QuaRot x2.30 /
x2.18 / x2.22; ResQ x1.54 / x1.50 / x1.49. Seed 0 is pinned with a band that covers the spread over seeds
(a few percent); a regression in calibration, projections, GPTQ, the quantizers or the packed runtime
moves ResQ out of it. On the README protocol (64 x 512 calibration, 40 x 512 evaluation) the ratios are
x1.39 (ResQ) and x1.97-2.00 (QuaRot); the official ResQ code gives x1.39 and x2.04 there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resq_quarot_rtn_on_smollm2(tmp_path):
    js = tmp_path / "results.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), "--quiet",
                          "--method", "rtn,quarot,resq", "--calib-windows", "16", "--calib-seq-len", "256",
                          "--eval-windows", "8", "--eval-seq-len", "512", "--seed", "0", "--json", str(js)],
                         capture_output=True, text=True, timeout=3000, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    ppl = {r["method"]: r["ppl"]["wiki-eval"] for r in json.loads(js.read_text())["runs"]}
    ratio = {m: p / ppl["none"] for m, p in ppl.items()}
    print("W4A4KV4 GPTQ, 16x256 calib, 8x512 eval:", {m: round(r, 3) for m, r in ratio.items()})
    assert abs(ppl["none"] / 14.76 - 1) < 0.002, ppl  # the float model and the tokenized windows
    assert 1.48 < ratio["resq"] < 1.61, ratio  # measured 1.545 (seed 0); 1.49-1.50 at seeds 1, 2
    assert 2.05 < ratio["quarot"] < 2.45, ratio  # measured 2.30 (seed 0); 2.18-2.22 at seeds 1, 2
    assert ratio["rtn"] > 100, ratio  # measured 217
    assert ratio["resq"] < ratio["quarot"] < ratio["rtn"]
