"""Large-model streaming (issue: 7B on one machine): vocabulary slices read and computed in part, integer codes
spilled to files, the fake-quant and packed models evaluated layer by layer with the numbers of the whole
model, and peak memory that does not grow with the number of layers.

References: whole tables indexed by NumPy, float64 NumPy products, the whole-model Decoder's logits with a
float64 log-softmax, and the peak RSS of a child process (``resource``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resq_jax.eval.perplexity import perplexity
from resq_jax.formats.integer import WeightCodes
from resq_jax.models.decoder import IDENTITY, from_weights
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer
from resq_jax.models.synthetic import write_random_model
from resq_jax.models.views import SpilledTable, assemble_vocab, vocab_slice
from resq_jax.pipeline.quantize import quantize_model
from resq_jax.pipeline.recipes import QuantConfig
from resq_jax.quant.code_store import CodeStore
from resq_jax.quant.fake_quant import FakeQuantHooks
from resq_jax.quant.layouts import ActivationSpec
from resq_jax.rotation.fusion import FoldedWeights, rotated_residual
from resq_jax.runtime.pack import pack_model, packed_decoder, packed_streamer
from resq_jax.transforms.orthogonal import random_orthogonal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def store_model(tmp_path_factory):
    """tiny-qwen2 (untied, q/k/v biases) as bfloat16 shards, loaded as a WeightStore."""
    folder = write_random_model(tmp_path_factory.mktemp("m") / "qwen", "tiny-qwen2", seed=4, shard_bytes=60_000)
    return load_model(str(folder), with_tokenizer=False)


def test_store_vocab_slices_read_only_those_entries(store_model):
    w = store_model.weights
    embed, head = w["embed"], w["lm_head"]  # [V, d], [d, V] read whole
    idx = np.array([5, 0, 511, 5, 300])
    np.testing.assert_array_equal(vocab_slice(w, "embed", idx), embed[idx])
    np.testing.assert_array_equal(vocab_slice(w, "embed", slice(100, 228)), embed[100:228])
    np.testing.assert_array_equal(vocab_slice(w, "lm_head", slice(7, 300)), head[:, 7:300])
    np.testing.assert_array_equal(vocab_slice(w, "lm_head", idx), head[:, idx])
    assert vocab_slice(w, "embed", idx).dtype == np.float32
    with pytest.raises(KeyError, match="not a vocabulary table"):
        vocab_slice(w, "norm", idx)


def test_fused_vocab_tables_equal_float64_products_in_any_slices(store_model, tmp_path):
    """Untie + fold + rotate as views: every slice of the tables and the assembled tables (in memory or written
    to a file slice by slice) equal the float64 products of the test (cast to float32), bit for bit, whatever
    the slicing."""
    cfg, w = store_model.config, store_model.weights
    folded = FoldedWeights(cfg, w)
    u = random_orthogonal(cfg.hidden_size, 3)
    view = rotated_residual(folded.untied_config, folded, u)
    norm = w["norm"].astype(np.float64)
    want_embed = (w["embed"].astype(np.float64) @ u).astype(np.float32)
    want_head = (u.T @ (norm[:, None] * w["lm_head"].astype(np.float64)).astype(np.float32).astype(np.float64))
    want_head = want_head.astype(np.float32)
    np.testing.assert_array_equal(view["embed"], want_embed)
    np.testing.assert_array_equal(view["lm_head"], want_head)
    np.testing.assert_array_equal(assemble_vocab(view.vocab_slice, "embed", cfg.vocab_size, chunk=37), want_embed)
    np.testing.assert_array_equal(assemble_vocab(view.vocab_slice, "lm_head", cfg.vocab_size, chunk=100), want_head)
    for name, want in (("embed", want_embed), ("lm_head", want_head)):
        table = assemble_vocab(view.vocab_slice, name, cfg.vocab_size, chunk=100, path=tmp_path / f"{name}.npy")
        assert isinstance(table, SpilledTable) and table.shape == want.shape and table.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(table), want)
        np.testing.assert_array_equal(vocab_slice({name: table}, name, [7, 1]), vocab_slice({name: want}, name, [7, 1]))
    idx = np.array([3, 3, 400, 0])
    np.testing.assert_array_equal(view.vocab_slice("embed", idx), want_embed[idx])


def test_code_store_spills_and_cleans_up():
    rng = np.random.default_rng(0)
    c = WeightCodes(q_low=rng.integers(-8, 8, (12, 5)).astype(np.int8), scale_low=rng.random((1, 5), np.float32),
                    q_high=rng.integers(-128, 128, (4, 5)).astype(np.int8), scale_high=None, low_bits=4,
                    high_bits=8)
    store = CodeStore.spilled()
    folder = store._folder
    store["layers.0.q"] = c
    store["embed"] = "kept in memory"
    assert set(store) == {"layers.0.q", "embed"} and store.nbytes_spilled() > 0
    back = store["layers.0.q"]
    for f in ("q_low", "scale_low", "q_high"):
        np.testing.assert_array_equal(getattr(back, f), getattr(c, f))
    assert back.scale_high is None and (back.low_bits, back.high_bits, back.group_size) == (4, 8, None)
    assert store["embed"] == "kept in memory"
    del store["layers.0.q"]
    assert "layers.0.q" not in store and not list(folder.glob("*.npy"))
    store["layers.1.q"] = c
    store.close()
    assert not folder.exists() and len(store) == 0


def _nll_whole(model, windows, hooks):
    """Mean next-token NLL per window from the whole model's logits, log-softmax in float64."""
    import jax.numpy as jnp

    logits = np.asarray(model(jnp.asarray(windows), hooks=hooks)[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1)[..., 0]
    return -picked.mean(-1)


def test_streamed_evaluation_equals_whole_model(store_model):
    """ResQ (RTN weights) from a store with spilled codes: layer-major streamed perplexity of the fake-quant
    view equals the whole-model Decoder's (to float rounding with float activations, within 4-bit rounding
    flips at W4A4KV4), so does the packed model's, and spilling changes no code."""
    cfg, w = store_model.config, store_model.weights
    rng = np.random.default_rng(1)
    calib = rng.integers(0, cfg.vocab_size, (8, 32))
    windows = rng.integers(0, cfg.vocab_size, (5, 24))  # 5 windows in batches of 2: a padded last batch
    qc = QuantConfig(method="resq", weight_quantizer="rtn", seed=0)
    spilled = quantize_model(cfg, w, qc, calib, progress=False, codes=CodeStore.spilled())
    memory = quantize_model(cfg, w, qc, calib, progress=False)
    assert spilled.codes.nbytes_spilled() > 0
    for k in memory.codes:
        a, b = memory.codes[k], spilled.codes[k]
        np.testing.assert_array_equal(np.asarray(a.q_low), b.q_low, err_msg=k)
        np.testing.assert_array_equal(np.asarray(a.scale_low), b.scale_low, err_msg=k)

    streamer = LayerStreamer.from_weights(spilled.config, spilled.weights)
    decoder = from_weights(spilled.config, dict(spilled.weights))
    # Quantized weights, float activations: the streamed program equals the whole model's to float rounding.
    float_acts = FakeQuantHooks(ActivationSpec())
    plain = perplexity(streamer, windows, batch_size=2, hooks=float_acts, progress=False).window_nll
    np.testing.assert_allclose(plain, _nll_whole(decoder, windows, float_acts), rtol=1e-5)
    # W4A4KV4: the per-layer programs and the whole-model program round differently in the last bit, which can
    # move a 4-bit activation across a rounding boundary, and one moved code shifts a window's mean NLL by
    # ~1e-3 (a CI machine moved 2 of 5 windows by 2e-4 and 5e-4 relative where this one moves none). Checked
    # here: the streamed program quantizes the activations (they move the NLL by 8e-3 on this random model)
    # and agrees with the whole model within that rounding; the sharp check of the streaming is the one above.
    streamed = perplexity(streamer, windows, batch_size=2, hooks=spilled.hooks, progress=False).window_nll
    assert np.abs(streamed / plain - 1).max() > 4e-3
    np.testing.assert_allclose(streamed, _nll_whole(decoder, windows, spilled.hooks), rtol=2e-3)

    pm = pack_model(spilled)
    packed = perplexity(packed_streamer(pm), windows, batch_size=2, hooks=pm.hooks, progress=False)
    np.testing.assert_allclose(packed.window_nll, _nll_whole(packed_decoder(pm), windows, pm.hooks), rtol=2e-3)
    # spilled codes: the float16 vocabulary tables are files in the same folder, equal to the in-memory pack's
    pm_memory = pack_model(memory)
    for name in ("embed", "lm_head"):
        table = pm.arrays[name]
        assert isinstance(table, SpilledTable) and table.path.parent == spilled.codes.folder
        assert (table.shape, table.dtype) == (pm_memory.arrays[name].shape, np.dtype(np.float16))
        np.testing.assert_array_equal(np.asarray(table), pm_memory.arrays[name])
        np.testing.assert_array_equal(vocab_slice(pm.arrays, name, [5, 0, 5]),
                                      vocab_slice(pm_memory.arrays, name, [5, 0, 5]))
    np.testing.assert_array_equal(
        packed.window_nll,
        perplexity(packed_streamer(pm_memory), windows, batch_size=2, hooks=pm.hooks, progress=False).window_nll)
    spilled.codes.close()
    assert not table.path.exists()
    float_ppl = perplexity(LayerStreamer.from_weights(cfg, w), windows, batch_size=2, progress=False)
    np.testing.assert_allclose(float_ppl.window_nll, _nll_whole(from_weights(cfg, dict(w)), windows, IDENTITY),
                               rtol=1e-5)


CHILD = r"""
import json, resource, sys
from resq_jax.cli.quantize import main
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def _peak_rss_mb(folder, out, tmp_path):
    args = ["--model", str(folder), "--method", "resq", "--calib-windows", "4", "--calib-seq-len", "128",
            "--eval-windows", "2", "--eval-seq-len", "128", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT, "RESQ_JAX_CACHE": os.environ.get("RESQ_JAX_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    res = subprocess.run([sys.executable, "-c", CHILD.format(), *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return info["maxrss_kb"] / 1024


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """scripts/quantize.py --method resq --out on a 2- and a 6-layer model with 86 MB float32 layers: the
    peak RSS differs by less than 150 MB (a run that held the float, fused or quantized model whole would
    grow by at least 4 x 86 = 344 MB), and the 6-layer checkpoint evaluates."""
    peaks = {}
    for layers in (2, 6):
        folder = write_random_model(tmp_path / f"m{layers}", "small-llama", layers=layers, seed=0)
        peaks[layers] = _peak_rss_mb(folder, tmp_path / f"ck{layers}", tmp_path)
    print("peak RSS (MB) by layer count:", peaks)
    assert abs(peaks[6] - peaks[2]) < 150, peaks
    assert (tmp_path / "ck6" / "meta.json").is_file()
    res = subprocess.run([sys.executable, "-m", "resq_jax.cli.evaluate", "--checkpoint", str(tmp_path / "ck6"),
                          "--eval-windows", "2", "--eval-seq-len", "64", "--quiet"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path, timeout=900)
    assert res.returncode == 0 and "resq" in res.stdout, res.stderr[-2000:]
