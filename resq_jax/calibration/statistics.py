"""Streamed calibration statistics (docs/algorithms.md, Second moments).

The model runs layer by layer over the calibration windows: each layer is fed the previous
layer's float outputs, and only one layer's weights and activations are live at a time. For
every layer l we accumulate, in float64, second moments (not centered covariances):

  attn[l]   [d, d]          sum x^T x of the q/k/v input (attn_in)
  mlp[l]    [d, d]          sum x^T x of the up/gate input (mlp_in)

of which only the sums over layers, attn_sum and mlp_sum, are kept (ResQ's residual basis uses
nothing else; a 7B model's per-layer [L, d, d] would be 2.9 GB each) unless ``per_layer=True``,
  value[l]  [KV, hd, hd]    per KV head, of the v_proj output
  key[l]    [hd, hd]        of k after RoPE, summed over KV heads

and, for L2QER, per-channel activation magnitudes at every linear's input (attn_in, o_in,
mlp_in, down_in): the max over windows of the window's mean |x|.

Batches are sharded over every device of every process (``distributed.mesh.data_mesh``; each process
builds only its devices' windows) with ``jax.shard_map``. Every device runs the same per-device batch shape
whatever the device count, so the float32 forward is bit-identical; each device's float64 statistics are
gathered to every process and added on the host in window order, so every process ends with the statistics
of a one-device run, bit for bit (a ``psum`` would add them in an order that depends on the device count).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from resq_jax.distributed.mesh import data_mesh, gather, sharded_rows
from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks
from resq_jax.models.streaming import LayerStreamer
from resq_jax.util.precision import EXACT
from resq_jax.util.progress import progress_bar

CAPTURED = ("attn_in", "mlp_in", "v", "k_rope", "o_in", "down_in")
ABS_SITES = ("attn_in", "o_in", "mlp_in", "down_in")


@dataclasses.dataclass
class CalibrationStats:
    """Float64 statistics; per-layer arrays stacked over layers on axis 0."""

    attn_sum: np.ndarray  # [d, d]: attn[0] + attn[1] + ... in layer order
    mlp_sum: np.ndarray  # [d, d]
    value: np.ndarray  # [L, KV, hd, hd]
    key: np.ndarray  # [L, hd, hd]
    abs_mean: dict[str, np.ndarray]  # site -> [L, channels]: max over windows of mean |x|
    tokens: int  # tokens seen per layer
    attn: np.ndarray | None = None  # [L, d, d], with calibrate(per_layer=True)
    mlp: np.ndarray | None = None  # [L, d, d], with calibrate(per_layer=True)

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {"attn_sum": self.attn_sum, "mlp_sum": self.mlp_sum, "value": self.value, "key": self.key,
               "tokens": np.asarray(self.tokens)}
        out.update({k: v for k, v in (("attn", self.attn), ("mlp", self.mlp)) if v is not None})
        out.update({f"abs_mean.{k}": v for k, v in self.abs_mean.items()})
        return out

    @classmethod
    def from_dict(cls, d) -> "CalibrationStats":
        per_layer = {k: np.asarray(d[k]) for k in ("attn", "mlp") if k in d}
        return cls(attn_sum=np.asarray(d["attn_sum"]), mlp_sum=np.asarray(d["mlp_sum"]),
                   value=np.asarray(d["value"]), key=np.asarray(d["key"]), tokens=int(d["tokens"]),
                   abs_mean={k.split(".", 1)[1]: np.asarray(v) for k, v in d.items() if k.startswith("abs_mean.")},
                   **per_layer)


def _window_stats(sites: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Float64 statistics of one per-device batch of windows ([b, T, ...] site activations)."""
    f64 = lambda a: a.astype(jnp.float64)  # noqa: E731
    x_attn, x_mlp = f64(sites["attn_in"]), f64(sites["mlp_in"])
    v, k = f64(sites["v"]), f64(sites["k_rope"])
    out = {
        "attn": jnp.einsum("bti,btj->ij", x_attn, x_attn, precision=EXACT),
        "mlp": jnp.einsum("bti,btj->ij", x_mlp, x_mlp, precision=EXACT),
        "value": jnp.einsum("btki,btkj->kij", v, v, precision=EXACT),
        "key": jnp.einsum("btki,btkj->ij", k, k, precision=EXACT),
    }
    for name in ABS_SITES:
        a = sites[name]
        a = a.reshape(a.shape[0], a.shape[1], -1)
        out["abs." + name] = jnp.max(jnp.mean(jnp.abs(a.astype(jnp.float32)), axis=1), axis=0).astype(jnp.float64)
    return out


