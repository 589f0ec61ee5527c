"""Multi-process jobs (resq_jax/distributed): 2 processes x 2 host devices on 127.0.0.1, joined through JAX's
distributed runtime with gloo collectives, give exactly the one-process, one-device results: the same
projections and integer codes (the checkpoints are identical array for array) and the same perplexities; only
process 0 prints and writes. Job flags are checked before any work."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
    blocks = sorted(str(p.relative_to(ckpt / "arrays")) for p in (ckpt / "arrays" / "vocab").glob("*/*"))
    assert blocks  # the float16 embed / lm_head blocks
    out = {}
    for part in ["common", *blocks] + [f"layers/{i}" for i in range(layers)]:
        out.update({f"{part}:{k}": np.asarray(v) for k, v in _flatten(_restore(ckpt, part)).items()})
    return out


def test_two_processes_equal_one(tiny_model, tmp_path):
    """ResQ + GPTQ through scripts/quantize.py: one process on one device, then 2 processes x 2 devices."""
    _two_processes_equal_one(["--model", str(tiny_model), "--method", "resq", *PROTOCOL], tmp_path)


@pytest.mark.slow
def test_two_processes_equal_one_smollm2(tmp_path):
    """The same on SmolLM2-135M (30 layers, real weights), 32 calibration and 8 evaluation windows of 256 tokens."""
    _two_processes_equal_one(["--model", "smollm2", "--method", "resq", "--calib-windows", "32", "--calib-seq-len",
                              "256", "--eval-windows", "8", "--eval-seq-len", "256"], tmp_path, timeout=3600)


def _two_processes_equal_one(base, tmp_path, timeout=600):
    one = _finish(_quantize([*base, "--json", str(tmp_path / "one.json"), "--out", str(tmp_path / "one")]),
                  timeout=timeout)
    assert one[0] == 0, one[2][-3000:]

    port = str(_free_port())
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [_quantize([*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                        "--json", str(tmp_path / f"two{i}.json"), "--out", str(tmp_path / "two")], env=env)
             for i in (0, 1)]
    two = [_finish(p, timeout=timeout) for p in procs]
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
    """One process with 2 host devices gives the one-device codes (calibration and GPTQ over the local mesh) and
    perplexities (the 2 evaluation batches of 4 windows run one per device: float and packed models)."""
    base = ["--model", str(tiny_model), "--method", "resq", *PROTOCOL]
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


# --- a failed job: one line, within a bound, nothing at --out ------------------------------------------------
TIMEOUT_S = 10  # --job-timeout of the failure tests
BOUND_S = TIMEOUT_S + 30  # the stated bound (--job-timeout + about 10 s) with room for a loaded machine


def _job(model, tmp_path):
    """Both processes of a 2-process ResQ job writing --out, stderr to files; returns (procs, out)."""
    port = _free_port()
    out = tmp_path / "ck"
    args = ["--model", str(model), "--method", "resq", "--calib-windows", "64", "--calib-seq-len", "256",
            "--eval-windows", "8", "--eval-seq-len", "64", "--out", str(out), "--job-timeout", str(TIMEOUT_S),
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "quantize.py"), *args, "--process-id", str(i)],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.err", "w"), env=env, cwd=ROOT)
             for i in (0, 1)]
    return procs, out


def _kill_mid_calibration(procs, tmp_path, victim: int) -> float:
    """SIGKILL process ``victim`` (the process the user started) once calibration runs; returns the kill time."""
    deadline = time.time() + 300
    while "calibrate:" not in (tmp_path / "p0.err").read_text():
        assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "p0.err").read_text()
        time.sleep(0.05)
    procs[victim].kill()
    return time.time()


@pytest.mark.parametrize("victim,needle", [
    (1, "error: process 1 of the job stopped responding for 10 s"),
    (0, "error: lost the coordinator at 127.0.0.1:"),
])
def test_killed_process_ends_the_job_with_one_line(tiny_model, tmp_path, victim, needle):
    """A process killed mid-calibration (kill -9): the other exits 1 within the bound with one line naming the
    failed process, no traceback and no runtime log; nothing at --out and no staging folder left."""
    procs, out = _job(tiny_model, tmp_path)
    try:
        killed = _kill_mid_calibration(procs, tmp_path, victim)
        survivor = procs[1 - victim]
        code = survivor.wait(timeout=BOUND_S + 60)
        elapsed = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    err = (tmp_path / f"p{1 - victim}.err").read_text()
    assert code == 1 and elapsed < BOUND_S, (code, elapsed, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(needle), err[-3000:]
    assert not any(w in err for w in ("Traceback", "Check failure", "F1", "absl")), err[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".ck.partial-*"))


def test_unreachable_coordinator_is_one_line(tiny_model, tmp_path):
    port = _free_port()  # nothing listens there
    t0 = time.time()
    code, _, err = _finish(_quantize(["--model", str(tiny_model), "--method", "rtn", "--coordinator",
                                      f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                                      "--job-timeout", str(TIMEOUT_S), "--out", str(tmp_path / "ck")]), timeout=300)
    assert code == 1 and time.time() - t0 < BOUND_S + 15, (code, err[-3000:])  # + start-up of the program
    assert err.strip().splitlines()[-1].startswith(f"error: process 1 could not join the job at 127.0.0.1:{port} "
                                                   f"within {TIMEOUT_S} s"), err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "ck").exists()


def test_mismatched_process_counts_are_one_line(tiny_model, tmp_path):
    """Process 0 of a 2-process job and a process that believes the job has 3: the latter is rejected at once,
    process 0 gives up after the timeout; one line each."""
    port = _free_port()
    base = ["--model", str(tiny_model), "--method", "rtn", "--coordinator", f"127.0.0.1:{port}",
            "--job-timeout", str(TIMEOUT_S)]
    p0 = _quantize([*base, "--num-processes", "2", "--process-id", "0"])
    p2 = _quantize([*base, "--num-processes", "3", "--process-id", "2"])
    (c0, _, e0), (c2, _, e2) = _finish(p0, timeout=300), _finish(p2, timeout=300)
    assert (c0, c2) == (1, 1), (e0[-2000:], e2[-2000:])
    assert e2.strip().splitlines()[-1].startswith(f"error: the coordinator at 127.0.0.1:{port} rejected process 2: "
                                                  "the processes disagree on --num-processes"), e2[-2000:]
    assert e0.strip().splitlines()[-1].startswith(f"error: process 0 waited {TIMEOUT_S} s at 127.0.0.1:{port} but "
                                                  "not every process joined"), e0[-2000:]
    assert "Traceback" not in e0 + e2


def test_runtime_reports_become_one_line():
    """The runtime's own reports (as JAX 0.8 prints them) map to the lines above; anything else (a bug) is not
    a job failure, so its traceback is shown."""
    from resq_jax.distributed.supervise import job_failure

    heartbeat = ("E1205 coordination_service.cc:1549] ... UNAVAILABLE: The following tasks are unhealthy (stopped "
                 "sending heartbeats):\n3\nThe tasks have crashed.\nF1205 client.h:80] Terminating process because "
                 "the JAX distributed service detected fatal errors.")
    assert job_failure(heartbeat, 0, "h:1", 60).startswith("process 3 of the job stopped responding for 60 s")
    gloo = "jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [h]:5"
    assert job_failure(gloo, 1, "h:1", 60).startswith("a peer process closed its connection")
    assert job_failure("Traceback (most recent call last):\nKeyError: 'x'", 0, "h:1", 60) is None


_SHARDED_EVAL = r"""
import json, sys
import numpy as np, jax
from resq_jax.distributed.mesh import model_mesh, shard_weights
from resq_jax.eval.perplexity import perplexity
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer
from resq_jax.pipeline.quantize import quantize_model
from resq_jax.pipeline.recipes import QuantConfig
from resq_jax.runtime.pack import pack_model, packed_streamer

