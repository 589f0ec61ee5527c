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
  spinquant
          QuaRot's transforms with the residual rotation and the per-layer value rotations learned by
          Cayley SGD on the calibration windows (100 steps by default; docs/algorithms.md, Learned
          rotations); Hadamard on the down_proj input and the keys; GPTQ weights
  resq+l2qer
          ResQ (projections, integer quantizers, GPTQ weights) plus an L2QER correction of the
          quantized weights: A, B in int8, x @ A quantized per token to 8 bits. Neither paper
          has it; the scale comes from the activations of the transformed float model.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from resq_jax.formats.bits import OFF, check_bits
from resq_jax.quant.gptq import DEFAULT_DAMP
from resq_jax.quant.lqer import LQERConfigError, LQERSpec


class QuantConfigError(ValueError):
    """Invalid quantization settings; the message names the setting and the allowed values."""


@dataclasses.dataclass(frozen=True, kw_only=True)
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
    default_cayley_steps: int = 0  # Cayley-SGD steps refining the rotations (learn.train); spinquant: 100

    @property
    def needs_calibration(self) -> bool:
        return "pca" in (self.residual, self.value, self.key) or self.lowrank == "l2qer"


_FLOAT = dict(fold_norms=False, residual="none", value="none", key="none", down_hadamard=False,
              default_high_fraction=0.0, qk_bits=OFF)
_MXINT = dict(_FLOAT, formats="mxint", default_a_bits=8, default_kv_bits=OFF)
_RESQ = dict(fold_norms=True, residual="pca", value="pca", key="pca", down_hadamard=True,
             default_high_fraction=0.125, qk_bits=8, weight_quantizer="gptq")
RECIPES: dict[str, Recipe] = {
    "none": Recipe(**_FLOAT, quantize=False),
    "rtn": Recipe(**_FLOAT),
    "gptq": Recipe(**_FLOAT, weight_quantizer="gptq"),
    "quarot": Recipe(fold_norms=True, residual="random_hadamard", value="hadamard", key="hadamard",
                     down_hadamard=True, default_high_fraction=0.0, qk_bits=OFF, weight_quantizer="gptq"),
    "resq": Recipe(**_RESQ),
    "spinquant": Recipe(fold_norms=True, residual="random_hadamard", value="hadamard", key="hadamard",
                        down_hadamard=True, default_high_fraction=0.0, qk_bits=OFF, weight_quantizer="gptq",
                        default_cayley_steps=100),
    "mxint": Recipe(**_MXINT),
    "lqer": Recipe(**_MXINT, lowrank="lqer"),
    "l2qer": Recipe(**_MXINT, lowrank="l2qer"),
    "resq+l2qer": Recipe(**_RESQ, lowrank="l2qer"),
}
METHODS = tuple(RECIPES)
WEIGHT_QUANTIZERS = ("rtn", "gptq")
W_FORMATS = ("mxint", "int")
DEFAULT_RANK = 32
# learned rotations (resq_jax.learn.train.CayleyConfig): the papers' settings, 100 steps of batch 8 at lr 1.5
DEFAULT_CAYLEY_LR = 1.5
DEFAULT_CAYLEY_BATCH = 8
DEFAULT_CAYLEY_MOMENTUM = 0.0  # SpinQuant's and ResQ's official training (Li et al.'s Cayley SGD uses 0.9)
DEFAULT_CAYLEY_CLIP = 1.0  # the gradient's global norm, as the papers' code (Hugging Face Trainer's max_grad_norm)
LOWRANK_BITS = 8  # A, B and x @ A of the integer recipes' low-rank correction


# Settings that only some recipes use. A QuantConfig refuses one its recipe would ignore (a flag accepted
# and silently dropped is a wrong result nobody notices); the CLI passes each flag to the methods it
# applies to and refuses a flag that none of the requested methods uses.
SETTINGS = ("high_bits", "high_fraction", "weight_quantizer", "act_order", "damp", "rank", "w_format", "group_size",
            "cayley_steps", "cayley_lr", "cayley_windows", "cayley_batch", "cayley_weights", "cayley_dtype",
            "cayley_micro_batch", "cayley_loss", "cayley_momentum", "cayley_clip")
