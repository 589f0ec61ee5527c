"""Packed checkpoints: bit-identical round trip, atomic writes (kill -9 mid-save), clear errors for
bad input with nothing overwritten; the older fake-quant format still loads."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config, tiny_qwen2_config
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model
from resq_jax.pipeline.quantize import quantize_model
from resq_jax.pipeline.recipes import QuantConfig
from resq_jax.runtime.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_packed,
    save_fake_quant,
    save_packed,
)
from resq_jax.runtime.pack import pack_model, packed_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(kind, tmp_path_factory, seed=5):
    cfg = tiny_llama_config(tied=True, llama3=True) if kind == "llama" else tiny_qwen2_config(tied=False)
    folder = tmp_path_factory.mktemp(kind)
    build_torch_model(cfg, seed=seed).save_pretrained(folder)
    return load_model(str(folder), with_tokenizer=False)


def _quantized(m, seed=0):
    calib = np.random.default_rng(seed).integers(0, m.config.vocab_size, (8, 32))
    return quantize_model(m.config, m.weights, QuantConfig(method="resq", weight_quantizer="rtn", seed=seed), calib,
                          progress=False)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    m = _model("qwen2", tmp_path_factory)
    qm = _quantized(m)
    return m, qm, pack_model(qm)


@pytest.fixture(scope="module")
def llama_packed(tmp_path_factory):
    return pack_model(_quantized(_model("llama", tmp_path_factory)))


TOKENS = np.random.default_rng(11).integers(0, 128, (2, 20))


def _logits(pm):
    return np.asarray(packed_decoder(pm)(jnp.asarray(TOKENS), hooks=pm.hooks)[0])


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory):
    _, _, pm = qwen
    path = tmp_path_factory.mktemp("ck") / "resq"
    save_packed(path, pm, source="tiny-qwen2")
    return path


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_round_trip_bit_identical(qwen, saved):
    _, _, pm = qwen
    loaded = load_packed(saved)
    assert loaded.source == "tiny-qwen2" and loaded.tokenizer is None
    back = loaded.model
    assert back.layouts == pm.layouts and back.spec == pm.spec and back.config == pm.config
    assert back.down_hadamard == pm.down_hadamard and back.qconfig["method"] == "resq"
    for k, a in pm.arrays.items():
        assert back.arrays[k].dtype == a.dtype and np.array_equal(back.arrays[k], a), k
    assert set(back.transforms) == {"residual", "value", "key"}
    np.testing.assert_array_equal(_logits(back), _logits(pm))
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["version"] == FORMAT_VERSION == 4
    assert meta["arrays"]["layers.0.q.w_low"]["dtype"] == "int8"
    # one orbax tree per layer, written and read one layer at a time, one per vocabulary block, one for the rest
    layers = sorted(int(p.name) for p in (saved / "arrays" / "layers").iterdir())
    assert layers == list(range(pm.config.num_layers)) and (saved / "arrays" / "common").is_dir()
    assert sorted(p.name for p in (saved / "arrays" / "vocab").iterdir()) == ["embed", "lm_head"]


def test_vocabulary_tables_in_blocks(qwen, tmp_path):
    """The float16 embed [128, d] and lm_head [d, 128] written in blocks of 48 entries (48 + 48 + 32): each
    block on disk is that slice of the table with its own CRC; they read back bit-identical, and a damaged or
    missing block is reported by name."""
    import orbax.checkpoint as ocp

    _, _, pm = qwen
    path = save_packed(tmp_path / "blocks", pm, vocab_block=48)
    meta = json.loads((path / "meta.json").read_text())
    for name, axis in (("embed", 0), ("lm_head", 1)):
        table = np.asarray(pm.arrays[name])
        assert table.dtype == np.float16 and table.shape[axis] == 128
        m = meta["arrays"][name]
        assert m["block"] == 48 and len(m["crc32"]) == 3 and m["shape"] == list(table.shape)
        last = ocp.PyTreeCheckpointer().restore((path / "arrays" / "vocab" / name / "2").absolute())["block"]
        np.testing.assert_array_equal(last, table[96:] if axis == 0 else table[:, 96:])
    back = load_packed(path).model
    for k, a in pm.arrays.items():
        assert back.arrays[k].dtype == a.dtype and np.array_equal(back.arrays[k], a), k
    np.testing.assert_array_equal(_logits(back), _logits(pm))

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    m = json.loads((bad / "meta.json").read_text())
    m["arrays"]["lm_head"]["crc32"][1] ^= 1
    (bad / "meta.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="block 1 of 'lm_head' fails its checksum"):
        load_packed(bad)
    shutil.rmtree(path / "arrays" / "vocab" / "embed" / "2")
    with pytest.raises(CheckpointError, match="cannot read the arrays"):
        load_packed(path)


def test_version_3_common_tables_still_load(qwen, saved, tmp_path):
    """A version 3 checkpoint (the float vocabulary tables inside arrays/common) loads to the same arrays."""
    import orbax.checkpoint as ocp

    _, _, pm = qwen
    dst = tmp_path / "v3"
    shutil.copytree(saved, dst)
    shutil.rmtree(dst / "arrays" / "vocab")
    tree = ocp.PyTreeCheckpointer().restore((saved / "arrays" / "common").absolute())
    shutil.rmtree(dst / "arrays" / "common")
    tables = {k: np.asarray(pm.arrays[k]) for k in ("embed", "lm_head")}
    ocp.PyTreeCheckpointer().save((dst / "arrays" / "common").absolute(),
                                  {"arrays": {**tree["arrays"], **tables}, "transforms": tree["transforms"]})
    meta = json.loads((saved / "meta.json").read_text())
    for k, a in tables.items():
        meta["arrays"][k] = {"shape": list(a.shape), "dtype": str(a.dtype),
                             "crc32": zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF}
    (dst / "meta.json").write_text(json.dumps({**meta, "version": 3}))
    back = load_packed(dst).model
    for k, a in pm.arrays.items():
        assert np.array_equal(back.arrays[k], a), k
    np.testing.assert_array_equal(_logits(back), _logits(pm))


def test_version_2_single_tree_still_loads(qwen, saved, tmp_path):
    """A version 2 checkpoint (every array in one orbax tree under arrays/) loads to the same arrays."""
    import orbax.checkpoint as ocp

    _, _, pm = qwen
    dst = tmp_path / "v2"
    dst.mkdir()
    nested: dict = {}
    for k, a in pm.arrays.items():
        node = nested
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(a)
    ocp.PyTreeCheckpointer().save((dst / "arrays").absolute(),
                                  {"arrays": nested, "transforms": {k: np.asarray(v) for k, v in pm.transforms.items()}})
    meta = json.loads((saved / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    back = load_packed(dst).model
    assert isinstance(back.arrays, dict) and back.arrays.keys() == set(pm.arrays)
    for k, a in pm.arrays.items():
        assert np.array_equal(back.arrays[k], a), k
    np.testing.assert_array_equal(_logits(back), _logits(pm))


def test_existing_target_is_not_overwritten(qwen, saved, tmp_path):
    _, _, pm = qwen
    dst = _copy(saved, tmp_path)
    before = (dst / "meta.json").read_text()
    with pytest.raises(CheckpointError, match="already exists.*force"):
        save_packed(dst, pm)
    assert (dst / "meta.json").read_text() == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a resq-jax checkpoint"):
        save_packed(mine, pm, force=True)
    assert (mine / "notes.txt").read_text() == "keep"
    save_packed(dst, pm, force=True)  # --force replaces a checkpoint
    load_packed(dst)
    assert not list(tmp_path.glob(".copy.*"))  # no staging or old folders left behind


def test_incompatible_version_and_format(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=f"version {FORMAT_VERSION + 1}.*newer resq-jax.*quantize.py --out"):
        load_packed(dst)
    # version 1 stored column sums and only float embeddings: re-created, not guessed at
    (dst / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(CheckpointError, match="version 1; this reads .* version 2, 3 or 4.*quantize.py --out"):
        load_packed(dst)
    bad = {**meta, "embedding": {"bits": 4, "group": 5, "head": "table"}}
    (dst / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="embedding description is invalid"):
        load_packed(dst)
    (dst / "meta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        load_packed(dst)
    (dst / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        load_packed(dst)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_packed(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a complete"):
        load_packed(tmp_path / "empty")


def test_different_model(saved, llama_packed, tmp_path):
    with pytest.raises(CheckpointError, match="different model.*arch 'qwen2' vs 'llama'"):
        load_packed(saved, expect_config=llama_packed.config)
    # the source model may tie its head to the embedding: the transforms folded into the head untie it
    own = load_packed(saved).model.config
    source = dataclasses.replace(own, tie_word_embeddings=not own.tie_word_embeddings)
    assert load_packed(saved, expect_config=source).model.config == own
    # the arrays/ folder of another model's checkpoint under this meta.json
    other = tmp_path / "llama"
    save_packed(other, llama_packed)
    dst = _copy(saved, tmp_path)
    shutil.rmtree(dst / "arrays")
    shutil.copytree(other / "arrays", dst / "arrays")
    with pytest.raises(CheckpointError, match="belongs to another checkpoint|does not match|checksum"):
        load_packed(dst)


def test_mismatched_shapes(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    meta = json.loads((dst / "meta.json").read_text())
    bad = json.loads(json.dumps(meta))
    bad["config"]["intermediate_size"] = 128
    (dst / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="gate layout.*model config needs"):
        load_packed(dst)
    bad = json.loads(json.dumps(meta))
    bad["arrays"]["layers.0.q.w_low"]["shape"] = [1, 7, 64]
    (dst / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="layers.0.q.w_low"):
        load_packed(dst)


# orbax's restore of a damaged file leaves asyncio callbacks that fail after its loop closed
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_or_flipped_file(saved, tmp_path):
    """Every file of arrays/ truncated to half, and with one byte flipped: loading either fails with
    a CheckpointError or (a file the restore does not read: orbax keeps some) returns arrays equal
    to the original bit for bit -- never wrong data. Damaging the array data is detected."""
    reference = load_packed(saved).model.arrays
    files = sorted(p.relative_to(saved) for p in (saved / "arrays").rglob("*") if p.is_file())
    detected = {"truncated": 0, "flipped": 0}
    for i, rel in enumerate(files):
        data = (saved / rel).read_bytes()
        mid = len(data) // 2
        for kind, damaged in (("truncated", data[:mid]),
                              ("flipped", data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:] if data else data)):
            dst = tmp_path / f"{kind}-{i}"
            shutil.copytree(saved, dst)
            (dst / rel).write_bytes(damaged)
            try:
                arrays = load_packed(dst).model.arrays
            except CheckpointError as e:
                assert str(dst) in str(e) or "checksum" in str(e) or "damaged" in str(e), e
                detected[kind] += 1
                continue
            assert arrays.keys() == reference.keys(), rel
            for k, a in reference.items():
                np.testing.assert_array_equal(arrays[k], a, err_msg=f"{kind} {rel}: {k}")
    assert detected["truncated"] >= 2 and detected["flipped"] >= 2, detected


CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
from resq_jax.runtime.checkpoint import load_packed, save_packed
pm = load_packed({src!r}).model
print("go", flush=True)
save_packed({dst!r}, pm, force=True)
print("done", flush=True)
"""


