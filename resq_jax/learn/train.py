"""Training the rotations: Cayley SGD on the quantized model's next-token loss over calibration windows.

Each step draws ``batch_size`` of the calibration windows (a permutation seeded by (seed, step): the same windows
whatever happened before, so a resumed run repeats an uninterrupted one exactly), runs ``rotated_nll`` with
straight-through quantizer hooks (or ``rotated_kl``, the KL divergence from the float model's next-token
distribution: ``CayleyConfig.loss``), and applies ``cayley_sgd`` under a cosine learning-rate decay. Every
``checkpoint_every`` steps the rotations, the optimizer state and the losses are saved with orbax (the latest
kept); a run given the same folder resumes from there. A loss that turns non-finite, or rises above
``diverge_factor`` times the first step's, stops the run with ``DivergedError`` naming the step; the rotations
are orthogonal at every step (the optimizer skips non-finite steps), and the last finite ones are reported.
Cayley SGD caps every step at a moderate rotation, so a learning rate that is merely too large does not trip this
guard (docs/algorithms.md, Divergence): it is there for numerical failure.

After training, the loss of every training window is measured under the starting and under the learned
rotations (``window_losses``): a paired comparison on the same windows, the training's own answer to whether
its loss fell, free of the batch-to-batch spread of the step losses.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resq_jax.learn.rotated import LOSSES
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import SiteHooks
from resq_jax.quant.layouts import WeightSpec
from resq_jax.transforms.cayley import cayley_sgd, check_orthogonal
from resq_jax.util.progress import progress_bar

FROZEN_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class CayleyConfig:
    """Defaults from the ResQ / SpinQuant papers and their official code: 100 steps, batch 8, lr 1.5 with cosine
    decay, no momentum (plain bounded steps; Li et al.'s Cayley SGD uses 0.9), the gradient clipped to global
    norm 1.0. ``clip``: the gradient is scaled to this global norm (over all the rotations) when it is larger,
    before the step (None: never); the papers' code trains through the Hugging Face ``Trainer``, whose default
    ``max_grad_norm`` of 1.0 does this, so a step is lr_t times the clipped gradient rather than the bound.
    ``dtype``: how the frozen model is stored while the rotations train (float32, or bfloat16: half the memory,
    float32 arithmetic either way). ``micro_batch``: windows per forward and backward pass, the gradient summed
    over batch_size / micro_batch passes (None: the whole batch at once); the same training, less memory.
    ``loss``: "ce", the next-token cross-entropy of the calibration text (the papers'), or "kl", the KL divergence
    from the float model's next-token distribution (learn.rotated.rotated_kl; a second, gradient-free forward
    pass of the float model per step)."""

    steps: int = 100
    lr: float = 1.5
    batch_size: int = 8
    momentum: float = 0.0
    seed: int = 0
    checkpoint_every: int = 10
    diverge_factor: float = 4.0
    dtype: str = "float32"
    micro_batch: int | None = None
    loss: str = "ce"
    clip: float | None = 1.0

    def __post_init__(self):
        optional = ("micro_batch",) if self.micro_batch is not None else ()
        for name in ("steps", "batch_size", "checkpoint_every") + optional:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"CayleyConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch is not None and self.batch_size % self.micro_batch:
            raise ValueError(f"the micro-batch ({self.micro_batch}) must divide the batch ({self.batch_size} windows)")
        if self.loss not in LOSSES:
            raise ValueError(f"the training loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.dtype not in FROZEN_DTYPES:
            raise ValueError(f"the frozen model's dtype must be one of {', '.join(FROZEN_DTYPES)}, got {self.dtype!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"the Cayley momentum must be a number in [0, 1), got {self.momentum!r}")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and not isinstance(self.clip, bool)
                                          and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"the gradient clip must be a positive number or None, got {self.clip!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the Cayley learning rate must be a positive number, got {self.lr!r}")


class DivergedError(RuntimeError):
    """The training loss became non-finite or exploded; ``rotations`` holds the last rotations before it."""

    def __init__(self, message: str, rotations):
        super().__init__(message)
        self.rotations = rotations


@dataclasses.dataclass
class TrainResult:
    rotations: dict
    losses: np.ndarray  # [steps] mean loss of each step's batch
    seconds: float
    resumed_from: int  # the step a checkpoint resumed from (0: a fresh start)
    start_window_losses: np.ndarray  # [N] each training window's loss under the starting rotations
    end_window_losses: np.ndarray  # [N] ... under the learned rotations

    def loss_change(self) -> tuple[float, float]:
        """(mean, standard error) over the training windows of end - start loss, in nats: negative when the
        learned rotations lower the loss of the windows they were trained on."""
        d = np.asarray(self.end_window_losses, np.float64) - np.asarray(self.start_window_losses, np.float64)
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")


def batch_indices(n_windows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The windows of step ``step``: ``batch_size`` distinct indices drawn from (seed, step) alone."""
    return np.random.default_rng([seed, step]).permutation(n_windows)[:batch_size]


def _manager(folder):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(Path(folder).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=1))


