"""Recipes: every method is a configuration of the same stages (DESIGN.md data flow).

  none    the float model
  rtn     no rotation; round-to-nearest weights, per-token activations, per-head KV
  gptq    no rotation; GPTQ weights
  quarot  randomized Hadamard on the residual stream, Hadamard per value head and on q/k
          (online), Hadamard on the down_proj input (online); uniform bits
  resq    PCA bases: U_A (residual, all layers), U_B (values, per layer and KV head), U_C (keys,
          per layer, online), each followed by random rotations inside the low and high
          subspaces; Hadamard on the down_proj input; the high 1/8 of channels in 8 bits
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping

import numpy as np

from models.config import ModelConfig
from resq_jax import fusion
from resq_jax.calibration import CalibrationStats, calibrate
from resq_jax.fake_quant import OFF, ActivationSpec, FakeQuantHooks, WeightSpec, fake_quantize_key_rotation
from resq_jax.projections import (block_diag_rotation, damped_eigh, hadamard_factor, hadamard_matrix, high_rank,
                                  randomized_hadamard)
from resq_jax.quantizers import check_bits


class QuantConfigError(ValueError):
    """Invalid quantization settings; the message names the setting and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    fold_norms: bool
    residual: str  # "none" | "random_hadamard" | "pca"
    value: str  # "none" | "hadamard" | "pca"
    key: str  # "none" | "hadamard" | "pca"
    down_hadamard: bool
    default_high_fraction: float
    qk_bits: int  # q/k fake-quant before the online key rotation (ResQ's int8 model)
    quantize: bool = True
    weight_quantizer: str = "rtn"  # default weight quantizer of the recipe

    @property
    def needs_calibration(self) -> bool:
        return "pca" in (self.residual, self.value, self.key)


RECIPES: dict[str, Recipe] = {
    "none": Recipe(False, "none", "none", "none", False, 0.0, OFF, quantize=False),
    "rtn": Recipe(False, "none", "none", "none", False, 0.0, OFF),
    "gptq": Recipe(False, "none", "none", "none", False, 0.0, OFF, weight_quantizer="gptq"),
    "quarot": Recipe(True, "random_hadamard", "hadamard", "hadamard", True, 0.0, OFF),
    "resq": Recipe(True, "pca", "pca", "pca", True, 0.125, 8),
}
METHODS = tuple(RECIPES)
WEIGHT_QUANTIZERS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str = "resq"
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    high_bits: int = 8
    high_fraction: float | None = None  # None: the method's default
    weight_quantizer: str | None = None  # None: the method's default
    clip_search: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.method not in RECIPES:
            raise QuantConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits", "kv_bits", "high_bits"):
            try:
                check_bits(getattr(self, name), name)
            except ValueError as e:
                raise QuantConfigError(f"--{name.replace('_', '-')}: {e}") from None
        hf = self.high_fraction
        if hf is not None and (isinstance(hf, bool) or not 0.0 <= float(hf) < 1.0):
            raise QuantConfigError(f"--high-fraction must be in [0, 1) (0.125 keeps 1/8 of channels in "
                                   f"high precision), got {hf}")
        if self.weight_quantizer is not None and self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise QuantConfigError(f"unknown weight quantizer {self.weight_quantizer!r}; choose one of "
                                   f"{', '.join(WEIGHT_QUANTIZERS)}")

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.method]

    @property
    def weights_by(self) -> str:
        """The weight quantizer in effect: the flag, else the recipe's default."""
        return self.weight_quantizer or self.recipe.weight_quantizer

    @property
    def fraction(self) -> float:
        return self.recipe.default_high_fraction if self.high_fraction is None else float(self.high_fraction)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["high_fraction"] = self.fraction
        d["weight_quantizer"] = self.weights_by
        return d


@dataclasses.dataclass
class Transforms:
    """The orthogonal transforms of a recipe (float64), all optional."""

    residual: np.ndarray | None = None  # [d, d]
    value: np.ndarray | None = None  # [L, KV, hd, hd]
    key: np.ndarray | None = None  # [L, hd, hd]
    down_hadamard: bool = False


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
    # fake_quant.linear_high_rows order (what resq_jax.runtime.pack_model packs); empty if unquantized
    codes: dict = dataclasses.field(default_factory=dict)


def activation_spec(config: ModelConfig, qc: QuantConfig) -> ActivationSpec:
    """Activation/KV quantizers; q/k are modeled in int8 around the online key rotation only
    when the recipe has one and activations or KV are quantized at all."""
    r = high_rank(config.hidden_size, qc.fraction)
    r_h = high_rank(config.head_dim, qc.fraction)
    quantizing = min(qc.a_bits, qc.kv_bits) < OFF
    return ActivationSpec(a_bits=qc.a_bits, kv_bits=qc.kv_bits, down_bits=qc.a_bits, high_bits=qc.high_bits,
                          high_residual=r, high_head=r_h,
                          qk_bits=qc.recipe.qk_bits if qc.recipe.key != "none" and quantizing else OFF)


def weight_spec(config: ModelConfig, qc: QuantConfig) -> WeightSpec:
    return WeightSpec(w_bits=qc.w_bits, high_bits=qc.high_bits,
                      high_residual=high_rank(config.hidden_size, qc.fraction),
                      high_head=high_rank(config.head_dim, qc.fraction), clip_search=qc.clip_search)


