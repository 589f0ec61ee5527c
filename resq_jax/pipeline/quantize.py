"""The quantize orchestration: prepare -> calibrate -> transforms -> fuse -> quantize weights ->
embeddings, for one recipe, streaming the model layer by layer where a stage allows it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

import numpy as np

from resq_jax.calibration.statistics import CalibrationStats, calibrate
from resq_jax.formats.bits import OFF
from resq_jax.models.config import ModelConfig
from resq_jax.models.streaming import LayerStreamer
from resq_jax.pipeline.recipes import LOWRANK_BITS, QuantConfig, QuantConfigError, Recipe, uses_gptq
from resq_jax.quant.code_store import CodeStore
from resq_jax.quant.embeddings import EmbeddingConfigError, check_embed_settings, quantize_embeddings
from resq_jax.quant.fake_quant import FakeQuantHooks, fake_quantize_key_rotation
from resq_jax.quant.layouts import ActivationSpec, WeightSpec
from resq_jax.quant.lqer import int_lowrank_codes, lqer_quantize_weights
from resq_jax.quant.weights import gptq_weights_codes, rtn_weights_codes
from resq_jax.rotation import fusion
from resq_jax.rotation.transforms import Transforms, apply_transforms, quarot_transforms, resq_transforms
from resq_jax.transforms.hadamard import hadamard_factor
from resq_jax.transforms.pca import high_rank
from resq_jax.util.files import write_json_atomic


@dataclasses.dataclass
class QuantizedModel:
    config: ModelConfig
    weights: dict[str, np.ndarray]
    hooks: FakeQuantHooks
    qconfig: QuantConfig
    transforms: Transforms
    seconds: dict[str, float]
    stats: CalibrationStats | None = None
    details: dict = dataclasses.field(default_factory=dict)  # e.g. GPTQ seconds per layer
    # the weight quantizer's integer codes: {"layers.{i}.{name}": WeightCodes}, rows in
    # quant.layouts.linear_high_rows order (what resq_jax.runtime.pack.pack_model packs), and "embed" for
    # quantized embeddings; a CodeStore (in memory or spilled to files); empty if unquantized
    codes: MutableMapping = dataclasses.field(default_factory=dict)


def activation_spec(config: ModelConfig, qc: QuantConfig) -> ActivationSpec:
    """Activation/KV quantizers; q/k are modeled in int8 around the online key rotation only
    when the recipe has one and activations or KV are quantized at all."""
    r = high_rank(config.hidden_size, qc.fraction)
    r_h = high_rank(config.head_dim, qc.fraction)
    quantizing = min(qc.a_bits, qc.kv_bits) < OFF
    return ActivationSpec(a_bits=qc.a_bits, kv_bits=qc.kv_bits, down_bits=qc.a_bits, high_bits=qc.high_bits,
                          high_residual=r, high_head=r_h,
                          lowrank_bits=LOWRANK_BITS if qc.rank_used and qc.a_bits < OFF else OFF,
                          qk_bits=qc.recipe.qk_bits if qc.recipe.key != "none" and quantizing else OFF)


def weight_spec(config: ModelConfig, qc: QuantConfig) -> WeightSpec:
    return WeightSpec(w_bits=qc.w_bits, high_bits=qc.high_bits,
                      high_residual=high_rank(config.hidden_size, qc.fraction),
                      high_head=high_rank(config.head_dim, qc.fraction), clip_search=qc.clip_search)


def check_hadamard_sizes(config: ModelConfig, recipe: Recipe):
    """Fail before any work when a needed Hadamard size has no construction."""
    sizes = []
    if recipe.down_hadamard:
        sizes.append(config.intermediate_size)
    if recipe.residual == "random_hadamard":
        sizes.append(config.hidden_size)
    if "hadamard" in (recipe.value, recipe.key):
        sizes.append(config.head_dim)
    for n in sizes:
        hadamard_factor(n)


def _int_lowrank(config: ModelConfig, w_float: Mapping[str, np.ndarray], w_q: Mapping[str, np.ndarray],
                 qc: QuantConfig, calib_windows: np.ndarray, progress: bool, seconds: dict) -> tuple[dict, dict]:
    """L2QER correction of integer-quantized (e.g. ResQ) weights: the scale comes from the
    activation magnitudes of the transformed float model (a second calibration pass), the
    error is against the transformed float weights; A, B are int8. Returns (weights with the
    ``_lr_a`` / ``_lr_b`` matrices, their WeightCodes)."""
    t0 = time.perf_counter()
    abs_mean = None
    if qc.recipe.lowrank == "l2qer":
        abs_mean = calibrate(LayerStreamer.from_weights(config, w_float), calib_windows, progress=progress).abs_mean
    seconds["calibrate"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = int_lowrank_codes(config, w_float, w_q, qc.rank_used, abs_mean, bits=LOWRANK_BITS)
    seconds["quantize"] += time.perf_counter() - t0
    return out


def cayley_config(qc: QuantConfig):
    """The training settings of ``qc``'s learned rotations (learn.train.CayleyConfig)."""
    from resq_jax.learn.train import CayleyConfig

    return CayleyConfig(steps=qc.cayley_steps_used, lr=qc.cayley_lr_used, batch_size=qc.cayley_batch_used, seed=qc.seed,
                        dtype=qc.cayley_dtype_used, micro_batch=qc.cayley_micro_batch, loss=qc.cayley_loss_used,
                        momentum=qc.cayley_momentum_used, clip=qc.cayley_clip_used or None)