def _save_and_kill(src: Path, dst: Path, delay: float) -> int:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT, src=str(src), dst=str(dst))],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "go"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


def _which(path: Path, candidates: dict) -> str:
    """Load ``path`` and say which candidate checkpoint (by array manifest) it is."""
    load_packed(path)  # must load completely
    manifest = json.loads((path / "meta.json").read_text())["arrays"]
    return next(name for name, m in candidates.items() if m == manifest)


def test_kill_during_save_leaves_old_or_none(saved, llama_packed, tmp_path):
    """kill -9 a process while it writes: the target is the old checkpoint, the new one, or
    absent (first save) -- never a folder that half-loads."""
    new_src = tmp_path / "new"
    save_packed(new_src, llama_packed)
    candidates = {"old": json.loads((saved / "meta.json").read_text())["arrays"],
                  "new": json.loads((new_src / "meta.json").read_text())["arrays"]}
    killed_mid_write = 0
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 1.0):  # dense: a fast machine writes in well under 1 s
        dst = tmp_path / f"target-{delay}"
        shutil.copytree(saved, dst)
        code = _save_and_kill(new_src, dst, delay)
        staging = list(tmp_path.glob(f".{dst.name}.partial-*"))
        if code == -signal.SIGKILL:
            killed_mid_write += bool(staging) or not (dst / "meta.json").exists()
        assert dst.exists() or list(tmp_path.glob(f".{dst.name}.old-*")), "neither old nor new checkpoint"
        if dst.exists():
            assert _which(dst, candidates) in ("old", "new")
    # a first save killed: no target, or a complete one
    first = tmp_path / "first"
    _save_and_kill(new_src, first, 0.2)
    if first.exists():
        assert _which(first, candidates) == "new"
    else:
        with pytest.raises(CheckpointError, match="does not exist"):
            load_packed(first)
    assert killed_mid_write >= 1, "no kill landed during a write: the test did not exercise the crash"
    # the next save removes the dead writers' staging folders
    save_packed(first, llama_packed, force=True)
    assert not list(tmp_path.glob(".first.partial-*"))