m = load_model(sys.argv[1])
rng = np.random.default_rng(0)
qm = quantize_model(m.config, m.weights, QuantConfig(method="resq", weight_quantizer="rtn"),
                    rng.integers(0, 1000, (8, 64)), progress=False)
pm = pack_model(qm)
windows = rng.integers(0, 1000, (6, 48))
out = {"devices": len(jax.local_devices())}
g, s = packed_streamer(pm).layers[0]
placed = shard_weights(s, model_mesh())
out["split"] = sorted({str(a.shape) + "->" + str(a.addressable_shards[0].data.shape)
                       for a in jax.tree.leaves(placed) if a.sharding.spec != jax.sharding.PartitionSpec()})
for name, model, hooks in (("float", LayerStreamer.from_weights(m.config, m.weights), None),
                           ("packed", packed_streamer(pm), pm.hooks)):
    kw = {} if hooks is None else {"hooks": hooks}
    out[name] = [perplexity(model, windows, batch_size=2, progress=False, shard_weights=flag, **kw).window_nll.tolist()
                 for flag in (False, True)]
print(json.dumps(out))
"""


def test_shard_weights_splits_layers_and_keeps_the_numbers(tiny_model):
    """--shard-weights on 2 host devices: the packed layer's matrices are split along their output axis (each
    device holds half), and the window losses of the float and the packed model equal the unsplit ones within
    float32 rounding (1e-5 relative)."""
    p = subprocess.run([sys.executable, "-c", _SHARDED_EVAL, str(tiny_model)], capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["split"] and all(int(s.split("->")[0].strip("()").split(",")[-1]) ==
                                2 * int(s.split("->")[1].strip("()").split(",")[-1]) for s in out["split"]), out
    for name in ("float", "packed"):
        whole, split = (np.asarray(v) for v in out[name])
        assert whole.shape == (6,) and np.all(np.isfinite(whole))
        np.testing.assert_allclose(split, whole, rtol=1e-5, err_msg=name)


def test_interrupted_process_is_one_line(tiny_model, tmp_path):
    """Ctrl-C (SIGINT to the process the user started) mid-calibration: it exits with one line; its peer with
    the failure line naming it; nothing at --out."""
    procs, out = _job(tiny_model, tmp_path)
    try:
        deadline = time.time() + 300
        while "calibrate:" not in (tmp_path / "p0.err").read_text():
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=BOUND_S + 60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errs = [(tmp_path / f"p{i}.err").read_text() for i in (0, 1)]
    assert codes == [1, 128 + signal.SIGINT], (codes, [e[-2000:] for e in errs])
    assert errs[1].strip().splitlines()[-1] == ("error: process 1 was interrupted (SIGINT); the other "
                                               "processes of the job stop too"), errs[1][-2000:]
    assert errs[0].strip().splitlines()[-1].startswith("error: "), errs[0][-2000:]
    assert "Traceback" not in errs[0] + errs[1] and not out.exists() and not list(tmp_path.glob(".ck.partial-*"))
