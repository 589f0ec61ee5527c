"""Packed-integer inference: the quantized model made real (docs/algorithms.md: Quantizers, Integer runtime arithmetic).

``pack_model(qm)`` turns a fake-quant ``pipeline.quantize.QuantizedModel`` into a ``PackedModel`` (integer
weight codes packed, scales, column sums); ``packed_decoder(pm)`` builds the ordinary
``models.decoder.Decoder`` whose seven linears per layer are ``PackedLinear`` modules, run with
``PackedHooks(pm.spec)`` and, for generation, the quantized K/V cache of
``init_packed_cache``.

A packed linear ``y = x @ w + bias``, ``x: [M, K]``, ``w: [K, N]``: K is cut in G groups of
K / G channels (G = 1 for q/k/v/gate/up/down; G = heads for o_proj, whose input is quantized per
(token, head)), each group in a low block (its first K/G - r channels) and a high block (its
last r). The activation codes come from ``formats.integer.quantize_mixed`` (the fake-quant numerics
exactly), shifted to the signed grid (``packing.signed_shift``); the weight codes are the
quantizer's own (``QuantizedModel.codes``). Per block b:

    acc_b[g, m, n] = sum_k xq_b[m, g, k] wq_b[g, k, n]        int8 x int8 -> int32 (lax.dot_general)
    c_b[g, m, n]   = acc_b - int32(z_b[m, g]) colsum_b[g, n]  int32, exactly sum_k (q - z) wq
    y[m, n]        = sum_b sum_g (s_b[m, g] sw_b[n]) float32(c_b[g, m, n]) + bias[n]

(one 2-D GEMM per group; the sums over g and b run in that order). Weights with at most 4 bits
are stored two per byte along K (packing.py: low nibble = even index) and unpacked to int8
inside the jitted graph; 5..8-bit blocks are int8. Column sums are derived from the codes when
a linear is built (``with_colsums``), not stored. This is the CPU path (XLA's integer dot; impl
"f32" computes the same integers with float32 GEMMs in chunks short enough to be exact); the
epilogue's order matches the mixed GEMM's reference (resq_jax.kernels.gemm_reference). ``integer_decoder`` runs a
fake-quant model this way, which is how scripts/quantize.py evaluates the integer recipes.
On an NVIDIA GPU (impl "auto" with jax_triton importable, or "triton") the linears with one
activation group per token and no low-rank term (q/k/v, gate/up, down) run the Triton
quantize-and-pack and mixed GEMM kernels on the same stored arrays instead; o_proj (per-head
groups) and L2QER's low-rank terms stay on XLA's integer dot.

An L2QER correction (``resq+l2qer``) adds Q(Q(x) A) B with int8 A [K, k] and B [k, N] (one
scale per column): t = sum_b s_b sA ((q_b - z_b) A_b) from the input's codes (A's rows split
like the weight's blocks), t quantized per token to ``lowrank_bits`` (the fake path's lowrank
site), then the integer product with B and its epilogue.

What stays as in the fake-quant model: embeddings and lm_head (stored in 16 bits, or as the
int8/int4 codes of resq_jax.quant.embeddings, computed in float32), RMSNorm, RoPE, Q, softmax and
P.V in float32. ResQ's int8 model of the online key
rotation (q/k fake-quantized to 8 bits per (token, head) at the q_rope/k_rope sites, times the
fake-quantized int8 rotation) is kept identical to the fake path: a float product of
dequantized values, so K's codes equal the fake path's. The K/V cache holds codes (low block
packed when <= 4 bits, high block int8, per (token, head) scale and zero of each block) and is
dequantized inside attention, which reproduces the fake-quant K/V exactly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import WeightCodes, dequantize_weight
from resq_jax.formats.packing import pack_int4_np, unpack_int4_np
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import Decoder, from_weights
from resq_jax.models.streaming import LayerStreamer
from resq_jax.models.views import LazyWeights, assemble_vocab, index_vocab, vocab_slice
from resq_jax.quant.embeddings import EmbeddingCodes, TableCodes
from resq_jax.quant.fake_quant import FakeQuantHooks
from resq_jax.quant.layouts import LINEARS, ActivationSpec, head_high_last_permutation
from resq_jax.runtime.linear import ActQuant, LinearLayout, PackedHooks, PackedLinear, pack_block_np

_F32 = jnp.float32


class PackError(ValueError):
    """A QuantizedModel the packed runtime cannot represent; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# the packed model
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackedModel:
    """A quantized model in packed form: everything the packed runtime and a checkpoint need.

    arrays:     flat {name: np.ndarray}: float ``embed`` / ``lm_head`` (16-bit), ``norm``,
                ``layers.{i}.attn_norm`` / ``mlp_norm`` / ``key_rotation`` (float32), and per linear
                ``layers.{i}.{name}.{w,scale,colsum}_{low,high}`` and ``.bias``
    layouts:    {linear name: LinearLayout}, the same in every layer
    spec:       the activation / KV quantizers (ActivationSpec)
    down_hadamard: size of the online down_proj Hadamard (0: none)
    qconfig:    the QuantConfig as a dict
    transforms: the recipe's projections (float32; residual [d, d], value [L, KV, hd, hd],
                key [L, hd, hd]) for inspection and reuse; the runtime does not need them
    embedding:  how the embeddings are stored: {"bits": 16} (float ``embed`` / ``lm_head``) or
                {"bits", "group", "head"} for resq_jax.quant.embeddings codes (embedding_arrays)
    weight_bits: average storage bits per decoder-linear weight (pipeline.quantize.weight_bits), what the
                results table reports; None when unknown (a checkpoint written before it was saved)
    """

    config: ModelConfig
    arrays: dict[str, np.ndarray]
    layouts: dict[str, LinearLayout]
    spec: ActivationSpec
    down_hadamard: int
    qconfig: dict
    transforms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embedding: dict = dataclasses.field(default_factory=lambda: {"bits": 16})
    weight_bits: float | None = None

    @property
    def hooks(self) -> PackedHooks:
        return PackedHooks(self.spec)

    def layer_arrays(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's arrays {``layers.{i}.…``: array} (computed or read for that layer only when ``arrays``
        is a PackedArrays)."""
        if isinstance(self.arrays, PackedArrays):
            return self.arrays.layer(i)
        prefix = f"layers.{i}."
        return {k: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def shared_arrays(self) -> dict[str, np.ndarray]:
        """The arrays outside the layers (embeddings, lm_head, final norm)."""
        return {k: self.arrays[k] for k in self.arrays if not k.startswith("layers.")}

    def linear_arrays(self, i: int, name: str) -> dict[str, np.ndarray]:
        prefix = f"layers.{i}.{name}."
        return {k[len(prefix):]: v for k, v in self.layer_arrays(i).items() if k.startswith(prefix)}


class PackedArrays(Mapping):
    """A packed model's flat {name: array} made one layer at a time: ``shared`` (embeddings, norm) in
    memory, ``make_layer(i)`` -> layer i's {``layers.{i}.…``: array} when one of them is read (packing
    that layer's codes, or reading it from a checkpoint), the last layer made kept until another is
    asked for. Every layer has the same entry names (layer 0's, made at construction)."""

    def __init__(self, shared: Mapping[str, np.ndarray], num_layers: int, make_layer):
        self._shared, self._n, self._make = dict(shared), num_layers, make_layer
        self._last: tuple[int, dict] | None = None
        self._suffixes = [k[len("layers.0."):] for k in self.layer(0)] if num_layers else []

    def layer(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(f"layer {i} of a {self._n}-layer model")
        if self._last is None or self._last[0] != i:
            self._last = None  # drop the previous layer before making the next
            self._last = (i, self._make(i))
        return self._last[1]

    def __iter__(self):
        yield from self._shared
        for i in range(self._n):
            for suffix in self._suffixes:
                yield f"layers.{i}.{suffix}"

    def __len__(self):
        return len(self._shared) + self._n * len(self._suffixes)

    def __contains__(self, key):
        if key in self._shared:
            return True
        parts = key.split(".", 2) if isinstance(key, str) else ()
        return (len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < self._n
                and parts[2] in self._suffixes)

    def __getitem__(self, key: str):
        if key in self._shared:
            return self._shared[key]
        if key not in self:
            raise KeyError(key)
        return self.layer(int(key.split(".")[1]))[key]


def _layouts(config: ModelConfig, spec: ActivationSpec, codes: Mapping[str, WeightCodes]) -> dict[str, LinearLayout]:
    hd, heads = config.head_dim, config.num_heads
    out = {}
    for name in LINEARS:
        c = codes[f"layers.0.{name}"]
        d_in, d_out = c.q_low.shape[0] + c.q_high.shape[0], c.q_low.shape[1]
        if name == "o":
            groups, act = heads, ActQuant(spec.a_bits, spec.high_bits, spec.high_head, hd)
        elif name == "down":
            groups, act = 1, ActQuant(spec.down_bits, OFF, 0)
        else:
            groups, act = 1, ActQuant(spec.a_bits, spec.high_bits, spec.high_residual)
        high_rows = c.q_high.shape[0] // groups
        if c.q_high.shape[0] != groups * act.high:
            raise PackError(f"{name}: the weights have {c.q_high.shape[0]} high rows for {groups} group(s), the "
                            f"activations {act.high} high channels per group: quantize weights and activations "
                            "with the same --high-fraction")
        lr = codes.get(f"layers.0.{name}_lr_a")
        rank = 0 if lr is None else lr.q_low.shape[1]
        if rank and spec.lowrank_bits >= OFF:
            raise PackError(f"{name}: a low-rank correction whose x @ A is not quantized (lowrank_bits "
                            f"{spec.lowrank_bits}); the packed runtime needs integer activations")
        out[name] = LinearLayout(d_in=d_in, d_out=d_out, groups=groups, low_rows=d_in // groups - high_rows,
                                 high_rows=high_rows, w_low_bits=c.low_bits, w_high_bits=c.high_bits, act=act,
                                 rank=rank, lowrank_bits=spec.lowrank_bits if rank else 8)
    return out


def check_packable_config(qc) -> None:
    """Raise PackError, before any work, when a pipeline.recipes.QuantConfig gives a model the packed
    runtime cannot represent (pack_model checks the model itself again)."""
    recipe = qc.recipe
    if not recipe.quantize or qc.w_bits >= OFF:
        raise PackError(f"method {qc.method!r} with w_bits={qc.w_bits} leaves the weights in float: nothing to pack")
    if getattr(recipe, "formats", "int") != "int":
        raise PackError(f"method {qc.method!r} uses MXINT formats; the packed runtime runs the integer recipes "
                        "(rtn, gptq, quarot, resq, resq+l2qer) only")
    if qc.a_bits >= OFF or (qc.fraction > 0 and qc.high_bits >= OFF):
        raise PackError(f"the packed runtime needs integer activations (a_bits={qc.a_bits}, "
                        f"high_bits={qc.high_bits}); use --a-bits and --high-bits in 2..8")


def _check_packable(qm) -> ActivationSpec:
    hooks = qm.hooks
    if type(hooks) is not FakeQuantHooks:
        raise PackError(f"method {qm.qconfig.method!r} uses {type(hooks).__name__}; the packed runtime runs the "
                        "integer recipes (rtn, gptq, quarot, resq, resq+l2qer) only")
    spec = hooks.spec
    missing = [k for k in qm.weights if k.endswith(("_lr_a", "_lr_b")) and k not in qm.codes]
    if missing:
        raise PackError(f"{missing[0]}: a low-rank correction without integer codes (A and B must be quantized "
                        "to int8, as resq+l2qer does); evaluate it with fake quantization")
    if not qm.codes:
        raise PackError("the model's weights are not quantized (w_bits 16 or method 'none'): nothing to pack")
    bad = [f"{n}={getattr(spec, n)}" for n in ("a_bits", "down_bits") if getattr(spec, n) >= OFF]
    if spec.high_residual or spec.high_head:
        bad += [f"high_bits={spec.high_bits}"] if spec.high_bits >= OFF else []
    if bad:
        raise PackError(f"the packed runtime needs integer activations: {', '.join(bad)}; quantize with "
                        "--a-bits and --high-bits in 2..8")
    return spec


def _row_perm(config: ModelConfig, lay: LinearLayout, key: str) -> np.ndarray | None:
    """The stored row order of linear ``key`` (``layers.{i}.{name}``): o_proj with high rows has
    every head's high rows last (quant.layouts.head_high_last_permutation); None for the others."""
    if key.endswith(".o") and lay.high_rows:
        return head_high_last_permutation(config.num_heads, config.head_dim, lay.high_rows)
    return None


def _linear_codes(config: ModelConfig, lay: LinearLayout, codes: WeightCodes, w_fake: np.ndarray, key: str,
                  bias: np.ndarray | None) -> dict[str, np.ndarray]:
    """Pack one linear's WeightCodes (rows in linear_high_rows order) after checking that they are
    the codes of the fake-quant weights ``w_fake: [d_in, d_out]``."""
    if codes.group_size is not None:
        raise PackError(f"{key}: weights quantized with group_size={codes.group_size}; the packed runtime has "
                        "one scale per output column and block")
    deq = np.asarray(dequantize_weight(codes))
    perm = _row_perm(config, lay, key)
    if not np.array_equal(deq, w_fake if perm is None else w_fake[perm]):
        raise PackError(f"{key}: the weight codes do not dequantize to the model's weights (were the weights "
                        "changed after quantization?); re-run quantize_model")
    g, n = lay.groups, lay.d_out
    out = {}
    for b, q, scale in (("low", codes.q_low, codes.scale_low), ("high", codes.q_high, codes.scale_high)):
        if lay.rows(b) == 0:
            continue
        q = np.asarray(q, np.int8).reshape(g, lay.rows(b), n)
        out[f"w_{b}"] = pack_block_np(q, lay.bits(b))
        out[f"scale_{b}"] = np.asarray(scale, np.float32).reshape(n)
    if bias is not None:
        out["bias"] = np.asarray(bias, np.float32)
    return out


def _lowrank_codes(lay: LinearLayout, perm: np.ndarray | None, a: WeightCodes, b: WeightCodes,
                   a_fake: np.ndarray, b_fake: np.ndarray, key: str) -> dict[str, np.ndarray]:
    """Int8 arrays of a linear's low-rank correction (PackedLinear's ``lr_*``): A [d_in, k] in
    the rows order and blocks of the weight (``perm``: o_proj's head layout), B [k, d_out]."""
    for c, fake, what in ((a, a_fake, "A"), (b, b_fake, "B")):
        if c.q_high.shape[0] or c.group_size is not None or c.low_bits > 8:
            raise PackError(f"{key}: the low-rank {what} must be int8 codes with one scale per column")
        if not np.array_equal(np.asarray(dequantize_weight(c)), fake):
            raise PackError(f"{key}: the low-rank {what} codes do not dequantize to the model's matrix; "
                            "re-run quantize_model")
    qa = np.asarray(a.q_low, np.int8)
    qa = qa if perm is None else qa[perm]
    g, k = lay.groups, qa.shape[1]
    n_low = g * lay.low_rows
    out = {"lr_a_scale": np.asarray(a.scale_low, np.float32).reshape(k)}
    for blk, rows in (("low", qa[:n_low]), ("high", qa[n_low:])):
        if lay.rows(blk):
            out[f"lr_a_{blk}"] = rows.reshape(g, lay.rows(blk), k)
    out.update(lr_b=np.asarray(b.q_low, np.int8)[None], lr_b_scale=np.asarray(b.scale_low, np.float32).reshape(-1))
    return out


def embedding_arrays(emb) -> dict[str, np.ndarray]:
    """Stored arrays of resq_jax.quant.embeddings.EmbeddingCodes: ``embed.q`` (int8 codes [V, d], two
    per byte along d at <= 4 bits), ``embed.scale`` (float16 [V, d / group]), the same for
    ``lm_head`` (codes of lm_head^T) of an untied model, ``head_basis`` [d, d] / ``head_gain`` [d]
    (float32) of a tied model whose head is derived from the table."""
    out = {}
    for name, c in (("embed", emb.table), ("lm_head", emb.head)):
        if c is not None:
            out[f"{name}.q"] = pack_int4_np(c.q, axis=1) if c.bits <= 4 else c.q
            out[f"{name}.scale"] = c.scale
    if emb.gain is not None:
        out["head_gain"] = emb.gain
        if emb.basis is not None:
            out["head_basis"] = emb.basis
    return out


def embedding_codes(arrays: Mapping[str, np.ndarray], embedding: Mapping):
    """The inverse of embedding_arrays: EmbeddingCodes from stored arrays and their description."""
    bits = int(embedding["bits"])

    def table(name):
        if f"{name}.q" not in arrays:
            return None
        q = np.asarray(arrays[f"{name}.q"])
        return TableCodes(q=unpack_int4_np(q, axis=1) if bits <= 4 else q, scale=np.asarray(arrays[f"{name}.scale"]),
                          bits=bits)

    return EmbeddingCodes(table=table("embed"), head=table("lm_head"), basis=arrays.get("head_basis"),
                          gain=arrays.get("head_gain"))


def pack_model(qm, embed_dtype=np.float16) -> PackedModel:
    """A fake-quant pipeline.quantize.QuantizedModel -> PackedModel (integer recipes, weights quantized,
    integer activations; see PackError). Quantized embeddings (QuantConfig.embed_bits < 16) are
    stored as their codes (embedding_arrays); float ones in ``embed_dtype`` (16 bits, docs/algorithms.md,
    What stays in float; np.float32 keeps the fake path's values exactly), made slice by slice.

    The layers are packed when they are read (``PackedArrays``): one layer's codes and packed arrays are
    in memory at a time, so packing, evaluating and saving a model the host cannot hold whole works. When
    ``qm.codes`` spills to a folder (``CodeStore.spilled``), the 16-bit embed / lm_head are written there too
    and read slice by slice (``models.views.SpilledTable``)."""
    spec = _check_packable(qm)
    config, w = qm.config, qm.weights
    layouts = _layouts(config, spec, qm.codes)
    shared: dict[str, np.ndarray] = {"norm": np.asarray(w["norm"], np.float32)}
    emb = qm.codes.get("embed")
    # codes spilled to a folder (CodeStore.spilled): the 16-bit vocabulary tables go there too (SpilledTable)
    folder = getattr(qm.codes, "folder", None)
    if emb is None:
        for name in ("embed", "lm_head"):
            if name in w:
                shared[name] = assemble_vocab(lambda n, sl: vocab_slice(w, n, sl), name, config.vocab_size,
                                              dtype=embed_dtype,
                                              path=None if folder is None else folder / f"{name}.table.npy")
        embedding = {"bits": 16}
    else:
        shared.update(embedding_arrays(emb))
        embedding = {"bits": emb.bits, "group": emb.table.group, "head": emb.head_kind}
    hadamard = {int(w.get(f"layers.{i}.down_hadamard", 0) or 0) for i in range(config.num_layers)}
    if len(hadamard) != 1:
        raise PackError(f"layers disagree on the down_proj Hadamard size ({sorted(hadamard)})")
    transforms = {k: np.asarray(v, np.float32) for k, v in dataclasses.asdict(qm.transforms).items()
                  if isinstance(v, np.ndarray)}
    arrays = PackedArrays(shared, config.num_layers, lambda i: _pack_layer(qm, layouts, i))
    return PackedModel(config=config, arrays=arrays, layouts=layouts, spec=spec, down_hadamard=hadamard.pop(),
                       qconfig=qm.qconfig.to_dict(), transforms=transforms, embedding=embedding,
                       weight_bits=qm.details.get("weight_bits"))


def _pack_layer(qm, layouts: Mapping[str, LinearLayout], i: int) -> dict[str, np.ndarray]:
    """Layer i of a QuantizedModel packed: norms, key rotation, every linear's packed codes."""
    config, w = qm.config, qm.weights
    p = f"layers.{i}."
    arrays = {}
    for k in ("attn_norm", "mlp_norm", "key_rotation"):
        if p + k in w:
            arrays[p + k] = np.asarray(w[p + k], np.float32)
    for name in LINEARS:
        key = p + name
        lay = layouts[name]
        packed = _linear_codes(config, lay, qm.codes[key], np.asarray(w[key], np.float32), key,
                               w.get(key + "_bias"))
        if lay.rank:
            packed.update(_lowrank_codes(lay, _row_perm(config, lay, key), qm.codes[key + "_lr_a"],
                                         qm.codes[key + "_lr_b"], np.asarray(w[key + "_lr_a"], np.float32),
                                         np.asarray(w[key + "_lr_b"], np.float32), key))
        arrays.update({f"{key}.{f}": a for f, a in packed.items()})
    return arrays


def packed_weights(pm: PackedModel, impl: str = "auto") -> LazyWeights:
    """The weights mapping of a PackedModel for models.decoder (a view, made on access): float params in
    float32 (``embed`` / ``lm_head`` from their 16-bit or quantized tables), and per layer the seven
    linears as ``PackedLinear`` modules of that layer's packed arrays. ``impl`` selects their GEMM
    (PackedLinear): "auto" (Triton kernels on an NVIDIA GPU, XLA elsewhere), "jnp" (XLA's integer dot
    everywhere), "triton", or "f32" (float32 dots of the integer codes in exact chunks: the same int32
    accumulators, hence bit-identical outputs to "jnp")."""
    config = pm.config
    emb = embedding_codes(pm.arrays, pm.embedding) if pm.embedding["bits"] < OFF else None
    keys = [k for k in ("embed", "lm_head", "norm") if k in pm.arrays]
    if emb is not None:
        keys = ["embed", "norm"] + (["lm_head"] if emb.head_kind != "tied" else [])
    for i in range(config.num_layers):
        p = f"layers.{i}."
        keys += [p + k for k in ("attn_norm", "mlp_norm", "key_rotation") if p + k in pm.arrays]
        keys += [p + name for name in LINEARS] + ([p + "down_hadamard"] if pm.down_hadamard else [])

    @functools.cache
    def decoded(name):  # quantized tables dequantized once per view (a device table reads them slice by slice)
        return emb.embed() if name == "embed" else emb.lm_head(decoded("embed"))

    def table(name):
        return np.asarray(pm.arrays[name], np.float32) if emb is None else decoded(name)

    def entry(key):
        if key in ("embed", "lm_head"):
            return table(key)
        if key == "norm":
            return np.asarray(pm.arrays[key], np.float32)
        _, i, name = key.split(".", 2)
        if name == "down_hadamard":
            return pm.down_hadamard
        if name in LINEARS:
            return PackedLinear(pm.layouts[name], pm.linear_arrays(int(i), name), impl)
        return np.asarray(pm.arrays[key], np.float32)

    def vocab(name, index):
        if emb is None:
            return np.asarray(index_vocab(name, pm.arrays[name], index), np.float32)
        return index_vocab(name, table(name), index)

    def dtypes(name):  # 16-bit float tables are exact in their dtype; dequantized codes are float32
        return pm.arrays[name].dtype if emb is None else np.float32

    return LazyWeights(dict.fromkeys(keys), entry, vocab=vocab, dtypes=dtypes)


def packed_streamer(pm: PackedModel, impl: str = "auto") -> LayerStreamer:
    """A LayerStreamer over ``packed_weights(pm, impl)``: each layer's PackedLinears are built when the
    layer runs, so a packed model evaluates with one layer on the device (run it with ``pm.hooks``)."""
    return LayerStreamer.from_weights(pm.config, packed_weights(pm, impl))


def packed_decoder(pm: PackedModel, impl: str = "auto") -> Decoder:
    """The whole models.decoder.Decoder of a PackedModel (``packed_weights``); run it with ``pm.hooks``
    (and ``init_packed_cache`` for generation)."""
    return from_weights(pm.config, dict(packed_weights(pm, impl)))


def integer_decoder(qm, impl: str = "auto") -> tuple[Decoder, PackedHooks] | None:
    """(decoder, hooks) that evaluate a fake-quant pipeline.quantize.QuantizedModel with the packed
    runtime's integer arithmetic, or None when the packed runtime cannot represent it (PackError:
    float weights or activations, MXINT recipes).

    Why: a W4A4 model's perplexity is not continuous at float-rounding scale. The classic fake
    path (dequantized activations times dequantized weights, float32 GEMMs) rounds differently
    for every batch shape and CPU, and a one-ulp change moves later 4-bit codes across rounding
    ties, so it reproduces itself only to about 0.5% (SmolLM2: -0.75% between batch 4 and 8).
    The integer products here are exact and the float epilogue is the packed runtime's (``impl``
    as in packed_decoder: "auto" picks what the packed runtime runs on this platform; on CPU
    "jnp" and "f32" give the same integers, hence identical outputs), and the model is the one
    pack_model stores (embeddings and lm_head in float16, docs/algorithms.md, What stays in float, or the
    quantized tables of ``embed_bits`` < 16), so the perplexity is the packed checkpoint's."""
    pm, _ = try_pack(qm)
    return None if pm is None else (packed_decoder(pm, impl), pm.hooks)


def try_pack(qm) -> tuple[PackedModel | None, str]:
    """(pack_model(qm), "") or, when the packed runtime cannot represent the model, (None, why): the
    PackError's message, for the caller to tell the user which evaluation path runs instead."""
    try:
        return pack_model(qm), ""
    except PackError as e:
        return None, str(e)
