"""The data mesh over every device of every process, and moving rows in and out of it; the model mesh of one
process's devices, over which ``--shard-weights`` splits a layer's weights.

Convention: a global batch [B, ...] is split over the mesh's 'data' axis in device order (the devices of
process 0 first), so device k of the mesh holds rows [k * B / n, (k + 1) * B / n). Every process knows the
whole input (the windows are drawn from the same seed), builds only the rows of its own devices, and gets
replicated results (``np.asarray`` works on them) or, through ``gather``, every device's block in order.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), ("data",))


def sharded_rows(mesh: Mesh, shape: tuple[int, ...], make_rows: Callable[[int, int], np.ndarray]) -> jax.Array:
    """A global array of ``shape`` split on axis 0 over ``mesh``; ``make_rows(start, stop)`` builds rows
    [start, stop) and is called only for the blocks of this process's devices."""
    def block(index):
        rows = index[0]
        return make_rows(rows.start or 0, shape[0] if rows.stop is None else rows.stop)

    return jax.make_array_from_callback(shape, NamedSharding(mesh, P("data")), block)


def gather(x: jax.Array) -> np.ndarray:
    """A global array split on axis 0 -> the whole array as NumPy in every process (device order)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_host(local: np.ndarray) -> np.ndarray:
    """Each process's NumPy block [n_p, ...] (the same shape in every process) -> [sum n_p, ...], in process
    order, in every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def model_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'model' over ``devices`` (default: this process's devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.asarray(devices), ("model",))


def model_axis_spec(shape: tuple[int, ...], size: int) -> P:
    """How ``shard_weights`` places an array of ``shape`` on a model mesh of ``size`` devices: split along its last
    (output) axis when it has two or more axes and that axis divides evenly, else replicated."""
    if len(shape) >= 2 and shape[-1] % size == 0:
        return P(*([None] * (len(shape) - 1)), "model")
    return P()


def shard_weights(tree, mesh: Mesh):
    """A pytree of weights placed on ``mesh`` (``model_axis_spec`` per array): each device holds 1/size of every
    matrix, and XLA's partitioner inserts the collectives of a jitted computation on them."""
    size = mesh.shape["model"]
    return jax.device_put(tree, jax.tree.map(lambda a: NamedSharding(mesh, model_axis_spec(np.shape(a), size)), tree))


def replicate(tree, mesh: Mesh):
    """A pytree of arrays copied to every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
