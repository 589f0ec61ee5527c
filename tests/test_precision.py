"""Every float dot that numbers depend on carries precision HIGHEST in its jaxpr (resq_jax/util/precision.py).

On the CPU the flag changes nothing, so no numeric test here could catch a missing one; on Ampere/Hopper
GPUs a float32 dot without it runs in TF32. These tests read the traced programs instead: calibration's
sharded step, the GPTQ Hessian stages and accumulator, the decoder's forward and the evaluation loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.calibration import statistics as calibration
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import IDENTITY, from_weights
from resq_jax.models.loaders import expected_shapes
from resq_jax.models.rope import rope_tables
from resq_jax.models.streaming import LayerStreamer, head_nll
from resq_jax.quant import gptq
from resq_jax.quant import weights as wq

CFG = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_eps=1e-6, rope_theta=1e4, attention_bias=True)


def _weights():
    rng = np.random.default_rng(0)
    return {k: (np.ones(s) if k.endswith("norm") else 0.1 * rng.standard_normal(s)).astype(np.float32)
            for k, s in expected_shapes(CFG).items()}


def _dots(jaxpr) -> list:
    """Every dot_general equation of a (closed) jaxpr, sub-jaxprs (jit, shard_map, loops) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found += _dots(sub)
    return found


def _assert_highest(closed, what: str, min_dots: int):
    dots = _dots(closed)
    assert len(dots) >= min_dots, f"{what}: found {len(dots)} dots, expected at least {min_dots}"
    for eqn in dots:
        if all(jnp.issubdtype(v.aval.dtype, jnp.integer) for v in eqn.invars):
            continue  # integer GEMMs are exact at any precision
        prec = eqn.params["precision"]
        assert prec is not None and all(p == jax.lax.Precision.HIGHEST for p in prec), (what, prec, str(eqn)[:200])


def _layer_inputs(batch=2, t=5):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, t, CFG.hidden_size)), jnp.float32)
    cos, sin = rope_tables(np.asarray(LayerStreamer(from_weights(CFG, _weights())).inv_freq), np.arange(t))
    return x, (jnp.asarray(cos), jnp.asarray(sin)), jnp.arange(t)


def test_calibration_step_is_highest():
    model = from_weights(CFG, _weights())
    graphdef, state = nnx.split(model.layers[0])
    x, rope, pos = _layer_inputs()
    step = calibration._sharded_step(graphdef, IDENTITY, calibration.data_mesh(jax.local_devices()[:1]))
    with jax.enable_x64(True):  # as calibrate() runs it: statistics in float64
        closed = jax.make_jaxpr(step)(state, x, rope, pos)
    _assert_highest(closed, "calibration step", 13)  # 7 linears, q.k, p.v, four statistics


def test_hessian_stages_and_accumulator_are_highest():
    model = from_weights(CFG, _weights())
    graphdef, state = nnx.split(model.layers[0])
    x, rope, pos = _layer_inputs()
    a = jnp.zeros((x.shape[0], x.shape[1], CFG.num_heads, CFG.head_dim), jnp.float32)
    jx = jax.make_jaxpr
    _assert_highest(jx(functools.partial(wq._stage_attn_in, graphdef))(state, x, rope, pos), "attn_in Hessian", 4)
    _assert_highest(jx(functools.partial(wq._stage_o_in, graphdef))(state, x, rope, pos), "o_in Hessian", 6)
    _assert_highest(jx(functools.partial(wq._stage_mlp_in, graphdef))(state, x, a), "mlp_in Hessian", 4)
    _assert_highest(jx(functools.partial(wq._stage_down_in, graphdef))(state, x), "down_in Hessian", 3)
    h, n = gptq.hessian_init(CFG.hidden_size)
    _assert_highest(jx(gptq.hessian_update)(h, n, x), "hessian_update", 1)


def test_decoder_forward_and_evaluation_loss_are_highest():
    model = from_weights(CFG, _weights())
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    graphdef, state = nnx.split(model)
    _assert_highest(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens), "decoder forward", 10)
    st = LayerStreamer(model)
    hg, hs = st.head_parts
    x = jnp.zeros((2, 6, CFG.hidden_size), jnp.float32)
    _assert_highest(jax.make_jaxpr(functools.partial(head_nll, hg))(hs, x, tokens), "evaluation loss", 1)
