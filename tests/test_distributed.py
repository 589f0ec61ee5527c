"""Multi-process jobs (resq_jax/distributed): 2 processes x 2 host devices on 127.0.0.1, joined through JAX's
distributed runtime with gloo collectives, give exactly the one-process, one-device results: the same
projections and integer codes (the checkpoints are identical array for array) and the same perplexities; only
process 0 prints and writes. Job flags are checked before any work."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resq_jax.distributed.job import JobError, JobSpec, check_job
from resq_jax.models.synthetic import write_random_model

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ["--calib-windows", "16", "--calib-seq-len", "64", "--eval-windows", "8", "--eval-seq-len", "64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantize(args, env=None, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "quantize.py"), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT,
                            env={**os.environ, **(env or {})})


def _finish(p: subprocess.Popen, timeout=600):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """2 layers of width 64 with SmolLM2's tokenizer (a real vocabulary, so the programs run it as is)."""
    return write_random_model(tmp_path_factory.mktemp("tiny") / "model", "tiny-llama-smol")


def _arrays(ckpt: Path) -> dict[str, np.ndarray]:
    from resq_jax.runtime.checkpoint import _flatten, _restore

    layers = len(list((ckpt / "arrays" / "layers").iterdir()))
    out = {}
    for part in ["common"] + [f"layers/{i}" for i in range(layers)]:
        out.update({f"{part}:{k}": np.asarray(v) for k, v in _flatten(_restore(ckpt, part)).items()})
    return out


def test_two_processes_equal_one(tiny_model, tmp_path):
    """ResQ + GPTQ through scripts/quantize.py: one process on one device, then 2 processes x 2 devices."""
    base = ["--model", str(tiny_model), "--method", "resq", *PROTOCOL]
    one = _finish(_quantize([*base, "--json", str(tmp_path / "one.json"), "--out", str(tmp_path / "one")]))
    assert one[0] == 0, one[2][-3000:]

    port = str(_free_port())
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [_quantize([*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                        "--json", str(tmp_path / f"two{i}.json"), "--out", str(tmp_path / "two")], env=env)
             for i in (0, 1)]
    two = [_finish(p) for p in procs]
    assert [r[0] for r in two] == [0, 0], [r[2][-3000:] for r in two]
    # process 0 alone prints the table and writes --json and --out
    assert "x fp (wiki-eval)" in two[0][1] and "x fp" not in two[1][1]  # (gloo itself prints to stdout)
    assert (tmp_path / "two0.json").exists() and not (tmp_path / "two1.json").exists()

    ppl_one = [r["ppl"]["wiki-eval"] for r in json.loads((tmp_path / "one.json").read_text())["runs"]]
    ppl_two = [r["ppl"]["wiki-eval"] for r in json.loads((tmp_path / "two0.json").read_text())["runs"]]
    assert ppl_two == pytest.approx(ppl_one, rel=1e-6)
    assert ppl_two == ppl_one  # in fact bit for bit: the same windows per device, sums in window order

    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert a.keys() == b.keys()
    assert "common:transforms.residual" in a and "layers/1:layers.1.down.w_low" in b
    for k in a:  # the projections (transforms.*) and every layer's integer codes and scales
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # a control: the projection is a real ResQ basis (orthogonal, not the identity)
    r = a["common:transforms.residual"].astype(np.float64)
    np.testing.assert_allclose(r.T @ r, np.eye(r.shape[0]), atol=1e-5)
    assert np.abs(r - np.eye(r.shape[0])).max() > 0.1


def test_two_local_devices_equal_one(tiny_model, tmp_path):
    """One process with 2 host devices (calibration and GPTQ over the local mesh) gives the one-device codes."""
    base = ["--model", str(tiny_model), "--method", "resq", "--eval-path", "fake", *PROTOCOL]
    one = _finish(_quantize([*base, "--json", str(tmp_path / "one.json"), "--out", str(tmp_path / "one")]))
    two = _finish(_quantize([*base, "--json", str(tmp_path / "two.json"), "--out", str(tmp_path / "two")],
                            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    assert one[0] == 0 and two[0] == 0, (one[2][-2000:], two[2][-2000:])
    a, b = _arrays(tmp_path / "one"), _arrays(tmp_path / "two")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ppl = [[r["ppl"] for r in json.loads((tmp_path / f).read_text())["runs"]] for f in ("one.json", "two.json")]
    assert ppl[0] == ppl[1]


@pytest.mark.parametrize("spec,needle", [
    (JobSpec(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "--process-id 2 is out of range"),
    (JobSpec(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1), "out of range"),
    (JobSpec(num_processes=2, process_id=1), "missing --coordinator"),
    (JobSpec(coordinator="127.0.0.1:1234", process_id=0), "missing --num-processes"),
    (JobSpec(coordinator="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
    (JobSpec(coordinator="10.0.0.1:99999", num_processes=2, process_id=0), "is not HOST:PORT"),
    (JobSpec(coordinator="10.0.0.1:1234", num_processes=0, process_id=0), "must be a positive integer"),
    (JobSpec(coordinator="10.0.0.1:1234", num_processes=2, process_id=0, timeout_s=0), "--job-timeout"),
])
def test_bad_job_flags(spec, needle):
    with pytest.raises(JobError, match=needle.replace("(", r"\(")):
        check_job(spec)


def test_job_flags_are_optional_for_one_process(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    check_job(JobSpec())
    assert not JobSpec().multi_process and not JobSpec(num_processes=1).multi_process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert JobSpec().detected == "SLURM" and JobSpec().multi_process


def test_bad_job_flags_end_the_program_with_one_line(tmp_path):
    """Through the program: one line, exit code 2, before the model is loaded and nothing at --out."""
    p = _quantize(["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "3",
                   "--out", str(tmp_path / "ck")])
    code, _, err = _finish(p, timeout=120)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: --process-id 3 is out of range for --num-processes 2: use 0..1"
    assert not (tmp_path / "ck").exists()