def optimizer(cc: CayleyConfig) -> optax.GradientTransformation:
    """Cayley SGD with momentum under a cosine decay of the learning rate from ``cc.lr`` to 0 over ``cc.steps``,
    after ``optax.clip_by_global_norm(cc.clip)`` when ``cc.clip`` is set (the Euclidean gradient dL/dX, as
    torch's ``clip_grad_norm_`` clips ``p.grad`` before the optimizer sees it)."""
    sgd = cayley_sgd(optax.cosine_decay_schedule(cc.lr, cc.steps), momentum=cc.momentum)
    return sgd if cc.clip is None else optax.chain(optax.clip_by_global_norm(cc.clip), sgd)


def loss_pass(config: ModelConfig, hooks: SiteHooks, *, hadamard: int, weight_spec: WeightSpec | None = None,
              loss: str = "ce"):
    """The jitted (rotations, tokens [B, T], arrays) -> [B] training loss of each window (``LOSSES[loss]``), no
    gradient unless differentiated (``training_step`` does); ``arrays`` is the frozen model (``stack_layers``)
    without its ``down_hadamard`` size (``hadamard``, static)."""
    if loss not in LOSSES:
        raise ValueError(f"the training loss must be one of {', '.join(LOSSES)}, got {loss!r}")

    @jax.jit
    def losses(rotations, tokens, arrays):
        model = {**arrays, "down_hadamard": hadamard}
        return LOSSES[loss](rotations, model, tokens, config=config, hooks=hooks, weight_spec=weight_spec)

    return losses