# The training settings that earlier versions had no choice of, at the value they used: a fingerprint leaves
# them out at that value, so those versions' checkpoints resume.
EARLIER_TRAINING = {"cayley_loss": "ce", "cayley_momentum": 0.9, "cayley_clip": 0.0}


def training_fingerprint(config: ModelConfig | None, qc: QuantConfig, windows: np.ndarray | None = None) -> dict:
    """What a learned-rotation training depends on: the source model (when given), the recipe's settings and (when
    given) the calibration windows' SHA-256 (the settings say which of them train); a resumed run must match its
    checkpoint's. The micro-batch is left out: it changes the memory of a step, not the training, so a run may
    resume with another. The loss, the momentum and the clip are left out at the only settings of earlier versions
    (the cross-entropy, 0.9, no clipping), so their checkpoints still resume with those."""
    settings = qc.to_dict()
    settings.pop("cayley_micro_batch", None)
    for name, old in EARLIER_TRAINING.items():
        if name in settings and settings[name] == old:
            settings.pop(name)
    out = {"qconfig": settings} if config is None else {"model": config.to_dict(), "qconfig": settings}
    if windows is not None:
        out["windows_sha256"] = hashlib.sha256(np.ascontiguousarray(windows, np.int64).tobytes()).hexdigest()
    return out


def check_training_folder(folder, fingerprint: dict, *, write: bool) -> None:
    """Refuse a --cayley-checkpoint folder holding another training (its fingerprint.json differs from
    ``fingerprint`` in any key both have); with ``write``, record ``fingerprint`` there."""
    folder = Path(folder)
    path = folder / "fingerprint.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        diff = [k for k in fingerprint if k in old and old[k] != fingerprint[k]] if old else ["fingerprint.json"]
        if diff:
            raise QuantConfigError(f"--cayley-checkpoint {folder.parent}: {folder.name}/ holds a training of other "
                                   f"settings ({', '.join(diff)} differ); give another folder or delete it")
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, fingerprint)


