"""Recipes: every method is a configuration of the same stages (docs/architecture.md, Pipeline).

  none    the float model
  rtn     no rotation; round-to-nearest weights, per-token activations, per-head KV
  gptq    no rotation; GPTQ weights
  quarot  randomized Hadamard on the residual stream, Hadamard per value head and on q/k
          (online), Hadamard on the down_proj input (online); uniform bits
  resq    PCA bases: U_A (residual, all layers), U_B (values, per layer and KV head), U_C (keys,
          per layer, online), each followed by random rotations inside the low and high
          subspaces; Hadamard on the down_proj input; the high 1/8 of channels in 8 bits
  mxint   LQER's baseline: MXINT weights (w_bits 4) and activations (a_bits 8), no correction
  lqer    mxint + a rank-k correction A B of the weight error from its SVD (docs/algorithms.md, LQER and L2QER)
  l2qer   lqer with the error scaled by the calibration activation magnitudes before the SVD
  resq+l2qer
          ResQ (projections, integer quantizers, GPTQ weights) plus an L2QER correction of the
          quantized weights: A, B in int8, x @ A quantized per token to 8 bits. Neither paper
          has it; the scale comes from the activations of the transformed float model.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from models.config import ModelConfig
from resq_jax import fusion
from resq_jax.calibration import CalibrationStats, calibrate
from resq_jax.gptq import DEFAULT_DAMP
from resq_jax.fake_quant import OFF, ActivationSpec, FakeQuantHooks, WeightSpec, fake_quantize_key_rotation
from resq_jax.embeddings import EmbeddingConfigError, check_embed_settings, quantize_embeddings
from resq_jax.lqer import int_lowrank_codes, lqer_quantize_weights
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
    lowrank: str = "none"  # "none" | "lqer" | "l2qer": low-rank correction of the weight error
    formats: str = "int"  # "int" (docs/algorithms.md, Quantizers) | "mxint" (docs/algorithms.md, MXINT)
    default_a_bits: int = 4
    default_kv_bits: int = 4

    @property
    def needs_calibration(self) -> bool:
        return "pca" in (self.residual, self.value, self.key) or self.lowrank == "l2qer"


RECIPES: dict[str, Recipe] = {
    "none": Recipe(False, "none", "none", "none", False, 0.0, OFF, quantize=False),
    "rtn": Recipe(False, "none", "none", "none", False, 0.0, OFF),
    "gptq": Recipe(False, "none", "none", "none", False, 0.0, OFF, weight_quantizer="gptq"),
    "quarot": Recipe(True, "random_hadamard", "hadamard", "hadamard", True, 0.0, OFF, weight_quantizer="gptq"),
    "resq": Recipe(True, "pca", "pca", "pca", True, 0.125, 8, weight_quantizer="gptq"),
    "mxint": Recipe(False, "none", "none", "none", False, 0.0, OFF, formats="mxint", default_a_bits=8,
                    default_kv_bits=OFF),
    "lqer": Recipe(False, "none", "none", "none", False, 0.0, OFF, lowrank="lqer", formats="mxint",
                   default_a_bits=8, default_kv_bits=OFF),
    "l2qer": Recipe(False, "none", "none", "none", False, 0.0, OFF, lowrank="l2qer", formats="mxint",
                    default_a_bits=8, default_kv_bits=OFF),
    "resq+l2qer": Recipe(True, "pca", "pca", "pca", True, 0.125, 8, weight_quantizer="gptq", lowrank="l2qer"),
}
METHODS = tuple(RECIPES)
WEIGHT_QUANTIZERS = ("rtn", "gptq")
W_FORMATS = ("mxint", "int")
DEFAULT_RANK = 32
LOWRANK_BITS = 8  # A, B and x @ A of the integer recipes' low-rank correction


# Settings that only some recipes use. A QuantConfig refuses one its recipe would ignore (a flag accepted
# and silently dropped is a wrong result nobody notices); the CLI passes each flag to the methods it
# applies to and refuses a flag that none of the requested methods uses.
SETTINGS = ("high_bits", "high_fraction", "weight_quantizer", "act_order", "damp", "rank", "w_format", "group_size")
DEFAULT_ACT_ORDER = False


def setting_applies(name: str, method: str, high_fraction: float | None = None,
                    weight_quantizer: str | None = None) -> bool:
    """Whether recipe ``method`` uses setting ``name`` (one of SETTINGS), given the other settings."""
    r = RECIPES[method]
    integer = r.quantize and r.formats == "int"
    if name in ("high_fraction", "weight_quantizer"):
        return integer
    if name == "high_bits":
        return integer and (r.default_high_fraction if high_fraction is None else float(high_fraction)) > 0
    if name in ("act_order", "damp"):
        return integer and (weight_quantizer or r.weight_quantizer) == "gptq"
    if name == "rank":
        return r.lowrank != "none"
    if name in ("w_format", "group_size"):
        return r.formats == "mxint"
    raise KeyError(name)


_WHY = {
    "high_bits": "no channel is kept in high precision (high fraction 0, or MXINT formats)",
    "high_fraction": "it has no high-precision subspace (float or MXINT formats)",
    "weight_quantizer": "its weights are float or MXINT-rounded",
    "act_order": "its weights are not quantized by GPTQ",
    "damp": "its weights are not quantized by GPTQ",
    "rank": "it has no low-rank correction",
    "w_format": "its weights are per-channel integers or float",
    "group_size": "its weights are per-channel integers or float",
}


def not_applicable(name: str, methods: Sequence[str]) -> str:
    """The error for setting ``name`` given to ``methods``, none of which uses it."""
    users = [m for m in METHODS if setting_applies(name, m)]
    what = (f"method {methods[0]!r}" if len(methods) == 1 else f"methods {', '.join(methods)}" if methods
            else "the float model")
    return (f"--{name.replace('_', '-')} does not apply to {what} ({_WHY[name]}); it applies to "
            f"{', '.join(users)}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str = "resq"
    w_bits: int = 4
    a_bits: int | None = None  # None: the method's default (4; 8 for the MXINT recipes)
    kv_bits: int | None = None  # None: the method's default (4; 16 = off for the MXINT recipes)
    high_bits: int | None = None  # None: 8
    high_fraction: float | None = None  # None: the method's default
    weight_quantizer: str | None = None  # None: the method's default
    act_order: bool | None = None  # GPTQ: sweep rows by descending Hessian diagonal, each row keeping its
    # group (None: DEFAULT_ACT_ORDER where GPTQ runs)
    damp: float | None = None  # GPTQ: damping relative to mean(diag H) (None: 0.01, GPTQ's and ResQ's)
    clip_search: bool | None = None  # MSE clip search of weight and embedding-table scales (None: on for
    # the integer recipes)
    seed: int = 0
    rank: int | None = None  # low-rank correction rank (None: 32 for lqer/l2qer recipes)
    w_format: str | None = None  # lqer/l2qer/mxint weights: "mxint" (default) or "int" (groups)
    group_size: int | None = None  # rows per weight scale group along d_in ("int" LQER weights: 128)
    embed_bits: int = OFF  # embeddings and lm_head (resq_jax.embeddings); 16 keeps them in float (the papers)
    embed_group: int | None = None  # channels per embedding scale (None: 64 at <= 4 bits, else the row)

    def __post_init__(self):
        if self.method not in RECIPES:
            raise QuantConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        r = RECIPES[self.method]
        for name in SETTINGS:
            value = getattr(self, name)
            if value is not None and not setting_applies(name, self.method, self.high_fraction,
                                                                        self.weight_quantizer):
                raise QuantConfigError(not_applicable(name, [self.method]))
        if self.high_bits is None:
            object.__setattr__(self, "high_bits", 8)
        if self.act_order is None:
            object.__setattr__(self, "act_order", DEFAULT_ACT_ORDER and setting_applies(
                "act_order", self.method, weight_quantizer=self.weight_quantizer))
        elif not isinstance(self.act_order, bool):
            raise QuantConfigError(f"act_order must be True or False, got {self.act_order!r}")
        if self.damp is None:
            object.__setattr__(self, "damp", DEFAULT_DAMP)
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not np.isfinite(self.damp)
                or not self.damp > 0):
            raise QuantConfigError(f"--damp must be a positive number (relative to mean(diag H); GPTQ uses 0.01), "
                                   f"got {self.damp!r}")
        if r.formats == "mxint" and self.kv_bits is not None and self.kv_bits < OFF:
            raise QuantConfigError(f"method {self.method!r} does not quantize the KV cache (LQER's setting); "
                                   f"drop --kv-bits or run {self.method} separately from KV-quantized methods")
        object.__setattr__(self, "a_bits", r.default_a_bits if self.a_bits is None else self.a_bits)
        object.__setattr__(self, "kv_bits", r.default_kv_bits if self.kv_bits is None else self.kv_bits)
        if self.clip_search is None:
            object.__setattr__(self, "clip_search", r.formats == "int" and r.quantize)
        elif not isinstance(self.clip_search, bool):
            raise QuantConfigError(f"clip_search must be True or False, got {self.clip_search!r}")
        for name in ("w_bits", "a_bits", "kv_bits", "high_bits", "embed_bits"):
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
        self._check_lowrank(r)

    def _check_lowrank(self, r: Recipe):
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise QuantConfigError(f"--rank must be an integer >= 0 (32 for W4A8 LQER), got {self.rank!r}")
        if self.w_format is not None and self.w_format not in W_FORMATS:
            raise QuantConfigError(f"--w-format must be one of {', '.join(W_FORMATS)}, got {self.w_format!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise QuantConfigError(f"--group-size must be a positive integer (e.g. 128), got {self.group_size!r}")
        if r.formats == "mxint":
            self.lqer_spec()  # raises for MXINT widths the format lacks

    @property
    def rank_used(self) -> int:
        """The low-rank correction's rank in effect (0 without a correction)."""
        if self.recipe.lowrank == "none":
            return 0
        return DEFAULT_RANK if self.rank is None else int(self.rank)

    def lqer_spec(self):
        """The LQERSpec of an MXINT recipe (weights, activation widths, rank, scaling)."""
        from resq_jax.lqer import LQERConfigError, LQERSpec

        w_format = self.w_format or "mxint"
        group = self.group_size if self.group_size is not None else (128 if w_format == "int" else None)
        try:
            return LQERSpec(w_format=w_format, w_bits=self.w_bits, group_size=group, a_width=self.a_bits,
                            lowrank_width=8, rank=self.rank_used, scaled=self.recipe.lowrank == "l2qer")
        except LQERConfigError as e:
            raise QuantConfigError(f"method {self.method!r}: {e}") from None

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
        d["weight_quantizer"] = self.weights_by if self.recipe.formats == "int" else "rtn"
        d["rank"] = self.rank_used
        if not uses_gptq(self):
            d["act_order"] = d["damp"] = None
        if self.recipe.formats == "mxint":
            spec = self.lqer_spec()
            d["w_format"], d["group_size"] = spec.w_format, spec.group_size
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
                          lowrank_bits=LOWRANK_BITS if qc.rank_used and qc.a_bits < OFF else OFF,
                          qk_bits=qc.recipe.qk_bits if qc.recipe.key != "none" and quantizing else OFF)


