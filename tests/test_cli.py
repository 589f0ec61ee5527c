"""The scripts end bad input with one clear line (exit code 2), before any heavy work, and never
leave half-written output."""
import json
import os
import subprocess
import sys

import pytest

from hf_fixtures import build_torch_model, tiny_llama_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=600):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--quiet", *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return res.returncode, res.stdout, res.stderr


def assert_clean_error(res, *needles):
    code, out, err = res
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-2000:]
    for n in needles:
        assert n in last, last


@pytest.mark.parametrize("args,needles", [
    (["--w-bits", "9"], ["w-bits", "between 2 and 8"]),
    (["--a-bits", "1"], ["a-bits", "between 2 and 8"]),
    (["--high-fraction", "1.0"], ["high-fraction", "[0, 1)"]),
    (["--high-fraction", "-0.1"], ["high-fraction"]),
    (["--calib-windows", "0"], ["--calib-windows must be a positive integer"]),
    (["--eval-seq-len", "-5"], ["--eval-seq-len must be a positive integer"]),
    (["--method", "omniquant"], ["unknown method", "spinquant"]),
    # flags a recipe would ignore are refused, naming the methods that use them
    (["--method", "resq", "--w-format", "int"], ["--w-format does not apply to method 'resq'", "lqer"]),
    (["--method", "resq", "--rank", "16"], ["--rank does not apply", "resq+l2qer"]),
    (["--method", "mxint,lqer", "--high-fraction", "0.1"], ["--high-fraction does not apply to methods mxint, lqer"]),
    (["--method", "rtn", "--high-bits", "6"], ["--high-bits does not apply", "resq"]),
    (["--weight-quantizer", "rtn", "--act-order"], ["--act-order does not apply to methods rtn, quarot, resq"]),
    (["--method", "resq", "--damp", "0"], ["--damp must be a positive number"]),
    # learned rotations
    (["--method", "rtn,gptq", "--cayley-steps", "10"], ["--cayley-steps does not apply to methods rtn, gptq", "spinquant"]),
    (["--method", "resq", "--cayley-lr", "1.0"], ["--cayley-lr does not apply to method 'resq'", "--cayley-steps N"]),
    (["--method", "spinquant", "--cayley-lr", "-1"], ["--cayley-lr must be a positive number"]),
    (["--method", "spinquant", "--cayley-steps", "-3"], ["--cayley-steps must be an integer >= 0"]),
    (["--method", "resq", "--cayley-steps", "5", "--cayley-windows", "4"], ["--cayley-windows 4 is fewer than the 8"]),
    (["--method", "resq", "--cayley-weights", "rtn"], ["--cayley-weights does not apply to method 'resq'", "--cayley-steps N"]),
    (["--method", "quarot", "--cayley-dtype", "bfloat16"], ["--cayley-dtype does not apply to method 'quarot'"]),
    (["--method", "resq", "--cayley-micro-batch", "2"], ["--cayley-micro-batch does not apply to method 'resq'"]),
    (["--method", "spinquant", "--cayley-micro-batch", "3"], ["--cayley-micro-batch 3 must divide the 8 windows"]),
    (["--method", "resq", "--cayley-loss", "kl"], ["--cayley-loss does not apply to method 'resq'"]),
    (["--method", "resq", "--cayley-momentum", "0"], ["--cayley-momentum does not apply to method 'resq'"]),
    (["--method", "spinquant", "--cayley-momentum", "1"], ["--cayley-momentum must be a number in [0, 1)"]),
    (["--method", "resq", "--cayley-clip", "1"], ["--cayley-clip does not apply to method 'resq'"]),
    (["--method", "spinquant", "--cayley-clip", "-1"], ["--cayley-clip must be a number >= 0"]),
])
def test_quantize_rejects_bad_settings_before_loading(args, needles):
    assert_clean_error(run("quantize.py", "--model", "/nonexistent/model", *args), *needles)


def test_missing_model(tmp_path):
    assert_clean_error(run("evaluate.py", "--model", str(tmp_path / "nope")), "nope")


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "m"
    build_torch_model(tiny_llama_config()).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("evaluate.py", "--model", str(folder)), "MistralForCausalLM")


def test_existing_out_is_not_overwritten(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(run("quantize.py", "--out", str(out)), "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_text_shorter_than_one_window_and_too_many_windows(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_clean_error(run("evaluate.py", "--eval-text", str(short)), "short", "fewer than one")
    assert_clean_error(run("quantize.py", "--method", "resq", "--calib-windows", "100000"),
                       "--calib-text", "at most")


def test_window_count_checked_against_devices_before_loading():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), "--quiet", "--model",
                          "/nonexistent/model", "--method", "resq", "--calib-windows", "8"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert_clean_error((res.returncode, res.stdout, res.stderr), "--calib-windows", "3 device(s)", "multiple of 3")