def _learned(config: ModelConfig, w: Mapping[str, np.ndarray], transforms: Transforms, qc: QuantConfig,
             calib_windows: np.ndarray | None, progress: bool, log: Callable[[str], None], seconds: dict,
             details: dict, folder: Path | None = None) -> Transforms:
    """The recipe's transforms refined by Cayley SGD on the calibration windows (resq_jax.learn.refine); with
    ``folder`` the training checkpoints there and resumes from there."""
    from resq_jax.learn.refine import refine

    if calib_windows is None:
        raise QuantConfigError(f"method {qc.method!r} learns its rotations and needs calibration windows")
    windows = calib_windows if qc.cayley_windows is None else calib_windows[:qc.cayley_windows]
    if len(windows) < qc.cayley_batch_used:
        raise QuantConfigError(f"learning the rotations needs at least --cayley-batch {qc.cayley_batch_used} "
                               f"calibration windows, got {len(windows)}")
    t0 = time.perf_counter()
    rtn = dataclasses.replace(weight_spec(config, qc), clip_search=False) if qc.cayley_weights == "rtn" else None
    refined, result = refine(config, w, transforms, activation_spec(config, qc), windows, cayley_config(qc),
                             progress=f"cayley {qc.method}" if progress else False, weight_spec=rtn,
                             checkpoint_dir=folder)
    if result.resumed_from:
        log(f"{qc.method}: rotation training resumed from step {result.resumed_from} ({folder})")
    seconds["train"] = time.perf_counter() - t0
    details["cayley"] = {"steps": len(result.losses), "windows": len(windows), "seq_len": int(windows.shape[1]),
                         "weights": qc.cayley_weights_used, "loss": qc.cayley_loss_used,
                         "momentum": qc.cayley_momentum_used, "clip": qc.cayley_clip_used,
                         "dtype": qc.cayley_dtype_used,
                         "micro_batch": qc.cayley_micro_batch_used, "resumed_from": result.resumed_from,
                         "losses": [float(x) for x in result.losses], "seconds": result.seconds,
                         "window_losses": {"start": [float(x) for x in result.start_window_losses],
                                           "end": [float(x) for x in result.end_window_losses]}}
    change, se = result.loss_change()
    details["cayley"]["loss_change"] = {"mean": change, "se": se if np.isfinite(se) else None}  # None: one window
    log(f"{qc.method}: rotations trained {len(result.losses)} steps in {result.seconds:.0f}s, step loss "
        f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; on the {len(windows)} training windows "
        f"{np.mean(result.start_window_losses):.4f} -> {np.mean(result.end_window_losses):.4f} "
        f"({change:+.4f} nats, se {se:.4f})")
    return refined


def check_rank(config: ModelConfig, qc: QuantConfig):
    """Fail before any work when the low-rank correction's rank exceeds a linear's min(d_in, d_out)."""
    k = qc.rank_used
    limit = min(config.hidden_size, config.kv_size, config.q_size, config.intermediate_size)
    if k > limit:
        raise QuantConfigError(f"--rank {k} is larger than min(d_in, d_out) = {limit} of this model's smallest "
                               f"linear (k/v: [{config.hidden_size}, {config.kv_size}]); use --rank <= {limit}")


def check_embed_quantization(config: ModelConfig, qc: QuantConfig) -> int:
    """The embedding tables' group size when ``qc`` quantizes them (0: kept in float); fails
    before any work for a group that does not divide the hidden size or a float-weight method."""
    if qc.embed_bits >= OFF:
        return 0
    if not qc.recipe.quantize:
        raise QuantConfigError(f"method {qc.method!r} leaves the model in float; --embed-bits applies to the "
                               "quantizing methods")
    try:
        return check_embed_settings(qc.embed_bits, qc.embed_group, config.hidden_size)
    except EmbeddingConfigError as e:
        raise QuantConfigError(str(e)) from None


def weight_bits(config: ModelConfig, qc: QuantConfig) -> float:
    """Average storage bits per decoder-linear weight, the low-rank correction included
    (scales and exponents included for MXINT: 8 bits per block of 16); 16 when unquantized."""
    d, ffn, q, kv, hd = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size, config.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ffn), (d, ffn), (ffn, d)]
    n = sum(a * b for a, b in shapes)
    if not qc.recipe.quantize or qc.w_bits >= OFF:
        return 16.0
    if qc.recipe.formats == "mxint":
        spec = qc.lqer_spec()
        per = spec.w_bits + (8.0 / spec.block if spec.w_format == "mxint" else 16.0 / (spec.group_size or 1e9))
        lowrank_bits = spec.lowrank_width + 8.0 / spec.block
        base = per * n
    else:
        r, r_h = high_rank(d, qc.fraction), high_rank(hd, qc.fraction)
        high_rows = {0: r, 1: r, 2: r, 3: config.num_heads * r_h, 4: r, 5: r, 6: 0}
        base = sum((a - high_rows[i]) * b * qc.w_bits + high_rows[i] * b * qc.high_bits
                   for i, (a, b) in enumerate(shapes))
        lowrank_bits = LOWRANK_BITS
    base += qc.rank_used * sum(a + b for a, b in shapes) * lowrank_bits
    return base / n


def prepare(config: ModelConfig, weights: Mapping[str, np.ndarray],
            recipe: Recipe) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    """Untie and fold norms when the recipe rotates the residual stream: a view computed per
    entry on access (``fusion.FoldedWeights``), so calibration streams the folded layers
    without a second copy of the model; ``apply_transforms`` materializes it."""
    if not recipe.fold_norms:
        return config, weights
    view = fusion.FoldedWeights(config, weights)
    return view.untied_config, view