def weight_spec(config: ModelConfig, qc: QuantConfig) -> WeightSpec:
    return WeightSpec(w_bits=qc.w_bits, high_bits=qc.high_bits,
                      high_residual=high_rank(config.hidden_size, qc.fraction),
                      high_head=high_rank(config.head_dim, qc.fraction), clip_search=qc.clip_search)


def resq_transforms(config: ModelConfig, stats: CalibrationStats, fraction: float, seed: int) -> Transforms:
    """ResQ's bases from calibration statistics (docs/algorithms.md, The bases U_A, U_B, U_C and U_D)."""
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


def _int_lowrank(config: ModelConfig, w_float: Mapping[str, np.ndarray], w_q: Mapping[str, np.ndarray],
                 qc: QuantConfig, calib_windows: np.ndarray, progress: bool, seconds: dict) -> tuple[dict, dict]:
    """L2QER correction of integer-quantized (e.g. ResQ) weights: the scale comes from the
    activation magnitudes of the transformed float model (a second calibration pass), the
    error is against the transformed float weights; A, B are int8. Returns (weights with the
    ``_lr_a`` / ``_lr_b`` matrices, their WeightCodes)."""
    from models.runner import LayerStreamer

    t0 = time.perf_counter()
    abs_mean = None
    if qc.recipe.lowrank == "l2qer":
        abs_mean = calibrate(LayerStreamer.from_weights(config, w_float), calib_windows, progress=progress).abs_mean
    seconds["calibrate"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = int_lowrank_codes(config, w_float, w_q, qc.rank_used, abs_mean, bits=LOWRANK_BITS)
    seconds["quantize"] += time.perf_counter() - t0
    return out


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


def uses_gptq(qc: QuantConfig) -> bool:
    return qc.recipe.quantize and qc.weights_by == "gptq" and qc.w_bits < OFF


def prepare(config: ModelConfig, weights: Mapping[str, np.ndarray],
            recipe: Recipe) -> tuple[ModelConfig, Mapping[str, np.ndarray]]:
    """Untie and fold norms when the recipe rotates the residual stream: a view computed per
    entry on access (``fusion.FoldedWeights``), so calibration streams the folded layers
    without a second copy of the model; ``apply_transforms`` materializes it."""
    if not recipe.fold_norms:
        return config, dict(weights)
    view = fusion.FoldedWeights(config, weights)
    return view.untied_config, view


def quantize_model(config: ModelConfig, weights: Mapping[str, np.ndarray], qc: QuantConfig,
                   calib_windows: np.ndarray | None = None, *, stats: CalibrationStats | None = None,
                   progress: bool = True, log: Callable[[str], None] = lambda s: None) -> QuantizedModel:
    """The whole pipeline for one recipe: prepare -> calibrate -> transforms -> fuse -> quantize."""
    from models.runner import LayerStreamer

    recipe = qc.recipe
    check_hadamard_sizes(config, recipe)
    check_rank(config, qc)
    embed_group = check_embed_quantization(config, qc)
    source_config, source_weights = config, weights
    seconds = {"calibrate": 0.0, "projections": 0.0, "fuse": 0.0, "quantize": 0.0}
    details: dict = {}
    codes: dict = {}
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
            from resq_jax import weight_quantization

            if uses_gptq(qc):
                qw = weight_quantization.gptq_weights_codes(config, w, calib_windows, weight_spec(config, qc),
                                                            act_order=qc.act_order, damp=qc.damp,
                                                            progress=progress, timings=details)
            else:
                qw = weight_quantization.rtn_weights_codes(config, w, weight_spec(config, qc))
            w, codes = qw.weights, qw.codes
            if hooks.spec.qk_bits < OFF and transforms.key is not None:
                w = fake_quantize_key_rotation(w, config.num_layers, hooks.spec.qk_bits)
        seconds["quantize"] = time.perf_counter() - t0
        if recipe.quantize and qc.rank_used:
            w, lr_codes = _int_lowrank(config, w_float, w, qc, calib_windows, progress, seconds)
            codes = {**codes, **lr_codes}
    if embed_group:
        tied = source_config.tie_word_embeddings and "lm_head" in w  # untied + folded here: derive the head
        w, codes["embed"] = quantize_embeddings(w, qc.embed_bits, embed_group,
                                                tied_gain=np.asarray(source_weights["norm"]) if tied else None,
                                                basis=transforms.residual, clip_search=qc.clip_search)
    details["weight_bits"] = weight_bits(config, qc)
    log(f"{qc.method}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return QuantizedModel(config=config, weights=w, hooks=hooks, qconfig=qc, transforms=transforms,
                          seconds=seconds, stats=stats, details=details, codes=codes)
