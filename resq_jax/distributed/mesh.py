"""The data mesh over every device of every process, and moving rows in and out of it.

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