def quantize_model(config: ModelConfig, weights: Mapping[str, np.ndarray], qc: QuantConfig,
                   calib_windows: np.ndarray | None = None, *, stats: CalibrationStats | None = None,
                   progress: bool = True, log: Callable[[str], None] = lambda s: None,
                   codes: MutableMapping | None = None, cayley_dir: str | None = None) -> QuantizedModel:
    """The whole pipeline for one recipe: prepare -> calibrate -> transforms -> fuse -> quantize.

    Every stage works layer by layer from ``weights`` (a dict, a models.store.WeightStore or a view):
    the returned weights are a view (fusion, then dequantized codes) computed on access, and the codes
    go to ``codes`` (default a CodeStore in memory; ``CodeStore.spilled()`` keeps them in files), so the
    float, fused and quantized models never exist whole in memory (the integer recipes; the MXINT ones
    still build their weights dict)."""
    recipe = qc.recipe
    check_hadamard_sizes(config, recipe)
    check_rank(config, qc)
    embed_group = check_embed_quantization(config, qc)
    source_config, source_weights = config, weights
    folder = None  # the rotation training's checkpoints
    if cayley_dir is not None and qc.cayley_steps_used:
        folder = Path(cayley_dir) / qc.method
        check_training_folder(folder, training_fingerprint(config, qc, calib_windows), write=True)
    seconds = {"calibrate": 0.0, "projections": 0.0, "train": 0.0, "fuse": 0.0, "quantize": 0.0}
    details: dict = {}
    codes = CodeStore() if codes is None else codes
    config, w = prepare(config, weights, recipe)
    transforms = Transforms()
    if calib_windows is None and ((recipe.needs_calibration and stats is None) or uses_gptq(qc)):
        raise QuantConfigError(f"method {qc.method!r} needs calibration windows")
    if recipe.needs_calibration and stats is None:
        t0 = time.perf_counter()
        stats = calibrate(LayerStreamer.from_weights(config, w), calib_windows, progress=progress)
        seconds["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if recipe.residual == "pca":
        transforms = resq_transforms(config, stats, qc.fraction, qc.seed)
    elif recipe.residual == "random_hadamard":
        transforms = quarot_transforms(config, qc.seed)
    seconds["projections"] = time.perf_counter() - t0
    if qc.cayley_steps_used:
        transforms = _learned(config, w, transforms, qc, calib_windows, progress, log, seconds, details, folder)
    t0 = time.perf_counter()
    w = apply_transforms(config, w, transforms)
    seconds["fuse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if recipe.formats == "mxint":
        spec = qc.lqer_spec()
        hooks = spec.hooks()
        w = lqer_quantize_weights(config, w, spec, stats.abs_mean if spec.scaled and spec.rank else None)
        seconds["quantize"] = time.perf_counter() - t0
    else:
        hooks = FakeQuantHooks(activation_spec(config, qc)) if recipe.quantize else FakeQuantHooks(ActivationSpec())
        w_float = w
        if recipe.quantize:
            if uses_gptq(qc):
                qw = gptq_weights_codes(config, w, calib_windows, weight_spec(config, qc), act_order=qc.act_order,
                                        damp=qc.damp, progress=progress, timings=details, codes=codes)
            else:
                qw = rtn_weights_codes(config, w, weight_spec(config, qc), codes=codes, progress=progress)
            w = qw.weights
            if hooks.spec.qk_bits < OFF and transforms.key is not None:
                w = fake_quantize_key_rotation(w, config.num_layers, hooks.spec.qk_bits)
        seconds["quantize"] = time.perf_counter() - t0
        if recipe.quantize and qc.rank_used:
            w, lr_codes = _int_lowrank(config, w_float, w, qc, calib_windows, progress, seconds)
            codes.update(lr_codes)
    if embed_group:
        tied = source_config.tie_word_embeddings and "lm_head" in w  # untied + folded here: derive the head
        w, codes["embed"] = quantize_embeddings(w, qc.embed_bits, embed_group,
                                                tied_gain=np.asarray(source_weights["norm"]) if tied else None,
                                                basis=transforms.residual, clip_search=qc.clip_search)
    details["weight_bits"] = weight_bits(config, qc)
    log(f"{qc.method}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return QuantizedModel(config=config, weights=w, hooks=hooks, qconfig=qc, transforms=transforms,
                          seconds=seconds, stats=stats, details=details, codes=codes)