DEFAULT_ACT_ORDER = False


def setting_applies(name: str, method: str, high_fraction: float | None = None,
                    weight_quantizer: str | None = None, cayley_steps: int | None = None) -> bool:
    """Whether recipe ``method`` uses setting ``name`` (one of SETTINGS), given the other settings."""
    r = RECIPES[method]
    integer = r.quantize and r.formats == "int"
    if name == "cayley_steps":
        return integer and r.residual != "none"
    if name in ("cayley_lr", "cayley_windows", "cayley_batch", "cayley_weights", "cayley_dtype",
                "cayley_micro_batch", "cayley_loss", "cayley_momentum", "cayley_clip"):
        steps = r.default_cayley_steps if cayley_steps is None else cayley_steps
        return integer and r.residual != "none" and steps > 0
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
    "cayley_steps": "it has no rotations to learn",
    "cayley_lr": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_windows": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_batch": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_weights": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_dtype": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_micro_batch": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_loss": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_momentum": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
    "cayley_clip": "it learns no rotations (give --cayley-steps N to resq, quarot or resq+l2qer)",
}
CAYLEY_WEIGHTS = ("float", "rtn")  # the weights while rotations train: float, or RTN-quantized straight-through
CAYLEY_LOSSES = ("ce", "kl")  # their loss: next-token cross-entropy, or KL divergence from the float model
CAYLEY_DTYPES = ("float32", "bfloat16")  # how the frozen model is stored while they train (float32 arithmetic)


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
    embed_bits: int = OFF  # embeddings and lm_head (resq_jax.quant.embeddings); 16 keeps them in float (the papers)
    embed_group: int | None = None  # channels per embedding scale (None: 64 at <= 4 bits, else the row)
    cayley_steps: int | None = None  # Cayley-SGD steps refining the rotations (None: the recipe's, 100 for spinquant)
    cayley_lr: float | None = None  # their initial learning rate, cosine-decayed (None: 1.5)
    cayley_windows: int | None = None  # the first N calibration windows train them (None: all)
    cayley_batch: int | None = None  # windows per step (None: 8)
    cayley_weights: str | None = None  # weights while they train: "float" (None) or "rtn" (straight-through)
    cayley_dtype: str | None = None  # the frozen model's storage while they train: "float32" (None) or "bfloat16"
    cayley_micro_batch: int | None = None  # windows per forward/backward pass of a step (None: the whole batch)
    cayley_loss: str | None = None  # "ce" (None: next-token cross-entropy) or "kl" (from the float model)
    cayley_momentum: float | None = None  # Cayley SGD's momentum in [0, 1) (None: DEFAULT_CAYLEY_MOMENTUM)
    cayley_clip: float | None = None  # the gradient's global norm bound (None: DEFAULT_CAYLEY_CLIP; 0: no clipping)

    def __post_init__(self):
        if self.method not in RECIPES:
            raise QuantConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        r = RECIPES[self.method]
        for name in SETTINGS:
            value = getattr(self, name)
            if value is not None and not setting_applies(name, self.method, self.high_fraction,
                                                         self.weight_quantizer, self.cayley_steps):
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
        self._check_cayley()

    def _check_cayley(self):
        for name in ("cayley_steps", "cayley_windows", "cayley_batch", "cayley_micro_batch"):
            v = getattr(self, name)
            low = 0 if name == "cayley_steps" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise QuantConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
        lr = self.cayley_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr)
                               or not lr > 0):
            raise QuantConfigError(f"--cayley-lr must be a positive number (the papers use 1.5), got {lr!r}")
        mu = self.cayley_momentum
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1):
            raise QuantConfigError(f"--cayley-momentum must be a number in [0, 1) (0: plain steps, as SpinQuant's "
                                   f"code; default {DEFAULT_CAYLEY_MOMENTUM}), got {mu!r}")
        clip = self.cayley_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not np.isfinite(clip)
                                 or clip < 0):
            raise QuantConfigError(f"--cayley-clip must be a number >= 0 (the gradient's global norm bound; 0: no "
                                   f"clipping; default {DEFAULT_CAYLEY_CLIP:g}), got {clip!r}")
        if self.cayley_weights is not None and self.cayley_weights not in CAYLEY_WEIGHTS:
            raise QuantConfigError(f"--cayley-weights must be one of {', '.join(CAYLEY_WEIGHTS)}, got "
                                   f"{self.cayley_weights!r}")
        if self.cayley_loss is not None and self.cayley_loss not in CAYLEY_LOSSES:
            raise QuantConfigError(f"--cayley-loss must be one of {', '.join(CAYLEY_LOSSES)}, got "
                                   f"{self.cayley_loss!r}")
        if self.cayley_dtype is not None and self.cayley_dtype not in CAYLEY_DTYPES:
            raise QuantConfigError(f"--cayley-dtype must be one of {', '.join(CAYLEY_DTYPES)}, got "
                                   f"{self.cayley_dtype!r}")
        if self.cayley_micro_batch is not None and self.cayley_batch_used % self.cayley_micro_batch:
            raise QuantConfigError(f"--cayley-micro-batch {self.cayley_micro_batch} must divide the "
                                   f"{self.cayley_batch_used} windows of a step (--cayley-batch)")
        if self.cayley_windows is not None and self.cayley_windows < self.cayley_batch_used:
            raise QuantConfigError(f"--cayley-windows {self.cayley_windows} is fewer than the {self.cayley_batch_used} "
                                   "windows of one step (--cayley-batch); give at least that many")

    @property
    def cayley_steps_used(self) -> int:
        """Cayley-SGD steps refining the rotations (0: the recipe's rotations as they are)."""
        if not setting_applies("cayley_steps", self.method):
            return 0
        return self.recipe.default_cayley_steps if self.cayley_steps is None else int(self.cayley_steps)

    @property
    def cayley_batch_used(self) -> int:
        return DEFAULT_CAYLEY_BATCH if self.cayley_batch is None else int(self.cayley_batch)

    @property
    def cayley_lr_used(self) -> float:
        return DEFAULT_CAYLEY_LR if self.cayley_lr is None else float(self.cayley_lr)

    @property
    def cayley_momentum_used(self) -> float:
        return DEFAULT_CAYLEY_MOMENTUM if self.cayley_momentum is None else float(self.cayley_momentum)

    @property
    def cayley_clip_used(self) -> float:
        """The bound on the gradient's global norm (0: no clipping)."""
        return DEFAULT_CAYLEY_CLIP if self.cayley_clip is None else float(self.cayley_clip)

    @property
    def cayley_weights_used(self) -> str:
        return self.cayley_weights or "float"

    @property
    def cayley_loss_used(self) -> str:
        return self.cayley_loss or "ce"

    @property
    def cayley_dtype_used(self) -> str:
        return self.cayley_dtype or "float32"

    @property
    def cayley_micro_batch_used(self) -> int:
        """Windows per forward/backward pass of a training step (the whole batch unless given)."""
        return self.cayley_batch_used if self.cayley_micro_batch is None else int(self.cayley_micro_batch)

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
        d["cayley_steps"] = self.cayley_steps_used
        if self.cayley_steps_used:
            for name in ("lr", "batch", "weights", "dtype", "micro_batch", "loss", "momentum", "clip"):
                d[f"cayley_{name}"] = getattr(self, f"cayley_{name}_used")
        else:
            for name in ("cayley_lr", "cayley_windows", "cayley_batch", "cayley_weights", "cayley_dtype",
                         "cayley_micro_batch", "cayley_loss", "cayley_momentum", "cayley_clip"):
                d[name] = None
        if not uses_gptq(self):
            d["act_order"] = d["damp"] = None
        if self.recipe.formats == "mxint":
            spec = self.lqer_spec()
            d["w_format"], d["group_size"] = spec.w_format, spec.group_size
        return d


def uses_gptq(qc: QuantConfig) -> bool:
    return qc.recipe.quantize and qc.weights_by == "gptq" and qc.w_bits < OFF