def resq_transforms(config: ModelConfig, stats: CalibrationStats, fraction: float, seed: int) -> Transforms:
    """ResQ's bases from calibration statistics (REFERENCE.md section 1, steps 4-5)."""
    d, hd, n_layers = config.hidden_size, config.head_dim, config.num_layers
    h_res = (stats.attn.sum(0) + stats.mlp.sum(0)) / (2 * n_layers * stats.tokens)
    _, u_a = damped_eigh(h_res)
    r1 = block_diag_rotation(d, high_rank(d, fraction), (seed, 1))
    r2 = block_diag_rotation(hd, high_rank(hd, fraction), (seed, 2))
    value = np.stack([np.stack([damped_eigh(stats.value[l, h])[1] @ r2 for h in range(config.num_kv_heads)])
                      for l in range(n_layers)])
    key = np.stack([damped_eigh(stats.key[l])[1] @ r2 for l in range(n_layers)])
    return Transforms(residual=u_a @ r1, value=value, key=key, down_hadamard=True)


def quarot_transforms(config: ModelConfig, seed: int) -> Transforms:
    hd, n_layers, kv = config.head_dim, config.num_layers, config.num_kv_heads
    h_head = hadamard_matrix(hd)
    return Transforms(residual=randomized_hadamard(config.hidden_size, (seed, 1)),
                      value=np.broadcast_to(h_head, (n_layers, kv, hd, hd)).copy(),
                      key=np.broadcast_to(h_head, (n_layers, hd, hd)).copy(), down_hadamard=True)


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


def apply_transforms(config: ModelConfig, weights: Mapping[str, np.ndarray], t: Transforms) -> dict:
    """Fuse the transforms into (untied, folded) weights; the key rotation and the down_proj
    Hadamard are also installed as online transforms."""
    w = dict(weights)
    if t.residual is not None:
        w = fusion.rotate_residual(config, w, t.residual)
    if t.value is not None:
        w = fusion.rotate_values(config, w, t.value)
    if t.key is not None:
        w = fusion.set_key_rotation(config, w, t.key)
    if t.down_hadamard:
        w = fusion.fuse_down_hadamard(config, w)
    return w


def uses_gptq(qc: QuantConfig) -> bool:
    return qc.recipe.quantize and qc.weights_by == "gptq" and qc.w_bits < OFF


def prepare(config: ModelConfig, weights: Mapping[str, np.ndarray], recipe: Recipe) -> tuple[ModelConfig, dict]:
    """Untie and fold norms when the recipe rotates the residual stream."""
    if not recipe.fold_norms:
        return config, dict(weights)
    config, w = fusion.untie_embeddings(config, weights)
    return config, fusion.fold_norms(config, w)


def quantize_model(config: ModelConfig, weights: Mapping[str, np.ndarray], qc: QuantConfig,
                   calib_windows: np.ndarray | None = None, *, stats: CalibrationStats | None = None,
                   progress: bool = True, log: Callable[[str], None] = lambda s: None) -> QuantizedModel:
    """The whole pipeline for one recipe: prepare -> calibrate -> transforms -> fuse -> quantize."""
    from models.decoder import from_weights

    recipe = qc.recipe
    check_hadamard_sizes(config, recipe)
    seconds = {"calibrate": 0.0, "projections": 0.0, "fuse": 0.0, "quantize": 0.0}
    details: dict = {}
    codes: dict = {}
    config, w = prepare(config, weights, recipe)
    transforms = Transforms()
    if calib_windows is None and ((recipe.needs_calibration and stats is None) or uses_gptq(qc)):
        raise QuantConfigError(f"method {qc.method!r} needs calibration windows")
    if recipe.needs_calibration and stats is None:
        t0 = time.perf_counter()
        stats = calibrate(from_weights(config, w), calib_windows, progress=progress)
        seconds["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if recipe.residual == "pca":
        transforms = resq_transforms(config, stats, qc.fraction, qc.seed)
    elif recipe.residual == "random_hadamard":
        transforms = quarot_transforms(config, qc.seed)
    seconds["projections"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = apply_transforms(config, w, transforms)
    seconds["fuse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hooks = FakeQuantHooks(activation_spec(config, qc)) if recipe.quantize else FakeQuantHooks(ActivationSpec())
    if recipe.quantize:
        from resq_jax import weight_quantization

        if uses_gptq(qc):
            qw = weight_quantization.gptq_weights_codes(config, w, calib_windows, weight_spec(config, qc),
                                                        progress=progress, timings=details)
        else:
            qw = weight_quantization.rtn_weights_codes(config, w, weight_spec(config, qc))
        w, codes = qw.weights, qw.codes
        if hooks.spec.qk_bits < OFF and transforms.key is not None:
            w = fake_quantize_key_rotation(w, config.num_layers, hooks.spec.qk_bits)
    seconds["quantize"] = time.perf_counter() - t0
    log(f"{qc.method}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return QuantizedModel(config=config, weights=w, hooks=hooks, qconfig=qc, transforms=transforms,
                          seconds=seconds, stats=stats, details=details, codes=codes)
