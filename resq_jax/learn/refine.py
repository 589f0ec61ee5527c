"""A recipe's rotations refined by training: the pipeline's entry to resq_jax.learn.

``refine(config, weights, transforms, spec, windows, cc)`` fuses the recipe's transforms into the (folded, untied)
float weights, trains block-diagonal rotations on top of them (``learn.train``) under the recipe's own activation
and KV quantizers passed straight through, and returns the transforms with the learned rotations folded in. The
blocks follow the recipe's subspaces: ResQ keeps its high-variance channels last in the residual stream and in
every value head, so it learns one rotation for the low block and one for the high block of each; QuaRot and
SpinQuant learn one full rotation of each. The weights stay in float while the rotations train (SpinQuant's
advice when GPTQ follows), or with ``weight_spec`` are RTN-quantized straight-through (its setting when RTN
follows); the quantizer then sees the refined model exactly as it would see the recipe's.

Memory: the fused model is held whole on the device with its stacked layers (``stack_layers``), in ``cc.dtype``
(float32; bfloat16 halves it), built one stacked array at a time from the fused view, plus one layer's activations
under rematerialization and each layer's input.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from resq_jax.learn.rotated import StraightThrough, identity_rotations, refined_transforms, stack_layers
from resq_jax.learn.train import CayleyConfig, TrainResult, train_rotations
from resq_jax.models.config import ModelConfig
from resq_jax.quant.fake_quant import FakeQuantHooks
from resq_jax.quant.layouts import ActivationSpec, WeightSpec
from resq_jax.rotation.transforms import Transforms, apply_transforms


def subspace_blocks(n: int, high: int) -> tuple[int, ...]:
    """The rotation blocks of an n-channel space whose last ``high`` channels are kept in high precision."""
    return (n - high, high) if 0 < high < n else (n,)


def start_rotations(config: ModelConfig, spec: ActivationSpec) -> dict:
    """Identity rotations in the blocks of ``spec``'s subspaces (learn.rotated.identity_rotations): the residual
    stream's low and high channels, every value head's likewise, per layer."""
    return identity_rotations(subspace_blocks(config.hidden_size, spec.high_residual),
                              subspace_blocks(config.head_dim, spec.high_head), config.num_layers)


def refine(config: ModelConfig, weights: Mapping[str, np.ndarray], transforms: Transforms, spec: ActivationSpec,
           windows: np.ndarray, cc: CayleyConfig, *, progress: bool | str = True,
           checkpoint_dir=None, weight_spec: WeightSpec | None = None) -> tuple[Transforms, TrainResult]:
    """weights: the recipe's folded, untied float model (not yet rotated); windows: [N, T] calibration tokens.
    Returns (the transforms with the learned rotations folded in, the training result)."""
    if transforms.residual is None or transforms.value is None:
        raise ValueError("learned rotations refine a recipe's residual and value rotations; this recipe has none")
    start = start_rotations(config, spec)
    frozen = stack_layers(config, apply_transforms(config, weights, transforms), cc.dtype)
    result = train_rotations(config, frozen, start, np.asarray(windows), StraightThrough(FakeQuantHooks(spec)), cc,
                             progress=progress, checkpoint_dir=checkpoint_dir, weight_spec=weight_spec)
    return refined_transforms(transforms, result.rotations), result