def training_step(config: ModelConfig, opt: optax.GradientTransformation, hooks: SiteHooks, *, hadamard: int,
                  weight_spec: WeightSpec | None = None, micro_batch: int | None = None, loss: str = "ce"):
    """The jitted step (rotations, opt_state, tokens [B, T], arrays) -> (rotations, opt_state, mean loss): the
    value and gradient of the mean over the B windows of ``LOSSES[loss]`` (``rotated_nll`` or ``rotated_kl``),
    then one ``opt`` update. With ``micro_batch`` m (dividing B) the windows pass m at a time under a ``lax.scan``
    that sums the losses and gradients of the B / m passes: the same mean and gradient (to float rounding), with
    one micro-batch's activations alive instead of the whole batch's. ``arrays`` is the frozen model
    (``stack_layers``) without its ``down_hadamard`` size (``hadamard``, static). The model is an argument, not a
    closure: closed-over arrays would be baked into the executable as constants (a second copy of the model, and
    a slow compile)."""
    losses = loss_pass(config, hooks, hadamard=hadamard, weight_spec=weight_spec, loss=loss)

    @jax.jit
    def step(rotations, state, tokens, arrays):
        value_and_grad = jax.value_and_grad(lambda r, t: losses(r, t, arrays).mean())
        b = tokens.shape[0]
        if micro_batch is None or micro_batch == b:
            loss, grads = value_and_grad(rotations, tokens)
        else:
            if b % micro_batch:
                raise ValueError(f"the micro-batch {micro_batch} must divide the batch of {b} windows")

            def accumulate(carry, t):  # t: [m, T]
                loss, grads = value_and_grad(rotations, t)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, rotations))
            total, _ = jax.lax.scan(accumulate, zero, tokens.reshape(b // micro_batch, micro_batch, -1))
            loss, grads = jax.tree.map(lambda x: x / (b // micro_batch), total)
        updates, state = opt.update(grads, state, rotations)
        return optax.apply_updates(rotations, updates), state, loss

    return step


def window_losses(losses, rotations: dict, windows: np.ndarray, arrays: dict, *, chunk: int = 8,
                  bar=None) -> np.ndarray:
    """windows: [N, T] -> [N] float64, each window's loss by ``losses`` (``loss_pass``) under ``rotations``,
    ``chunk`` windows per pass (the last pass padded with copies of the first window, their losses dropped);
    ``bar`` (a progress bar, optional) advances by the windows of each pass."""
    windows = np.asarray(windows)
    n = windows.shape[0]
    out = []
    for i in range(0, n, chunk):
        idx = np.arange(i, i + chunk)
        idx[idx >= n] = 0
        out.append(np.asarray(losses(rotations, jnp.asarray(windows[idx], jnp.int32), arrays), np.float64))
        if bar is not None:
            bar.update(min(chunk, n - i))
    return np.concatenate(out)[:n]


def train_rotations(config: ModelConfig, frozen: dict, rotations: dict, windows: np.ndarray, hooks: SiteHooks,
                    cc: CayleyConfig = CayleyConfig(), *, checkpoint_dir: str | Path | None = None,
                    progress: bool | str = True, weight_spec: WeightSpec | None = None) -> TrainResult:
    """Refine ``rotations`` ({"residual": blocks, "value": blocks}, orthogonal) on ``windows`` [N, T]; with
    ``weight_spec`` the weights are RTN-quantized straight-through while they train (learn.rotated)."""
    import orbax.checkpoint as ocp

    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < cc.batch_size:
        raise ValueError(f"training needs at least batch_size = {cc.batch_size} windows [N, T], got {windows.shape}")
    check_orthogonal(rotations)
    initial = rotations
    opt = optimizer(cc)
    state = opt.init(rotations)
    losses = np.full(cc.steps, np.nan)
    start = 0
    manager = None if checkpoint_dir is None else _manager(checkpoint_dir)
    if manager is not None and manager.latest_step() is not None:
        start = int(manager.latest_step())
        target = {"rotations": rotations, "opt": state, "losses": losses}
        got = manager.restore(start, args=ocp.args.StandardRestore(target))
        rotations, state, losses = got["rotations"], got["opt"], np.asarray(got["losses"])

    arrays = jax.device_put({k: v for k, v in frozen.items() if k != "down_hadamard"})
    step = training_step(config, opt, hooks, hadamard=frozen["down_hadamard"], weight_spec=weight_spec,
                         micro_batch=cc.micro_batch, loss=cc.loss)

    label = progress if isinstance(progress, str) else "cayley"
    bar = progress_bar(cc.steps, label, unit="step") if progress else None
    if bar is not None:
        bar.update(start)
    t0 = time.perf_counter()
    first = losses[0] if start else None
    for k in range(start, cc.steps):
        tokens = jnp.asarray(windows[batch_indices(len(windows), cc.batch_size, cc.seed, k)], jnp.int32)
        new_rotations, new_state, loss = step(rotations, state, tokens, arrays)
        loss = float(loss)
        first = loss if first is None else first
        if not math.isfinite(loss) or loss > cc.diverge_factor * first:
            if bar is not None:
                bar.close()
            raise DivergedError(f"the rotation training diverged at step {k + 1} of {cc.steps} (loss {loss:.4g}, "
                                f"first {first:.4g}): lower --cayley-lr (now {cc.lr:g})", rotations)
        rotations, state, losses[k] = new_rotations, new_state, loss
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
        if manager is not None and ((k + 1) % cc.checkpoint_every == 0 or k + 1 == cc.steps):
            manager.save(k + 1, args=ocp.args.StandardSave({"rotations": rotations, "opt": state, "losses": losses}))
            manager.wait_until_finished()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    measure = loss_pass(config, hooks, hadamard=frozen["down_hadamard"], weight_spec=weight_spec, loss=cc.loss)
    bar = progress_bar(2 * len(windows), f"{label}: start vs end loss", unit="window") if progress else None
    measured = {name: window_losses(measure, r, windows, arrays, chunk=cc.micro_batch or cc.batch_size, bar=bar)
                for name, r in (("start", initial), ("end", rotations))}
    if bar is not None:
        bar.close()
    return TrainResult(rotations=rotations, losses=losses, seconds=seconds, resumed_from=start,
                       start_window_losses=measured["start"], end_window_losses=measured["end"])