@functools.lru_cache(maxsize=None)
def _sharded_step(graphdef, hooks: SiteHooks, mesh):
    """jit(shard_map(layer forward + statistics)), batch axis split over ``mesh``'s 'data' axis; each device's
    statistics come back on a leading device axis (added on the host in window order, see ``calibrate``)."""

    def step(state, x, rope, positions):
        cos, sin = rope
        y, sites, _ = nnx.merge(graphdef, state)(x, cos, sin, positions, hooks, capture=CAPTURED)
        return y, {k: v[None] for k, v in _window_stats(sites).items()}

    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P(), P()),
                            out_specs=(P("data"), P("data")), check_vma=False)
    return jax.jit(sharded)


def check_window_count(n_windows: int, per_device_batch: int = 1, n_devices: int | None = None) -> None:
    """Raise ValueError unless ``n_windows`` splits evenly over the devices (callers check this before
    loading a model). ``n_devices`` defaults to the job's device count (every process's)."""
    n_dev = jax.device_count() if n_devices is None else n_devices
    step = per_device_batch * n_dev
    if n_windows % step:
        raise ValueError(
            f"{n_windows} calibration windows do not split evenly over {n_dev} device(s) x {per_device_batch} "
            f"windows per device: use a multiple of {step} (e.g. --calib-windows {max(step, n_windows // step * step)})")


def calibrate(model: "Decoder | LayerStreamer", windows: np.ndarray, *, per_device_batch: int = 1,
              hooks: SiteHooks = IDENTITY, devices=None, progress: bool = True,
              per_layer: bool = False) -> CalibrationStats:
    """Stream the calibration windows [N, T] through the model (a Decoder, or a
    ``LayerStreamer.from_weights`` that builds one layer at a time) and collect statistics; the memory
    does not grow with depth beyond the small per-layer arrays (value, key, abs_mean) unless
    ``per_layer`` also keeps every layer's attn / mlp second moments.

    Each step gives every device ``per_device_batch`` windows, so N must be a multiple of
    ``per_device_batch * n_devices`` (no padding: padded windows would bias the statistics).
    """
    windows = np.asarray(windows, dtype=np.int32)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"calibration windows must be [N >= 1, T], got shape {windows.shape}")
    mesh = data_mesh(devices)
    check_window_count(windows.shape[0], per_device_batch, mesh.devices.size)
    step_windows = per_device_batch * mesh.devices.size
    streamer = model if isinstance(model, LayerStreamer) else LayerStreamer(model)
    cfg = streamer.config
    n_layers = cfg.num_layers
    t = windows.shape[1]
    positions, rope = streamer.rope(t)
    steps = windows.shape[0] // step_windows

    def embedded(s):  # step s's windows, embedded on the devices of this process only
        def rows(a, b):
            return streamer.embed(jnp.asarray(windows[s * step_windows + a:s * step_windows + b]))
        return sharded_rows(mesh, (step_windows, t, cfg.hidden_size), rows)

    with jax.enable_x64(True):
        xs = [embedded(s) for s in range(steps)]
        out: dict[str, np.ndarray] = {}  # key -> [L, ...] float64, filled layer by layer
        sums: dict[str, np.ndarray] = {}  # attn, mlp: [d, d] summed over layers
        bar = progress_bar(n_layers * steps, "calibrate") if progress else None
        for i in range(n_layers):
            graphdef, state = streamer.layers[i]
            fn = _sharded_step(graphdef, hooks, mesh)
            acc = None
            for s in range(steps):
                xs[s], st = fn(state, xs[s], rope, positions)
                for dev in _per_device(st):  # in window order: the same additions on any number of devices
                    acc = dev if acc is None else _merge(acc, dev)
                if bar is not None:
                    bar.update(1)
            del graphdef, state
            for k, v in acc.items():
                if k in ("attn", "mlp"):  # summed in layer order, as np.sum(axis=0) of the stacked layers
                    if i == 0:
                        sums[k] = v.copy()
                    else:
                        sums[k] += v
                    if not per_layer:
                        continue
                if k not in out:
                    out[k] = np.empty((n_layers, *v.shape), np.float64)
                out[k][i] = v
        if bar is not None:
            bar.close()
    return CalibrationStats(
        attn_sum=sums["attn"], mlp_sum=sums["mlp"], value=out["value"], key=out["key"],
        abs_mean={name: out["abs." + name] for name in ABS_SITES},
        tokens=int(windows.size), attn=out.get("attn"), mlp=out.get("mlp"),
    )


def _per_device(stats: dict) -> list[dict]:
    """One step's statistics, [n_dev, ...] per key (from every process), -> each device's, in device order."""
    host = {k: gather(v) for k, v in stats.items()}
    return [{k: v[i] for k, v in host.items()} for i in range(len(next(iter(host.values()))))]


def _merge(a, b):
    """float64 sums (maxima for the magnitudes) of two windows' statistics, on the host."""
    return {k: (np.maximum(a[k], b[k]) if k.startswith("abs.") else a[k] + b[k]) for k in a}