def test_fake_quant_format_still_loads(qwen, tmp_path):
    m, qm, _ = qwen

    class Src:
        source, tokenizer = "tiny-qwen2", None

    path = save_fake_quant(tmp_path / "fq", qm, Src())
    ck = load_checkpoint(path)
    fake = from_weights(qm.config, qm.weights)(jnp.asarray(TOKENS), hooks=qm.hooks)[0]
    again = from_weights(ck.config, ck.weights)(jnp.asarray(TOKENS), hooks=ck.hooks)[0]
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(again))
    with pytest.raises(CheckpointError, match="older fake-quant checkpoint"):
        load_packed(path)


def test_evaluate_cli_bad_checkpoint(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, "version": 7}))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--quiet", "--checkpoint",
                          str(dst)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "version 7" in last and "Traceback" not in res.stderr


@pytest.mark.slow
def test_smollm2_checkpoint_cli_round_trip_and_size(tmp_path):
    """quantize.py --out (ResQ RTN) -> evaluate.py --checkpoint (packed path, --prompt with the
    quantized KV cache); the checkpoint vs the float16 weights of the same model.

    The script prints the prompt followed by the decoded greedy continuation (the prompt alone
    is always printed, so it proves nothing). The continuation is checked against the tokens
    the same checkpoint generates when loaded here (load_packed -> packed_decoder, quantized KV
    cache, the script's EOS): the printed line must be the prompt + the decoded ids exactly, and
    those ids must be the checkpoint's own greedy tokens recomputed without a cache (one
    teacher-forced full-sequence forward over prompt + ids: causal, so the argmax at position
    T-1+j is greedy step j; equal = the cached generation is the cache-free greedy decoding).
    That forward is jitted, as generate_greedy's steps are: measured on this checkpoint its
    logits equal the cached steps' exactly (max difference 0.0 at all 8 steps); run eagerly
    (op by op, other float roundings that flip 4-bit activation roundings over 30 layers) it
    picked another token at 3 of the 8 positions.
    Agreement with the fake-quant model is not asserted here: the checkpoint keeps its
    embedding tables in float16 (a slightly different model; on the tiny models that alone cut
    the agreement to a 0..12-token prefix), and it is measured on float32 tables in
    test_runtime.py::test_generation_with_quantized_cache."""
    import jax
    from flax import nnx

    from resq_jax.eval.generate import generate_greedy
    from resq_jax.runtime.kv_cache import init_packed_cache

    out, prompt, n_new = tmp_path / "smol", "The capital of France is", 8
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, timeout=3000,  # noqa
                                    cwd=ROOT)
    res = run("scripts/quantize.py", "--quiet", "--method", "resq", "--weight-quantizer", "rtn", "--calib-windows",
              "8", "--calib-seq-len", "128", "--eval-windows", "2", "--eval-seq-len", "128", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run("scripts/evaluate.py", "--quiet", "--checkpoint", str(out), "--eval-windows", "2", "--eval-seq-len",
              "128", "--prompt", prompt, "--max-new-tokens", str(n_new))
    assert res.returncode == 0, res.stderr[-3000:]
    ck = load_packed(out)
    pm, tok = ck.model, ck.tokenizer
    ids = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], np.int32)
    packed = packed_decoder(pm)
    new = generate_greedy(packed, ids, n_new, hooks=pm.hooks, eos_token_id=pm.config.eos_token_id,
                          cache=init_packed_cache(pm.config, pm.spec, 1, ids.size + n_new))
    assert 1 <= new.size <= n_new and (new.size == n_new or new[-1] == pm.config.eos_token_id)
    text = prompt + tok.decode(new, skip_special_tokens=True)
    print(f"generated ids {new.tolist()}: {text!r}")
    assert res.stdout.startswith(text + "\n"), (text, res.stdout[:500])
    assert text != prompt, "the checkpoint generated nothing printable: the check would see the echo only"
    seq = jnp.asarray(np.concatenate([ids, new[:-1]])[None])
    graphdef, state = nnx.split(packed)  # jitted like generate_greedy (eager op-by-op rounds differently)
    full = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, hooks=pm.hooks)[0])(state, seq)
    np.testing.assert_array_equal(np.asarray(full)[0, ids.size - 1:].argmax(-1), new)  # == cache-free greedy
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "tokenizer" not in p.parts)
    m = load_model("smollm2", with_tokenizer=False)
    fp16 = 2 * sum(np.asarray(v).size for v in m.weights.values())
    print(f"checkpoint {size / 1e6:.1f} MB, float16 weights {fp16 / 1e6:.1f} MB, ratio {fp16 / size:.2f}")
    assert fp16 / size > 1.5
