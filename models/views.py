"""Weights mappings computed on access: the vocabulary-table protocol and ``LazyWeights``.

Every stage reads a model through a ``Mapping`` from contract names (models/config.py) to arrays. Such a
mapping may be a dict, a ``models.store.WeightStore`` (tensors read from files on access) or a
``LazyWeights`` view (each entry computed from another mapping on access: norm folding, rotations,
dequantized codes). Stacking views keeps one tensor at a time in memory whatever the model's size.

The two vocabulary tables (``embed`` [vocab, d], ``lm_head`` [d, vocab]) are large (a 7B model's: 2.2 GB
each in float32) and are mostly needed in part: ``vocab_slice(weights, name, index)`` asks a mapping for some
of their entries only (an embedding lookup, a slice of the head), and every store and view answers it
without building the whole table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

# vocabulary entries per slice when a view makes a whole embed / lm_head: its float64 temporaries are
# [VOCAB_SLICE, d] (a 7B model's table in float64 would be 4.4 GB)
VOCAB_SLICE = 8192

# the vocabulary axis of the two vocabulary tables of the naming contract: embed [vocab, d], lm_head [d, vocab]
VOCAB_AXIS = {"embed": 0, "lm_head": 1}


class SpilledTable:
    """A table kept in a ``.npy`` file instead of memory (a packed 7B model's float16 embed and lm_head: 1.1 GB
    each): ``shape`` / ``dtype`` known, ``table[index]`` reads those entries, ``np.asarray(table)`` the whole.
    Each read maps the file and unmaps it after, so the pages read do not stay in the process's memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype = m.shape, m.dtype
        del m

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, index) -> np.ndarray:
        m = np.load(self.path, mmap_mode="r")
        try:
            return np.array(m[index])
        finally:
            del m

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = np.load(self.path)
        return a if dtype is None else a.astype(dtype, copy=False)


def index_vocab(name: str, a, index) -> np.ndarray:
    """``a`` (the whole table ``name``, an array or a ``SpilledTable``) restricted to the vocabulary entries
    ``index``."""
    a = a if isinstance(a, SpilledTable) else np.asarray(a)
    return a[index] if VOCAB_AXIS[name] == 0 else a[:, index]


def vocab_slice(weights: Mapping[str, np.ndarray], name: str, index) -> np.ndarray:
    """``weights[name]`` (``embed`` or ``lm_head``) restricted to the vocabulary entries ``index`` (slice or
    integer array): embed rows [n, d], lm_head columns [d, n]. A store or a lazy view computes only those
    entries (an embedding lookup never reads the whole table; a fused 7B head is made in slices); a plain
    dict is indexed."""
    if name not in VOCAB_AXIS:
        raise KeyError(f"{name} is not a vocabulary table ({', '.join(VOCAB_AXIS)})")
    fn = getattr(weights, "vocab_slice", None)
    return fn(name, index) if fn is not None else index_vocab(name, weights[name], index)


def vocab_dtype(weights: Mapping[str, np.ndarray], name: str) -> np.dtype:
    """The narrowest float dtype that holds every value of the table ``name`` exactly, as far as the mapping
    knows without reading it: a store's stored bfloat16 / float16, float32 for a computed table. Keeping a
    table on the device in that dtype and widening slices of it to float32 gives the float32 values."""
    fn = getattr(weights, "vocab_dtype", None)
    if fn is not None:
        return np.dtype(fn(name))
    dtype = np.dtype(getattr(weights[name], "dtype", np.float32))
    return dtype if dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)) else np.dtype(np.float32)


class LazyWeights(Mapping):
    """A weights mapping computed from ``base`` one entry at a time on access, nothing cached.

    ``entry(key)`` returns the new value of ``key`` or None to pass ``base[key]`` through; ``extra`` lists keys
    the transform adds (after the base's, in order), which ``entry`` must produce. A chain of these views is
    the fused model: reading ``layers.3.q`` runs the float64 products of that one tensor, so the transformed
    model never exists whole in memory (rotation/fusion.py: its eager functions are ``dict(view)``).

    A view that changes a vocabulary table (``embed`` / ``lm_head``) gives ``vocab(name, index)``, the table's
    entries ``index`` (``vocab_slice``): an embedding lookup then computes only the looked-up rows,
    and the whole table is assembled slice by slice (``assemble_vocab``). Row and column slices of these
    float64 products are bit-identical to the whole products (BLAS sums each output over the same k)."""

    def __init__(self, base: Mapping[str, np.ndarray], entry, extra=(), vocab=None, dtypes=None):
        """``dtypes(name)``: the dtype of a vocabulary table the view changes (``vocab_dtype``), None when it
        passes the base's through; by default float32 for every table when ``vocab`` is given."""
        self._base, self._entry, self._vocab = base, entry, vocab
        self._dtypes = dtypes if dtypes is not None else (lambda name: np.float32) if vocab is not None else None
        self._keys = dict.fromkeys([*base, *extra])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(key)
        value = self._entry(key)
        return self._base[key] if value is None else value

    def vocab_slice(self, name: str, index) -> np.ndarray:
        """Entries ``index`` of the vocabulary table ``name`` (``vocab_slice``)."""
        value = None if self._vocab is None else self._vocab(name, index)
        return vocab_slice(self._base, name, index) if value is None else value

    def vocab_dtype(self, name: str) -> np.dtype:
        """``vocab_dtype`` of the table ``name`` of this view."""
        dtype = None if self._dtypes is None else self._dtypes(name)
        return vocab_dtype(self._base, name) if dtype is None else np.dtype(dtype)


def vocab_blocks(vocab, name: str, vocab_size: int, chunk: int = VOCAB_SLICE):
    """Yields (start, block, whole-table shape) for ``vocab(name, slice)`` calls of ``chunk`` entries each."""
    for start in range(0, vocab_size, chunk):
        block = vocab(name, slice(start, min(start + chunk, vocab_size)))
        shape = list(block.shape)
        shape[VOCAB_AXIS[name]] = vocab_size
        yield start, block, tuple(shape)


def assemble_vocab(vocab, name: str, vocab_size: int, chunk: int = VOCAB_SLICE, dtype=np.float32,
                   path: str | Path | None = None) -> np.ndarray | SpilledTable:
    """The whole table ``name`` from ``vocab(name, slice)`` calls of ``chunk`` entries each, in ``dtype``: an
    array, or with ``path`` a ``SpilledTable`` written there slice by slice (one slice in memory)."""
    out = None
    for start, block, shape in vocab_blocks(vocab, name, vocab_size, chunk):
        index = slice(start, start + block.shape[VOCAB_AXIS[name]])
        index = (index,) if VOCAB_AXIS[name] == 0 else (slice(None), index)
        if path is None:
            out = np.empty(shape, dtype) if out is None else out
            out[index] = block
            continue
        if out is None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        else:
            out = np.load(path, mmap_mode="r+")
        out[index] = block
        out.flush()
        out = True  # unmapped after each slice: the written pages leave the process's memory
    return out if path is None else SpilledTable(path)


def overlaid(base: Mapping[str, np.ndarray], overlay: Mapping[str, np.ndarray]) -> LazyWeights:
    """``base`` with the entries of ``overlay`` (arrays in memory) replacing or added to its own, as a view;
    ``overlay`` is read on each access, so a caller may update it (GPTQ's current layer)."""
    return LazyWeights(base, overlay.get, extra=[k for k in overlay if k not in base],
                       vocab=lambda name, index: index_vocab(name, overlay[name], index) if name in overlay else None,
                       dtypes=lambda name: vocab_dtype(overlay, name) if name in overlay else None)
