"""Real-model checks on SmolLM2-135M-Instruct (the embedded default) with real English text."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import transformers_gguf_perplexity
from resq_jax.calibration.statistics import calibrate
from resq_jax.data.texts import load_text
from resq_jax.data.windows import calib_windows, eval_windows, tokenize
from resq_jax.eval.generate import generate_greedy
from resq_jax.eval.perplexity import perplexity
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model
from resq_jax.pipeline.quantize import prepare, quantize_model
from resq_jax.pipeline.recipes import QuantConfig
from resq_jax.rotation.transforms import apply_transforms, resq_transforms

EVAL_WINDOWS, CALIB_WINDOWS, SEQ = 8, 16, 512


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def eval_set(smol):
    return eval_windows(tokenize(load_text("wiki-eval").text, smol.tokenizer), EVAL_WINDOWS, SEQ)


@pytest.fixture(scope="module")
def calib_set(smol):
    return calib_windows(tokenize(load_text("wiki-calib").text, smol.tokenizer), CALIB_WINDOWS, SEQ, seed=0)


@pytest.fixture(scope="module")
def fp_ppl(smol, eval_set):
    return perplexity(from_weights(smol.config, smol.weights), eval_set, progress=False).ppl


def test_perplexity_matches_transformers(smol, eval_set, fp_ppl):
    ref = transformers_gguf_perplexity(smol.source, eval_set)
    assert abs(fp_ppl / ref - 1) < 0.002, (fp_ppl, ref)
    assert 8 < fp_ppl < 30  # a working 135M model on Wikipedia text


def test_greedy_continuation_names_paris(smol):
    ids = smol.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    new = generate_greedy(from_weights(smol.config, smol.weights), ids, 8)
    assert "Paris" in smol.tokenizer.decode(new)


def test_resq_transforms_preserve_smollm2_logits(smol, calib_set):
    tokens = calib_set[:1, :64]
    ref = np.asarray(from_weights(smol.config, smol.weights)(jnp.asarray(tokens))[0])
    qc = QuantConfig(method="resq", w_bits=16, a_bits=16, kv_bits=16)
    cfg, w = prepare(smol.config, smol.weights, qc.recipe)
    stats = calibrate(from_weights(cfg, w), calib_set[:4, :128], progress=False)
    fused = apply_transforms(cfg, w, resq_transforms(cfg, stats, 0.125, seed=3))
    out = np.asarray(from_weights(cfg, fused)(jnp.asarray(tokens))[0])
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max() / 10)


def test_w4a4kv4_ordering(smol, eval_set, calib_set, fp_ppl):
    """ResQ beats QuaRot, which beats RTN (W4A4KV4, RTN weights), and all are worse than float."""
    ppl = {}
    stats = None
    for method in ("rtn", "quarot", "resq"):
        qm = quantize_model(smol.config, smol.weights, QuantConfig(method=method, weight_quantizer="rtn"), calib_set, stats=stats,
                            progress=False)
        stats = qm.stats or stats
        ppl[method] = perplexity(from_weights(qm.config, qm.weights), eval_set, hooks=qm.hooks, progress=False).ppl
    print("W4A4KV4 ppl", fp_ppl, ppl)
    assert fp_ppl < ppl["resq"] < ppl["quarot"] < ppl["rtn"]
    assert ppl["resq"] < 3 * fp_ppl
